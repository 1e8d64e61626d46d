"""Running a command whose ranks must all stop when it takes too long (tests of launched scripts)."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass


@dataclass
class Finished:
    """What a command left: its exit status and the output it wrote."""

    returncode: int
    stdout: str
    stderr: str

    def tail(self) -> str:
        """The ends of both streams, for a failure message."""
        return f"{self.stdout[-4000:]}\n{self.stderr[-8000:]}"


def run_in_own_session(command: list[str], *, cwd, env: dict, timeout: float, what: str) -> Finished:
    """Run `command` in its own session; past `timeout` seconds kill the whole session (a launcher
    and every rank it started) and raise TimeoutError with the output so far."""
    pipe = subprocess.PIPE
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        output = Finished(proc.returncode, stdout, stderr).tail()
        raise TimeoutError(f"{what} did not finish in {timeout} s:\n{output}") from None
    return Finished(proc.returncode, stdout, stderr)

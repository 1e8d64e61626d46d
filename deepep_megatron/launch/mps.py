"""The MPS control daemon that lets several rank processes share one GPU at once."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from deepep_megatron.mps import candidate_pipe_directories

MPS_CONTROL = "nvidia-cuda-mps-control"


class MpsUnavailableError(RuntimeError):
    """The MPS control binary is missing or the daemon did not come up."""


@dataclass
class MpsDaemon:
    """An MPS control daemon: one this process started (`started`), or an existing one it reuses.

    `env` holds the variables CUDA clients need to find it; `stop()` shuts down a daemon that
    was started here (and removes its directory) and does nothing for a reused one. Usable as a
    context manager.
    """

    pipe_dir: str
    log_dir: str | None
    started: bool
    owned_dir: str | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def env(self) -> dict[str, str]:
        env = {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir}
        if self.log_dir:
            env["CUDA_MPS_LOG_DIRECTORY"] = self.log_dir
        return env

    def export(self) -> None:
        """Put `env` into this process's environment (inherited by children started later)."""
        os.environ.update(self.env)

    def stop(self) -> None:
        if self._stopped or not self.started:
            return
        self._stopped = True
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [MPS_CONTROL],
                input="quit\n",
                text=True,
                env={**os.environ, **self.env},
                capture_output=True,
                timeout=30,
                check=False,
            )
        if self.owned_dir:
            # The daemon removes its pipes as it exits; give it a moment before deleting.
            deadline = time.monotonic() + 5
            while os.path.exists(os.path.join(self.pipe_dir, "control")) and time.monotonic() < deadline:
                time.sleep(0.1)
            shutil.rmtree(self.owned_dir, ignore_errors=True)

    def __enter__(self) -> MpsDaemon:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _mps_daemon_answers(pipe_dir: str) -> bool:
    """Whether an MPS control daemon listens on `pipe_dir` (a stale pipe does not count)."""
    if not os.path.exists(os.path.join(pipe_dir, "control")):
        return False
    try:
        result = subprocess.run(
            [MPS_CONTROL],
            input="get_server_list\n",
            text=True,
            capture_output=True,
            timeout=10,
            env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": pipe_dir},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def start_mps_daemon(base_dir: str | None = None, timeout: float = 30.0) -> MpsDaemon:
    """Start an MPS control daemon, or reuse one that is already running.

    An existing daemon is looked for at `$CUDA_MPS_PIPE_DIRECTORY` (if set) and at the default
    `/tmp/nvidia-mps`. Otherwise `nvidia-cuda-mps-control -d` is started with its pipe and log
    directories in a fresh temporary directory (under `base_dir` if given), which `stop()` removes.
    Nothing about the GPU's settings is changed.

    Call `daemon.export()` (or pass `daemon.env` to children) before any CUDA context is created.

    Raises:
        MpsUnavailableError: the binary is not on PATH, or the daemon did not answer in `timeout`.
    """
    candidates = candidate_pipe_directories()
    if shutil.which(MPS_CONTROL) is None:
        raise MpsUnavailableError(f"{MPS_CONTROL} is not on PATH")
    for pipe_dir in candidates:
        if _mps_daemon_answers(pipe_dir):
            return MpsDaemon(pipe_dir, os.environ.get("CUDA_MPS_LOG_DIRECTORY"), started=False)

    owned = tempfile.mkdtemp(prefix="deepep_megatron_mps_", dir=base_dir)
    pipe_dir, log_dir = os.path.join(owned, "pipe"), os.path.join(owned, "log")
    os.makedirs(pipe_dir)
    os.makedirs(log_dir)
    daemon = MpsDaemon(pipe_dir, log_dir, started=True, owned_dir=owned)
    try:
        subprocess.run(
            [MPS_CONTROL, "-d"],
            env={**os.environ, **daemon.env},
            check=True,
            timeout=timeout,
            capture_output=True,
        )
        deadline = time.monotonic() + timeout
        while not _mps_daemon_answers(pipe_dir):
            if time.monotonic() > deadline:
                raise MpsUnavailableError(
                    f"the MPS daemon did not answer within {timeout:.0f} s (logs: {log_dir})"
                )
            time.sleep(0.2)
    except (OSError, subprocess.SubprocessError) as error:
        daemon.stop()
        raise MpsUnavailableError(f"could not start the MPS daemon: {error}") from error
    except BaseException:
        daemon.stop()
        raise
    return daemon

"""Start N ranks, watch them, stop them all when one fails, and say why it failed."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

from deepep_megatron.launch.mps import MpsUnavailableError, start_mps_daemon
from deepep_megatron.launch.placement import SHARE_GPU_ENV, plan_placement
from deepep_megatron.launch.rank import free_port


def _set_parent_death_signal() -> None:  # pragma: no cover - runs in the child before exec
    """Kill the rank if the launcher dies without cleaning up (Linux only; best effort)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _log(message: str) -> None:
    print(f"[launch] {message}", file=sys.stderr, flush=True)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def launch(
    command: list[str],
    nproc: int,
    share_gpu: str = "auto",
    master_port: int | None = None,
    grace_s: float = 5.0,
    num_gpus: int | None = None,
) -> int:
    """Run `command` (an argv list) as `nproc` ranks; return the exit code (see module doc)."""
    placement = plan_placement(nproc, share_gpu, num_gpus)
    port = master_port or free_port()
    base_env = dict(os.environ)
    base_env.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
        }
    )
    base_env.setdefault("OMP_NUM_THREADS", "1")
    base_env.pop(SHARE_GPU_ENV, None)
    daemon = None
    if placement.share_gpu:
        base_env[SHARE_GPU_ENV] = "1"
        try:
            daemon = start_mps_daemon()
            base_env.update(daemon.env)
            _log(("started" if daemon.started else "reusing") + f" MPS daemon (pipes in {daemon.pipe_dir})")
        except MpsUnavailableError as error:
            _log(f"warning: no MPS ({error}); the {nproc} ranks will time-slice GPU 0")
    where = {"cpu": "CPU", "cuda": "GPU 0 (shared)" if placement.share_gpu else "one GPU per rank"}[
        placement.device
    ]
    _log(f"{nproc} rank(s) on {where}, process group backend {placement.dist_backend}, port {port}")

    procs: list[subprocess.Popen] = []
    outputs: list[RankErrorOutput] = []
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc, signum)

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(nproc):
            env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
            procs.append(
                subprocess.Popen(
                    command,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_set_parent_death_signal,
                    stderr=subprocess.PIPE,
                    text=True,
                    errors="replace",
                )
            )
            outputs.append(RankErrorOutput(procs[-1]))
        return _supervise(procs, received, grace_s, outputs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if daemon is not None:
            daemon.stop()


# The last line of a Python traceback ("ValueError: ...", "torch.distributed.DistBackendError: ..."),
# after the "[rank1]: " prefix torch.distributed puts on the lines of an uncaught exception.
_EXCEPTION_LINE = re.compile(
    r"^(?:\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Timeout\w*)\b.*)"
)


class RankErrorOutput:
    """Forwards one rank's stderr line by line and remembers the last exception line in it, so
    the launcher can name the cause of a failure after the other ranks' noise."""

    def __init__(self, proc: subprocess.Popen, keep_lines: int = 200):
        self._lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._thread = threading.Thread(target=self._forward, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _forward(self, stream) -> None:
        for line in iter(stream.readline, ""):
            sys.stderr.write(line)
            sys.stderr.flush()
            self._lines.append(line.rstrip("\n"))
        stream.close()

    def cause(self) -> str | None:
        """The last exception line the rank printed, or None."""
        self._thread.join(timeout=5)
        for line in reversed(self._lines):
            match = _EXCEPTION_LINE.match(line.strip())
            if match:
                return match.group(1)
        return None


def _supervise(
    procs: list[subprocess.Popen], received: list[int], grace_s: float, outputs: list[RankErrorOutput]
) -> int:
    failure: tuple[int, int] | None = None  # (rank, exit code) of the first failure
    stop_deadline = None
    while True:
        running = False
        for rank, proc in enumerate(procs):
            code = proc.poll()
            if code is None:
                running = True
            elif code != 0 and failure is None and not received:
                failure = (rank, _exit_code(code))
                _log(f"rank {rank} failed with exit code {failure[1]}; stopping the other ranks")
                for other in procs:
                    if other.poll() is None:
                        _signal_group(other, signal.SIGTERM)
                stop_deadline = time.monotonic() + grace_s
        if received and stop_deadline is None:
            stop_deadline = time.monotonic() + grace_s
        if not running:
            break
        if stop_deadline is not None and time.monotonic() > stop_deadline:
            for proc in procs:
                if proc.poll() is None:
                    _signal_group(proc, signal.SIGKILL)
            stop_deadline = float("inf")
        time.sleep(0.05)
    if failure is not None:
        # Repeat the cause last: the other ranks' tracebacks (peers gone) usually bury it.
        cause = outputs[failure[0]].cause() if outputs else None
        _log(f"rank {failure[0]} failed with exit code {failure[1]}" + (f": {cause}" if cause else ""))
        return failure[1]
    if received:
        codes = [_exit_code(p.returncode) for p in procs if p.returncode != 0]
        _log(f"interrupted by signal {received[0]}")
        return codes[0] if codes else 128 + received[0]
    return 0

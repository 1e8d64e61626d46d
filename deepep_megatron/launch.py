"""A torchrun-like launcher for expert-parallel development on one workstation.

    python -m deepep_megatron.launch --nproc N [--share-gpu auto|yes|no] script.py args...
    python -m deepep_megatron.launch --nproc N -m package.module args...

Placement (`plan_placement`):

- no CUDA: N CPU ranks, gloo;
- CUDA with one visible GPU and N > 1 (or `--share-gpu yes`): all N ranks on GPU 0 under an MPS
  daemon (started in a temporary directory the launcher owns, or an existing one reused), with
  `DEEPEP_MEGATRON_SHARE_GPU=1` so that code bootstraps with gloo (NCCL refuses two ranks on one
  GPU);
- CUDA with at least N GPUs: one rank per GPU (`LOCAL_RANK`), NCCL allowed.

Every rank gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1` and
`MASTER_PORT` (a free port), and `OMP_NUM_THREADS=1` unless it is set. The launcher exits with the
first non-zero exit code of any rank (128 + signal for a rank killed by a signal), stops the other
ranks when one fails, says which rank failed, and forwards SIGINT / SIGTERM to all ranks.

It never changes GPU settings (compute mode, clocks, MIG): MPS runs as an ordinary user daemon.
Scripts call `init_distributed()` to join the process group.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

SHARE_GPU_ENV = "DEEPEP_MEGATRON_SHARE_GPU"
MPS_CONTROL = "nvidia-cuda-mps-control"
DEFAULT_MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"

__all__ = [
    "MpsDaemon",
    "MpsUnavailableError",
    "Placement",
    "free_port",
    "init_distributed",
    "launch",
    "main",
    "plan_placement",
    "start_mps_daemon",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class Placement:
    """Where N ranks run and how they talk.

    Attributes:
        device: "cpu" or "cuda".
        share_gpu: all ranks on GPU 0 (under MPS when available); bootstrap with gloo.
        dist_backend: "gloo" or "nccl", the process-group backend ranks should use.
        num_gpus: visible GPUs.
    """

    device: str
    share_gpu: bool
    dist_backend: str
    num_gpus: int

    def gpu_of(self, local_rank: int) -> int | None:
        if self.device != "cuda":
            return None
        return 0 if self.share_gpu else local_rank % self.num_gpus


def _visible_gpus() -> int:
    """Visible CUDA devices, without creating a CUDA context in this process."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_placement(nproc: int, share_gpu: str = "auto", num_gpus: int | None = None) -> Placement:
    """Decide the placement of `nproc` ranks.

    Args:
        nproc: number of ranks (>= 1).
        share_gpu: "auto" (share GPU 0 when there is one GPU and several ranks), "yes" (always put
            every rank on GPU 0) or "no" (one rank per GPU; an error if there are too few).
        num_gpus: visible GPUs; default: ask torch (0 without CUDA).

    Raises:
        ValueError: for an impossible request (more ranks than GPUs with "no", "yes" without CUDA).
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if share_gpu not in ("auto", "yes", "no"):
        raise ValueError(f"--share-gpu must be auto, yes or no, got {share_gpu!r}")
    if num_gpus is None:
        num_gpus = _visible_gpus()
    if num_gpus == 0:
        if share_gpu == "yes":
            raise ValueError("--share-gpu yes needs a CUDA GPU, and none is visible")
        return Placement("cpu", False, "gloo", 0)
    if share_gpu == "yes" or (share_gpu == "auto" and num_gpus == 1 and nproc > 1):
        return Placement("cuda", True, "gloo", num_gpus)
    if nproc > num_gpus:
        raise ValueError(
            f"{nproc} ranks need {nproc} GPUs for one rank per GPU, but {num_gpus} are visible; "
            "use --share-gpu yes to put all ranks on GPU 0"
        )
    return Placement("cuda", False, "nccl", num_gpus)


# ---------------------------------------------------------------------------------------------- MPS
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
    candidates = [os.environ.get("CUDA_MPS_PIPE_DIRECTORY"), DEFAULT_MPS_PIPE_DIRECTORY]
    if shutil.which(MPS_CONTROL) is None:
        raise MpsUnavailableError(f"{MPS_CONTROL} is not on PATH")
    for pipe_dir in candidates:
        if pipe_dir and _mps_daemon_answers(pipe_dir):
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


# ------------------------------------------------------------------------------- inside a rank
def init_distributed(backend: str | None = None, timeout_s: float | None = None):
    """Join the process group described by the launcher's environment variables.

    Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` and
    `DEEPEP_MEGATRON_SHARE_GPU` (defaults: a single rank on a free local port). With CUDA, sets the
    current device (GPU 0 when ranks share a GPU, else `LOCAL_RANK`). The backend is gloo when
    ranks share a GPU or there is no CUDA, else NCCL, unless `backend` says otherwise.

    Returns:
        `(rank, world_size, device)`.
    """
    import datetime

    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if "MASTER_PORT" not in os.environ:
        if world_size != 1:
            raise RuntimeError(
                "MASTER_PORT is not set: start the ranks with python -m deepep_megatron.launch"
            )
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

    if torch.cuda.is_available():
        num_gpus = torch.cuda.device_count()
        share = os.environ.get(SHARE_GPU_ENV) == "1" or local_world_size > num_gpus
        device = torch.device("cuda", 0 if share else local_rank % num_gpus)
        torch.cuda.set_device(device)
        default_backend = "gloo" if share else "nccl"
    else:
        device = torch.device("cpu")
        default_backend = "gloo"
    if not dist.is_initialized():
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(
            backend or default_backend, rank=rank, world_size=world_size, init_method="env://", **kwargs
        )
    return rank, world_size, device


# ------------------------------------------------------------------------------------- launching
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
                    command, env=env, start_new_session=True, preexec_fn=_set_parent_death_signal
                )
            )
        return _supervise(procs, received, grace_s)
    finally:
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if daemon is not None:
            daemon.stop()


def _supervise(procs: list[subprocess.Popen], received: list[int], grace_s: float) -> int:
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
        return failure[1]
    if received:
        codes = [_exit_code(p.returncode) for p in procs if p.returncode != 0]
        _log(f"interrupted by signal {received[0]}")
        return codes[0] if codes else 128 + received[0]
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepep_megatron.launch",
        description="Start N ranks of a script on this machine: CPU ranks, all ranks on one GPU under MPS, "
        "or one rank per GPU.",
    )
    parser.add_argument(
        "--nproc", "--nproc-per-node", type=int, default=1, help="number of ranks (default 1)"
    )
    parser.add_argument(
        "--share-gpu",
        choices=("auto", "yes", "no"),
        default="auto",
        help="put all ranks on GPU 0 under MPS (auto: when one GPU is visible and N > 1)",
    )
    parser.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds between SIGTERM and SIGKILL when stopping ranks (default 5)",
    )
    parser.add_argument("-m", "--module", action="store_true", help="run `script` as a module (python -m)")
    parser.add_argument("script", help="the script (or module with -m) each rank runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    args = parser.parse_args(argv)
    command = [sys.executable, "-u"] + (["-m", args.script] if args.module else [args.script]) + args.args
    try:
        return launch(command, args.nproc, args.share_gpu, args.master_port, args.grace)
    except ValueError as error:
        parser.error(str(error))
    return 2  # unreachable: parser.error exits


if __name__ == "__main__":
    sys.exit(main())

"""One training stage, every GPU the job was granted: ``tvt stage`` re-executes itself under
``accelerate launch``.

The registry's command stays ``tvt stage NAME --config FILE`` for Snakemake, DVC and a
SLURM job alike (no launcher in ``dvc.yaml``, no per-cluster rule): a stage that trains
with the :class:`~tvt.training.engine.Trainer` counts the processes it should run — one per
visible GPU, or ``$TVT_NUM_PROCESSES`` — and when that is more than one, runs the same
command again under ``accelerate launch``, which starts one process per GPU (torchrun).
The relaunched processes see the launcher's rank variables and train; the parent only
waits, forwards termination signals (SLURM preemption, ``scancel``) and returns their exit
status. It opens no MLflow run: rank 0 of the launched processes does
(:func:`tvt.tracking.stage_run`).

Two guarantees for every stage process: it dies with its parent (:func:`die_with_parent`: a
killed Snakemake or job shell leaves no orphan trainer behind), and one stage instance runs at
a time (:func:`exclusive`: a second one refuses to start, naming the first).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

#: overrides the number of processes (e.g. 2 CPU processes in tests, or fewer GPUs than granted)
NUM_PROCESSES_ENV = "TVT_NUM_PROCESSES"
#: the Trainer's source: a stage declared `trains` has it among its (import-graph) code files
ENGINE_SOURCE = "tvt/training/engine.py"
#: set in every process a launcher starts: torchrun (and so multi-process ``accelerate launch``),
#: MPI, and ``ACCELERATE_DYNAMO_MODE`` for a single-process ``accelerate launch``. Not every
#: ``ACCELERATE_*``: users set e.g. ``ACCELERATE_MIXED_PRECISION`` or ``ACCELERATE_LOG_LEVEL`` as
#: plain configuration, which must not silently switch the relaunch off.
LAUNCHER_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
                "ACCELERATE_DYNAMO_MODE")
#: what the parent passes on to the launcher, which passes it on to every rank
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


log = logging.getLogger(__name__)
#: prctl(2) option: the signal this process gets when its parent dies (Linux)
PR_SET_PDEATHSIG = 1
#: how often the fallback watcher checks whether the parent is still there
PARENT_POLL_S = 1.0


class LaunchError(RuntimeError):
    """The training processes could not be started or failed; ``returncode`` is the stage's exit status."""

    def __init__(self, message: str, returncode: int = 1):
        super().__init__(message)
        self.returncode = returncode


def uses_trainer(stage) -> bool:
    """Whether a registry :class:`~tvt.stages.Stage` trains with the Trainer (and can use several GPUs)."""
    return stage.trains


def inside_distributed_launch(env: Mapping[str, str]) -> bool:
    """Whether this process was started by a launcher (it must train, not launch again)."""
    return any(env.get(name) for name in LAUNCHER_ENV)


def wanted_processes(env: Mapping[str, str], cuda_count: int) -> int:
    """How many data-parallel processes to run: ``$TVT_NUM_PROCESSES``, else one per GPU this
    job may use, else 1.

    ``cuda_count`` is ``torch.cuda.device_count()``, which honours ``CUDA_VISIBLE_DEVICES``
    (set by SLURM to the granted GPUs); ``SLURM_GPUS_ON_NODE`` caps it where a node does not
    hide the GPUs that were not granted.
    """
    override = env.get(NUM_PROCESSES_ENV, "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            raise LaunchError(f"{NUM_PROCESSES_ENV}={override!r}: expected a whole number of processes >= 1", 2)
        wanted = int(override)
        if 0 < cuda_count < wanted:
            raise LaunchError(f"{NUM_PROCESSES_ENV}={wanted} but only {cuda_count} GPU(s) are visible: one process "
                              "per GPU (set CUDA_VISIBLE_DEVICES= to run the processes on CPU)", 2)
        return wanted
    granted = env.get("SLURM_GPUS_ON_NODE", "")
    if granted.isdigit():
        cuda_count = min(cuda_count, int(granted))
    return max(cuda_count, 1)


def accelerate_command(num_processes: int, tvt_args: Sequence[str], *, threads_per_process: int = 1,
                       python: str = sys.executable) -> list[str]:
    """``accelerate launch`` of ``python -m tvt <tvt_args>`` on ``num_processes`` processes of one node.

    A free rendezvous port (``--main_process_port 0``): two jobs that share a node must not
    collide on accelerate's default 29500. Mixed precision is the stage's own setting
    (``mixed_precision`` in its config section, given to ``Accelerator``, which wins over the
    launcher's ``no``); dynamo stays off, as in a single-process run.
    """
    if num_processes < 2:
        raise ValueError(f"accelerate launch is for 2 or more processes, not {num_processes}")
    return [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(threads_per_process),
            "--module", "tvt", *tvt_args]


def launch_environment(env: Mapping[str, str], *, use_cpu: bool) -> dict[str, str]:
    """The launcher's environment. On CPU, accelerate forms a multi-process (gloo) group only
    when told to use the CPU; ``--multi_gpu`` then just means "start N processes" (torchrun)."""
    return {**env, **({"ACCELERATE_USE_CPU": "true"} if use_cpu else {})}


class StageBusyError(RuntimeError):
    """Another process holds the stage's lock; the message names it (PID, host, since when)."""


def _set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def die_with_parent() -> None:
    """End this process (SIGTERM: a training stage checkpoints on the way out) when its parent dies.

    Linux's ``PR_SET_PDEATHSIG`` where available, and a watcher thread everywhere: the parent is
    gone when this process is re-parented. A parent that died before this call is caught too.
    """
    parent = os.getppid()
    _set_parent_death_signal()

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="tvt-parent-watch", daemon=True).start()


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe_holder(info: Mapping) -> str:
    return f"PID {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}"


@contextlib.contextmanager
def exclusive(lock_file: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` while the block runs; raise :class:`StageBusyError`
    naming the holder when another process has it.

    ``flock`` locks die with their process, so a lock file left by a killed or crashed process is
    free: it is taken over (and said so), never a reason to refuse. The file records who holds it.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise StageBusyError(f"{what} is already running: {_describe_holder(_holder(lock_file))} "
                                 f"(lock {lock_file})") from None
        previous = _holder(lock_file)
        if previous:
            log.warning("%s: taking over the lock of a process that is gone (%s)", what, _describe_holder(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: the next holder has nothing to take over
    finally:
        os.close(fd)


def run_forwarding_signals(cmd: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``cmd``, passing SIGTERM/SIGINT on to it, and return its exit status (128 + signal
    when it or this process was stopped by one, the shell's convention that SLURM and
    Snakemake read as "killed").

    The launcher (torchrun) relays a signal to every rank and waits for them; a signal that
    reaches it twice (SLURM signals every process of the job, and the parent forwards) is
    harmless.
    """
    child = subprocess.Popen(list(cmd), env=dict(env), preexec_fn=_set_parent_death_signal)  # noqa: PLW1509
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code < 0:
        return 128 - code
    if code and received:
        return 128 + received[0]
    return code


def relaunch(tvt_args: Sequence[str], num_processes: int, *, use_cpu: bool) -> None:
    """Run ``tvt <tvt_args>`` on ``num_processes`` processes; raise :class:`LaunchError` if they fail."""
    threads = max(1, len(os.sched_getaffinity(0)) // num_processes)  # the job's cores, shared out
    cmd = accelerate_command(num_processes, tvt_args, threads_per_process=threads)
    code = run_forwarding_signals(cmd, launch_environment(os.environ, use_cpu=use_cpu))
    if code:
        raise LaunchError(f"`tvt {' '.join(tvt_args)}` on {num_processes} {'CPU' if use_cpu else 'GPU'} "
                          f"processes failed (exit status {code}); the ranks' errors are above", code)

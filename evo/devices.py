"""The device a verification runs on, seen from the orchestrator without a CUDA context:
which GPU, its architecture, the sandbox environment and limits, cached ceilings."""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from evo import cores, nvml, storage
from evo.sandbox import wire
from evo.sandbox_runner import Limits

GPU_FLUSH_BYTES = 256 << 20  # over four times an H100/H200 L2
# What a sandbox may write to disk by default: far beyond a build's needs (a CUDA extension's
# objects take megabytes, a precompiled torch header hundreds), far below what a disk can lose
# to one candidate beside the others' builds.
DISK_LIMIT_BYTES = 8 << 30
DISK_LIMIT_FLOOR_BYTES = 1 << 30
TASK_LIMIT = 4096


def cpu_flush_bytes() -> int:
    """Twice the largest CPU cache, at least 8 MiB: enough to evict it, cheap enough per call."""
    largest = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size_file.read_text().strip().upper()
            largest = max(largest, int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0))
        except (OSError, ValueError):
            continue
    return max(8 << 20, 2 * largest)
# Environment variables a sandbox keeps; everything else (API keys included) is dropped.
PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "CUDA_HOME", "CUDA_PATH", "LD_LIBRARY_PATH", "CC", "CXX",
                  "MAX_JOBS")


class DeviceError(Exception):
    """The requested device cannot be used; the message says what to pass instead."""


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    visible: str  # CUDA_VISIBLE_DEVICES for the sandboxes ("" on cpu)
    name: str  # the GPU's or CPU's name
    arch: str  # compute capability such as "9.0"; "" on cpu

    @property
    def torch_name(self) -> str:
        return "cuda:0" if self.kind == "cuda" else "cpu"

    @property
    def arch_tag(self) -> str:
        return f"sm{self.arch.replace('.', '')}" if self.arch else "cpu"

    @property
    def lock_name(self) -> str:
        return f"gpu{self.visible}" if self.kind == "cuda" else "cpu"

    @property
    def max_window(self) -> int:
        """Calls per timed window. On a CPU, a flush inside the window competes with the
        candidate's own threads for the same cores, so each call gets a window of its own."""
        return 32 if self.kind == "cuda" else 1

    @property
    def flush_bytes(self) -> int:
        return GPU_FLUSH_BYTES if self.kind == "cuda" else cpu_flush_bytes()

    def cache_bytes(self, facts: dict) -> int:
        """Bytes of output that may still sit in the last-level cache when a call ends."""
        return int(facts.get("l2_bytes") or 0) if self.kind == "cuda" else 0


_gpus_seen: list[tuple[str, str, str]] = []  # the first successful answer; GPUs do not come and go
_gpus_lock = threading.Lock()
NVIDIA_SMI_TRIES = 3


def list_gpus() -> list[tuple[str, str, str]]:
    """(index, name, compute capability) of each GPU that nvidia-smi sees. A loaded machine can
    make nvidia-smi fail or stall once, which must not turn a GPU run into "no GPU"."""
    if not shutil.which("nvidia-smi"):
        return []
    with _gpus_lock:
        for _ in range(NVIDIA_SMI_TRIES):
            if _gpus_seen:
                break
            _gpus_seen.extend(query_gpus())
        return list(_gpus_seen)


def query_gpus() -> list[tuple[str, str, str]]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [tuple(part.strip() for part in line.split(",")) for line in out.stdout.strip().splitlines() if line]


def usable_gpus() -> list[str]:
    """The GPUs evo may use, as nvidia-smi indices: those CUDA_VISIBLE_DEVICES names where it is
    set (nvidia-smi itself ignores it), else every GPU; "cuda:N" is the N-th of them."""
    parent_visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return parent_visible or [index for index, _, _ in list_gpus()]


def resolve(requested: str | None) -> Device:
    gpus = list_gpus()
    if requested in (None, "cuda") or (requested or "").startswith("cuda:"):
        if not gpus:
            if requested is None:
                return Device(kind="cpu", visible="", name=platform.processor() or platform.machine(), arch="")
            raise DeviceError(f"--device {requested} was asked for but no NVIDIA GPU is visible (nvidia-smi found none); "
                              "use --device cpu to verify C++ candidates on the CPU")
        ordinal = int(requested.split(":")[1]) if requested and ":" in requested else 0
        choices = usable_gpus()
        if ordinal >= len(choices):
            raise DeviceError(f"--device {requested} names GPU {ordinal}, but only {len(choices)} are visible")
        physical = choices[ordinal]
        match = next((gpu for gpu in gpus if gpu[0] == physical), gpus[0])
        return Device(kind="cuda", visible=physical, name=match[1], arch=match[2])
    if requested == "cpu":
        return Device(kind="cpu", visible="", name=platform.processor() or platform.machine(), arch="")
    raise DeviceError(f"--device {requested!r} is not a device; use cuda, cuda:N or cpu")


class DeviceLoad:
    """Evaluations handed to each device and not finished yet. A new one goes to the device with
    the fewest, so that a device whose evaluations run long does not gather a queue while
    another idles (round robin would)."""

    def __init__(self, names: list[str]):
        self.counts = dict.fromkeys(names, 0)
        self.lock = threading.Lock()

    def take(self) -> str:
        with self.lock:
            name = min(self.counts, key=self.counts.__getitem__)  # ties go to the first listed
            self.counts[name] += 1
            return name

    def done(self, name: str) -> None:
        with self.lock:
            self.counts[name] -= 1


def limits(policy, device: Device) -> Limits:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    memory = policy.memory_limit_bytes or int(total * 0.75)
    # A CUDA process reserves far more address space than it uses, so RLIMIT_AS only fits the CPU.
    address_space = memory + (4 << 30) if device.kind == "cpu" else None
    disk = policy.disk_limit_bytes or min(DISK_LIMIT_BYTES, max(DISK_LIMIT_FLOOR_BYTES,
                                                                (storage.free_bytes(tempfile.gettempdir()) or 0) // 8))
    return Limits(memory_bytes=memory, address_space_bytes=address_space, disk_bytes=disk, tasks=task_limit(policy))


def task_limit(policy) -> int:
    """A sandbox's processes and threads: an honest one runs a few hundred at most (a thread per
    core, a build's compilers), and a fork bomb stopped here leaves most process IDs to the rest."""
    if policy.task_limit:
        return policy.task_limit
    try:
        process_ids = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        process_ids = 32768  # the kernel's default
    return min(TASK_LIMIT, process_ids // 8)


def sandbox_env(home: Path, device: Device, extra: dict[str, str]) -> dict[str, str]:
    env = {key: os.environ[key] for key in PASSED_THROUGH if key in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(HOME=str(home), TMPDIR=str(home), PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES=device.visible, TRITON_CACHE_DIR=str(home / "triton"),
               TORCHINDUCTOR_CACHE_DIR=str(home / "inductor"), CUPY_CACHE_DIR=str(home / "cupy"),
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               # Workers spinning after a parallel region would take the cores the parent's clock needs.
               OMP_WAIT_POLICY="PASSIVE",
               # Keep freed host memory in the process: otherwise each window pays page faults in
               # proportion to what the previous one freed, which differs between the subjects.
               # No mmap'd blocks (they come back as fresh zero pages), and every allocation filled
               # with a known byte, so host memory a candidate never wrote shows as unwritten.
               MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40), MALLOC_PERTURB_=str(wire.HOST_POISON_BYTE ^ 0xFF))
    if device.arch:
        env["TORCH_CUDA_ARCH_LIST"] = device.arch
    env.update(extra)
    return env


# Compiler jobs per build: a load_inline extension has two translation units, compiled side by side.
BUILD_JOBS = 2
# The memory one build of torch's headers may take at its peak.
BUILD_MEMORY_BYTES = 3 << 30


def parallel_builds(device_kind: str) -> int:
    """How many builds this machine runs at once without oversubscribing its cores or memory: one
    per core that builds may use (not those kept for timing), since a build keeps about one core
    busy: its binding unit (torch's headers) takes most of its time, its CUDA unit a second or two
    beside it (eight builds at once on the H200's 16 cores kept 8.6 busy)."""
    kept = cores.split(device_kind)
    usable = len(kept[1]) if kept else len(os.sched_getaffinity(0))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(usable, memory // BUILD_MEMORY_BYTES))


# Evaluations holding candidate processes at once on one device: enough to keep it busy. More
# only add processes starting and ending beside the timed one, which slows every turn: NVRTC
# turns on the H200 took 0.62 s with 4, 0.66 s with 6, 0.75 s with 8 and 1.14 s with 14, and
# with 4 the device waited between turns for under 10 ms.
EVALUATIONS_AT_DEVICE = 4


def evaluations_at_device(device_kind: str, devices_in_use: int = 1) -> int:
    """How many evaluations hold candidate processes at once on each device (the others build
    or wait), where `devices_in_use` devices share this machine's cores."""
    per_device = min(parallel_builds(device_kind), len(os.sched_getaffinity(0)) // 2) // devices_in_use
    return max(2, min(EVALUATIONS_AT_DEVICE, per_device))


def cache_dir(create: bool = True) -> Path:
    root = Path(os.environ.get("EVO_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "evo")
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


def driver_version() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment(device: Device, facts: dict) -> dict:
    from evo import __version__

    env = {"gpu": facts.get("gpu") if device.kind == "cuda" else None, "driver": driver_version(),
           "torch": facts.get("torch"), "cuda": facts.get("cuda"), "python": facts.get("python"),
           "cpu": facts.get("cpu"), "evo": __version__, "compute_capability": facts.get("compute_capability"),
           "sm_count": facts.get("sm_count"), "l2_bytes": facts.get("l2_bytes")}
    return {key: value for key, value in env.items() if value is not None}


def publish_extensions(extensions: list[dict], cache: Path, built_in: Path) -> None:
    """Copy what a compiling sandbox built under `built_in` into the shared cache, each entry at
    most once: only a plain entry name, only from a directory of that sandbox's."""
    for extension in extensions:
        entry, source = str(extension.get("entry", "")), Path(str(extension.get("build_directory", "")))
        if not ENTRY_NAME.fullmatch(entry) or not source.resolve().is_relative_to(built_in.resolve()):
            continue
        if source.is_dir():
            install_whole(cache / entry,
                          lambda staging: shutil.copytree(source, staging, ignore=shutil.ignore_patterns("lock")))


ENTRY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def install_whole(target: Path, fill: Callable[[Path], None]) -> None:
    """Put a directory into a cache at `target`, whole or not at all: `fill` makes it beside
    the target, which it then replaces by a rename, so no reader sees it half-written. Where
    another evo or thread put it there first, theirs stays."""
    if target.exists():
        return
    staging = target.parent / f".{target.name}.{os.getpid()}.{threading.get_ident()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        fill(staging)
    except BaseException:  # a full disk, say: no half-made entry is left behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        staging.rename(target)
    except OSError:  # put there meanwhile
        shutil.rmtree(staging, ignore_errors=True)


class Cancelled(Exception):
    """A wait for the device was called off."""


@contextlib.contextmanager
def exclusive(device: Device, cancelled: threading.Event | None = None, defer_teardowns: bool = False):
    """Hold the device for one evaluation's device work, so that two evo processes on one
    machine never run on a device at once and skew each other's timings. Yields the seconds
    spent waiting; a wait given a `cancelled` event raises Cancelled once it is set. The lock
    dies with the process that holds it; it is per machine and user, whatever cache directory
    each process uses.

    An earlier holder's killed processes may still be ending (their device contexts going)
    when it gave the device up (see `Ending`). The new holder waits for them as it takes the
    device; or, with `defer_teardowns`, calls `await_teardowns` itself before it times
    anything or reads what they could reach, doing other work meanwhile."""
    started = time.monotonic()
    with open(lock_path(device, "lock"), "a") as handle:
        if cancelled is None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        else:
            while not try_lock(handle):
                if cancelled.wait(LOCK_POLL_S):
                    raise Cancelled("the wait for the device was called off")
        try:
            if not defer_teardowns:
                await_teardowns(device)
            yield time.monotonic() - started
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_path(device: Device, suffix: str) -> Path:
    locks = Path(tempfile.gettempdir()) / f"evo-{os.getuid()}-device-locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    return locks / f"{device.lock_name}.{suffix}"


def await_teardowns(device: Device) -> None:
    """Return once no process of an earlier holder of the device is still ending. Called only
    while holding the device, so no `Ending` begins while it waits."""
    with open(lock_path(device, "ending"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)


class Ending:
    """Held by a holder of the device from the end of its turn until the processes it killed
    have ended, so that it can give the device up at once and let them end while the next
    holder starts work that is neither timed nor reads what they could reach. Taken only while
    holding the device, after the holder's own `await_teardowns` (which would wait for it)."""

    def __init__(self, device: Device):
        self.device, self.handle = device, None

    def hold(self) -> None:
        self.handle = open(lock_path(self.device, "ending"), "a")
        fcntl.flock(self.handle, fcntl.LOCK_SH)

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


# Below this share of a GPU's memory free as a turn ends, its killed processes end within it.
FREE_FOR_OVERLAPPED_TEARDOWN = 0.5


def teardown_may_overlap(device: Device) -> bool:
    """Whether the next holder may take the device while this turn's killed processes end (see
    `Ending`). Its checker and candidate take device memory at once, which killed processes give
    back only as they end: not when they may be what fills the device (NVML unreadable counts)."""
    if device.kind != "cuda":
        return True
    free = nvml.free_fraction(device.visible)
    return free is not None and free >= FREE_FOR_OVERLAPPED_TEARDOWN


LOCK_POLL_S = 0.02  # how often a cancellable wait tries the lock


def try_lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False

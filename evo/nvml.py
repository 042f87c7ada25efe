"""The device's memory, and who computed on it, as the driver's management library (NVML)
reports them. evo reads them this way because it never holds a CUDA context of its own."""

from __future__ import annotations

import ctypes
import functools
import time

NVML_SUCCESS = 0
NVML_ERROR_NOT_FOUND = 6  # no process computed in the span asked about
NVML_ERROR_INSUFFICIENT_SIZE = 7
SAMPLE_PERIOD_S = 0.2  # how often the driver samples each process's utilization (measured on the H200)


class _MemoryInfo(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _ProcessSample(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("time_stamp", ctypes.c_ulonglong), ("sm_util", ctypes.c_uint),
                ("mem_util", ctypes.c_uint), ("enc_util", ctypes.c_uint), ("dec_util", ctypes.c_uint)]


class _ProcessInfo(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("used_gpu_memory", ctypes.c_ulonglong), ("gpu_instance_id", ctypes.c_uint),
                ("compute_instance_id", ctypes.c_uint)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    return library if library.nvmlInit_v2() == NVML_SUCCESS else None


def free_fraction(gpu: str) -> float | None:
    """The fraction of a GPU's memory that no process holds, or None where NVML cannot say."""
    opened, memory = _open(gpu), _MemoryInfo()
    if opened is None:
        return None
    library, handle = opened
    if library.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != NVML_SUCCESS or not memory.total:
        return None
    return memory.free / memory.total


def busy_processes(gpu: str, since: float) -> dict[int, int] | None:
    """The processes that computed on a GPU since `since` (time.time()), each with its average
    share of the GPU's SMs over that span in percent, as the driver sampled them (each sample
    covers the SAMPLE_PERIOD_S before it: see `await_sample`); None where NVML cannot say. The
    PIDs are those of the driver's PID namespace."""
    opened = _open(gpu)
    if opened is None:
        return None
    library, handle = opened
    since_us = ctypes.c_ulonglong(int(since * 1e6))
    count = ctypes.c_uint(0)
    status = library.nvmlDeviceGetProcessUtilization(handle, None, ctypes.byref(count), since_us)
    if status == NVML_ERROR_NOT_FOUND or (status == NVML_SUCCESS and not count.value):
        return {}
    if status != NVML_ERROR_INSUFFICIENT_SIZE:
        return None
    samples = (_ProcessSample * (count.value + 8))()  # room for processes that begin meanwhile
    count = ctypes.c_uint(len(samples))
    status = library.nvmlDeviceGetProcessUtilization(handle, samples, ctypes.byref(count), since_us)
    if status == NVML_ERROR_NOT_FOUND:
        return {}
    if status != NVML_SUCCESS:
        return None
    busy: dict[int, int] = {}
    for sample in samples[:count.value]:
        if sample.sm_util:
            busy[sample.pid] = max(busy.get(sample.pid, 0), sample.sm_util)
    return busy


def compute_processes(gpu: str) -> set[int] | None:
    """The processes holding a compute context on a GPU, busy or not; None where NVML cannot say.
    The PIDs are those of the driver's PID namespace."""
    opened = _open(gpu)
    listing = getattr(opened[0], "nvmlDeviceGetComputeRunningProcesses_v3", None) if opened else None
    if listing is None:
        return None
    for room in (64, 4096):
        count = ctypes.c_uint(room)
        processes = (_ProcessInfo * room)()
        status = listing(opened[1], ctypes.byref(count), processes)
        if status == NVML_SUCCESS:
            return {process.pid for process in processes[:count.value]}
        if status != NVML_ERROR_INSUFFICIENT_SIZE:
            return None
    return None


def await_sample(gpu: str, after: float, timeout: float) -> None:
    """Return once the driver has sampled a busy process after `after` (time.time()), so that
    the work up to then is in its samples; or after `timeout` seconds, or at once where NVML
    cannot say."""
    deadline = time.monotonic() + timeout
    while True:
        busy = busy_processes(gpu, after)
        if busy is None or busy or time.monotonic() >= deadline:
            return
        time.sleep(SAMPLE_PERIOD_S / 10)


def _open(gpu: str) -> tuple[ctypes.CDLL, ctypes.c_void_p] | None:
    """NVML and its handle of a GPU named as CUDA_VISIBLE_DEVICES names it: nvidia-smi's index
    (NVML's too) or a GPU-... UUID; None where NVML is missing, or for a MIG instance (not a
    whole GPU)."""
    library, handle = _library(), ctypes.c_void_p()
    if library is None:
        return None
    if gpu.isdigit():
        found = library.nvmlDeviceGetHandleByIndex_v2(int(gpu), ctypes.byref(handle))
    elif gpu.startswith("GPU-"):
        found = library.nvmlDeviceGetHandleByUUID(gpu.encode(), ctypes.byref(handle))
    else:
        return None
    return (library, handle) if found == NVML_SUCCESS else None

"""The device's memory as the driver's management library (NVML) reports it. evo reads it this
way because it never holds a CUDA context of its own."""

from __future__ import annotations

import ctypes
import functools

NVML_SUCCESS = 0


class _MemoryInfo(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    return library if library.nvmlInit_v2() == NVML_SUCCESS else None


def free_fraction(gpu: str) -> float | None:
    """The fraction of a GPU's memory that no process holds, or None where NVML cannot say. `gpu`
    as CUDA_VISIBLE_DEVICES names it: nvidia-smi's index (NVML's too) or a GPU-... UUID."""
    library = _library()
    if library is None:
        return None
    handle, memory = ctypes.c_void_p(), _MemoryInfo()
    if gpu.isdigit():
        found = library.nvmlDeviceGetHandleByIndex_v2(int(gpu), ctypes.byref(handle))
    elif gpu.startswith("GPU-"):
        found = library.nvmlDeviceGetHandleByUUID(gpu.encode(), ctypes.byref(handle))
    else:  # a MIG instance: its memory is not the whole GPU's
        return None
    if found != NVML_SUCCESS:
        return None
    if library.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != NVML_SUCCESS or not memory.total:
        return None
    return memory.free / memory.total

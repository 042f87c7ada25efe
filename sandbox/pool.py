"""The input pool: memory that the checker writes each window's inputs into, as the parent's
clock for that window starts, and that the candidate's process reads them from. A candidate
process so never holds its inputs before it is timed on them, nor a seed they were made from.

On a GPU the pool is device memory made with the CUDA driver's virtual memory calls and shared
as a file descriptor (legacy CUDA IPC handles cannot cross the sandbox's PID namespace); on a
CPU, a memory file. Either way the descriptor travels over a Unix socket: checker to evo, evo to
the candidate's process.

Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import torch

ALIGNMENT = 256  # of every input's first byte in a slot, as a device allocator would place it
# Zero bytes left after every input, so that a write just past one lands where the checker looks
# (its slot's bytes must be as it laid them out after a checked call).
GAP = 256
_CU_MEM_ALLOCATION_TYPE_PINNED = 1
_CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class PoolError(RuntimeError):
    """The pool could not be made or mapped; the message says which driver call failed."""


class _Driver:
    """The few CUDA driver calls the pool needs, in the context torch made current."""

    def __init__(self, device_index: int):
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.device_index = device_index
        self.prop = _AllocationProp(type=_CU_MEM_ALLOCATION_TYPE_PINNED,
                                    requestedHandleTypes=_CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                                    location=_Location(_CU_MEM_LOCATION_TYPE_DEVICE, device_index))

    def call(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise PoolError(f"the CUDA driver's {name} returned error {status}: candidates' inputs are handed over in "
                            "device memory shared as a file descriptor (CUDA virtual memory management), which this "
                            "GPU or driver refused")

    def granularity(self) -> int:
        size = ctypes.c_size_t()
        self.call("cuMemGetAllocationGranularity", ctypes.byref(size), ctypes.byref(self.prop), 0)
        return size.value

    def create(self, nbytes: int) -> int:
        handle = ctypes.c_ulonglong()
        self.call("cuMemCreate", ctypes.byref(handle), ctypes.c_size_t(nbytes), ctypes.byref(self.prop),
                  ctypes.c_ulonglong(0))
        return handle.value

    def export(self, handle: int) -> int:
        fd = ctypes.c_int(-1)
        self.call("cuMemExportToShareableHandle", ctypes.byref(fd), ctypes.c_ulonglong(handle),
                  _CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, ctypes.c_ulonglong(0))
        return fd.value

    def import_fd(self, fd: int) -> int:
        handle = ctypes.c_ulonglong()
        self.call("cuMemImportFromShareableHandle", ctypes.byref(handle), ctypes.c_void_p(fd),
                  _CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        return handle.value

    def map(self, handle: int, nbytes: int) -> int:
        """Map the allocation at an address of its own, readable and writable on the device."""
        address = ctypes.c_ulonglong()
        self.call("cuMemAddressReserve", ctypes.byref(address), ctypes.c_size_t(nbytes), ctypes.c_size_t(0),
                  ctypes.c_ulonglong(0), ctypes.c_ulonglong(0))
        self.call("cuMemMap", address, ctypes.c_size_t(nbytes), ctypes.c_size_t(0), ctypes.c_ulonglong(handle),
                  ctypes.c_ulonglong(0))
        access = _AccessDesc(location=_Location(_CU_MEM_LOCATION_TYPE_DEVICE, self.device_index),
                             flags=_CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        self.call("cuMemSetAccess", address, ctypes.c_size_t(nbytes), ctypes.byref(access), ctypes.c_size_t(1))
        # The allocation lives as long as the mapping: this handle is no longer needed.
        self.call("cuMemRelease", ctypes.c_ulonglong(handle))
        return address.value


class _DeviceBytes:
    """A span of mapped device memory as torch reads it (the CUDA array interface)."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None}


class Pool:
    """The pool as one process holds it: `bytes` is a uint8 tensor over all of it."""

    def __init__(self, fd: int, nbytes: int, device: str):
        self.fd, self.nbytes, self.device = fd, nbytes, device
        if device.startswith("cuda"):
            driver = _Driver(torch.device(device).index or 0)
            self.address = driver.map(driver.import_fd(fd), nbytes)
        else:
            self.view = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.bytes = self.span(0, nbytes)

    def span(self, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes of the pool as a uint8 tensor with a storage of their own."""
        if self.device.startswith("cuda"):
            return torch.as_tensor(_DeviceBytes(self.address + offset, nbytes), device=self.device)
        return torch.frombuffer(self.view, dtype=torch.uint8, count=nbytes, offset=offset)

    @classmethod
    def create(cls, nbytes: int, device: str) -> "Pool":
        """A new pool of at least `nbytes`, made in this process (the checker's)."""
        if device.startswith("cuda"):
            torch.cuda.init()
            torch.empty(1, device=device)  # the context the driver calls need, current on this thread
            driver = _Driver(torch.device(device).index or 0)
            size = _round_up(max(nbytes, 1), driver.granularity())
            handle = driver.create(size)
            try:
                fd = driver.export(handle)
            finally:
                driver.call("cuMemRelease", ctypes.c_ulonglong(handle))  # the fd holds it now
        else:
            size = _round_up(max(nbytes, 1), mmap.PAGESIZE)
            fd = os.memfd_create("evo-inputs", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        return cls(fd, size, device)

    def tensor(self, spec: dict) -> torch.Tensor:
        """The input a layout entry describes (`layout`): a storage of its own over the pool's bytes
        at its offset, viewed with the strides the task's input had."""
        dtype = getattr(torch, spec["dtype"])
        span = self.span(spec["offset"], spec["storage_bytes"]).view(dtype)
        return span.as_strided(spec["shape"], spec["stride"], spec["storage_offset"])


def layout(window: list[list[torch.Tensor]], start: int) -> tuple[list[list[dict]], int]:
    """Where each input of a window of calls goes in the pool, from byte `start` on: its whole
    storage (strides and storage offset kept), aligned, and a gap after it; and the byte after
    the last gap."""
    offset, calls = start, []
    for inputs in window:
        specs = []
        for tensor in inputs:
            offset = _round_up(offset, ALIGNMENT)
            storage_bytes = tensor.untyped_storage().nbytes()
            specs.append({"offset": offset, "storage_bytes": storage_bytes,
                          "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
                          "stride": list(tensor.stride()), "storage_offset": tensor.storage_offset()})
            offset += storage_bytes + GAP
        calls.append(specs)
    return calls, offset


def gather(window: list[list[torch.Tensor]], specs: list[list[dict]], start: int, end: int) -> torch.Tensor:
    """The bytes from `start` to `end` of the pool as they will be once the window is handed
    over: each input's whole storage at its place (`layout`), in memory of this process, so that
    handing it over is one copy."""
    device = window[0][0].device if window and window[0] else "cpu"
    staged = torch.zeros(end - start, dtype=torch.uint8, device=device)
    for inputs, call in zip(window, specs):
        for tensor, spec in zip(inputs, call):
            storage = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())
            place = spec["offset"] - start
            staged[place: place + spec["storage_bytes"]].copy_(storage)
    return staged

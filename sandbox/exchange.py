"""The shared buffer that carries output tensors from a candidate's process to the checker,
so that hundreds of megabytes per timed window never cross the parent's pipes.

evo creates one memory file per task session, sealed so that nobody can shrink it (a reader
would fault past its end), and hands it only to the checker and to the candidate processes
that are timed.
A candidate process writes its outputs there and describes them in its reply; the checker
copies what it is told to read into memory of its own before judging it, so bytes changed
while it reads cannot change what it judges, and the checksum bound to the window exposes
any change made after the window ended. The parent clears the buffer between candidates.

Imports only the standard library, numpy and torch. Never imports evo.
"""

from __future__ import annotations

import mmap

import numpy
import torch

STAGING_BYTES = 64 << 20  # pinned host memory a reader keeps for copies to a GPU


def dtype_of(meta: dict) -> torch.dtype:
    """The dtype a tensor's metadata names; what a candidate's process sent may name anything."""
    dtype = getattr(torch, str(meta["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"a tensor is described with dtype {meta['dtype']!r}")
    return dtype


class Exchange:
    def __init__(self, fd: int | None, writable: bool):
        self.fd, self.writable = fd, writable
        self.view: mmap.mmap | None = None
        self.size = 0
        self.staging: torch.Tensor | None = None  # pinned host memory, for copies to a GPU

    def mapped(self, size: int) -> mmap.mmap:
        """The buffer, mapped at least `size` bytes long (evo grew the file to that first)."""
        if self.fd is None:
            raise RuntimeError("this process was started without the exchange buffer")
        if self.view is None or size > self.size:
            protection = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
            self.view = mmap.mmap(self.fd, size, mmap.MAP_SHARED, protection)
            self.size = size
        return self.view

    def write(self, tensors: list, size: int, metas: list[dict]) -> bool:
        """Copy the tensors' bytes one after another from the start of the buffer; False, and
        nothing written, when they do not fit in `size` bytes."""
        if sum(meta["nbytes"] for meta in metas) > size:
            return False
        view, offset = self.mapped(size), 0
        for tensor, meta in zip(tensors, metas):
            if meta["nbytes"]:
                target = torch.frombuffer(view, dtype=torch.uint8, count=meta["nbytes"], offset=offset)
                target.copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
            offset += meta["nbytes"]
        return True

    def read(self, metas: list[dict], size: int, device: str = "cpu") -> list[torch.Tensor]:
        """Copies on `device` of the tensors the metadata describes, laid out as `write` leaves
        them: all their bytes in one copy (through a bounded pinned buffer to a GPU), each tensor
        a view of it where its offset allows."""
        sizes = [int(meta["nbytes"]) for meta in metas]
        if sum(max(nbytes, 0) for nbytes in sizes) > size:
            raise ValueError("the described tensors do not fit in the exchange buffer")
        negative = next((nbytes for nbytes in sizes if nbytes < 0), None)
        if negative is not None:
            raise ValueError(f"a tensor is described as {negative} bytes")
        whole = self.copy_out(sum(sizes), size, torch.device(device))
        offset, tensors = 0, []
        for meta, nbytes in zip(metas, sizes):
            dtype = dtype_of(meta)
            raw = whole[offset: offset + nbytes]
            if offset % dtype.itemsize:
                raw = raw.clone()
            tensors.append(raw.view(dtype).reshape(meta["shape"]))
            offset += nbytes
        return tensors

    def copy_out(self, nbytes: int, size: int, device: torch.device) -> torch.Tensor:
        """The first `nbytes` of the buffer (of `size` bytes in use), copied into memory of this
        process on `device`."""
        source = numpy.frombuffer(self.mapped(size), dtype=numpy.uint8, count=nbytes)
        if device.type != "cuda":
            return torch.from_numpy(source.copy())
        whole = torch.empty(nbytes, dtype=torch.uint8, device=device)
        if self.staging is None:
            self.staging = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
        staging = self.staging.numpy()
        for start in range(0, nbytes, STAGING_BYTES):
            count = min(STAGING_BYTES, nbytes - start)
            staging[:count] = source[start: start + count]
            whole[start: start + count].copy_(self.staging[:count])
        return whole

"""The memory guard: watches, across one call, the device memory that no tensor owns.

Before the call every byte of the caching allocator's segments outside the tensors alive then
(free blocks, and the rounding slack past each tensor's end) is filled with 0xFF, a NaN in every
floating-point type, and the allocator's history is recorded. After it, each such byte that no
allocation made during the call covered must still hold 0xFF; one that does not was written by a
kernel outside the memory it was given: a write past a tensor's end, say, which in a process that
also held the reference's answer could have landed on it.

Only what the allocator holds when the call starts is watched: a segment it takes from the driver
during the call starts with unknown contents, and a CUDA graph's private pool is written by its
replays where its blocks look free. A write that leaves the segments faults, or lands in memory
nobody reads. It runs in the candidate's process, so a candidate could hide its own writes; it is
there to catch a kernel's bug, which gains nothing in a verdict, before it reaches a user's project.

Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import torch

SENTINEL = 0xFF
# More allocator events than this in one call and the oldest would be dropped from the history, so
# the bytes the call owned would not be known: the guard then says it could not watch.
HISTORY_ENTRIES = 200_000
_snapshot = torch.cuda.memory._snapshot
_record_history = torch.cuda.memory._record_memory_history
# The comparison's own tensors must not land in the memory it reads: they come from a pool of
# their own, whose segments are never watched. Compared in chunks, so they stay small.
CHUNK_BYTES = 64 * 2**20
_synchronize = getattr(torch._C, "_cuda_synchronize", None)  # absent from a CPU-only build
_tensor_type = torch.Tensor
_use_pool = torch.cuda.use_mem_pool
_new_pool = torch.cuda.MemPool


class _Raw:
    """A run of device bytes at an address, as torch.as_tensor takes it (no allocation, no copy)."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None}


def _bytes_at(address: int, nbytes: int) -> torch.Tensor:
    return torch.as_tensor(_Raw(address, nbytes), device="cuda")


def _subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of sorted, disjoint `ranges` outside every range in `holes`."""
    holes = sorted(hole for hole in holes if hole[0] < hole[1])
    left, position = [], 0
    for start, end in ranges:
        while position < len(holes) and holes[position][1] <= start:
            position += 1
        cursor, index = start, position
        while index < len(holes) and holes[index][0] < end:
            if holes[index][0] > cursor:
                left.append((cursor, holes[index][0]))
            cursor = max(cursor, holes[index][1])
            index += 1
        if cursor < end:
            left.append((cursor, end))
    return left


def _owned_and_segments(snapshot: dict) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(what live tensors own, the default pool's segments), as address ranges."""
    owned, segments = [], []
    device = torch.cuda.current_device()
    for segment in snapshot["segments"]:
        if segment.get("device", device) != device or tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0):
            continue
        segments.append((segment["address"], segment["address"] + segment["total_size"]))
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                owned.append((block["address"], block["address"] + block.get("requested_size", block["size"])))
            elif block["state"] != "inactive":  # awaiting another stream's end: in use still
                owned.append((block["address"], block["address"] + block["size"]))
    return owned, sorted(segments)


class MemoryGuard:
    """Arm it just before a call and read it just after; CUDA only."""

    scratch = None  # the pool of the comparisons' tensors, made once per process

    def __init__(self) -> None:
        self.watched: list[tuple[int, int]] = []
        if MemoryGuard.scratch is None:
            MemoryGuard.scratch = _new_pool()

    def warm(self) -> None:
        """One watch over nothing, as a process starts: the first loads the kernels and makes the
        pool, a tenth of a second (H200) that would otherwise fall in a checked call's turn."""
        self.arm()
        self.findings([])

    def arm(self) -> None:
        _synchronize()
        owned, segments = _owned_and_segments(_snapshot())
        self.watched = _subtract(segments, owned)
        for start, end in self.watched:
            _bytes_at(start, end - start).fill_(SENTINEL)
        _synchronize()
        _record_history(enabled="all", context=None, stacks="python", max_entries=HISTORY_ENTRIES,
                        clear_history=True)

    def findings(self, outputs: list) -> dict:
        """After the call, the device synchronized: how many watched bytes there were, how many
        changed, and where the first change lies relative to the nearest output before it."""
        snapshot = _snapshot()
        _record_history(enabled=None)
        events = [event for trace in snapshot.get("device_traces", []) for event in trace]
        if len(events) >= HISTORY_ENTRIES:
            return {"watched_bytes": 0, "changed_bytes": 0, "unwatched": "the call made too many allocations"}
        during = [(event["addr"], event["addr"] + event["size"]) for event in events if event["action"] == "alloc"]
        _, segments_now = _owned_and_segments(snapshot)
        # Bytes the call never owned, in segments that are still there (one given back is unmapped).
        untouched = _subtract(self.watched, during)
        watched = _subtract(untouched, _subtract(untouched, segments_now))
        chunks = [(start, min(start + CHUNK_BYTES, end)) for begin, end in watched
                  for start in range(begin, end, CHUNK_BYTES)]
        with _use_pool(MemoryGuard.scratch):
            counts = self.count_changed(chunks)
            report = {"watched_bytes": sum(end - start for start, end in watched), "changed_bytes": sum(counts)}
            first = next(((start, end) for (start, end), count in zip(chunks, counts) if count), None)
            if first is not None:
                offset = int(torch.nonzero(_bytes_at(first[0], first[1] - first[0]) != SENTINEL)[0, 0])
                report.update(self.locate(first[0] + offset, outputs))
        self.watched = []
        return report

    @staticmethod
    def count_changed(chunks: list[tuple[int, int]]) -> list[int]:
        """How many bytes of each chunk no longer hold the fill, read in one transfer."""
        if not chunks:
            return []
        counts = torch.stack([torch.count_nonzero(_bytes_at(start, end - start) != SENTINEL) for start, end in chunks])
        return [int(count) for count in counts.tolist()]

    @staticmethod
    def locate(address: int, outputs: list) -> dict:
        """The output whose end lies nearest below `address`, and how far past it the address is."""
        best = None
        for position, output in enumerate(outputs):
            if type(output) is _tensor_type and output.is_cuda:  # a subclass's methods are the candidate's
                end = output.untyped_storage().data_ptr() + output.untyped_storage().nbytes()
                if end <= address and (best is None or end > best[1]):
                    best = (position, end)
        if best is None:
            return {"first_changed_output": None, "first_changed_past_end": None}
        return {"first_changed_output": best[0], "first_changed_past_end": address - best[1]}

"""What a sandbox's processes use of the machine, as this process sees it from outside: resident
memory, processes and threads, and what they wrote to disk. A sandbox can write only in its own
directory (the rest of the filesystem is read-only to it), so its directory, plus the files it
deleted but still holds open there, is all it can take of the disk; one that filled the disk
would fail every build beside it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# A directory walk stops here: a sandbox that made more files than this is over its limit anyway.
MOST_FILES = 100_000


def resident_bytes_and_tasks(pids: list[int]) -> tuple[int, int]:
    """Resident memory of these processes, and their threads (a zombie counts one: it holds its
    process ID until reaped), from /proc."""
    resident, tasks = 0, 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    resident += int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    tasks += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return resident, tasks


def written_bytes(directory: Path, pids: list[int]) -> int | None:
    """Disk space taken by `directory` and by deleted files on its disk that `pids` hold open;
    None when the directory holds more than MOST_FILES entries."""
    try:
        device = os.stat(directory).st_dev
    except OSError:
        return 0
    seen: set[tuple[int, int]] = set()
    total, entries, stack = 0, 0, [directory]
    while stack:
        try:
            with os.scandir(stack.pop()) as listing:
                for entry in listing:
                    entries += 1
                    if entries > MOST_FILES:
                        return None
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISDIR(info.st_mode):
                        stack.append(entry.path)
                    total += _new_blocks(info, seen)
        except OSError:  # removed meanwhile
            continue
    for pid in pids:
        total += _held_deleted_bytes(pid, device, seen)
    return total


def _held_deleted_bytes(pid: int, device: int, seen: set[tuple[int, int]]) -> int:
    total = 0
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for descriptor in descriptors:
        path = f"/proc/{pid}/fd/{descriptor}"
        try:
            if not os.readlink(path).endswith(" (deleted)"):
                continue
            info = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_dev == device:  # not memory files, nor /dev/shm's
            total += _new_blocks(info, seen)
    return total


def size_text(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def _new_blocks(info: os.stat_result, seen: set[tuple[int, int]]) -> int:
    """The space a file takes (a sparse file only what it wrote), once per file however often linked."""
    key = (info.st_dev, info.st_ino)
    if key in seen:
        return 0
    seen.add(key)
    return info.st_blocks * 512

"""The disks evo writes to, and what it says when one of them is full.

A full disk is the machine's state, not a candidate's failure: a compiler that cannot write its
object file, or a cache entry that cannot be copied, would otherwise read as the candidate's
build failing. So a verification that failed while a disk it writes to is full ends in an
error that names the disk, and a search stops there, its candidates left to be judged on
`--resume`, instead of rejecting every later candidate.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from evo.verdict import Check

# Less room than this (or than a twentieth of the disk, for a small one) counts as full.
FULL_BELOW_BYTES = 256 << 20
# Below this (or a fifth of the disk), a failure that says space ran out is believed: a CUDA
# build's temporary files take hundreds of megabytes, removed again once the build has failed.
SHORT_BELOW_BYTES = 2 << 30
OUT_OF_SPACE_WORDS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "database or disk is full")
# The checks a disk with no room fails: compilers and loaders that cannot write, processes that end.
DISK_BOUND_CHECKS = ("build", "load", "runs")


def _statvfs(path: Path) -> os.statvfs_result | None:
    """Of the disk that holds `path`, or would hold it."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return os.statvfs(path)
    except OSError:
        return None


def free_bytes(path: Path) -> int | None:
    """Room left for an unprivileged writer on the disk that holds `path`."""
    stats = _statvfs(path)
    return None if stats is None else stats.f_bavail * stats.f_frsize


def is_full(path: Path, failure: str = "") -> bool:
    stats = _statvfs(path)
    if stats is None:
        return False
    if stats.f_files > 0 and stats.f_favail == 0:  # no file can be made, whatever room is left
        return True
    room, size = stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize
    return room < min(FULL_BELOW_BYTES, size // 20) or (
        room < min(SHORT_BELOW_BYTES, size // 5) and says_out_of_space(failure))


def says_out_of_space(text: str) -> bool:
    return any(words in text for words in OUT_OF_SPACE_WORDS)


def full_disk(paths: Iterable[Path], failure: str = "") -> Path | None:
    """The first of `paths` on a full disk, or on a short one when `failure` says that space ran out."""
    return next((Path(path) for path in paths if is_full(path, failure)), None)


def written_by_evo(cache_dir: Path, *more: Path) -> list[Path]:
    """Where an evaluation writes: the cache, the temporary directory, and any others given."""
    return [Path(cache_dir), Path(tempfile.gettempdir()), *more]


def full_disk_message(path: Path) -> str:
    room = free_bytes(path) or 0
    return (f"the disk holding {path} is full ({room / 2**20:.1f} MiB free): free space there, or set "
            "EVO_CACHE_DIR and TMPDIR to a disk with room, and run again")


def write_failure(error: OSError) -> str:
    """One sentence for a write of evo's own that failed; shutil.Error lists (source, target, why)."""
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        _, where, why = error.args[0][0]
        reason = str(why)
    else:
        where, reason = error.filename, error.strerror or str(error)
    return f"evo could not write {where or 'a file of its own'} ({reason}); check that the disk has room and is writable"


def unless_disk_full(outcome: tuple[str, str] | None, failed: Check | None,
                     cache_dir: Path) -> tuple[str, str] | None:
    """An evaluation's outcome (None, or an error and its sentence), unless a failure a full disk
    can cause came while a disk evo writes to is still full once the evaluation's own files are
    gone: that is the machine's, an error naming the disk, not the candidate's verdict."""
    if outcome is None and (failed is None or failed.name not in DISK_BOUND_CHECKS):
        return outcome
    full = full_disk(written_by_evo(cache_dir), outcome[1] if outcome else failed.detail)
    return ("error", full_disk_message(full)) if full else outcome

"""The parent's side of the exchange buffer (sandbox/exchange.py): one memory file per task
session that carries candidates' outputs to the checker without crossing the parent's pipes.
Only the checker and candidate processes are given it; evo grows it before a message needs
more room, and clears it between candidates, so no candidate finds another's bytes there.
"""

from __future__ import annotations

import fcntl
import mmap
import os


class ExchangeBuffer:
    def __init__(self) -> None:
        self.fd = os.memfd_create("evo-exchange", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        # Nobody may shrink it, or a reader would fault past its end; and nobody may add a seal,
        # which would let a candidate stop evo from growing it.
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        self.size = 0  # bytes the messages may use; the file may be longer (a candidate can grow it)

    def reserve(self, nbytes: int) -> int:
        """Room for at least `nbytes`; returns the size to name in messages."""
        if nbytes > self.size:
            if os.fstat(self.fd).st_size < nbytes:
                os.ftruncate(self.fd, nbytes)
            self.size = nbytes
        return self.size

    def clear(self) -> None:
        """Give back every page: the next reader finds zeros, and a candidate that wrote beyond
        the room it was given holds no memory after it is gone."""
        length = os.fstat(self.fd).st_size
        if length:
            with mmap.mmap(self.fd, length) as view:
                view.madvise(mmap.MADV_REMOVE)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

"""Message framing between evo and the sandbox programs (standard library only).

A frame is a 4-byte big-endian length, a UTF-8 JSON header of that length, then
`header["payload"]` raw bytes (0 when absent). Nothing is ever unpickled on either side;
output tensors do not travel in frames but through the exchange buffer (exchange.py), as raw
bytes described by the header.
"""

from __future__ import annotations

import json
import os
import struct

HEADER_LIMIT = 16 * 1024 * 1024  # a header larger than this is a protocol violation
# Every new host allocation in a sandbox starts filled with this byte (evo sets glibc's
# MALLOC_PERTURB_ for it; the checker reads it as "never written"). Here because both sides need it.
HOST_POISON_BYTE = 0x7F


class ChannelClosed(Exception):
    """The other side closed its end of the pipe."""


def encode(header: dict, payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    header = dict(header, payload=len(payload))
    body = json.dumps(header, separators=(",", ":")).encode()
    return [struct.pack(">I", len(body)) + body, payload]


def write_frame(fd: int, header: dict, payload: bytes | memoryview = b"") -> None:
    for part in encode(header, payload):
        view = memoryview(part).cast("B")
        while view:
            written = os.write(fd, view)
            view = view[written:]


def read_exact(fd: int, count: int) -> bytearray:
    buf = bytearray(count)
    view = memoryview(buf)
    while view:
        got = os.readv(fd, [view])
        if got == 0:
            raise ChannelClosed("channel closed")
        view = view[got:]
    return buf


def read_frame(fd: int) -> tuple[dict, bytearray]:
    (size,) = struct.unpack(">I", read_exact(fd, 4))
    if size > HEADER_LIMIT:
        raise ValueError(f"frame header of {size} bytes exceeds the limit")
    header = json.loads(bytes(read_exact(fd, size)))
    payload = read_exact(fd, int(header.get("payload", 0)))
    return header, payload


def requests(fd: int):
    """The (header, payload) of each message arriving on fd, until the other side closes it or
    asks the program to exit. For trusted programs only: a candidate could replace what it calls."""
    while True:
        try:
            header, payload = read_frame(fd)
        except ChannelClosed:
            return
        if header.get("op") == "exit":
            return
        yield header, payload


class FrameParser:
    """Incremental parser for the parent, which reads without blocking."""

    def __init__(self, payload_limit: int | None = None) -> None:
        self.payload_limit = payload_limit  # bytes a frame's payload may have: more is a protocol violation
        self.buffer = bytearray()
        self.state = "length"  # then "header", then "payload"
        self.need = 4
        self.header: dict = {}

    def idle(self) -> bool:
        """True between frames: the next byte read starts a new frame."""
        return self.state == "length" and not self.buffer

    def feed(self, data: bytes) -> list[tuple[dict, bytearray]]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= self.need:
            chunk = bytearray(self.buffer[: self.need])
            del self.buffer[: self.need]
            if self.state == "length":
                (self.need,) = struct.unpack(">I", chunk)
                if self.need > HEADER_LIMIT:
                    raise ValueError(f"frame header of {self.need} bytes exceeds the limit")
                self.state = "header"
            elif self.state == "header":
                self.header = json.loads(bytes(chunk))
                if not isinstance(self.header, dict):
                    raise ValueError("frame header is not a JSON object")
                self.need = int(self.header.get("payload", 0))
                if self.payload_limit is not None and self.need > self.payload_limit:
                    raise ValueError(f"a payload of {self.need} bytes exceeds the process's memory limit")
                self.state = "payload"
            else:
                frames.append((self.header, chunk))
                self.state, self.need = "length", 4
        return frames

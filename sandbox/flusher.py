"""The cache flusher: a trusted process of its own that evicts the device's last-level cache
before every timed call, of the reference and of the candidate alike.

Being a separate process, it makes every timed subject pay the same switch of GPU context
between the flush and its call, so the reference calibrates the candidate's overhead.

    python flusher.py READ_FD,WRITE_FD

Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import start_gate  # noqa: E402
import wire  # noqa: E402


def main() -> None:
    read_fd, write_fd, _ = harness.channel_from_argv()
    with start_gate.held():
        harness.start_device()
    harness.forbid_tracing()
    flusher = None
    for msg, _ in wire.requests(read_fd):
        if msg["op"] == "init":
            flusher = harness.CacheFlusher(msg["device"], msg["flush_bytes"])
        if msg["op"] == "warm":  # bring the clocks up before a timing phase
            deadline = time.monotonic() + msg["seconds"]
            while time.monotonic() < deadline:
                flusher.flush()
        flusher.flush()
        wire.write_frame(write_fd, {"flushed": True})


if __name__ == "__main__":
    main()

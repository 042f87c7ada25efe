"""Fault: forward double-forks a child into its own session that outlives the call, then raises.

The escapee runs `python -c LOOP TOKEN` for at most 120 s, where TOKEN is a path next to this
candidate's own file (a test that copies this file to a fresh directory gets a token unique to
it, visible in the escapee's command line in /proc). Where the file system lets it, the escapee
also appends to that path every 0.1 s. The forward waits until the escapee shows up in /proc,
so the escape really happened, and says so in the exception it raises.
"""

import os
import sys
import time
from pathlib import Path

import torch.nn as nn

TOKEN = str(Path(__file__).resolve().with_name("escapee.marker"))
LOOP = (
    "import sys, time\n"
    "end = time.monotonic() + 120\n"
    "while time.monotonic() < end:\n"
    "    try:\n"
    "        with open(sys.argv[1], 'a') as f:\n"
    "            f.write('alive\\n')\n"
    "    except OSError:\n"
    "        pass\n"
    "    time.sleep(0.1)\n"
)


def escape() -> None:
    if os.fork() == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                os.closerange(0, 1024)
                os.execv(sys.executable, [sys.executable, "-c", LOOP, TOKEN])
        finally:
            os._exit(0)


def escapee_running() -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if TOKEN.encode() in f.read():
                        return True
            except OSError:
                pass
    return False


class ModelNew(nn.Module):
    def forward(self, x):
        escape()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if escapee_running():
                raise RuntimeError("evo-fault: escaped child started")
            time.sleep(0.05)
        raise RuntimeError("evo-fault: escaped child did not start")

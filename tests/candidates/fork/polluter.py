"""Fault: a candidate that leaves traces wherever it can, for the candidate after it to find.

Candidate processes are forked from one fork server per task session; each must start from the
server's state, never from a predecessor's. At import this one patches torch, sets variables and
flags, writes marker files in its home, next to it (every sibling directory it can see, where the
next candidate's home already waits) and in /dev/shm and /tmp, and, where it is the first process
of a PID namespace of its own, kills every other process it can see (the spare started for the
next candidate, if visible). Then it computes ReLU honestly in plain PyTorch.
Witnessed by: witness.py, verified after it in the same session.
"""

import os
import signal
from pathlib import Path

import torch
import torch.nn as nn

MARKER = "evo-polluted"

torch._evo_polluted = True
torch.relu = lambda x: x  # noqa: E731 - what a careless successor would call
os.environ["EVO_POLLUTED"] = "1"
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


def scribble(directory: Path) -> None:
    try:
        (directory / f"{MARKER}-{os.getpid()}").write_text("left behind")
    except OSError:
        pass


home = Path(os.environ["HOME"])
for place in (home, Path("/dev/shm"), Path("/tmp"), home.parent):
    scribble(place)
try:
    for sibling in home.parent.iterdir():
        if sibling.is_dir():
            scribble(sibling)
except OSError:
    pass

if os.getpid() == 1:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != 1:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


class ModelNew(nn.Module):
    def forward(self, x):
        return torch.clamp_min(x, 0.0)

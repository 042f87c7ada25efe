"""Fault witness: a candidate that refuses to load when it finds any trace of polluter.py (a
patched torch, a variable, a marker file where it can look, another process in its view; the
flags the polluter set are the global_flags check's, pinned before any candidate loads). Verified after the polluter, it shows that nothing of one candidate reached the next.
"""

import os
from pathlib import Path

import torch
import torch.nn as nn

MARKER = "evo-polluted"


def traces() -> list[str]:
    found = []
    if getattr(torch, "_evo_polluted", False):
        found.append("torch._evo_polluted is set")
    if torch.relu is not torch._C._VariableFunctions.relu:
        found.append("torch.relu is patched")
    if "EVO_POLLUTED" in os.environ:
        found.append("EVO_POLLUTED is in the environment")
    home = Path(os.environ["HOME"])
    places = [home, Path("/dev/shm"), Path("/tmp"), home.parent]
    try:
        places += [sibling for sibling in home.parent.iterdir() if sibling.is_dir()]
    except OSError:
        pass
    for place in places:
        try:
            found += [str(path) for path in place.iterdir() if path.name.startswith(MARKER)]
        except OSError:
            pass
    if os.getpid() == 1:  # the first of a PID namespace of its own: nothing else should be visible
        others = [entry.name for entry in Path("/proc").iterdir() if entry.name.isdigit() and entry.name != "1"
                  and "PPid:\t1\n" not in (entry / "status").read_text()]  # not a child of its own
        if others:
            found.append(f"other processes are visible: {others}")
    return found


found = traces()
if found:
    raise RuntimeError("traces of an earlier candidate: " + "; ".join(found))


class ModelNew(nn.Module):
    def forward(self, x):
        return torch.clamp_min(x, 0.0)

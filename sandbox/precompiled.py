"""Which extension builds may use a precompiled torch header, and where it lies.

The binding file of a load_inline extension includes <torch/extension.h>, whose parsing is most
of its compile (about 14 of 17 CPU seconds). A trusted process (pch.py, never with candidate
code) precompiles that header once per set of compiler flags; builds with the same flags then
include it first (GCC uses the .gch beside it, and the object file is the same). Only flags that
change code generation, warnings and definitions qualify: a header precompiled with them is
torch's own headers and nothing else, and no candidate's file can reach it.

Standard library only: evo checks the specifications a build sandbox asks for, and the sandbox
programs find and build the headers with it.
"""

from __future__ import annotations

import re

HEADER = "torch_extension.h"  # its one line includes <torch/extension.h>; the .gch lies beside it
HEADER_TEXT = "#include <torch/extension.h>\n"
# At most this many flag sets get a header of their own (each is hundreds of megabytes).
MAX_SPECS = 4

_SAFE_FLAG = re.compile(r"-O[0-3sgz]?|-g[0-3]?|-w|-W[A-Za-z0-9_=+-]*|-std=[a-z0-9+]+|-m(arch|tune)=[a-z0-9_-]+"
                        r"|-fopenmp|-pthread|-f(no-)?[a-z0-9-]+|-[DU][A-Za-z_][A-Za-z0-9_]*(=[A-Za-z0-9_.]*)?")


def spec(with_cuda: object, extra_cflags: object) -> dict | None:
    """The header's specification for a build with these arguments, or None where its flags
    keep it off precompiled headers."""
    if extra_cflags is None:
        extra_cflags = []
    if not isinstance(with_cuda, bool) or not isinstance(extra_cflags, (list, tuple)):
        return None
    if not all(isinstance(flag, str) and _SAFE_FLAG.fullmatch(flag.strip()) for flag in extra_cflags):
        return None
    return {"with_cuda": with_cuda, "extra_cflags": [flag.strip() for flag in extra_cflags]}


def checked(candidate: object) -> dict | None:
    """A specification that came from a build sandbox, where candidate code ran: itself if it is
    one `spec` would give, else None."""
    if not isinstance(candidate, dict) or set(candidate) != {"with_cuda", "extra_cflags"}:
        return None
    return spec(candidate["with_cuda"], candidate["extra_cflags"])

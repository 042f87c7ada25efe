"""The build step: imports a candidate in an isolated process with no GPU visible, so that
every load_inline/load extension it declares at import is compiled into the build cache.

    python build.py READ_FD,WRITE_FD

Replies once: {"ok": true, "extensions": [...]} or {"ok": false, "error": ..., "log": ...}.
A candidate whose import needs a GPU (or compiles later, like Triton and NVRTC) is not a
build failure: it is reported as deferred and compiled in its candidate process.
Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import hooks  # noqa: E402
import wire  # noqa: E402

LOG_LINES = 60


def trim_compiler_log(text: str) -> str:
    """The lines of a compiler log that say what went wrong, with a little context."""
    lines = text.splitlines()
    keep = set()
    for index, line in enumerate(lines):
        if "error" in line.lower() or "undefined" in line.lower():
            keep.update(range(max(0, index - 2), min(len(lines), index + 3)))
    chosen = [lines[i] for i in sorted(keep)] or lines[-LOG_LINES:]
    return "\n".join(chosen[:LOG_LINES])

# Builds run while other candidates are timed; at the lowest priority a compiler never takes a
# core from a timed process.
BUILD_NICENESS = 19


def main() -> None:
    read_fd, write_fd, _ = harness.channel_from_argv()
    os.nice(BUILD_NICENESS)
    msg, _ = wire.read_frame(read_fd)
    ledger = hooks.ExtensionLedger()
    hooks.install(msg["extensions_cache"], msg["extensions_dir"], msg["allow_reduced_precision"], ledger,
                  msg.get("headers"))
    started = time.monotonic()
    reply = {"ok": True, "deferred": None}
    try:
        harness.import_file(msg["candidate"], "evo_candidate", "candidate")
    except harness.UserCodeError as err:
        text = str(err)
        cause = err.__context__
        if ledger.refused_flags:
            reply = {"ok": False, "error": text, "refused_flags": ledger.refused_flags}
        elif "Error building extension" in text or "error" in text.lower() and "compil" in text.lower():
            reply = {"ok": False, "error": "the candidate's extension failed to compile",
                     "log": trim_compiler_log(str(cause) if cause else text)}
        elif "syntax error" in text:
            reply = {"ok": False, "error": text}
        else:
            reply = {"ok": True, "deferred": text}
    reply.update(extensions=ledger.extensions, seconds=time.monotonic() - started, precompiled=ledger.precompiled,
                 headers_wanted=ledger.headers_wanted)
    wire.write_frame(write_fd, reply)


if __name__ == "__main__":
    main()

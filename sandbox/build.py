"""The build step: imports a candidate in an isolated process with no GPU visible, so that
every load_inline/load extension it declares at import is compiled into the build cache.

    python build.py READ_FD,WRITE_FD

The importing sandbox asks evo for each build the cache lacks ({"compile": arguments}) and waits
for the answer; evo has a second sandbox of this program compile it ({"compile": ...} as its
first message), one that runs no candidate code, so what reaches the cache under an extension's
key was built from that key's arguments. Each finally replies once: {"ok": true, "extensions":
[...]} or {"ok": false, "error": ..., "log": ...}. A candidate whose import needs a GPU (or
compiles later, like Triton and NVRTC) is not a build failure: it is reported as deferred and
compiled in its candidate process.
Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.utils.cpp_extension as cpp_extension  # noqa: E402

import harness  # noqa: E402
import hooks  # noqa: E402
import isolate  # noqa: E402
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
    isolate.keep_process_group()  # before any candidate code: killing the group reaches all it forks
    os.nice(BUILD_NICENESS)
    msg, _ = wire.read_frame(read_fd)
    ledger = hooks.ExtensionLedger()
    if "compile" in msg:
        wire.write_frame(write_fd, compile_arguments(msg, ledger))
        return

    def compile_elsewhere(arguments: dict) -> None:
        wire.write_frame(write_fd, {"compile": arguments})
        answer, _ = wire.read_frame(read_fd)
        ledger.refused_flags.extend(answer.get("refused_flags") or [])
        ledger.precompiled += answer.get("precompiled", 0)
        if not answer.get("ok"):
            log = f":\n{answer['log']}" if answer.get("log") else ""
            raise RuntimeError(f"Error building extension '{arguments['name']}': {answer.get('error')}{log}")

    hooks.install(msg["extensions_cache"], msg["extensions_dir"], msg["allow_reduced_precision"], ledger,
                  msg.get("headers"), compile_elsewhere)
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


def compile_arguments(msg: dict, ledger) -> dict:
    """The compiler's side: build one extension from the arguments a build sandbox reported, in a
    process where no candidate code runs. What it builds is never loaded here (loading runs the
    library's initializers, which are the candidate's code): the hooks' import is replaced."""
    hooks.install(msg["extensions_cache"], msg["extensions_dir"], msg["allow_reduced_precision"], ledger,
                  msg.get("headers"))
    cpp_extension._import_module_from_library = lambda *args, **kwargs: types.SimpleNamespace()
    request = msg["compile"]
    arguments = request["kwargs"]
    if arguments.get("is_python_module", True) is not True or arguments.get("is_standalone"):
        return {"ok": False, "error": "only Python extension modules are compiled for the cache", "extensions": []}
    for key in hooks.KEYED_VARIABLES:  # the flag policy still reads them, as part of the flags
        value = (request.get("environment") or {}).get(key)
        if isinstance(value, str):
            os.environ[key] = value
        else:
            os.environ.pop(key, None)
    build = cpp_extension.load_inline if request.get("kind") == "load_inline" else cpp_extension.load
    started = time.monotonic()
    reply = {"ok": True}
    try:
        build(request["name"], **arguments)
    except Exception as err:  # the compiler's error, a refused flag, or arguments load_inline refuses
        text = str(err)
        if ledger.refused_flags:
            reply = {"ok": False, "error": text.splitlines()[0] if text else "refused", "refused_flags": ledger.refused_flags}
        else:
            reply = {"ok": False, "error": "the candidate's extension failed to compile", "log": trim_compiler_log(text)}
    reply.update(extensions=ledger.extensions, seconds=time.monotonic() - started, precompiled=ledger.precompiled,
                 headers_wanted=ledger.headers_wanted)
    return reply


if __name__ == "__main__":
    main()

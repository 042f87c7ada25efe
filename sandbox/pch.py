"""The header precompiler: makes the precompiled torch header for one set of compiler flags
(precompiled.py). It runs no candidate code: evo asks for it with a specification it checked,
and copies what it made into the build cache, which only evo writes.

    python pch.py READ_FD,WRITE_FD

One request, one reply: {"ok": true, "key": ..., "built": bool, "seconds": ...} (built: false
where the cache has that header already), or {"ok": false, "error": ...}.
Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.utils.cpp_extension as cpp_extension  # noqa: E402

import harness  # noqa: E402
import hooks  # noqa: E402
import precompiled  # noqa: E402
import wire  # noqa: E402

COMPILE_TIMEOUT_S = 600
PRECOMPILER_NICENESS = 19  # like the builds: never a core taken from a timed process


class _Written(Exception):
    """torch wrote the build file, which is all that is wanted of it."""


def binding_compile(spec: dict, probe: Path) -> list[str]:
    """The command that compiles a load_inline binding file with these flags, as torch writes it
    (less the extension's name, which the header does not use), from a build file torch writes
    for an empty extension and is stopped from building."""
    original = cpp_extension._run_ninja_build

    def stop(*_args, **_kwargs):
        raise _Written

    cpp_extension._run_ninja_build = stop
    probe.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load_inline("evo_pch_probe", cpp_sources="", cuda_sources="" if spec["with_cuda"] else None,
                                  extra_cflags=spec["extra_cflags"], with_cuda=spec["with_cuda"],
                                  build_directory=str(probe), no_implicit_headers=True)
    except _Written:
        pass
    finally:
        cpp_extension._run_ninja_build = original
    variables = {}
    for line in (probe / "build.ninja").read_text().splitlines():
        name, equals, value = line.partition(" = ")
        if equals and not line.startswith(" "):
            variables[name] = value.replace("$ ", " ").replace("$:", ":").replace("$$", "$")
    flags = shlex.split(variables["cflags"]) + shlex.split(variables.get("post_cflags", ""))
    return [*shlex.split(variables["cxx"]), *(flag for flag in flags if not flag.startswith("-DTORCH_EXTENSION_NAME="))]


def make(spec: dict, headers_root: Path, out: Path) -> dict:
    key = hooks.header_key(spec)
    if (headers_root / key / (precompiled.HEADER + ".gch")).is_file():
        return {"ok": True, "key": key, "built": False}
    out.mkdir(parents=True, exist_ok=True)
    command = binding_compile(spec, out / "probe")
    header = out / precompiled.HEADER
    header.write_text(precompiled.HEADER_TEXT)
    done = subprocess.run([*command, "-x", "c++-header", str(header), "-o", f"{header}.gch"], capture_output=True,
                          text=True, timeout=COMPILE_TIMEOUT_S)
    if done.returncode != 0:
        return {"ok": False, "error": f"the compiler failed: {done.stderr.strip()[-2000:]}"}
    return {"ok": True, "key": key, "built": True}


def main() -> None:
    read_fd, write_fd, _ = harness.channel_from_argv()
    os.nice(PRECOMPILER_NICENESS)
    msg, _ = wire.read_frame(read_fd)
    started = time.monotonic()
    spec = precompiled.checked(msg["spec"])
    try:
        reply = make(spec, Path(msg["headers"]), Path(msg["out"])) if spec else \
            {"ok": False, "error": "the specification is not one a header is precompiled for"}
    except Exception as err:  # noqa: BLE001 - any failure only means builds without the header
        reply = {"ok": False, "error": harness.describe_exception(err)}
    wire.write_frame(write_fd, {**reply, "seconds": time.monotonic() - started})


if __name__ == "__main__":
    main()

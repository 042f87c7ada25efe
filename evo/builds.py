"""A candidate's C++ and CUDA extensions, built before its processes load it: a build sandbox that
sees no device imports the candidate under the same hooks as at load (flags checked, arguments
bound by name), and each build the cache lacks is compiled from its reported arguments by a second
sandbox that runs no candidate code, into a cache by content hash that only evo writes and every
sandbox reads."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from evo import devices
from evo.config import VerifyPolicy
from evo.judgement import Judgement
from evo.sandbox_runner import SandboxProcess
from evo.session import TaskSession
from evo.verdict import Timings

# A candidate whose source names none of these builds no C++ extension at import, so no build
# sandbox is started for it. One that builds one by other means builds it when its processes
# load it, under the same hooks: slower, never unchecked.
EXTENSION_BUILDERS = (b"cpp_extension", b"load_inline")


def names_an_extension_build(candidate: Path) -> bool:
    source = candidate.read_bytes()
    return any(name in source for name in EXTENSION_BUILDERS)


def extensions_cache(session: TaskSession) -> Path:
    """Built extensions by content hash: sandboxes read it, only this process writes it."""
    path = session.cache_dir / "extensions" / session.device.arch_tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def headers_root(session: TaskSession) -> str | None:
    """Where builds find precompiled torch headers (read-only to them), unless the policy says no."""
    return str(session.headers.root) if session.headers is not None else None


def build(session: TaskSession, candidate: Path, policy: VerifyPolicy, judgement: Judgement, timings: Timings,
          own: Callable[[SandboxProcess], SandboxProcess]) -> None:
    """Build what the candidate builds at import, and judge the build (`judgement` raises on a
    rejection). `own` makes the build sandbox the evaluation's, ended with its other processes."""
    if not names_an_extension_build(candidate):
        judgement.passed("build", "nothing to build ahead: the source names no C++ extension build "
                                  "(what it compiles at run time, such as NVRTC or Triton kernels, "
                                  "it compiles when loaded)")
        return
    started = time.monotonic()
    deadline = started + policy.build_timeout_s
    builder = own(session.sandbox("build.py", "build", BUILD_ENVIRONMENT))
    builder.send(build_message(session, builder, policy, candidate=str(candidate)), timeout=policy.build_timeout_s)
    while True:  # the build sandbox asks for each build the cache lacks, then replies
        reply, _ = builder.receive(timeout=max(1.0, deadline - time.monotonic()))
        if "compile" not in reply:
            break
        answer = compile_for_the_cache(session, reply["compile"], policy, own, deadline)
        builder.send({key: answer.get(key) for key in ("ok", "error", "log", "refused_flags", "precompiled")})
    builder.close()
    if session.headers is not None:  # for builds it made itself (never published)
        session.headers.want(reply.get("headers_wanted"))
    timings.build_s = time.monotonic() - started
    if reply.get("refused_flags"):
        judgement.reject("compiler_flags", f"{reply['error']}; pass --allow-reduced-precision to permit them")
    if not reply["ok"]:
        log = f"\n{reply['log']}" if reply.get("log") else ""
        judgement.reject("build", f"{reply['error']}{log}")
    header = " (with torch's header precompiled)" if reply.get("precompiled") else ""
    judgement.passed("build", f"built{header}" if reply["extensions"] else
                     "no extension to build at import" + (f" ({reply['deferred']})" if reply.get("deferred") else ""))


# A build sees no device and runs its compilers on a few cores.
BUILD_ENVIRONMENT = {"CUDA_VISIBLE_DEVICES": "", "MAX_JOBS": str(devices.BUILD_JOBS)}


def build_message(session: TaskSession, process: SandboxProcess, policy: VerifyPolicy, **what) -> dict:
    return {**what, "extensions_cache": str(extensions_cache(session)), "extensions_dir": str(process.workdir / "extensions"),
            "headers": headers_root(session), "allow_reduced_precision": policy.allow_reduced_precision}


def compile_for_the_cache(session: TaskSession, arguments, policy: VerifyPolicy,
                          own: Callable[[SandboxProcess], SandboxProcess], deadline: float) -> dict:
    """Compile one extension from the arguments the build sandbox reported, in a sandbox of its own
    that runs no candidate code, and put what it built in the cache: the build sandbox, where the
    candidate's import code runs, could otherwise name any library under any key."""
    if not (isinstance(arguments, dict) and isinstance(arguments.get("name"), str)
            and isinstance(arguments.get("kwargs"), dict)):
        return {"ok": False, "error": "the build sandbox asked for a compile evo cannot read"}
    compiler = own(session.sandbox("build.py", "build", BUILD_ENVIRONMENT))
    answer, _ = compiler.request(build_message(session, compiler, policy, compile=arguments),
                                 timeout=max(1.0, deadline - time.monotonic()))
    compiler.close()
    if session.headers is not None:
        session.headers.want(answer.get("headers_wanted"))
    if answer.get("ok"):
        devices.publish_extensions(answer.get("extensions") or [], extensions_cache(session), compiler.workdir)
    return answer


"""A finished extension build's sources as its compilers saw them: each compile command of its
build.ninja run again with -E, so macros are expanded, `_Pragma` strings have become `#pragma`
lines and included files are inlined. What a source asks of the optimizer through names that
macros paste together can only be read there.

Imports only the standard library. Never imports evo.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

# The rules torch's build.ninja compiles sources with (linking sees no source).
COMPILE_RULES = ("compile", "cuda_compile")
# Arguments of a compile command that write files (dependencies, the object) and take a value.
_WRITING_WITH_VALUE = {"-o", "-MF", "-MT", "-MQ", "--dependency-output"}
_WRITING = {"-c", "-MD", "-MMD", "-MP", "--generate-dependencies-with-compile"}
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
# Where a command names its source and its object while its words are split (a path may hold
# spaces): the source's path goes last once they are; the object's is never needed.
_SOURCE, _OUTPUT = "\3source\3", "\3object\3"
_LINE_MARKER = re.compile(r"^#\s*(?:line\s+)?\d+\s+\".*$", re.M)  # `# 12 "file.h"`: a path, not code


class PreprocessingError(RuntimeError):
    """The preprocessor refused a command that had just compiled."""


def preprocessed_sources(build_dir: Path, timeout_s: float) -> list[str]:
    """Each compiled source of the build in `build_dir`, preprocessed, without line markers."""
    texts = []
    for command in compile_commands((build_dir / "build.ninja").read_text()):
        done = subprocess.run([*command, "-E"], cwd=build_dir, capture_output=True, text=True, errors="replace",
                              timeout=timeout_s)
        if done.returncode != 0:
            raise PreprocessingError(f"preprocessing {command[-1]} failed: {done.stderr.strip()[-400:]}")
        texts.append(_LINE_MARKER.sub("", done.stdout))
    return texts


def compile_commands(ninja: str) -> list[list[str]]:
    """The compile commands of a torch build.ninja, without what writes files, source last."""
    variables, rules, builds, rule = {}, {}, [], None
    for line in ninja.splitlines():
        if line.startswith("rule "):
            rule = line.split()[1]
        elif line.startswith("  ") and rule and line.strip().startswith("command ="):
            rules[rule] = line.split("=", 1)[1].strip()
        elif line.startswith("build "):
            rule = None
            # Paths escape a space as "$ " and a colon as "$:".
            escaped = line[len("build "):].replace("$ ", "\1").replace("$:", "\2")
            used, *sources = escaped.partition(":")[2].split()
            builds.extend((used, _unescaped(source)) for source in sources)
        elif "=" in line and not line.startswith(" "):
            rule = None
            key, value = line.split("=", 1)
            variables[key.strip()] = value.strip()
    commands = []
    for used, source in builds:
        if used not in COMPILE_RULES or used not in rules:
            continue
        commands.append(_without_outputs(_expanded(rules[used], variables), source))
    return commands


def _expanded(command: str, variables: dict) -> list[str]:
    """A rule's command as its words, with the file's variables filled in."""
    values = {**variables, "in": _SOURCE, "out": _OUTPUT}
    text = _VARIABLE.sub(lambda match: values.get(match.group(1) or match.group(2), ""), command.replace("$$", "\0"))
    return shlex.split(text.replace("\0", "$"))


def _unescaped(path: str) -> str:
    return path.replace("\1", " ").replace("\2", ":")


def _without_outputs(words: list[str], source: str) -> list[str]:
    """A command's words without those that write files, and with the source's path last."""
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in _WRITING_WITH_VALUE:
            skip = True
        elif word not in _WRITING and word != _SOURCE:
            kept.append(word)
    return [*kept, source]

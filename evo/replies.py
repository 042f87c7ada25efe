"""What the search loop takes from an LLM reply: parse_reply finds the candidate file in it (or
says, in NoUsableCode, what to tell the model instead), and normalized_source_hash identifies a
candidate up to comments and layout, for deduplication. The prompts themselves are in evo/prompts.py.
"""

from __future__ import annotations

import ast
import hashlib
import re
import textwrap
from dataclasses import dataclass
from typing import Iterable

from evo.prompts import truncate

NOTES_CHARS = 2_000  # of the prose around the code, kept as ParsedReply.notes


class NoUsableCode(Exception):
    """A reply the evaluator cannot use; `reason` goes back to the LLM through `PromptBuilder.no_code`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ParsedReply:
    source: str  # the candidate file, ending with a newline
    notes: str  # the prose around the code (the model's stated idea), truncated


@dataclass(frozen=True)
class _Block:
    language: str
    code: str
    closed: bool
    first_line: int  # the opening fence
    last_line: int  # the closing fence, or the reply's last line


_REASONING_TAGS = "think|thinking|reasoning"
_FENCE_OPEN = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([\w+.#-]*)")
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}
_CLASS_MODELNEW = re.compile(r"^\s*class\s+ModelNew\b", re.MULTILINE)


def _strip_reasoning(text: str) -> str:
    """Drop the reasoning that local models emit between <think> tags: it holds drafts."""
    text = re.sub(rf"<({_REASONING_TAGS})>.*?</\1>", "", text, flags=re.DOTALL | re.IGNORECASE)
    closings = list(re.finditer(rf"</({_REASONING_TAGS})>", text, flags=re.IGNORECASE))
    if closings:  # some servers swallow the opening tag
        text = text[closings[-1].end():]
    opening = re.search(rf"<({_REASONING_TAGS})>", text, flags=re.IGNORECASE)
    return text[:opening.start()] if opening else text  # never closed: the rest is reasoning


def _code_blocks(lines: list[str]) -> list[_Block]:
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE_OPEN.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening.group(1)
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            j += 1
        blocks.append(_Block(opening.group(2).lower(), "\n".join(lines[i + 1:j]), j < len(lines), i,
                             min(j, len(lines) - 1)))
        i = j + 1
    return blocks


def _statements(body: list[ast.stmt]) -> Iterable[ast.stmt]:
    """Module-level statements, including those under if/try/with (import-time guards)."""
    for node in body:
        yield node
        for name in ("body", "orelse", "finalbody"):
            if isinstance(node, (ast.If, ast.Try, ast.With)) and hasattr(node, name):
                yield from _statements(getattr(node, name))
        for handler in getattr(node, "handlers", []) if isinstance(node, ast.Try) else []:
            yield from _statements(handler.body)


def _has_forward(cls: ast.ClassDef, classes: dict[str, ast.ClassDef], seen: frozenset = frozenset()) -> bool:
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "forward":
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "forward" for t in node.targets):
            return True
    bases = [base.id for base in cls.bases if isinstance(base, ast.Name) and base.id in classes and base.id not in seen]
    return any(_has_forward(classes[name], classes, seen | {cls.name}) for name in bases)


def _parses_as_python(text: str) -> bool:
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return bool(_CLASS_MODELNEW.search(text))


def _check_candidate(code: str, cut_off: bool) -> None:
    try:
        tree = ast.parse(code)
    except SyntaxError as err:
        lines = code.splitlines()
        shown = lines[err.lineno - 1].strip()[:160] if err.lineno and 0 < err.lineno <= len(lines) else ""
        where = f"line {err.lineno}: {err.msg}" + (f": `{shown}`" if shown else "")
        cut = " (the code block was never closed: the reply may have been cut off)" if cut_off else ""
        raise NoUsableCode(f"the code does not parse as Python: {where}{cut}") from None
    classes = {node.name: node for node in _statements(tree.body) if isinstance(node, ast.ClassDef)}
    if "ModelNew" not in classes:
        if classes:
            names = ", ".join(f"`class {name}`" for name in classes)
            raise NoUsableCode(f"the code defines {names} but no class named exactly `ModelNew`, "
                               "which is the name the evaluator imports")
        raise NoUsableCode("the code defines no `class ModelNew` at the top level of the file")
    if not _has_forward(classes["ModelNew"], classes):
        raise NoUsableCode("`class ModelNew` has no `forward` method")


def parse_reply(text: str) -> ParsedReply:
    """The candidate file in an LLM reply, or NoUsableCode saying what is wrong with the reply."""
    text = _strip_reasoning(text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = text.split("\n")
    blocks = _code_blocks(lines)
    usable = [block for block in blocks if block.language in _PYTHON_TAGS] or \
        [block for block in blocks if _CLASS_MODELNEW.search(block.code)]
    if not usable:
        if blocks:
            tags = ", ".join(sorted({block.language or "untagged" for block in blocks}))
            raise NoUsableCode(f"the reply's code blocks are {tags}; the whole file must be one ```python block")
        if not _parses_as_python(text):  # else a bare file with no fences at all
            raise NoUsableCode("the reply contains no ```python code block")
        usable = [_Block("python", text, True, 0, len(lines) - 1)]
    chosen = ([block for block in usable if _CLASS_MODELNEW.search(block.code)] or usable)[-1]
    code = textwrap.dedent(chosen.code).strip("\n")
    if not code.strip():
        raise NoUsableCode("the ```python code block is empty")
    _check_candidate(code, cut_off=not chosen.closed)
    notes = "\n".join(lines[:chosen.first_line] + lines[chosen.last_line + 1:]).strip()
    return ParsedReply(source=code + "\n", notes=truncate(notes, NOTES_CHARS))


# ---- deduplication ----------------------------------------------------------------------

_C_LIKE = ("__global__", "__device__", "#include", 'extern "C"')


def _normalize_c(code: str) -> str:
    """C/CUDA source without comments, with each line's whitespace collapsed and blank lines
    dropped. Newlines stay: they end preprocessor directives, so they carry meaning."""
    out, i, n = [], 0, len(code)
    while i < n:
        if code.startswith("//", i):
            end = code.find("\n", i)
            i = n if end < 0 else end
        elif code.startswith("/*", i):
            end = code.find("*/", i + 2)
            i = n if end < 0 else end + 2
            out.append(" ")
        elif code[i] in "\"'":  # a literal: comment markers inside it are text
            j = i + 1
            while j < n and code[j] not in (code[i], "\n"):
                j += 2 if code[j] == "\\" else 1
            out.append(code[i:j + 1])
            i = j + 1
        else:
            out.append(code[i])
            i += 1
    lines = (" ".join(line.split()) for line in "".join(out).split("\n"))
    return "\n".join(line for line in lines if line)


class _Normalizer(ast.NodeTransformer):
    def visit_Expr(self, node: ast.Expr):
        # Docstrings and other bare strings are comments in effect.
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return None
        return self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant):
        if isinstance(node.value, str) and any(marker in node.value for marker in _C_LIKE):
            return ast.copy_location(ast.Constant(_normalize_c(node.value)), node)
        return node

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        if isinstance(getattr(node, "body", None), list) and not node.body and not isinstance(node, ast.Module):
            node.body = [ast.Pass()]
        return node


def normalized_source_hash(source: str) -> str:
    """sha256 of a candidate with comments, docstrings and layout normalized away, so copies
    that differ only in those dedup. An ast round trip drops Python comments and layout, but the
    CUDA or C++ inside string literals is data to Python and keeps its comments and whitespace;
    so string constants that look like C/CUDA are normalized too. Sources that do not parse
    are hashed with only line-end whitespace and blank lines normalized."""
    try:
        canonical = "py\n" + ast.unparse(_Normalizer().visit(ast.parse(source)))
    except (SyntaxError, ValueError, RecursionError):
        lines = (line.rstrip() for line in source.replace("\r\n", "\n").split("\n"))
        canonical = "raw\n" + "\n".join(line for line in lines if line)
    return hashlib.sha256(("evo-source-v1\n" + canonical).encode()).hexdigest()

"""The build hook's reading of an extension's sources for fast math asked for in the code."""

from __future__ import annotations

import pytest

from evo.sandbox.hooks import TOOL_FLAG, _fast_math_in_sources

ASKS = [
    '#pragma GCC optimize("fast-math")\nint x;',
    '_Pragma("GCC optimize(\\"Ofast\\")")',
    '__attribute__((optimize("-fassociative-math"))) void f();',
    '__attribute__((optimize("fast" "-math"))) void f();',  # adjacent literals are one to the compiler
    'const char* url = "http://x"; __attribute__((optimize("//", "fast-math"))) void f();',
    '#pragma GCC optimize("-fno-signed-zeros")',  # the no- forms that are fast math's parts
    '#pragma GCC \\\noptimize("Ofast")',  # a continued line
]
EXACT = [
    '// no fast-math here\nint x; /* nor Ofast */',
    '#pragma GCC optimize("no-fast-math")',
    '#pragma GCC optimize("O3", "unroll-loops")',
    'float fast = 1.f, math = 2.f; float y = fast - math;',
]


@pytest.mark.parametrize("source", ASKS)
def test_a_source_asking_for_fast_math_is_seen(source):
    assert _fast_math_in_sources({"cpp_sources": source})
    assert _fast_math_in_sources({"cuda_sources": ["int y;", source]})


@pytest.mark.parametrize("source", EXACT)
def test_a_source_that_only_mentions_it_or_asks_for_exact_math_is_not(source):
    assert not _fast_math_in_sources({"cpp_sources": source})


def test_the_files_of_a_load_are_read(tmp_path):
    (tmp_path / "kernel.cpp").write_text('#pragma GCC optimize("Ofast")\n')
    (tmp_path / "clean.cpp").write_text("int x;\n")
    assert _fast_math_in_sources({"sources": [str(tmp_path / "clean.cpp"), str(tmp_path / "kernel.cpp")]})
    assert not _fast_math_in_sources({"sources": str(tmp_path / "clean.cpp")})


@pytest.mark.parametrize("flag, refused", [
    ("-fplugin=/home/x/p.so", True), ("-Xcompiler=-fplugin=p.so", True), ("-B/home/x/bin", True), ("-B", True),
    ("@/home/x/flags", True), ("NVCC_PREPEND_FLAGS=-ccbin /home/x/cc", True), ("--compiler-bindir=/x", True),
    ("-wrapper", True), ("-O3", False), ("-Wl,-Bsymbolic", False), ("-std=c++17", False), ("-fopenmp", False),
])
def test_flags_that_make_the_compiler_run_a_chosen_program_are_refused(flag, refused):
    assert bool(TOOL_FLAG.search(flag)) is refused

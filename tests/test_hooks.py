"""The build hook's reading of an extension's sources for fast math asked for in the code."""

from __future__ import annotations

import pytest

from evo.sandbox.hooks import _fast_math_in_sources

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

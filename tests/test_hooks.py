"""The build hook's reading of an extension's sources for fast math asked for in the code, as
written and once preprocessed."""

from __future__ import annotations

import shutil

import pytest
import torch.utils.cpp_extension as cpp_extension

from evo.sandbox.hooks import TOOL_FLAG, _fast_math_in_sources, _fast_math_once_preprocessed
from evo.sandbox.preprocessed import compile_commands

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


def test_the_compile_commands_of_a_torch_build_are_read_without_what_they_write(tmp_path, monkeypatch):
    """From the build.ninja this torch writes (its rules differ between versions: nvcc took
    --generate-dependencies-with-compile, now -MD -MF)."""
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/cuda")  # where the file says nvcc is; nothing runs it
    monkeypatch.setenv("CXX", "c++")
    cpp_extension._write_ninja_file(
        tmp_path / "build.ninja", cflags=["-DNAME=probe", "-isystem /t/include"], post_cflags=["-O2"],
        cuda_cflags=["-DNAME=probe", "--compiler-options '-fPIC'"], cuda_post_cflags=["-gencode=arch=compute_90,code=sm_90"],
        cuda_dlink_post_cflags=None, sycl_cflags=None, sycl_post_cflags=None, sycl_dlink_post_cflags=None,
        sources=["/b/a dir/main.cpp", "/b/cuda.cu"], objects=["main.o", "cuda.cuda.o"], ldflags=["-shared"],
        library_target="probe.so", with_cuda=True, with_sycl=False)
    assert compile_commands((tmp_path / "build.ninja").read_text()) == [
        ["c++", "-DNAME=probe", "-isystem", "/t/include", "-O2", "/b/a dir/main.cpp"],  # ninja wrote "a$ dir"
        ["/cuda/bin/nvcc", "-DNAME=probe", "--compiler-options", "-fPIC", "-gencode=arch=compute_90,code=sm_90",
         "/b/cuda.cu"],
    ]


MACRO_BUILT = """#define PASTE(a, b) a##b
#define QUOTE(x) #x
#define NAME_OF(x) QUOTE(x)
#define FAST_PRAGMA(x) _Pragma(QUOTE(GCC optimize(x)))
__attribute__((optimize(NAME_OF(PASTE(O, fast))))) float f(float x) { return x * 2; }
"""


def built(tmp_path, source: str, compiler: str = "c++", rule: str = "compile", suffix: str = ".cpp"):
    """A build directory as torch leaves it: its build.ninja and the source it compiled."""
    (tmp_path / f"main{suffix}").write_text(source)
    tool = "nvcc" if rule == "cuda_compile" else "cxx"
    (tmp_path / "build.ninja").write_text(
        f"{tool} = {compiler}\nflags = -DUNUSED=1\n\nrule {rule}\n  command = ${tool} -MD -MF $out.d $flags -c $in -o $out\n\n"
        f"build main.o: {rule} {tmp_path / f'main{suffix}'}\n")
    return tmp_path


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("source, asked", [
    (MACRO_BUILT, 'optimize("Ofast")'),
    ('#define NOTE /* not fast-math */ 1\nint x = NOTE;\n', None),  # comments are gone once preprocessed
    ('#define Q(x) #x\n#define OPT(x) _Pragma(Q(GCC optimize(x)))\nOPT("unsafe-math-optimizations")\nint x;',
     "unsafe-math-optimizations"),
    ('#define OPT(x) __attribute__((optimize(x)))\n#define EXACT "O3"\nOPT(EXACT) int f();\n', None),
])
def test_fast_math_built_by_macros_shows_once_preprocessed(tmp_path, source, asked):
    found = _fast_math_once_preprocessed("probe", built(tmp_path, source))
    assert (asked in found[0]) if asked else not found, found


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_a_cuda_source_is_preprocessed_by_nvcc(tmp_path):
    source = MACRO_BUILT + "__global__ void k(float* x) { x[0] = 1.f; }\n"
    found = _fast_math_once_preprocessed("probe", built(tmp_path, source, "nvcc", "cuda_compile", ".cu"))
    assert found and 'optimize("Ofast")' in found[0], found


def test_a_build_that_cannot_be_preprocessed_is_not_taken_as_clean(tmp_path):
    with pytest.raises(RuntimeError, match="could not be preprocessed to check them for fast math"):
        _fast_math_once_preprocessed("probe", built(tmp_path, "#error no\n"))

"""Precompiled torch headers for load_inline builds (sandbox/precompiled.py, sandbox/pch.py,
evo/precompiled_headers.py): made by a trusted process, only for flags that cannot pull a
candidate's file into them, and changing nothing in what a build makes."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from conftest import EXAMPLE_TASKS, ROOT, verified_but_for_host_load
from evo.config import VerifyPolicy
from evo.evaluator import verify
from evo.precompiled_headers import PROMPT_FORMAT_SPEC
from evo.sandbox import precompiled
from evo.session import TaskSession

RELU = EXAMPLE_TASKS / "relu.py"
HONEST = ROOT / "examples" / "candidates" / "relu_cpu.py"
POLICY = dict(device="cpu", trials=1, timing_budget_s=0.2, max_timed_calls=30, load_timeout_s=300)

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("flags", [None, [], ["-O3"], ["-O2", "-g", "-Wall", "-std=c++20", "-DFAST=1", "-UNDEBUG"],
                                   ["-fopenmp", "-march=native", "-fno-strict-aliasing"]])
def test_flags_that_change_only_code_generation_get_a_header(flags):
    assert precompiled.spec(True, flags) == {"with_cuda": True, "extra_cflags": list(flags or [])}


def test_the_header_a_cuda_search_makes_ahead_is_the_one_its_prompts_builds_use():
    """evo optimize makes PROMPT_FORMAT_SPEC's header before the first build: the skeleton the
    prompts give for load_inline must build with exactly those flags, or it was made for nothing."""
    guide = (ROOT / "prompts" / "parts" / "format_load_inline.md").read_text()
    skeleton = ast.parse(guide.split("```python\n", 1)[1].split("```", 1)[0])
    call = next(node for node in ast.walk(skeleton)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_inline")
    arguments = {keyword.arg: keyword.value for keyword in call.keywords}
    with_cuda = ast.literal_eval(arguments["with_cuda"]) if "with_cuda" in arguments else "cuda_sources" in arguments
    extra_cflags = ast.literal_eval(arguments["extra_cflags"]) if "extra_cflags" in arguments else None
    assert precompiled.spec(with_cuda, extra_cflags) == PROMPT_FORMAT_SPEC


@pytest.mark.parametrize("flags", [["-include", "/tmp/mine.h"], ["-I/tmp"], ["-isystem", "/tmp"], ["@flags.txt"],
                                   ["-fplugin=/tmp/p.so"], ["-Wp,-include,/tmp/mine.h"], ["-imacros", "x.h"],
                                   ["-DX=$(touch /tmp/y)"], ["-B/tmp"], "-O3", [3]])
def test_flags_that_could_reach_a_file_get_none(flags):
    assert precompiled.spec(False, flags) is None


@pytest.mark.parametrize("claimed", [{"with_cuda": False, "extra_cflags": ["-include", "x.h"]},
                                     {"with_cuda": "yes", "extra_cflags": []},
                                     {"with_cuda": False, "extra_cflags": [], "key": "../../etc"}, ["-O3"], None])
def test_a_specification_from_a_build_sandbox_is_checked(claimed):
    assert precompiled.checked(claimed) is None


def built_code(cache: Path, scratch: Path) -> bytes:
    """The machine code of the extension's binding file (its strings name the sandbox's build
    directory, which differs between any two builds)."""
    objects = list((cache / "extensions").glob("*/evo_example_relu_cpu-*/main.o"))
    assert len(objects) == 1, objects
    code = scratch / f"{cache.name}.text"
    subprocess.run(["objcopy", "--dump-section", f".text={code}", str(objects[0]), str(scratch / "discarded.o")],
                   check=True, capture_output=True)
    return code.read_bytes()


def test_a_search_makes_the_header_and_builds_use_it_to_the_same_object(tmp_path):
    with_header, without = tmp_path / "with", tmp_path / "without"
    policy = VerifyPolicy(**POLICY)
    with TaskSession(RELU, policy, with_header, standby=1) as session:
        first = verify(RELU, HONEST, policy, with_header, session)  # its build finds no header and asks for one
        session.headers.thread.join()
        made = session.headers.replies
        (with_header / "extensions").rename(with_header / "first-extensions")  # build it again
        verdict = verify(RELU, HONEST, policy, with_header, session)
    # The header compiles beside the first verification's timing: only the build is at stake here.
    assert verified_but_for_host_load(first), first.summary
    assert "precompiled" not in next(check.detail for check in first.checks if check.name == "build")
    assert [reply.get("built") for reply in made] == [True], made
    assert len(list((with_header / "headers").glob(f"*/{precompiled.HEADER}.gch"))) == 1
    assert verdict.verdict == "verified", verdict.summary
    assert "precompiled" in next(check.detail for check in verdict.checks if check.name == "build")

    plain_policy = VerifyPolicy(**POLICY, precompiled_headers=False)
    plain = verify(RELU, HONEST, plain_policy, without)
    assert plain.verdict == "verified", plain.summary
    assert "precompiled" not in next(check.detail for check in plain.checks if check.name == "build")
    code = built_code(with_header, tmp_path)
    assert code and code == built_code(without, tmp_path)


def test_a_one_shot_verification_makes_no_header(tmp_path):
    verdict = verify(RELU, HONEST, VerifyPolicy(**POLICY), tmp_path)
    assert verdict.verdict == "verified", verdict.summary
    assert not list(tmp_path.glob("headers/*"))

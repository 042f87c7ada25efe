"""Broken task files: verdict 'error', exit code 2 through the CLI, and one line that names the problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TASKS

BROKEN = TASKS / "broken"
# Pure PyTorch: nothing to compile, so each run costs only the sandboxes' start-up.
CANDIDATE = ROOT / "tests" / "candidates" / "faults" / "no_custom_code.py"

pytestmark = pytest.mark.timeout(180)


def evo(*args: str, cache_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "EVO_CACHE_DIR": str(cache_dir)}
    return subprocess.run([sys.executable, "-m", "evo", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=170)


def assert_one_line(text: str) -> None:
    assert text.strip(), "empty message"
    assert "\n" not in text, f"not one line: {text!r}"
    assert "Traceback" not in text and 'File "' not in text, f"a traceback leaked: {text!r}"


# (task file, words the summary must contain, case-insensitively)
CASES = [
    ("syntax_error.py", ["syntax error", "line 7", "syntax_error.py"]),
    ("no_model.py", ["does not define", "model"]),
    ("no_get_inputs.py", ["does not define", "get_inputs"]),
    ("no_get_init_inputs.py", ["does not define", "get_init_inputs"]),
    ("inputs_not_list.py", ["get_inputs()", "tensor", "list"]),
    ("inputs_not_tensor.py", ["get_inputs()", "element 1", "str", "torch.tensor"]),
    ("forward_raises.py", ["reference", "forward", "runtimeerror", "evo-broken-task: the reference refuses",
                           "forward_raises.py, line 7"]),
    ("model_not_module.py", ["model", "not", "nn.module"]),
    ("inputs_change_size.py", ["get_inputs()", "larger inputs", "same shapes"]),
    ("does_not_exist.py", ["does_not_exist.py", "does not exist"]),
]


@pytest.mark.parametrize("task, words", CASES, ids=[case[0].removesuffix(".py") for case in CASES])
def test_broken_task_is_an_error(task, words, cache_dir):
    path = BROKEN / task
    assert path.exists() == (task != "does_not_exist.py")
    result = evo("verify", str(path), str(CANDIDATE), "--device", "cpu", "--json", cache_dir=cache_dir)
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    verdict = json.loads(result.stdout)
    assert verdict["verdict"] == "error"
    assert verdict["speedup"] is None
    summary = verdict["summary"]
    assert_one_line(summary)
    for word in words:
        assert word in summary.lower(), f"{word!r} missing from {summary!r}"
    # A broken task is the task's fault, never the candidate's: no check of the candidate failed.
    assert not [check for check in verdict["checks"] if not check["passed"]], verdict["checks"]


def test_broken_task_readable_report_is_one_line_without_traceback(cache_dir):
    result = evo("verify", str(BROKEN / "forward_raises.py"), str(CANDIDATE), "--device", "cpu",
                 cache_dir=cache_dir)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("ERROR") and "reference" in first

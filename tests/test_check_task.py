"""`python -m evo check-task`: tasks whose outputs barely depend on their inputs are flagged
(exit 1), honest tasks pass (exit 0), broken ones are errors (exit 2); `verify` reports the
same warnings in its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TASKS

AUDIT = TASKS / "audit"
# Rejected at load (no ModelNew) right after the task audit ran: the cheapest full verify.
NO_MODELNEW = ROOT / "tests" / "candidates" / "faults" / "no_modelnew.py"

pytestmark = pytest.mark.timeout(180)


def evo(*args, cache_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "EVO_CACHE_DIR": str(cache_dir)}
    return subprocess.run([sys.executable, "-m", "evo", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=170)


def check_task(task, cache_dir) -> tuple[int, dict]:
    result = evo("check-task", task, "--device", "cpu", "--json", cache_dir=cache_dir)
    assert result.stdout.count("\n") == 1, f"stdout is not one JSON object:\n{result.stdout[:2000]}"
    audit = json.loads(result.stdout)
    assert set(audit) >= {"status", "task", "device", "warnings", "error"}
    assert result.returncode == {"ok": 0, "warnings": 1, "error": 2}[audit["status"]], (result.returncode, audit)
    return result.returncode, audit


# (task, words each warning must contain; None: no warning)
CASES = [
    ("constant.py", ["output 0", "nearly constant", "1 everywhere"]),
    ("identity_on_domain.py", ["output 0", "equals input 0", "copying its input"]),
    ("seed_independent.py", ["output 0", "same for every input seed"]),
    ("normal.py", None),
]


@pytest.mark.parametrize("task, words", CASES, ids=[case[0].removesuffix(".py") for case in CASES])
def test_check_task_and_verify_agree(task, words, cache_dir):
    code, audit = check_task(AUDIT / task, cache_dir)
    if words is None:
        assert (code, audit["status"], audit["warnings"], audit["error"]) == (0, "ok", [], None)
        return
    assert (code, audit["status"], audit["error"]) == (1, "warnings", None)
    assert len(audit["warnings"]) == 1, audit["warnings"]
    warning = audit["warnings"][0]
    for word in words:
        assert word in warning, f"{word!r} missing from {warning!r}"
    assert "\n" not in warning
    result = evo("verify", AUDIT / task, NO_MODELNEW, "--device", "cpu", "--json", cache_dir=cache_dir)
    verdict = json.loads(result.stdout)
    assert verdict["verdict"] == "rejected", verdict["summary"]  # the candidate's fault, whatever the audit says
    assert verdict["warnings"] == audit["warnings"]


def test_readable_check_task(cache_dir):
    result = evo("check-task", AUDIT / "constant.py", "--device", "cpu", cache_dir=cache_dir)
    assert result.returncode == 1
    assert result.stdout.startswith("WARNINGS")
    assert "warning:" in result.stdout and "nearly constant" in result.stdout


def test_each_output_is_audited(cache_dir):
    code, audit = check_task(AUDIT / "second_output_constant.py", cache_dir)
    assert code == 1
    assert len(audit["warnings"]) == 1 and audit["warnings"][0].startswith("output 1 is nearly constant (2 everywhere)")


@pytest.mark.parametrize("task, words", [
    (TASKS / "broken" / "forward_raises.py", ["reference", "RuntimeError"]),
    (TASKS / "broken" / "syntax_error.py", ["syntax error"]),
    (AUDIT / "does_not_exist.py", ["does not exist"]),
], ids=["forward-raises", "syntax-error", "missing-file"])
def test_check_task_error(task, words, cache_dir):
    code, audit = check_task(task, cache_dir)
    assert code == 2 and audit["status"] == "error" and audit["warnings"] == []
    assert "\n" not in audit["error"] and "Traceback" not in audit["error"]
    for word in words:
        assert word in audit["error"]


def test_constant_integer_output_is_flagged(cache_dir):
    code, audit = check_task(AUDIT / "integer_constant.py", cache_dir)
    assert code == 1 and "nearly constant" in " ".join(audit["warnings"])


def test_all_nan_output_is_flagged(cache_dir):
    code, audit = check_task(AUDIT / "nan_everywhere.py", cache_dir)
    assert code == 1 and audit["warnings"]

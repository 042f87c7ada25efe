"""`python -m evo optimize` end to end on the CPU: the scripted provider, and the real OpenAI and
Anthropic SDKs talking to a local server. Every run judges its candidates with the real
evaluator, so these tests are slow-ish; the policy in FAST_CONFIG keeps each under a minute."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLE_TASKS, ROOT, TASKS
from evo import optimize
from evo.archive import Archive
from evo.cli import main as evo_main
from evo.verdict import Verdict
from evo.work import evaluate
from llm_server import Fail, Garbage, LLMServer, Reply

SCRIPTED = ROOT / "examples" / "scripted" / "relu"
RELU = EXAMPLE_TASKS / "relu.py"
SOFTMAX = TASKS / "cpu_softmax.py"
FAST_CONFIG = """
[verify]
timing_budget_s = 0.2
max_timed_calls = 30
trials = 2
audit_task = false

[optimize]
islands = 1
llm_concurrency = 1
evaluations_per_gpu = 1
remeasure_elites = false
llm_max_retries = 2
llm_timeout_s = 20
"""


def fenced(path: Path, replace: tuple[str, str] | None = None) -> str:
    source = path.read_text()
    if replace:
        source = source.replace(*replace)
    return f"Here is the kernel.\n```python\n{source}```\n"


@pytest.fixture
def workspace(tmp_path, cache_dir, monkeypatch):
    """A config file, an archive path, and an environment without API keys."""
    for key in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("EVO_CACHE_DIR", str(cache_dir))
    config = tmp_path / "evo.toml"
    config.write_text(FAST_CONFIG)
    return tmp_path, config, tmp_path / "archive" / "evo.sqlite"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evo", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def only_run(archive_path: Path) -> str:
    with Archive(archive_path, create=False) as archive:
        return archive.runs()[0].run_id


# ---- the scripted provider ---------------------------------------------------------------------

def test_scripted_batch_over_two_tasks_rejects_the_cheat(workspace):
    tmp, config, archive_path = workspace
    scripted = tmp / "scripted"
    (scripted / "relu").mkdir(parents=True)
    (scripted / "cpu_softmax").mkdir()
    for name in ("01_naive.py", "02_stale_output.py"):
        (scripted / "relu" / name).write_text((SCRIPTED / name).read_text())
    (scripted / "cpu_softmax" / "01.py").write_text(
        (ROOT / "tests" / "candidates" / "cpu" / "honest_softmax_workspace.py").read_text())
    result = run_cli("optimize", str(RELU), str(SOFTMAX), "--llm", f"scripted:{scripted}", "--device", "cpu",
                     "--config", str(config), "--archive", str(archive_path))
    assert result.returncode == 0, result.stderr + result.stdout
    assert "scripted" in result.stdout
    with Archive(archive_path, create=False) as archive:
        run_id = archive.runs()[0].run_id
        relu = {c.source.splitlines()[4]: c for c in archive.candidates(run_id, task=str(RELU))}
        verdicts = sorted(c.verdict for c in archive.candidates(run_id, task=str(RELU)))
        assert verdicts == ["rejected", "verified"], verdicts
        cheat = next(c for c in archive.candidates(run_id, task=str(RELU)) if c.verdict == "rejected")
        assert [check.name for check in cheat.checks if not check.passed][0] == "output_written", cheat.summary
        best = archive.best(task=str(RELU), run_id=run_id)
        assert best is not None and best.candidate_id != cheat.candidate_id and best.verdict == "verified"
        assert archive.best(task=str(SOFTMAX), run_id=run_id).verdict == "verified"
        assert archive.get_run(run_id).status == "finished"
    assert relu  # sources were kept whole
    shown = run_cli("archive", "best", str(RELU), "--archive", str(archive_path))
    assert shown.returncode == 0 and f"c{best.candidate_id}" in shown.stdout, shown.stdout + shown.stderr


def test_a_build_error_is_repaired_with_the_compiler_log(workspace):
    tmp, config, archive_path = workspace
    replies = tmp / "replies.jsonl"
    broken, honest = SCRIPTED / "03_build_error.py", SCRIPTED / "01_naive.py"
    fixed = (broken, ("auto y = torch::empty_like(x)\n", "auto y = torch::empty_like(x);\n"))
    replies.write_text("".join(json.dumps({"reply": text}) + "\n" for text in (
        fenced(broken), fenced(honest), fenced(*fixed))))
    code = evo_main(["optimize", str(RELU), "--llm", f"scripted:{replies}", "--device", "cpu",
                     "--config", str(config), "--archive", str(archive_path), "--max-candidates", "3"])
    assert code == 0
    with Archive(archive_path, create=False) as archive:
        run_id = archive.runs()[0].run_id
        candidates = {c.candidate_id: c for c in archive.candidates(run_id)}
        first, repair = candidates[1], next(c for c in candidates.values() if c.operator == "repair_build")
        assert first.verdict == "rejected" and [ch.name for ch in first.checks if not ch.passed] == ["build"]
        assert repair.parent_ids == [first.candidate_id] and repair.verdict == "verified", repair.summary
        prompt = json.loads(next(call for call in archive.llm_calls(run_id)
                                 if call.call_id == repair.llm_call_id).prompt)
        assert "expected" in prompt["messages"][-1]["content"]  # the compiler's complaint reached the LLM


def test_an_evaluator_error_is_judged_again_once(workspace, monkeypatch):
    """An `error` verdict is the evaluator's (on a GPU, another job computing beside the timing:
    evo.neighbours), not the candidate's: the candidate is judged again once. The errors are
    injected (a shared GPU cannot happen on a CPU); the evaluations after them are real."""
    tmp, config, archive_path = workspace
    replies = tmp / "replies.jsonl"
    replies.write_text("".join(json.dumps({"reply": fenced(SCRIPTED / name)}) + "\n"
                               for name in ("01_naive.py", "04_vectorized.py")))
    calls: dict[str, int] = {}

    def shared_gpu_at_first(path, session):
        calls[path.name] = calls.get(path.name, 0) + 1
        if calls[path.name] == 1 or path.name == "c2.py":
            summary = ("the candidate's timing failed timer_consistency while other processes computed on the GPU "
                       "(PID 4321 (python train.py) at 40% of the SMs): verify again on an idle GPU")
            return Verdict(verdict="error", task=str(session.task), candidate=str(path), device="cpu", summary=summary)
        return evaluate(path, session)

    monkeypatch.setattr(optimize, "evaluate", shared_gpu_at_first)
    code = evo_main(["optimize", str(RELU), "--llm", f"scripted:{replies}", "--device", "cpu",
                     "--config", str(config), "--archive", str(archive_path), "--max-candidates", "2"])
    assert code == 0
    assert calls == {"c1.py": 2, "c2.py": 2}
    with Archive(archive_path, create=False) as archive:
        verdicts = {c.candidate_id: c.verdict for c in archive.candidates(archive.runs()[0].run_id)}
    assert verdicts == {1: "verified", 2: "error"}, verdicts


# ---- real SDKs over HTTP -------------------------------------------------------------------------

def test_openai_compatible_server_with_retries_and_a_reply_without_code(workspace, monkeypatch):
    tmp, config, archive_path = workspace
    with LLMServer() as server:
        server.queue(Fail(429), Reply(text="I would use a grid-stride loop."), Fail(500),
                     Reply(text=fenced(SCRIPTED / "01_naive.py")))
        code = evo_main(["optimize", str(RELU), "--llm", f"openai-compatible:served-model@{server.url}/v1",
                         "--device", "cpu", "--config", str(config), "--archive", str(archive_path),
                         "--max-candidates", "1"])
        requests = server.requests_to("/v1/chat/completions")
    assert code == 0
    assert len(requests) == 4  # each failure retried by the SDK itself
    re_ask = requests[-1].body["messages"]
    assert re_ask[-2]["role"] == "assistant" and "grid-stride" in re_ask[-2]["content"]
    assert "ModelNew" in re_ask[-1]["content"]  # the no-code feedback restates the contract
    with Archive(archive_path, create=False) as archive:
        run_id = archive.runs()[0].run_id
        assert [c.verdict for c in archive.candidates(run_id)] == ["verified"]
        assert len(archive.llm_calls(run_id)) == 2


def test_anthropic_budget_stops_the_run(workspace, monkeypatch):
    tmp, config, archive_path = workspace
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    with LLMServer() as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        server.queue(*[Reply(text=fenced(SCRIPTED / "01_naive.py", ("256", str(64 + n))), input_tokens=200_000,
                             output_tokens=20_000) for n in range(5)])
        code = evo_main(["optimize", str(RELU), "--llm", "anthropic:claude-sonnet-4-5", "--device", "cpu",
                         "--config", str(config), "--archive", str(archive_path), "--budget-usd", "0.5"])
        requests = server.requests_to("/v1/messages")
    assert code == 0
    assert requests[0].body["system"][0]["cache_control"] == {"type": "ephemeral"}
    with Archive(archive_path, create=False) as archive:
        run_id = archive.runs()[0].run_id
        spent = archive.totals(run_id).spend.cost_usd
        assert spent >= 0.5 and len(requests) <= 2, (spent, len(requests))  # one call in flight at most


def test_a_provider_that_keeps_failing_stops_the_run_cleanly(workspace, capsys):
    tmp, config, archive_path = workspace
    with LLMServer() as server:
        server.queue(*[Garbage()] * 3)
        code = evo_main(["optimize", str(RELU), "--llm", f"openai-compatible:served-model@{server.url}/v1",
                         "--device", "cpu", "--config", str(config), "--archive", str(archive_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "failed 3 times in a row" in out and "no verified kernel" in out
    with Archive(archive_path, create=False) as archive:
        assert archive.get_run(archive.runs()[0].run_id).status == "finished"


def test_no_provider_names_the_options(workspace):
    tmp, config, archive_path = workspace
    result = run_cli("optimize", str(RELU), "--device", "cpu", "--archive", str(archive_path))
    assert result.returncode == 2
    assert "scripted:examples/scripted" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---- kill -9 and resume ------------------------------------------------------------------------------

def test_resume_after_sigkill_loses_only_work_in_flight(workspace):
    tmp, config, archive_path = workspace
    scripted = tmp / "scripted"
    scripted.mkdir()
    for n in range(3):
        (scripted / f"{n:02d}.py").write_text((SCRIPTED / "01_naive.py").read_text().replace("256", str(128 + n)))
    command = [sys.executable, "-m", "evo", "optimize", str(RELU), "--llm", f"scripted:{scripted}", "--device", "cpu",
               "--config", str(config), "--archive", str(archive_path)]
    search = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not evaluated_count(archive_path):
        time.sleep(0.5)
    os.killpg(search.pid, signal.SIGKILL)
    search.wait()
    assert evaluated_count(archive_path) >= 1
    run_id = only_run(archive_path)
    result = run_cli("optimize", "--resume", run_id, "--archive", str(archive_path))
    assert result.returncode == 0, result.stderr + result.stdout
    with Archive(archive_path, create=False) as archive:
        candidates = archive.candidates(run_id)
        # Every reply was asked for once: the resumed run went on after the replies already used
        # (a reply whose candidate was not yet recorded when the kill came is the work lost).
        assert len(archive.llm_calls(run_id)) == 3
        assert len(candidates) >= 2 and len({c.source_hash for c in candidates}) == len(candidates)
        assert all(c.verdict == "verified" for c in candidates), [c.summary for c in candidates]
        assert archive.get_run(run_id).status == "finished"


def evaluated_count(archive_path: Path) -> int:
    if not archive_path.exists():
        return 0
    try:
        with sqlite3.connect(archive_path, timeout=5) as db:
            return db.execute("SELECT count(*) FROM candidates WHERE verdict IS NOT NULL").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0

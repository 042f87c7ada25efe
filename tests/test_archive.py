"""The archive: real SQLite files, several threads and processes, a writer killed mid-write."""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from evo import archive as archive_module
from evo import archive_views as views
from evo.archive import SCHEMA_VERSION, Archive, ArchiveError, file_sha256

ROOT = Path(__file__).resolve().parent.parent


def verdict(name: str = "verified", speedup: float | None = 2.0, summary: str = "verified") -> dict:
    return {"verdict": name, "summary": summary, "task": "task.py", "candidate": "candidate.py", "device": "cuda:0",
            "speedup": speedup, "checks": [{"name": "values", "passed": name == "verified", "detail": "error 1e-7"}],
            "environment": {"gpu": "NVIDIA H200", "torch": "2.11.0", "evo": "0.1.0"}}


@pytest.fixture
def archive(tmp_path):
    with Archive(tmp_path / "archive" / "evo.sqlite") as opened:
        yield opened


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "relu.py"
    path.write_text("class Model: ...\n")
    return path


def new_run(archive: Archive, tasks=("relu.py",)) -> str:
    return archive.create_run(config={"islands": 2}, command=["python", "-m", "evo", "optimize", *tasks],
                              tasks=list(tasks), hardware={"gpu": "NVIDIA H200", "sm_count": 132})


def add(archive: Archive, run_id: str, source: str = "src", task: str = "relu.py", task_hash: str = "hash-relu",
        operator: str = "translate", parents=(), result: dict | None = None) -> int:
    candidate_id = archive.add_candidate(run_id, task=task, task_hash=task_hash, source=source,
                                         source_hash=f"h-{source}", operator=operator, parent_ids=parents)
    if result is not None:
        archive.record_evaluation(candidate_id, result, build_log="nvcc ok")
    return candidate_id


def test_runs_are_created_listed_and_finished(archive, tmp_path):
    assert (tmp_path / "archive").is_dir()
    first = new_run(archive)
    time.sleep(0.01)
    second = new_run(archive, tasks=("a.py", "b.py"))
    assert re.fullmatch(r"r\d{6}-\d{4}-[a-z2-9]{3}", first) and first != second
    assert [run.run_id for run in archive.runs()] == [second, first]
    run = archive.get_run(second)
    assert run.status == "running" and run.finished_at is None and run.tasks == ["a.py", "b.py"]
    assert run.command == "python -m evo optimize a.py b.py" and run.hardware["sm_count"] == 132
    assert run.config == {"islands": 2} and run.software["evo"] and run.software["python"]
    archive.finish_run(second, "stopped")
    assert archive.get_run(second).status == "stopped" and archive.get_run(second).finished_at is not None
    with pytest.raises(ArchiveError, match=r"no run named r000 in .*evo archive list"):
        archive.get_run("r000")


def test_a_missing_archive_is_not_created_for_reading(tmp_path):
    with pytest.raises(ArchiveError, match="there is no archive at"):
        Archive(tmp_path / "nowhere.sqlite", create=False)
    assert not (tmp_path / "nowhere.sqlite").exists()


def test_candidates_move_from_pending_to_evaluated(archive):
    run_id = new_run(archive)
    built, wrong, broken, gave_up = (add(archive, run_id, source) for source in ("a", "b", "c", "d"))
    archive.record_build(built, "compiled in 23 s")
    assert [c.candidate_id for c in archive.unfinished(run_id)] == [built, wrong, broken, gave_up]
    archive.record_evaluation(built, verdict(speedup=1.5))
    archive.record_evaluation(wrong, verdict("rejected", speedup=None, summary="values: error 0.3"), build_log="log")
    archive.record_evaluation(broken, verdict("error", speedup=None))
    archive.mark_failed(gave_up, "the build worker died")
    assert archive.unfinished(run_id) == []
    good = archive.candidate(built)
    assert (good.status, good.verdict, good.speedup, good.build_log) == ("evaluated", "verified", 1.5, "compiled in 23 s")
    assert good.checks[0].name == "values" and good.checks[0].passed and good.environment["gpu"] == "NVIDIA H200"
    assert good.verdict_json["device"] == "cuda:0" and good.evaluated_at >= good.created_at
    assert archive.candidate(wrong).summary == "values: error 0.3" and archive.candidate(wrong).build_log == "log"
    assert archive.candidate(broken).status == "failed" and archive.candidate(gave_up).summary == "the build worker died"
    assert [c.candidate_id for c in archive.candidates(run_id, verdict="rejected")] == [wrong]
    assert len(archive.candidates(run_id, task="relu.py")) == 4 and archive.candidates(run_id, task="other.py") == []
    with pytest.raises(ArchiveError, match="no candidate c999"):
        archive.record_evaluation(999, verdict())
    with pytest.raises(ArchiveError, match="cannot add a candidate to run r000"):
        add(archive, "r000")


def test_best_is_verified_and_ranked_by_median_across_runs(archive, task_file):
    task, task_hash = str(task_file), file_sha256(task_file)
    first, second = new_run(archive), new_run(archive)
    slow = add(archive, first, "slow", task, task_hash, result=verdict(speedup=1.5))
    fast = add(archive, second, "fast", task, task_hash, result=verdict(speedup=2.0))
    # A rejected candidate claiming a huge speedup never ranks, whatever its verdict JSON says.
    cheat = add(archive, second, "cheat", task, task_hash, result=verdict("rejected", speedup=1000.0))
    assert archive.candidate(cheat).speedup is None and archive.candidate(cheat).verdict_json["speedup"] == 1000.0
    raw = sqlite3.connect(archive.path)  # even a speedup written into a rejected row by hand never ranks
    raw.execute("UPDATE candidates SET speedup = 1000.0 WHERE candidate_id = ?", (cheat,))
    raw.commit()
    raw.close()
    # One lucky measurement loses to its re-measurements: median(3.0, 1.0, 1.1) = 1.1.
    lucky = add(archive, second, "lucky", task, task_hash, result=verdict(speedup=3.0))
    archive.add_remeasurement(lucky, 1.0, {"median_ms": 1.0})
    archive.add_remeasurement(lucky, 1.1, None)
    # A re-measurement that does not verify disqualifies, however fast the first one was.
    flaky = add(archive, second, "flaky", task, task_hash, result=verdict(speedup=5.0))
    archive.add_remeasurement(flaky, None, None, verdict="rejected")
    assert archive.candidate(lucky).fitness == 1.1 and archive.candidate(flaky).fitness is None
    assert archive.best().candidate_id == fast
    assert archive.best(run_id=first).candidate_id == slow
    assert archive.best(task).candidate_id == fast  # the file: matched by its content's hash
    assert archive.best(task_hash, run_id=first).candidate_id == slow
    assert archive.best("other.py") is None
    assert archive.totals(second).best_speedup == 2.0
    task_file.write_text("class Model: 'edited, so another task'\n")
    assert archive.best(task) is None


def test_dedup_lookup_by_source_hash(archive):
    first, second = new_run(archive), new_run(archive)
    original = add(archive, first, "kernel")
    add(archive, first, "kernel")  # a duplicate the loop would have skipped; the first one is found
    assert archive.find_by_source_hash(first, "hash-relu", "h-kernel").candidate_id == original
    assert archive.find_by_source_hash(second, "hash-relu", "h-kernel") is None
    assert archive.find_by_source_hash(None, "hash-relu", "h-kernel").candidate_id == original
    assert archive.find_by_source_hash(first, "other-task", "h-kernel") is None


def test_lineage_follows_first_parents_back_to_the_root(archive):
    run_id = new_run(archive)
    root = add(archive, run_id, "root", result=verdict(speedup=1.0))
    other = add(archive, run_id, "other", result=verdict(speedup=1.2))
    child = add(archive, run_id, "child", operator="improve", parents=[root], result=verdict("rejected", None))
    fixed = add(archive, run_id, "fixed", operator="repair_wrong", parents=[child], result=verdict(speedup=1.4))
    cross = add(archive, run_id, "cross", operator="crossover", parents=[fixed, other], result=verdict(speedup=2.5))
    steps = archive.lineage(cross)
    assert [(s.candidate_id, s.operator) for s in steps] == [
        (root, "translate"), (child, "improve"), (fixed, "repair_wrong"), (cross, "crossover")]
    assert steps[-1].parent_ids == [fixed, other] and archive.candidate(cross).parent_ids == [fixed, other]
    assert archive.lineage(root)[0].parent_ids == []
    summary = archive.run_summary(run_id).tasks[0]
    assert summary.best.candidate_id == cross and [s.candidate_id for s in summary.lineage][0] == root


def test_run_summary_counts_outcomes_and_spend_per_task(archive):
    run_id = new_run(archive, tasks=("relu.py", "softmax.py"))
    call = archive.add_llm_call(run_id, provider="anthropic", model="claude", task="relu.py",
                                prompt={"system": "you write CUDA", "messages": [{"role": "user", "content": "go"}]},
                                reply="```python\n...```", input_tokens=1000, output_tokens=200,
                                cached_input_tokens=800, cost_usd=0.25, latency_s=3.5)
    archive.add_llm_call(run_id, provider="anthropic", model="claude", task="softmax.py", prompt=[], reply=None,
                         error="rate limited", cost_usd=0.0)
    archive.add_llm_call(run_id, provider="script", model="-", prompt=[], reply="x", scripted=True)
    made = archive.add_candidate(run_id, task="relu.py", task_hash="hash-relu", source="a", source_hash="a",
                                 operator="translate", llm_call_id=call)
    archive.record_evaluation(made, verdict(speedup=1.7))
    add(archive, run_id, "b", result=verdict("rejected", None))
    add(archive, run_id, "c", task="softmax.py", task_hash="hash-softmax")
    summary = archive.run_summary(run_id)
    assert summary.totals.candidates == 3 and summary.totals.verified == 1 and summary.totals.unfinished == 1
    assert summary.totals.spend.llm_calls == 3 and summary.totals.spend.failed_calls == 1
    assert summary.totals.spend.scripted_calls == 1 and summary.totals.spend.cost_usd == pytest.approx(0.25)
    relu, softmax = summary.tasks
    assert relu.outcomes == {"verified": 1, "rejected": 1, "error": 0, "unfinished": 0, "failed": 0}
    assert relu.best.candidate_id == made and relu.best.llm_call_id == call and relu.spend.cached_input_tokens == 800
    assert softmax.best is None and softmax.outcomes["unfinished"] == 1 and softmax.spend.failed_calls == 1
    stored = archive.llm_calls(run_id, task="relu.py")[0]
    assert stored.prompt["messages"][0]["content"] == "go" and stored.latency_s == 3.5 and not stored.scripted


def test_state_for_resuming_a_run(archive):
    run_id = new_run(archive)
    assert archive.load_state(run_id, "rng") is None and archive.load_state(run_id, "rng", default=[]) == []
    archive.save_state(run_id, "rng", {"state": [1, 2, 3]})
    archive.save_state(run_id, "rng", {"state": [4]})
    assert archive.load_state(run_id, "rng") == {"state": [4]}


# Version 1 of the schema, exactly as it shipped: an archive written then must open in every later evo.
SCHEMA_V1 = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT,
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'stopped', 'failed')),
    config TEXT NOT NULL, command TEXT NOT NULL, tasks TEXT NOT NULL, hardware TEXT NOT NULL, software TEXT NOT NULL);
CREATE TABLE llm_calls (call_id INTEGER PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs (run_id), task TEXT,
    provider TEXT NOT NULL, model TEXT NOT NULL, prompt TEXT NOT NULL, reply TEXT, input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, cached_input_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL, latency_s REAL,
    scripted INTEGER NOT NULL, error TEXT, created_at TEXT NOT NULL);
CREATE TABLE candidates (candidate_id INTEGER PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs (run_id),
    task TEXT NOT NULL, task_hash TEXT NOT NULL, island INTEGER NOT NULL, generation INTEGER NOT NULL,
    operator TEXT NOT NULL, source TEXT NOT NULL, source_hash TEXT NOT NULL,
    llm_call_id INTEGER REFERENCES llm_calls (call_id),
    status TEXT NOT NULL CHECK (status IN ('pending', 'built', 'evaluated', 'failed')),
    verdict TEXT CHECK (verdict IN ('verified', 'rejected', 'error')), summary TEXT, checks TEXT NOT NULL DEFAULT '[]',
    speedup REAL, speedup_vs_compile REAL, timings TEXT, roofline TEXT, verdict_json TEXT, build_log TEXT,
    environment TEXT, created_at TEXT NOT NULL, evaluated_at TEXT);
CREATE TABLE candidate_parents (candidate_id INTEGER NOT NULL REFERENCES candidates (candidate_id),
    parent_id INTEGER NOT NULL REFERENCES candidates (candidate_id), position INTEGER NOT NULL,
    PRIMARY KEY (candidate_id, position));
INSERT INTO runs VALUES ('r250101-0900-abc', '2025-01-01T09:00:00.000+00:00', NULL, 'finished', '{}',
    'python -m evo optimize relu.py', '["relu.py"]', '{}', '{}');
INSERT INTO candidates (run_id, task, task_hash, island, generation, operator, source, source_hash, status, verdict,
    speedup, created_at) VALUES ('r250101-0900-abc', 'relu.py', 'hash-relu', 0, 0, 'translate', 'old kernel', 'h',
    'evaluated', 'verified', 1.8, '2025-01-01T09:01:00.000+00:00');
PRAGMA user_version = 1;
"""


def build_v1(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.executescript(SCHEMA_V1)
    connection.close()


def test_an_older_archive_is_upgraded_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    build_v1(path)
    with Archive(path) as upgraded:
        assert upgraded.get_run("r250101-0900-abc").status == "finished"
        old = upgraded.best("relu.py")
        assert old.source == "old kernel" and old.fitness == 1.8
        upgraded.add_remeasurement(old.candidate_id, 1.6, None)  # a table version 2 added
        assert upgraded.candidate(old.candidate_id).fitness == pytest.approx(1.7)
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failed_migration_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite"
    build_v1(path)
    shipped = list(archive_module.MIGRATIONS)
    broken = [*shipped, "CREATE TABLE extra (x);\nTHIS IS NOT SQL;\n"]
    monkeypatch.setattr(archive_module, "MIGRATIONS", broken)
    monkeypatch.setattr(archive_module, "SCHEMA_VERSION", len(broken))
    with pytest.raises(ArchiveError, match="failed at migration 3 .* left unchanged"):
        Archive(path)
    connection = sqlite3.connect(path)
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert connection.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "extra" not in tables and "remeasurements" not in tables
    connection.close()

    def add_column(connection: sqlite3.Connection) -> None:  # a migration may be a function
        connection.execute("ALTER TABLE runs ADD COLUMN note TEXT")

    fixed = [*shipped, add_column]
    monkeypatch.setattr(archive_module, "MIGRATIONS", fixed)
    monkeypatch.setattr(archive_module, "SCHEMA_VERSION", len(fixed))
    with Archive(path) as upgraded:
        assert upgraded.get_run("r250101-0900-abc").status == "finished"
    assert sqlite3.connect(path).execute("SELECT note FROM runs").fetchone() == (None,)


def test_an_archive_from_a_newer_evo_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / "evo.sqlite"
    Archive(path).close()
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    with pytest.raises(ArchiveError) as raised:
        Archive(path)
    message = str(raised.value)
    assert "written by a newer evo" in message and "upgrade evo" in message and "\n" not in message


def test_files_that_are_not_evo_archives_are_refused(tmp_path):
    text = tmp_path / "notes.sqlite"
    text.write_text("not a database, but long enough to have a header that SQLite reads and rejects" * 10)
    with pytest.raises(ArchiveError, match="is not an evo archive"):
        Archive(text)
    foreign = tmp_path / "foreign.sqlite"
    sqlite3.connect(foreign).execute("CREATE TABLE photos (id)").connection.commit()
    with pytest.raises(ArchiveError, match="not an evo archive"):
        Archive(foreign)


def test_writer_threads_and_a_reader_work_at_once(tmp_path):
    path = tmp_path / "evo.sqlite"
    writer, reader = Archive(path), Archive(path)  # the reader stands for `evo archive list` in another terminal
    run_id = new_run(writer)
    errors: list[BaseException] = []
    done = threading.Event()

    def write(worker: int) -> None:
        try:
            for number in range(25):
                add(writer, run_id, f"w{worker}-{number}", result=verdict(speedup=1.0 + number / 100))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    def read() -> None:
        seen = 0
        try:
            while not done.is_set():
                now = len(reader.candidates(run_id))
                assert now >= seen and reader.totals(run_id).candidates >= now
                seen = now
                views.render_text(views.list_view(reader))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    watcher = threading.Thread(target=read)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()
    assert errors == []
    assert len(reader.candidates(run_id, verdict="verified")) == 100 and reader.best().speedup == 1.24
    writer.close()
    reader.close()


WRITER = """
import sys
from evo.archive import Archive
archive = Archive(sys.argv[1])
run_id = archive.create_run(config={}, command="writer", tasks=["relu.py"], hardware={})
print(run_id, flush=True)
verdict = {"verdict": "verified", "summary": "ok", "task": "t", "candidate": "c", "device": "cpu", "speedup": 1.5,
           "checks": [{"name": "values", "passed": True, "detail": "x" * 5000}]}
number = 0
while True:
    number += 1
    candidate_id = archive.add_candidate(run_id, task="relu.py", task_hash="h", source="s" * 20000 + str(number),
                                         source_hash=str(number), operator="translate")
    archive.record_evaluation(candidate_id, verdict, build_log="log " * 2000)
    print(candidate_id, flush=True)  # only after the commit returned
"""


def test_a_writer_killed_mid_write_loses_nothing_committed(tmp_path):
    """Three writers in turn, each SIGKILLed at a random moment while it writes nonstop (sources
    big enough that WAL checkpoints run meanwhile); after each, the file is whole and holds every
    row whose commit had returned."""
    path = tmp_path / "evo.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    committed: dict[str, list[int]] = {}
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(path)], stdout=subprocess.PIPE,
                                 text=True, env=env)
        try:
            run_id = child.stdout.readline().strip()
            assert run_id.startswith("r"), "the writer did not start"
            committed[run_id] = []
            with Archive(path) as reader:  # reads while the writer writes
                while len(committed[run_id]) < 60:
                    committed[run_id].append(int(child.stdout.readline()))
                    if len(committed[run_id]) % 20 == 0:
                        assert len(reader.candidates(run_id)) >= len(committed[run_id])
            time.sleep(random.uniform(0, 0.05))
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        assert child.returncode == -signal.SIGKILL
        with Archive(path) as reopened:
            assert reopened._connection().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            for run_id, ids in committed.items():
                stored = {c.candidate_id: c for c in reopened.candidates(run_id)}
                assert set(ids) <= set(stored)
                assert all(stored[c].verdict == "verified" and stored[c].build_log.startswith("log") for c in ids)
            assert reopened.best().fitness == 1.5 and len(reopened.runs()) == len(committed)


def test_views_show_what_the_cli_prints(archive):
    run_id = new_run(archive)
    base = add(archive, run_id, "x = 1\ny = 2\n", result=verdict(speedup=1.25))
    better = add(archive, run_id, "x = 1\ny = 3\n", operator="improve", parents=[base],
                 result=verdict(speedup=2.5))
    wrong = add(archive, run_id, "x = 1\n", operator="improve", parents=[base],
                result=verdict("rejected", speedup=90.0, summary="output_shape: [4, 4] expected, got [red]"))
    listing = views.render_text(views.list_view(archive))
    assert run_id in listing and "2.50x" in listing and "running" in listing
    shown = views.render_text(views.show_view(archive, run_id), width=200)
    assert f"c{base} translate -> c{better} improve" in shown and "[4, 4] expected, got [red]" in shown
    assert "90.00x" not in shown  # a rejected candidate's claimed speedup is never shown
    one = views.render_text(views.show_view(archive, f"c{wrong}"))
    assert "rejected" in one and "values" in one and "FAIL" in one and "x = 1" in one
    best = views.render_text(views.best_view(archive, "relu.py"))
    assert f"c{better}" in best and "2.50x" in best and "y = 3" in best and "improve" in best
    assert "no verified candidate" in views.render_text(views.best_view(archive, "softmax.py"))
    diff = views.render_text(views.diff_view(archive, base, better))
    assert "-y = 2" in diff and "+y = 3" in diff and "1.25x" in diff and "2.50x" in diff
    assert "identical" in views.render_text(views.diff_view(archive, base, base))
    with pytest.raises(ArchiveError, match="not a candidate id"):
        views.show_view(archive, "banana")

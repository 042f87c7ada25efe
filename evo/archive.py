"""The archive: every run, candidate, evaluation and LLM call, kept in one SQLite file.
archive/README.md documents the schema; evo/archive_views.py renders it for `evo archive`.
This file holds the Archive class; the schema and its migrations are in evo/archive_schema.py, the
records it returns in evo/archive_models.py. Callers import those records, ArchiveError and
SCHEMA_VERSION from here."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import secrets
import shlex
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from evo import __version__
from evo.archive_models import (Candidate, LineageStep, LLMCall, Run, RunStatus, RunSummary, RunTotals, Spend,
                                TaskSummary, VerdictName, fitness)
from evo.archive_schema import (APPLICATION_ID, CANDIDATE_SELECT, MIGRATIONS, SCHEMA_VERSION, SPEND_SELECT,
                                ArchiveError, apply_migration, decode)
from evo.verdict import Verdict

DEFAULT_PATH = Path("archive") / "evo.sqlite"  # relative to the directory evo runs in
BUSY_TIMEOUT_S = 30.0  # how long a write waits for another writer's transaction before failing


def file_sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def software_fingerprint() -> dict:
    """Versions that change what a measurement means, read without importing torch."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {"evo": __version__, "torch": torch_version, "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_run_id() -> str:
    alphabet = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o or 1/l/i to misread
    return f"r{datetime.now():%y%m%d-%H%M}-" + "".join(secrets.choice(alphabet) for _ in range(3))


class Archive:
    """One archive file. Concurrency: one connection per thread (sqlite3 connections must not be
    used by two threads at once), in WAL mode, so readers in any process never block the writer
    nor see half a transaction; writers take the write lock up front (BEGIN IMMEDIATE) and wait
    for each other up to BUSY_TIMEOUT_S. Every write is one committed transaction, synchronous=FULL:
    a kill -9 loses at most the write in flight and never corrupts the file."""

    def __init__(self, path: Path | str = DEFAULT_PATH, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise ArchiveError(f"there is no archive at {self.path}; a run creates it (`python -m evo optimize`)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._migrate(self._connection())
        except sqlite3.DatabaseError as err:
            self.close()
            raise ArchiveError(f"{self.path} is not an evo archive (SQLite says: {err}); "
                               "point evo at another archive file") from err
        except ArchiveError:
            self.close()
            raise

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for connection in self._connections:
                connection.close()
            self._connections.clear()

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            return connection
        with self._lock:
            if self._closed:
                raise ArchiveError(f"the archive {self.path} was closed; open it again")
            # isolation_level=None: transactions are ours (BEGIN ... COMMIT), never implicit.
            # check_same_thread=False only so close() may close other threads' connections.
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                         check_same_thread=False)
            self._connections.append(connection)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode = WAL")  # stays on in the file; a no-op after the first time
        connection.execute("PRAGMA synchronous = FULL")  # commits survive power loss too; writes are rare
        connection.execute("PRAGMA foreign_keys = ON")
        self._local.connection = connection
        return connection

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE: take the write lock before reading, so that a transaction never has to
        # upgrade a read snapshot to a write (which fails at once in WAL, whatever the timeout).
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:  # also when COMMIT itself failed (a full disk)
                connection.execute("ROLLBACK")
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """Several queries that see one snapshot, whatever the writer commits meanwhile. Nests:
        an inner _read joins the outer one's snapshot."""
        connection = self._connection()
        if connection.in_transaction:
            yield connection
            return
        connection.execute("BEGIN")
        try:
            yield connection
        finally:
            connection.execute("COMMIT")

    def _migrate(self, connection: sqlite3.Connection) -> None:
        """Bring the file to SCHEMA_VERSION in one transaction: a failed upgrade leaves the file
        exactly as the older evo wrote it. Two processes opening an old file upgrade it once."""
        if self._version(connection) == SCHEMA_VERSION:
            return
        with self._write():
            version = self._version(connection)
            for number in range(version, SCHEMA_VERSION):
                try:
                    apply_migration(connection, MIGRATIONS[number])
                except sqlite3.Error as err:
                    raise ArchiveError(f"upgrading {self.path} from schema version {version} failed at migration "
                                       f"{number + 1} ({err}); the file was left unchanged") from err
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _version(self, connection: sqlite3.Connection) -> int:
        application = connection.execute("PRAGMA application_id").fetchone()[0]
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if application not in (0, APPLICATION_ID) or (version == 0 and connection.execute(
                "SELECT count(*) FROM sqlite_master").fetchone()[0]):
            raise ArchiveError(f"{self.path} is a SQLite file but not an evo archive; point evo at another archive file")
        if version > SCHEMA_VERSION:
            raise ArchiveError(f"{self.path} was written by a newer evo (archive schema version {version}, this evo "
                               f"reads up to {SCHEMA_VERSION}); upgrade evo to open it")
        return version

    # Runs.

    def create_run(self, *, config: dict, command: str | Sequence[str], tasks: Sequence[str], hardware: dict,
                   software: dict | None = None) -> str:
        command_line = command if isinstance(command, str) else shlex.join(command)
        for _ in range(20):  # a clash needs two runs in one minute drawing one of 24,389 suffixes
            run_id = new_run_id()
            try:
                with self._write() as db:
                    db.execute("INSERT INTO runs VALUES (?, ?, NULL, 'running', ?, ?, ?, ?, ?)",
                               (run_id, now(), json.dumps(config), command_line, json.dumps(list(tasks)),
                                json.dumps(hardware), json.dumps(software or software_fingerprint())))
                return run_id
            except sqlite3.IntegrityError:
                continue
        raise ArchiveError(f"could not find a free run id in {self.path}; try again in a minute")

    def get_run(self, run_id: str) -> Run:
        row = self._connection().execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise ArchiveError(f"no run named {run_id} in {self.path}; `python -m evo archive list` shows the runs")
        return Run(**decode(row))

    def runs(self) -> list[Run]:
        """Newest first."""
        rows = self._connection().execute("SELECT * FROM runs ORDER BY started_at DESC, run_id DESC")
        return [Run(**decode(row)) for row in rows]

    def finish_run(self, run_id: str, status: RunStatus) -> None:
        if status == "running":
            raise ArchiveError("a run finishes as finished, stopped or failed, not running")
        self.get_run(run_id)
        with self._write() as db:
            db.execute("UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?", (status, now(), run_id))

    def totals(self, run_id: str) -> RunTotals:
        self.get_run(run_id)
        with self._read() as db:
            counts = db.execute(
                """SELECT count(*), count(*) FILTER (WHERE verdict = 'verified'),
                   count(*) FILTER (WHERE verdict = 'rejected'), count(*) FILTER (WHERE verdict = 'error'),
                   count(*) FILTER (WHERE status IN ('pending', 'built')) FROM candidates WHERE run_id = ?""",
                (run_id,)).fetchone()
            best = max(self._fitnesses("c.run_id = ?", (run_id,)).values(), default=None)
            spend = Spend(**decode(db.execute(SPEND_SELECT, (run_id,)).fetchone()))
        return RunTotals(candidates=counts[0], verified=counts[1], rejected=counts[2], errors=counts[3],
                         unfinished=counts[4], best_speedup=best, spend=spend)

    def save_state(self, run_id: str, key: str, value: Any) -> None:
        """Keep a JSON value (the search's RNG state, counters...) for resuming the run."""
        with self._write() as db:
            db.execute("INSERT INTO run_state VALUES (?, ?, ?, ?) ON CONFLICT (run_id, key) DO UPDATE "
                       "SET value = excluded.value, updated_at = excluded.updated_at",
                       (run_id, key, json.dumps(value), now()))

    def load_state(self, run_id: str, key: str, default: Any = None) -> Any:
        row = self._connection().execute("SELECT value FROM run_state WHERE run_id = ? AND key = ?",
                                         (run_id, key)).fetchone()
        return default if row is None else json.loads(row["value"])

    # Candidates.

    def add_candidate(self, run_id: str, *, task: str, task_hash: str, source: str, source_hash: str, operator: str,
                      parent_ids: Sequence[int] = (), island: int = 0, generation: int = 0,
                      llm_call_id: int | None = None) -> int:
        with self._write() as db, self._explained(f"cannot add a candidate to run {run_id}: the run, a parent "
                                                  f"{list(parent_ids)} or LLM call {llm_call_id} is not in the archive"):
            cursor = db.execute(
                """INSERT INTO candidates (run_id, task, task_hash, island, generation, operator, source, source_hash,
                   llm_call_id, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)""",
                (run_id, str(task), task_hash, island, generation, operator, source, source_hash, llm_call_id, now()))
            db.executemany("INSERT INTO candidate_parents VALUES (?, ?, ?)",
                           [(cursor.lastrowid, parent, position) for position, parent in enumerate(parent_ids)])
        return cursor.lastrowid

    @contextmanager
    def _explained(self, message: str) -> Iterator[None]:
        """Turn a broken reference (foreign key) into a sentence a user understands."""
        try:
            yield
        except sqlite3.IntegrityError as err:
            raise ArchiveError(f"{message} ({err})") from err

    def record_build(self, candidate_id: int, build_log: str) -> None:
        """The candidate compiled; its evaluation is still to come."""
        self._update(candidate_id, "status = 'built', build_log = ?", (build_log,))

    def record_evaluation(self, candidate_id: int, verdict: Verdict | dict, build_log: str | None = None,
                          fingerprint: dict | None = None) -> None:
        """Keep a verdict. A speedup is kept only when verified: a rejected candidate's claim stays
        in verdict_json and can never rank. fingerprint defaults to the verdict's environment."""
        verdict = verdict if isinstance(verdict, Verdict) else Verdict.model_validate(verdict)
        verified = verdict.verdict == "verified"
        self._update(
            candidate_id,
            """status = ?, verdict = ?, summary = ?, checks = ?, speedup = ?, speedup_vs_compile = ?, timings = ?,
               roofline = ?, verdict_json = ?, build_log = coalesce(?, build_log), environment = ?, evaluated_at = ?""",
            ("failed" if verdict.verdict == "error" else "evaluated", verdict.verdict, verdict.summary,
             json.dumps([check.model_dump() for check in verdict.checks]),
             verdict.speedup if verified else None, verdict.speedup_vs_compile if verified else None,
             verdict.timings.model_dump_json(), verdict.roofline.model_dump_json() if verdict.roofline else None,
             verdict.model_dump_json(), build_log, json.dumps(fingerprint or verdict.environment), now()))

    def mark_failed(self, candidate_id: int, reason: str) -> None:
        """No verdict will come (the build worker died, the run gave up on it); reason says why."""
        self._update(candidate_id, "status = 'failed', summary = ?, evaluated_at = ?", (reason, now()))

    def _update(self, candidate_id: int, assignments: str, values: tuple) -> None:
        self._require_candidate(candidate_id)
        with self._write() as db:
            db.execute(f"UPDATE candidates SET {assignments} WHERE candidate_id = ?", (*values, candidate_id))

    def _require_candidate(self, candidate_id: int) -> None:
        if self._connection().execute("SELECT 1 FROM candidates WHERE candidate_id = ?", (candidate_id,)).fetchone() is None:
            raise ArchiveError(f"no candidate c{candidate_id} in {self.path}; "
                               "`python -m evo archive show RUN_ID` lists a run's candidates")

    def add_remeasurement(self, candidate_id: int, speedup: float | None, timings: dict | None,
                          verdict: VerdictName = "verified") -> int:
        """A later measurement of a candidate. One that does not verify disqualifies it from best()."""
        self._require_candidate(candidate_id)
        with self._write() as db:
            return db.execute("INSERT INTO remeasurements VALUES (NULL, ?, ?, ?, ?, ?)",
                              (candidate_id, verdict, speedup if verdict == "verified" else None,
                               json.dumps(timings), now())).lastrowid

    def candidate(self, candidate_id: int) -> Candidate:
        self._require_candidate(candidate_id)
        return self._candidates("c.candidate_id = ?", (candidate_id,))[0]

    def candidates(self, run_id: str, task: str | None = None, verdict: VerdictName | None = None) -> list[Candidate]:
        """In the order they were made. task: a path as given or a task hash."""
        where, params = ["c.run_id = ?"], [run_id]
        if task is not None:
            where.append("(c.task = ? OR c.task_hash = ?)")
            params += [task, task]
        if verdict is not None:
            where.append("c.verdict = ?")
            params.append(verdict)
        return self._candidates(" AND ".join(where), tuple(params))

    def unfinished(self, run_id: str) -> list[Candidate]:
        """Pending or built: what a resumed run must build or evaluate again."""
        return self._candidates("c.run_id = ? AND c.status IN ('pending', 'built')", (run_id,))

    def find_by_source_hash(self, run_id: str | None, task_hash: str, source_hash: str) -> Candidate | None:
        """The first candidate with this source for this task (in this run, or any when run_id is None)."""
        found = self._candidates("(? IS NULL OR c.run_id = ?) AND c.task_hash = ? AND c.source_hash = ?",
                                 (run_id, run_id, task_hash, source_hash), limit=1)
        return found[0] if found else None

    def _candidates(self, where: str, params: tuple, limit: int | None = None) -> list[Candidate]:
        query = f"{CANDIDATE_SELECT} WHERE {where} ORDER BY c.candidate_id" + (f" LIMIT {limit}" if limit else "")
        return [Candidate(**decode(row)) for row in self._connection().execute(query, params)]

    def best(self, task: str | None = None, run_id: str | None = None) -> Candidate | None:
        """The verified candidate of highest fitness (median speedup over its measurements), in
        one run or across all. task: an existing task file matches by its content's hash only,
        since an edited file at the same path is another task; anything else matches a path as
        given or a task hash."""
        where, params = ["(? IS NULL OR c.run_id = ?)"], [run_id, run_id]
        if task is not None:
            if Path(task).is_file():
                where.append("c.task_hash = ?")
                params.append(file_sha256(task))
            else:
                where.append("(c.task = ? OR c.task_hash = ?)")
                params += [task, task]
        return self._best(" AND ".join(where), tuple(params))

    def best_per_task(self, exclude_task_hash: str | None = None) -> list[Candidate]:
        """The best verified candidate of each task in the archive (by content hash), best
        first: examples for the cross-task memory."""
        hashes = [row[0] for row in self._connection().execute(
            "SELECT DISTINCT task_hash FROM candidates WHERE verdict = 'verified' AND task_hash IS NOT ?",
            (exclude_task_hash,))]
        found = [self._best("c.task_hash = ?", (task_hash,)) for task_hash in hashes]
        return sorted((c for c in found if c is not None), key=lambda c: c.fitness or 0.0, reverse=True)

    def _best(self, where: str, params: tuple) -> Candidate | None:
        scores = self._fitnesses(where, params)
        if not scores:
            return None
        return self.candidate(max(scores, key=lambda candidate_id: (scores[candidate_id], -candidate_id)))

    def _fitnesses(self, where: str, params: tuple) -> dict[int, float]:
        """Fitness of each verified candidate matching where, without loading sources."""
        rows = self._connection().execute(
            f"""SELECT c.candidate_id, c.speedup,
                  (SELECT json_group_array(speedup) FROM remeasurements r
                     WHERE r.candidate_id = c.candidate_id AND r.verdict = 'verified') AS remeasured,
                  (SELECT count(*) FROM remeasurements r
                     WHERE r.candidate_id = c.candidate_id AND r.verdict != 'verified') AS failures
                FROM candidates c WHERE c.verdict = 'verified' AND {where}""", params)
        scores = {row[0]: fitness("verified", row[1], json.loads(row[2]), row[3]) for row in rows}
        return {candidate_id: score for candidate_id, score in scores.items() if score is not None}

    def lineage(self, candidate_id: int) -> list[LineageStep]:
        """From the root to this candidate, following each candidate's first parent."""
        self._require_candidate(candidate_id)
        rows = self._connection().execute(
            """WITH RECURSIVE chain (candidate_id, depth) AS (
                 SELECT ?, 0
                 UNION ALL
                 SELECT p.parent_id, chain.depth + 1 FROM candidate_parents p
                   JOIN chain ON p.candidate_id = chain.candidate_id AND p.position = 0)
               SELECT c.candidate_id, c.operator, c.generation, c.island, c.verdict, c.speedup,
                 (SELECT json_group_array(parent_id) FROM (SELECT parent_id FROM candidate_parents p
                    WHERE p.candidate_id = c.candidate_id ORDER BY position)) AS parent_ids
               FROM chain JOIN candidates c USING (candidate_id) ORDER BY chain.depth DESC""",
            (candidate_id,))  # parents are older than their children, so the chain cannot loop
        return [LineageStep(**decode(row)) for row in rows]

    # LLM calls.

    def add_llm_call(self, run_id: str, *, provider: str, model: str, prompt: Any, reply: str | None,
                     input_tokens: int = 0, output_tokens: int = 0, cached_input_tokens: int = 0,
                     cost_usd: float = 0.0, latency_s: float | None = None, scripted: bool = False,
                     error: str | None = None, task: str | None = None) -> int:
        """prompt: the system prompt and messages as sent (anything JSON can hold)."""
        with self._write() as db, self._explained(f"cannot record an LLM call: no run {run_id} in the archive"):
            return db.execute(
                "INSERT INTO llm_calls VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, task, provider, model, json.dumps(prompt), reply, input_tokens, output_tokens,
                 cached_input_tokens, cost_usd, latency_s, int(scripted), error, now())).lastrowid

    def llm_calls(self, run_id: str, task: str | None = None) -> list[LLMCall]:
        rows = self._connection().execute(
            "SELECT * FROM llm_calls WHERE run_id = ? AND (? IS NULL OR task = ?) ORDER BY call_id",
            (run_id, task, task))
        return [LLMCall(**decode(row)) for row in rows]

    # Summaries.

    def run_summary(self, run_id: str) -> RunSummary:
        with self._read() as db:
            run, totals = self.get_run(run_id), self.totals(run_id)
            groups = db.execute(
                """SELECT task, task_hash, count(*) FILTER (WHERE verdict = 'verified') AS verified,
                     count(*) FILTER (WHERE verdict = 'rejected') AS rejected,
                     count(*) FILTER (WHERE verdict = 'error') AS error,
                     count(*) FILTER (WHERE status IN ('pending', 'built')) AS unfinished,
                     count(*) FILTER (WHERE status = 'failed' AND verdict IS NULL) AS failed
                   FROM candidates WHERE run_id = ? GROUP BY task, task_hash ORDER BY min(candidate_id)""",
                (run_id,)).fetchall()
            summaries = []
            for group in groups:
                best = self._best("c.run_id = ? AND c.task = ? AND c.task_hash = ?",
                                  (run_id, group["task"], group["task_hash"]))
                spend = db.execute(f"{SPEND_SELECT} AND task = ?", (run_id, group["task"])).fetchone()
                summaries.append(TaskSummary(
                    task=group["task"], task_hash=group["task_hash"], best=best, spend=Spend(**decode(spend)),
                    outcomes={key: group[key] for key in ("verified", "rejected", "error", "unfinished", "failed")},
                    lineage=self.lineage(best.candidate_id) if best else []))
        return RunSummary(run=run, totals=totals, tasks=summaries)

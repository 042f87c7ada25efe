"""The archive: every run, candidate, evaluation and LLM call, kept in one SQLite file.
archive/README.md documents the schema; evo/archive_views.py renders it for `evo archive`."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import secrets
import shlex
import sqlite3
import statistics
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from evo import __version__
from evo.verdict import Check, Verdict

DEFAULT_PATH = Path("archive") / "evo.sqlite"  # relative to the directory evo runs in
APPLICATION_ID = 0x65766F31  # "evo1" in the file header: tells an evo archive from other SQLite files
BUSY_TIMEOUT_S = 30.0  # how long a write waits for another writer's transaction before failing
RunStatus = Literal["running", "finished", "stopped", "failed"]
CandidateStatus = Literal["pending", "built", "evaluated", "failed"]
VerdictName = Literal["verified", "rejected", "error"]


class ArchiveError(Exception):
    """The archive cannot do what was asked; the message says why and what to do."""


# Schema migrations, applied in order. Entry i takes a database from version i to version i + 1
# (kept in PRAGMA user_version). Never edit a shipped entry: append a new one. A SQL entry holds
# one statement per line-ending ';'; a callable entry gets the connection inside the transaction.
Migration = str | Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = [
    # 1: runs, LLM calls, candidates with their parents.
    f"""
    PRAGMA application_id = {APPLICATION_ID};
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT,
        status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'stopped', 'failed')),
        config TEXT NOT NULL, command TEXT NOT NULL, tasks TEXT NOT NULL,
        hardware TEXT NOT NULL, software TEXT NOT NULL);
    CREATE TABLE llm_calls (
        call_id INTEGER PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs (run_id), task TEXT,
        provider TEXT NOT NULL, model TEXT NOT NULL, prompt TEXT NOT NULL, reply TEXT,
        input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cached_input_tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL, latency_s REAL, scripted INTEGER NOT NULL, error TEXT, created_at TEXT NOT NULL);
    CREATE TABLE candidates (
        candidate_id INTEGER PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs (run_id),
        task TEXT NOT NULL, task_hash TEXT NOT NULL, island INTEGER NOT NULL, generation INTEGER NOT NULL,
        operator TEXT NOT NULL, source TEXT NOT NULL, source_hash TEXT NOT NULL,
        llm_call_id INTEGER REFERENCES llm_calls (call_id),
        status TEXT NOT NULL CHECK (status IN ('pending', 'built', 'evaluated', 'failed')),
        verdict TEXT CHECK (verdict IN ('verified', 'rejected', 'error')),
        summary TEXT, checks TEXT NOT NULL DEFAULT '[]', speedup REAL, speedup_vs_compile REAL,
        timings TEXT, roofline TEXT, verdict_json TEXT, build_log TEXT, environment TEXT,
        created_at TEXT NOT NULL, evaluated_at TEXT);
    CREATE TABLE candidate_parents (
        candidate_id INTEGER NOT NULL REFERENCES candidates (candidate_id),
        parent_id INTEGER NOT NULL REFERENCES candidates (candidate_id),
        position INTEGER NOT NULL, PRIMARY KEY (candidate_id, position));
    CREATE INDEX candidates_by_run_task ON candidates (run_id, task_hash, source_hash);
    CREATE INDEX candidates_by_task_verdict ON candidates (task_hash, verdict);
    CREATE INDEX llm_calls_by_run ON llm_calls (run_id, task);
    """,
    # 2: re-measurements of elites (noise-aware fitness) and key-value state for resuming a run.
    """
    CREATE TABLE remeasurements (
        remeasurement_id INTEGER PRIMARY KEY, candidate_id INTEGER NOT NULL REFERENCES candidates (candidate_id),
        verdict TEXT NOT NULL CHECK (verdict IN ('verified', 'rejected', 'error')),
        speedup REAL, timings TEXT, measured_at TEXT NOT NULL);
    CREATE INDEX remeasurements_by_candidate ON remeasurements (candidate_id);
    CREATE TABLE run_state (
        run_id TEXT NOT NULL REFERENCES runs (run_id), key TEXT NOT NULL, value TEXT NOT NULL,
        updated_at TEXT NOT NULL, PRIMARY KEY (run_id, key));
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def apply_migration(connection: sqlite3.Connection, migration: Migration) -> None:
    """Run one migration inside the caller's transaction. (executescript would commit it first.)"""
    if callable(migration):
        migration(connection)
        return
    statement = ""
    for line in migration.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            connection.execute(statement)
            statement = ""
    if statement.strip():
        raise ArchiveError(f"a migration ends in an unfinished statement: {statement.strip()[:80]}")


class Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class Run(Record):
    run_id: str  # short and typeable: "r" + start minute + random suffix
    started_at: datetime
    finished_at: datetime | None
    status: RunStatus
    config: dict  # the frozen run config
    command: str  # the command line that started the run
    tasks: list[str]  # task paths, as given
    hardware: dict  # GPU, driver, CUDA, compute capability, SM count...
    software: dict  # evo, torch, python versions


class Spend(Record):
    llm_calls: int = 0
    failed_calls: int = 0  # calls that ended in an error
    scripted_calls: int = 0  # replies that came from a script, not a model
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cost_usd: float = 0.0


class RunTotals(Record):
    candidates: int
    verified: int
    rejected: int
    errors: int  # the evaluator could not judge them
    unfinished: int  # pending or built: work a resumed run has to redo
    best_speedup: float | None  # highest fitness of a verified candidate, over every task of the run
    spend: Spend


class Candidate(Record):
    candidate_id: int
    run_id: str
    task: str  # the task's path, as given to the run
    task_hash: str  # sha256 of the task file's content: the task's identity
    island: int
    generation: int
    operator: str  # how it was made: translate, improve, repair_build, repair_wrong, crossover, scripted...
    parent_ids: list[int]  # the first is the main parent; lineage follows it
    source: str
    source_hash: str  # of the normalized source, as the caller computed it; for deduplication
    llm_call_id: int | None  # the call whose reply held the source
    status: CandidateStatus
    verdict: VerdictName | None  # None until evaluated
    summary: str | None  # the verdict's sentence, or why the evaluation failed
    checks: list[Check]
    speedup: float | None  # of the first evaluation; None unless verified
    speedup_vs_compile: float | None
    timings: dict | None
    roofline: dict | None
    verdict_json: dict | None  # the whole Verdict
    build_log: str | None
    environment: dict | None  # the hardware and software it was measured on
    created_at: datetime
    evaluated_at: datetime | None
    remeasured_speedups: list[float]  # of later verified re-measurements, oldest first
    failed_remeasurements: int  # re-measurements that did not verify: the candidate is not trusted

    @property
    def measurements(self) -> list[float]:
        """Every verified speedup: the first evaluation's, then the re-measurements'."""
        return [] if self.speedup is None else [self.speedup, *self.remeasured_speedups]

    @property
    def fitness(self) -> float | None:
        """Median speedup over every measurement; None unless verified every time."""
        return fitness(self.verdict, self.speedup, self.remeasured_speedups, self.failed_remeasurements)


class LineageStep(Record):
    candidate_id: int
    operator: str
    generation: int
    island: int
    verdict: VerdictName | None
    speedup: float | None
    parent_ids: list[int]  # all parents; the chain follows the first


class LLMCall(Record):
    call_id: int
    run_id: str
    task: str | None  # the task the call worked on, when it was for one
    provider: str
    model: str
    prompt: Any  # system prompt and messages, as sent
    reply: str | None
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int  # part of input_tokens served from the provider's prompt cache
    cost_usd: float
    latency_s: float | None
    scripted: bool  # the reply came from a script, not a model
    error: str | None
    created_at: datetime


class TaskSummary(Record):
    task: str
    task_hash: str
    outcomes: dict[str, int]  # how many candidates are verified, rejected, error, unfinished, failed (no verdict)
    best: Candidate | None  # the verified candidate of highest fitness
    lineage: list[LineageStep]  # of the best, from its root
    spend: Spend  # of the LLM calls made for this task


class RunSummary(Record):
    run: Run
    totals: RunTotals
    tasks: list[TaskSummary]


def fitness(verdict: str | None, speedup: float | None, remeasured: Sequence[float], failures: int) -> float | None:
    if verdict != "verified" or speedup is None or failures:
        return None
    return statistics.median([speedup, *remeasured])


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


JSON_COLUMNS = {"config", "tasks", "hardware", "software", "checks", "timings", "roofline", "verdict_json",
                "environment", "prompt", "parent_ids", "remeasured_speedups", "value"}


def decode(row: sqlite3.Row) -> dict:
    return {key: json.loads(row[key]) if key in JSON_COLUMNS and row[key] is not None else row[key]
            for key in row.keys()}


# A candidate row with its parents (in order) and its re-measurements, for Candidate(**decode(row)).
CANDIDATE_SELECT = """
    SELECT c.*,
      (SELECT json_group_array(parent_id) FROM (SELECT parent_id FROM candidate_parents p
         WHERE p.candidate_id = c.candidate_id ORDER BY position)) AS parent_ids,
      (SELECT json_group_array(speedup) FROM (SELECT speedup FROM remeasurements r
         WHERE r.candidate_id = c.candidate_id AND r.verdict = 'verified' ORDER BY remeasurement_id)) AS remeasured_speedups,
      (SELECT count(*) FROM remeasurements r
         WHERE r.candidate_id = c.candidate_id AND r.verdict != 'verified') AS failed_remeasurements
    FROM candidates c"""
SPEND_SELECT = """SELECT count(*) AS llm_calls, count(error) AS failed_calls, coalesce(sum(scripted), 0) AS scripted_calls,
    coalesce(sum(input_tokens), 0) AS input_tokens, coalesce(sum(output_tokens), 0) AS output_tokens,
    coalesce(sum(cached_input_tokens), 0) AS cached_input_tokens, coalesce(sum(cost_usd), 0.0) AS cost_usd
    FROM llm_calls WHERE run_id = ?"""


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

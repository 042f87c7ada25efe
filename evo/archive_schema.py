"""The archive's SQL side: its tables, built by migrations applied in order, and how rows read back
(which columns hold JSON, the selects that shape rows for the models in evo/archive_models.py).
archive/README.md documents the tables; evo/archive.py applies the migrations when it opens a file."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

APPLICATION_ID = 0x65766F31  # "evo1" in the file header: tells an evo archive from other SQLite files


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


# Reading rows back: JSON columns are decoded, so decode(row) gives a model's keyword arguments.
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

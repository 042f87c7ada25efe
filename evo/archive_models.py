"""What the archive hands back: frozen pydantic records of runs, candidates, LLM calls and summaries,
and fitness, the score that ranks verified candidates. evo/archive.py reads them from the file."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from evo.verdict import Check

RunStatus = Literal["running", "finished", "stopped", "failed"]
CandidateStatus = Literal["pending", "built", "evaluated", "failed"]
VerdictName = Literal["verified", "rejected", "error"]


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

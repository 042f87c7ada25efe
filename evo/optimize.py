"""`python -m evo optimize`: the search loop. For each task, ask the search what to do next,
have the LLM write candidates and the evaluator judge them, concurrently, and keep everything
in the archive, so a killed run resumes where it stopped."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from evo import devices, live_sandboxes, storage
from evo.archive import Archive
from evo.archive_views import lineage_text
from evo.config import OptimizeConfig, VerifyPolicy
from evo.progress import Progress
from evo.provider import ProviderError, ProviderExhausted
from evo.replies import normalized_source_hash
from evo.run_setup import RunSetup
from evo.search import Job, Member, Search
from evo.session import TaskSession
from evo.task import Task
from evo.work import Produced, candidate_file, evaluate, produce

PROVIDER_FAILURES_TO_STOP = 3  # consecutive failed LLM jobs: the provider is down, stop cleanly
# An `error` verdict is the evaluator's failure, never the candidate's (a GPU another job was
# computing on, a trusted process that crashed): the candidate is judged again, this many times.
JUDGED_AGAIN_AFTER_ERROR = 1


@dataclass
class TaskOutcome:
    task: str
    path: str  # the task file, as the archive names it
    best_candidate: int | None
    best_speedup: float | None
    stopped_by: str  # why the search of this task ended


class Optimizer:
    def __init__(self, setup: RunSetup, progress: Progress):
        self.setup, self.progress = setup, progress
        self.archive: Archive = setup.archive
        self.config: OptimizeConfig = setup.config
        self.policy: VerifyPolicy = setup.policy
        self.run_stop: str | None = None  # set when the whole run must end (Ctrl-C, budget, provider, disk)
        self.disk_full = False  # the run stopped because a disk it writes to is full
        self.provider_failures = 0
        self.task_stop: str | None = None  # set when the current task's search must end
        self.errors: dict[int, int] = {}  # candidate id -> its evaluations that ended in `error`
        self.device_load = devices.DeviceLoad(setup.devices)
        kind, gpus = setup.devices[0].partition(":")[0], len(setup.devices)
        self.evaluations_per_gpu = self.config.evaluations_per_gpu or max(2, devices.parallel_builds(kind) // gpus)
        # Of those, how many hold candidate processes at once (the rest build or wait for a slot).
        self.processes_per_gpu = min(self.evaluations_per_gpu, devices.evaluations_at_device(kind, gpus))

    # ---- the run --------------------------------------------------------------------------

    def run(self) -> list[TaskOutcome]:
        outcomes = []
        evaluations = len(self.setup.devices) * self.evaluations_per_gpu
        with ThreadPoolExecutor(self.config.llm_concurrency, "llm") as self.llm_pool, \
                ThreadPoolExecutor(evaluations, "evaluate") as self.eval_pool:
            for index, task in enumerate(self.setup.tasks):
                if task.name in self.setup.finished_tasks:
                    continue
                outcomes.append(self.search_task(task, index))
                if self.run_stop:
                    break
        return outcomes

    def search_task(self, task: Task, index: int) -> TaskOutcome:
        """The task's search, with a session per device: its reference checker and timing, and
        candidate processes started ahead of need, serve every evaluation of the task there.
        A session keeps as many spares as evaluations hold processes at once on its device: a
        candidate then finds its processes started, and the device does not wait on interpreters
        starting."""
        self.sessions = {device: TaskSession(task.path, self.policy.model_copy(update={"device": device}),
                                             standby=self.processes_per_gpu).start()
                         for device in self.setup.devices}
        # The sessions share one cache of precompiled headers: the first makes what they need.
        self.sessions[self.setup.devices[0]].expect_format(self.config.candidate_format)
        try:
            return self.search_loop(task, index)
        finally:
            for session in self.sessions.values():
                session.close()

    def search_loop(self, task: Task, index: int) -> TaskOutcome:
        """The main loop for one task: keep LLM and evaluation work in flight until a limit."""
        search, created = self.restore(task, index)
        self.task_stop = None
        deadline = self.task_deadline(index)
        pending: dict[Future, tuple[str, Job, int | None]] = {}
        self.resubmit_unfinished(task, pending)
        self.progress.status(task.name, "searching")
        stopped_by = None
        while True:
            stopped_by = self.run_stop or self.task_limit(created, deadline)
            if stopped_by and not pending:
                break
            try:
                if not stopped_by:
                    created += self.start_work(task, search, pending, created)
                done, _ = wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    self.settle(task, search, pending.pop(future), future, pending)
            except (OSError, sqlite3.Error) as err:  # the archive or a candidate's file could not be written
                if not self.stop_if_disk_full(str(err)):
                    raise
        self.progress.status(task.name, f"done: {stopped_by}")
        if not self.run_stop:
            self.archive.save_state(self.setup.run_id, f"finished:{task.name}", stopped_by)
        best = search.best()
        return TaskOutcome(task.name, str(task.path), best.candidate_id if best else None, best.fitness if best else None, stopped_by)

    # ---- starting work ----------------------------------------------------------------------

    def start_work(self, task: Task, search: Search, pending: dict, created: int) -> int:
        """Start jobs while there is room; returns how many new candidates they will make."""
        started = 0
        capacity = self.config.llm_concurrency + len(self.setup.devices) * self.evaluations_per_gpu
        while (len(pending) < capacity and created + started < self.config.max_candidates
               and self.llm_in_flight(pending) < self.config.llm_concurrency):
            job = search.next_job()
            if job.operator == "remeasure":
                candidate = self.archive.candidate(job.parents[0])
                pending[self.submit_evaluation(task, candidate.candidate_id, candidate.source)] = ("remeasure", job,
                                                                                                   candidate.candidate_id)
                continue
            prompt = self.setup.prompt_for(task, job)
            future = self.llm_pool.submit(produce, self.setup.llm_for(task), self.setup.builder, self.archive,
                                          self.setup.run_id, task, job, prompt, self.config.no_code_retries)
            pending[future] = ("produce", job, None)
            started += 1
        return started

    @staticmethod
    def llm_in_flight(pending: dict) -> int:
        return sum(1 for kind, _, _ in pending.values() if kind == "produce")

    def submit_evaluation(self, task: Task, candidate_id: int, source: str) -> Future:
        path = candidate_file(self.setup.run_dir, candidate_id, source)
        device = self.device_load.take()
        future = self.eval_pool.submit(evaluate, path, self.sessions[device])
        future.add_done_callback(lambda _: self.device_load.done(device))
        return future

    def resubmit_unfinished(self, task: Task, pending: dict) -> None:
        """Candidates a killed run had made but not judged: judge them now."""
        for candidate in self.archive.unfinished(self.setup.run_id):
            if candidate.task == str(task.path):
                job = Job(candidate.operator, candidate.island, candidate.generation, tuple(candidate.parent_ids))
                pending[self.submit_evaluation(task, candidate.candidate_id, candidate.source)] = (
                    "evaluate", job, candidate.candidate_id)

    # ---- finished work ----------------------------------------------------------------------

    def settle(self, task: Task, search: Search, what: tuple[str, Job, int | None], future: Future,
               pending: dict) -> None:
        kind, job, candidate_id = what
        if kind == "produce":
            self.settle_produced(task, search, future, pending)
            return
        verdict = future.result()
        if self.run_stop == "interrupted":  # its sandboxes were killed: the verdict means nothing
            return
        if verdict.verdict == "error" and self.stop_if_disk_full(verdict.summary):
            return  # the candidate stays unfinished: a resume judges it
        if kind == "evaluate" and verdict.verdict == "error" and self.judge_again(task, what, verdict, pending):
            return
        failed = next((check.name for check in verdict.checks if not check.passed), None)
        if kind == "remeasure":
            self.archive.add_remeasurement(candidate_id, verdict.speedup or 0.0, verdict.timings.model_dump(),
                                           verdict=verdict.verdict)
            search.record(job, candidate_id, verdict.verdict, verdict.speedup, failed)
            self.progress.log(f"{task.name}: c{candidate_id} re-measured: {first_line(verdict.summary)}")
        else:
            self.archive.record_evaluation(candidate_id, verdict)
            search.record(job, candidate_id, verdict.verdict, verdict.speedup, failed)
            self.progress.outcome(task.name, verdict.verdict, f"c{candidate_id} ({job.operator}) {first_line(verdict.summary)}")
        self.show_best(task, search)

    def judge_again(self, task: Task, what: tuple[str, Job, int | None], verdict, pending: dict) -> bool:
        """Queue a candidate whose evaluation ended in an evaluator error for another, behind the
        evaluations queued now, unless it had its share; it stays unfinished meanwhile."""
        candidate_id = what[2]
        self.errors[candidate_id] = self.errors.get(candidate_id, 0) + 1
        if self.errors[candidate_id] > JUDGED_AGAIN_AFTER_ERROR or self.run_stop:
            return False
        self.progress.log(f"{task.name}: c{candidate_id}: {first_line(verdict.summary)}; it will be judged again")
        source = self.archive.candidate(candidate_id).source
        pending[self.submit_evaluation(task, candidate_id, source)] = what
        return True

    def settle_produced(self, task: Task, search: Search, future: Future, pending: dict) -> None:
        try:
            produced: Produced = future.result()
        except ProviderExhausted as err:  # each task has its own replies
            self.task_stop = self.task_stop or "scripted replies used up"
            self.progress.log(str(err))
            return
        except ProviderError as err:
            self.provider_failures += 1
            self.progress.log(f"{task.name}: the LLM call failed: {err}")
            if self.provider_failures >= PROVIDER_FAILURES_TO_STOP:
                self.run_stop = self.run_stop or f"the LLM provider failed {self.provider_failures} times in a row"
            return
        self.provider_failures = 0
        self.progress.spend(produced.cost_usd, len(produced.calls))
        if produced.source is None:
            self.progress.outcome(task.name, "no_code", f"{produced.job.operator}: {produced.problem}")
            return
        source_hash = normalized_source_hash(produced.source)
        job = produced.job
        candidate_id = self.archive.add_candidate(
            self.setup.run_id, task=str(task.path), task_hash=task.sha256, source=produced.source,
            source_hash=source_hash, operator=job.operator, parent_ids=job.parents, island=job.island,
            generation=job.generation, llm_call_id=produced.llm_call_id)
        if search.is_duplicate(source_hash):
            self.archive.mark_failed(candidate_id, "duplicate: the same normalized source was evaluated before")
            self.progress.outcome(task.name, "duplicate", f"c{candidate_id} ({job.operator}) repeats an earlier source")
            return
        search.remember(source_hash)
        pending[self.submit_evaluation(task, candidate_id, produced.source)] = ("evaluate", job, candidate_id)

    def show_best(self, task: Task, search: Search) -> None:
        best = search.best()
        if best is not None:
            self.progress.best(task.name, best.fitness, lineage_text(self.archive.lineage(best.candidate_id)))

    # ---- limits -----------------------------------------------------------------------------

    def task_limit(self, created: int, deadline: float | None) -> str | None:
        if self.task_stop:
            return self.task_stop
        if created >= self.config.max_candidates:
            return f"{self.config.max_candidates} candidates"
        if deadline is not None and time.monotonic() >= deadline:
            return "time limit"
        if self.config.budget_usd is not None and self.spent() >= self.config.budget_usd:
            self.run_stop = self.run_stop or f"budget of ${self.config.budget_usd:g} spent"
            return self.run_stop
        return None

    def spent(self) -> float:
        return self.archive.totals(self.setup.run_id).spend.cost_usd

    def task_deadline(self, index: int) -> float | None:
        """An equal share of the run's remaining time for each remaining task."""
        if self.setup.deadline is None:
            return None
        remaining_tasks = len(self.setup.tasks) - index
        return time.monotonic() + max(0.0, self.setup.deadline - time.monotonic()) / remaining_tasks

    def stop_if_disk_full(self, failure: str) -> bool:
        """Stop the run when a disk it writes to is full: every later candidate would fail on it."""
        cache = next(iter(self.sessions.values())).cache_dir
        full = storage.full_disk(storage.written_by_evo(cache, self.archive.path, self.setup.run_dir), failure)
        if full is None:
            return False
        self.disk_full = True
        self.run_stop = self.run_stop or storage.full_disk_message(full)
        return True

    def interrupt(self) -> None:
        """Ctrl-C: stop starting work and kill the sandboxes of evaluations under way; their
        candidates stay unfinished in the archive, and a resume evaluates them."""
        self.run_stop = "interrupted"
        live_sandboxes.kill_all()

    # ---- resume -----------------------------------------------------------------------------

    def restore(self, task: Task, index: int) -> tuple[Search, int]:
        """The search state of a task, rebuilt from the archive (empty for a new run)."""
        rng = random.Random(f"{self.config.seed}:{index}:{self.setup.resumes}")
        search = Search(self.config, rng)
        created = 0
        for candidate in self.archive.candidates(self.setup.run_id, task=str(task.path)):
            created += 1
            search.remember(candidate.source_hash)
            if candidate.fitness is not None and candidate.island < len(search.islands):
                search.add_member(Member(candidate.candidate_id, candidate.island, candidate.generation,
                                         list(candidate.measurements)))
            if candidate.verdict is not None:
                search.evaluated += 1
        return search, created


def first_line(text: str, limit: int = 240) -> str:
    """A log line's share of a verdict: its first line (a build log stays in the archive)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def run_search(setup: RunSetup) -> int:
    """Run the loop with a progress view; the first Ctrl-C stops cleanly, a second quits at once
    (the archive loses nothing either way: every write is its own transaction)."""
    progress = Progress(setup.run_id, [task.name for task in setup.tasks], setup.scripted)
    optimizer = Optimizer(setup, progress)
    live_sandboxes.allow_new()

    def on_interrupt(signum, frame):
        if optimizer.run_stop == "interrupted":
            print(f"\nevo: quit; resume with: python -m evo optimize --resume {setup.run_id}", flush=True)
            os._exit(130)
        progress.log("stopping: evaluations under way are cancelled, LLM calls under way are awaited "
                     "(Ctrl-C again to quit now)")
        optimizer.interrupt()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        with progress:
            if setup.scripted:
                progress.log("replies are scripted: no LLM is asked")
            outcomes = optimizer.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    interrupted = optimizer.run_stop == "interrupted"
    if optimizer.disk_full:  # nothing more can be written; what was is kept
        print(f"evo: {optimizer.run_stop}; then resume with: python -m evo optimize --resume {setup.run_id}",
              file=sys.stderr)
        return 2
    setup.archive.finish_run(setup.run_id, "stopped" if interrupted else "finished")
    report_outcomes(setup, outcomes, progress)
    if interrupted:
        print(f"stopped; resume with: python -m evo optimize --resume {setup.run_id}")
        return 130
    return 0


def report_outcomes(setup: RunSetup, outcomes: list[TaskOutcome], progress: Progress) -> None:
    """For each task: the best verified kernel, its speedup, how it was found, what it cost."""
    totals = setup.archive.totals(setup.run_id)
    print(f"run {setup.run_id}: {totals.candidates} candidates, {totals.verified} verified, "
          f"${totals.spend.cost_usd:.2f} over {totals.spend.llm_calls} LLM calls"
          + (" (scripted replies)" if setup.scripted else ""))
    spend = {summary.task: summary.spend for summary in setup.archive.run_summary(setup.run_id).tasks}
    for outcome in outcomes:
        cost = spend.get(outcome.path)
        cost_text = f"${cost.cost_usd:.2f} over {cost.llm_calls} calls" if cost else "$0.00"
        if outcome.best_candidate is None:
            print(f"  {outcome.task}: no verified kernel; {cost_text} ({outcome.stopped_by})")
            continue
        lineage = lineage_text(setup.archive.lineage(outcome.best_candidate))
        path = candidate_file(setup.run_dir, outcome.best_candidate, setup.archive.candidate(outcome.best_candidate).source)
        print(f"  {outcome.task}: {outcome.best_speedup:.3f}x the eager reference, c{outcome.best_candidate} "
              f"({lineage}), {path}; {cost_text} ({outcome.stopped_by})")
    print(f"details: python -m evo archive show {setup.run_id} --archive {setup.archive.path}")

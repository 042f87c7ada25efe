"""The search policy for one task: islands of verified candidates, which operator to apply
next and to which parents, bounded repairs, noise-aware fitness, duplicate sources.

Pure logic: no I/O, no LLM, no evaluator. The loop asks for jobs and reports what each
evaluation found; everything it needs to rebuild this state after a crash is in the archive.
"""

from __future__ import annotations

import random
import statistics
from collections import deque
from dataclasses import dataclass, field

from evo.config import OptimizeConfig

# Checks whose failure is the compiler's or the loader's business: the repair prompt shows the log.
BUILD_CHECKS = {"build", "compiler_flags", "load"}


@dataclass
class Member:
    """A verified candidate kept in an island."""

    candidate_id: int
    island: int
    generation: int
    speedups: list[float]  # every verified measurement: the first, then re-measurements
    chosen: int = 0  # times picked as a parent: a tax on the weight, so one elite does not breed alone

    @property
    def fitness(self) -> float:
        return statistics.median(self.speedups)


@dataclass(frozen=True)
class Job:
    operator: str  # translate | improve | crossover | repair_build | repair_wrong | remeasure
    island: int
    generation: int
    parents: tuple[int, ...] = ()  # candidate ids
    repairs: int = 0  # repairs already spent on this lineage, this one included


@dataclass
class Search:
    settings: OptimizeConfig
    rng: random.Random
    islands: list[list[Member]] = field(default_factory=list)
    repairs_due: deque[Job] = field(default_factory=deque)
    source_hashes: set[str] = field(default_factory=set)
    evaluated: int = 0
    remeasuring: set[int] = field(default_factory=set)  # candidate ids with a re-measurement under way

    def __post_init__(self) -> None:
        if not self.islands:
            self.islands = [[] for _ in range(self.settings.islands)]
        self.turn = 0

    # ---- what to do next ------------------------------------------------------------------

    def next_job(self) -> Job:
        if self.repairs_due:
            return self.repairs_due.popleft()
        island = self.turn % len(self.islands)
        self.turn += 1
        members = self.islands[island]
        if not members:
            return Job("translate", island, 0)
        unconfirmed = self.unconfirmed_elite(members)
        if unconfirmed is not None:
            self.remeasuring.add(unconfirmed.candidate_id)
            return Job("remeasure", island, unconfirmed.generation, (unconfirmed.candidate_id,))
        if len(members) >= 2 and self.rng.random() < self.settings.crossover_rate:
            first = self.select(members)
            second = self.select([m for m in members if m is not first])
            return Job("crossover", island, max(first.generation, second.generation) + 1,
                       (first.candidate_id, second.candidate_id))
        parent = self.select(members)
        return Job("improve", island, parent.generation + 1, (parent.candidate_id,))

    def unconfirmed_elite(self, members: list[Member]) -> Member | None:
        """The island's best, if it has been measured once only: one lucky measurement must not
        make it everyone's parent."""
        if not self.settings.remeasure_elites:
            return None
        best = max(members, key=lambda m: m.fitness)
        if len(best.speedups) < 2 and best.candidate_id not in self.remeasuring:
            return best
        return None

    def select(self, members: list[Member]) -> Member:
        """Weighted by fitness, taxed by how often a member has already been a parent."""
        weights = [max(member.fitness, 1e-3) / (1 + member.chosen) for member in members]
        chosen = self.rng.choices(members, weights=weights)[0]
        chosen.chosen += 1
        return chosen

    # ---- what happened -------------------------------------------------------------------

    def is_duplicate(self, source_hash: str) -> bool:
        return source_hash in self.source_hashes

    def remember(self, source_hash: str) -> None:
        self.source_hashes.add(source_hash)

    def record(self, job: Job, candidate_id: int, verdict: str, speedup: float | None,
               failed_check: str | None) -> None:
        """Account for one evaluated candidate (or one re-measurement, for a remeasure job)."""
        if job.operator == "remeasure":
            self.record_remeasurement(job.parents[0], verdict, speedup)
            return
        self.evaluated += 1
        if verdict == "verified" and speedup is not None:
            self.add_member(Member(candidate_id, job.island, job.generation, [speedup]))
        elif verdict == "rejected" and failed_check and job.repairs < self.settings.max_repairs:
            operator = "repair_build" if failed_check in BUILD_CHECKS else "repair_wrong"
            self.repairs_due.append(Job(operator, job.island, job.generation, (candidate_id,), job.repairs + 1))
        if self.evaluated % self.settings.migration_interval == 0:
            self.migrate()

    def record_remeasurement(self, candidate_id: int, verdict: str, speedup: float | None) -> None:
        self.remeasuring.discard(candidate_id)
        for members in self.islands:
            for member in list(members):
                if member.candidate_id != candidate_id:
                    continue
                if verdict == "verified" and speedup is not None:
                    member.speedups.append(speedup)
                else:  # verified once, not again: it does not breed
                    members.remove(member)

    def add_member(self, member: Member) -> None:
        members = self.islands[member.island]
        if any(m.candidate_id == member.candidate_id for m in members):
            return
        members.append(member)
        members.sort(key=lambda m: m.fitness, reverse=True)
        del members[self.settings.island_size:]

    def migrate(self) -> None:
        """Each island's best joins the next island (a ring), so good ideas spread while the
        islands keep searching apart."""
        if len(self.islands) < 2:
            return
        bests = [max(members, key=lambda m: m.fitness) if members else None for members in self.islands]
        for index, best in enumerate(bests):
            if best is not None:
                target = (index + 1) % len(self.islands)
                self.add_member(Member(best.candidate_id, target, best.generation, list(best.speedups)))

    def best(self) -> Member | None:
        members = [m for island in self.islands for m in island]
        return max(members, key=lambda m: m.fitness) if members else None

"""The search policy on its own: which job comes next, given what evaluations reported."""

from __future__ import annotations

import random
from collections import Counter

from evo.config import OptimizeConfig
from evo.search import Job, Search


def search(**settings) -> Search:
    return Search(OptimizeConfig(**settings), random.Random(0))


def test_empty_islands_translate_then_a_verified_member_is_improved():
    s = search(islands=2, remeasure_elites=False, crossover_rate=0)
    assert [s.next_job().operator for _ in range(2)] == ["translate", "translate"]
    s.record(Job("translate", 0, 0), 1, "verified", 2.0, None)
    job = s.next_job()
    assert job == Job("improve", 0, 1, (1,))


def test_an_elite_is_remeasured_before_it_breeds_and_dropped_if_it_fails():
    s = search(islands=1, crossover_rate=0)
    s.record(Job("translate", 0, 0), 1, "verified", 3.0, None)
    job = s.next_job()
    assert job.operator == "remeasure" and job.parents == (1,)
    s.record(job, 1, "rejected", None, "values")
    assert s.best() is None  # verified once, not again: it does not breed
    assert s.next_job().operator == "translate"


def test_fitness_is_the_median_of_measurements():
    s = search(islands=1, crossover_rate=0)
    s.record(Job("translate", 0, 0), 1, "verified", 10.0, None)  # one lucky measurement
    s.record(Job("translate", 0, 0), 2, "verified", 2.0, None)
    remeasure = s.next_job()
    s.record(remeasure, 1, "verified", 1.0, None)
    s.record(Job("remeasure", 0, 0, (1,)), 1, "verified", 1.2, None)
    first = next(m for m in s.islands[0] if m.candidate_id == 1)
    assert first.fitness == 1.2  # the median of 10.0, 1.0 and 1.2: the lucky one does not count
    assert s.best().candidate_id == 2


def test_repairs_are_bounded_per_lineage():
    s = search(islands=1, max_repairs=2)
    s.record(Job("translate", 0, 0), 1, "rejected", None, "build")
    repair = s.next_job()
    assert repair == Job("repair_build", 0, 0, (1,), 1)
    s.record(repair, 2, "rejected", None, "values")
    second = s.next_job()
    assert second == Job("repair_wrong", 0, 0, (2,), 2)
    s.record(second, 3, "rejected", None, "values")
    assert s.next_job().operator == "translate"  # the lineage's repairs are spent


def test_selection_favours_speed_but_taxes_repeated_parents():
    s = search(islands=1, remeasure_elites=False, crossover_rate=0, island_size=3)
    for candidate_id, speedup in ((1, 4.0), (2, 1.0), (3, 1.0)):
        s.record(Job("translate", 0, 0), candidate_id, "verified", speedup, None)
    parents = Counter(s.next_job().parents[0] for _ in range(300))
    assert parents[1] > parents[2] and parents[1] > parents[3]
    assert parents[2] > 30 and parents[3] > 30  # the tax keeps the others breeding


def test_island_size_keeps_the_best_and_migration_spreads_them():
    s = search(islands=2, island_size=2, migration_interval=3, remeasure_elites=False)
    for candidate_id, speedup in ((1, 1.0), (2, 3.0), (3, 2.0)):
        s.record(Job("translate", 0, 0), candidate_id, "verified", speedup, None)
    assert [m.candidate_id for m in s.islands[0]] == [2, 3]
    assert [m.candidate_id for m in s.islands[1]] == [2]  # the third evaluation migrated island 0's best


def test_duplicates_are_remembered():
    s = search()
    assert not s.is_duplicate("abc")
    s.remember("abc")
    assert s.is_duplicate("abc")

"""Shared fixtures: run the evaluator in this process, as evo's search loop will."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from evo import devices
from evo.config import VerifyPolicy
from evo.evaluator import verify
from evo.verdict import Verdict

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "tasks"
EXAMPLE_TASKS = ROOT / "examples" / "tasks"
CPU_CANDIDATES = ROOT / "tests" / "candidates" / "cpu"
CUDA_CANDIDATES = ROOT / "tests" / "candidates" / "cuda"


def gpu_present() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


HAS_GPU = gpu_present()
# Where a GPU round writes each verdict and each failure the moment it happens, so a run cut
# short by the device's time limit still tells what it saw.
REPORT_DIR = os.environ.get("EVO_TEST_REPORT_DIR")


def append_report(name: str, text: str) -> None:
    if REPORT_DIR:
        with open(Path(REPORT_DIR) / name, "a") as handle:
            handle.write(text + "\n")


def pytest_runtest_logreport(report):
    if report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        append_report("failures.log", f"==== {report.nodeid} ({report.when})\n{report.longreprtext}")


def pytest_collection_modifyitems(config, items):
    select_shard(config, items)
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="no NVIDIA GPU visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def select_shard(config, items) -> None:
    """EVO_TEST_SHARD=I/N keeps every N-th test from the I-th: a GPU run split over several
    device sessions, each under the device's time limit."""
    shard = os.environ.get("EVO_TEST_SHARD")
    if not shard:
        return
    index, count = (int(part) for part in shard.split("/"))
    kept = [item for position, item in enumerate(items) if position % count == index]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One build cache for the session, so identical extensions are compiled once."""
    shared = os.environ.get("EVO_TEST_CACHE_DIR")
    if shared:
        path = Path(shared)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("evo-cache")


@pytest.fixture
def run_verify(cache_dir):
    """verify(task, candidate, **policy) -> Verdict, with a fast timing budget for tests."""

    def run(task: Path, candidate: Path, **policy) -> Verdict:
        policy.setdefault("timing_budget_s", 0.3)
        policy.setdefault("max_timed_calls", 50)
        verdict = verify(Path(task), Path(candidate), VerifyPolicy(**policy), cache_dir=cache_dir)
        append_report("verdicts.jsonl", json.dumps({"candidate": Path(candidate).name, "task": Path(task).name,
                                                    "verdict": verdict.verdict, "summary": verdict.summary,
                                                    "timings": verdict.timings.model_dump()}))
        return verdict

    return run


def failed_names(verdict: Verdict) -> list[str]:
    return [check.name for check in verdict.failed()]


# The timing protocol's own check: a small machine loaded by other verifications (pytest -n 2 on
# two cores) can fail an honest run on it alone.
HOST_LOAD_CHECKS = frozenset({"timer_consistency"})


def verified_but_for_host_load(verdict: Verdict) -> bool:
    return verdict.verdict == "verified" or (verdict.verdict == "rejected" and set(failed_names(verdict)) <= HOST_LOAD_CHECKS)


@contextlib.contextmanager
def gpu_alone():
    """Hold evo's device lock for a test's own GPU work, done outside evo: evaluations in the
    other test workers time their calls under that lock, and kernels run beside them would be
    timed with theirs (an honest candidate's time outside its timer grew 2 ms per window)."""
    with devices.exclusive(devices.resolve("cuda")):
        yield


@pytest.fixture
def gpu_alone_if_gpu(request):
    """`gpu_alone` for the whole test, where it is marked `gpu`."""
    with gpu_alone() if request.node.get_closest_marker("gpu") else contextlib.nullcontext():
        yield

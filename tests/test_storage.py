"""A full disk is the machine's failure, not the candidate's: `verify` ends in an error that names
the disk (exit code 2) rather than rejecting the candidate's build, a search stops with its
candidate left for --resume, and a candidate that fills the disk itself is still judged for it.

Each test runs evo in a user and mount namespace of its own, where a small tmpfs stands for the
full disk (skipped where such namespaces are not allowed)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TASKS
from evo import storage
from evo.archive import Archive

RELU = TASKS / "cpu_relu.py"
TINY_BUILD = ROOT / "tests" / "candidates" / "disk" / "tiny_extension.py"
DISK_HOG = ROOT / "tests" / "candidates" / "disk" / "fills_its_directory.py"
FAST_CONFIG = """
[verify]
timing_budget_s = 0.2
max_timed_calls = 30
trials = 1
audit_task = false

[optimize]
islands = 1
llm_concurrency = 1
evaluations_per_gpu = 1
remeasure_elites = false
"""


def namespaces_allowed() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not namespaces_allowed(), reason="needs unprivileged user and mount namespaces")


def small_disk(mount_point: Path, size_kib: int, leave_kib: int) -> str:
    """Shell lines that mount a tmpfs of `size_kib` at `mount_point` and fill it up to `leave_kib`."""
    blocks = max(0, (size_kib - leave_kib) // 4)
    return (f"mount -t tmpfs -o size={size_kib}k tmpfs {shlex.quote(str(mount_point))} && "
            f"(dd if=/dev/zero of={shlex.quote(str(mount_point / 'filler'))} bs=4k count={blocks} 2>/dev/null || true)")


def evo_on_small_disk(mount_point: Path, size_kib: int, leave_kib: int, *args: str,
                      env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m evo ARGS` with a small, nearly full tmpfs mounted at `mount_point`, seen by it alone."""
    mount_point.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(part) for part in (sys.executable, "-m", "evo", *args))
    script = f"{small_disk(mount_point, size_kib, leave_kib)} && exec {command}"
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, **(env or {})})


def test_a_full_cache_disk_is_an_error_that_names_it(tmp_path):
    """The build succeeds; copying it into the cache cannot: no half-copied entry is left there."""
    disk = tmp_path / "disk"
    result = evo_on_small_disk(disk, 1024, 0, "verify", str(RELU), str(TINY_BUILD), "--device", "cpu", "--json",
                               env={"EVO_CACHE_DIR": str(disk / "cache")})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    verdict = json.loads(result.stdout)
    assert verdict["verdict"] == "error"
    assert f"the disk holding {disk / 'cache'} is full" in verdict["summary"], verdict["summary"]
    assert "EVO_CACHE_DIR" in verdict["summary"]


def test_a_full_temporary_disk_is_not_the_candidates_build_failure(tmp_path, cache_dir):
    """The compiler cannot write its output in the session's directory: without this rule the
    honest candidate would be rejected by `build`."""
    disk = tmp_path / "tmp"
    result = evo_on_small_disk(disk, 4096, 96, "verify", str(RELU), str(TINY_BUILD), "--device", "cpu", "--json",
                               env={"TMPDIR": str(disk), "EVO_CACHE_DIR": str(tmp_path / "fresh-cache")})
    assert result.returncode == 2, result.stdout + result.stderr
    verdict = json.loads(result.stdout)
    assert verdict["verdict"] == "error", verdict["summary"]
    assert f"the disk holding {disk} is full" in verdict["summary"], verdict["summary"]
    build = next(check for check in verdict["checks"] if check["name"] == "build")
    assert not build["passed"] and storage.says_out_of_space(build["detail"]), build["detail"]


def test_a_candidate_that_fills_the_disk_is_judged_for_it(tmp_path, cache_dir):
    """Once its directory is gone the disk has room again: the failure was the candidate's own."""
    disk = tmp_path / "tmp"
    result = evo_on_small_disk(disk, 16384, 16384, "verify", str(RELU), str(DISK_HOG), "--device", "cpu", "--json",
                               "--allow-no-custom-code", env={"TMPDIR": str(disk), "EVO_CACHE_DIR": str(cache_dir)})
    verdict = json.loads(result.stdout)
    assert verdict["verdict"] == "rejected", verdict["summary"]
    failed = [check for check in verdict["checks"] if not check["passed"]]
    assert failed[0]["name"] == "load" and storage.says_out_of_space(failed[0]["detail"]), failed


def test_a_search_stops_on_a_full_disk_and_resumes_its_candidate(tmp_path):
    disk = tmp_path / "disk"
    replies = tmp_path / "replies.jsonl"
    replies.write_text(json.dumps({"reply": f"Here it is.\n```python\n{TINY_BUILD.read_text()}```\n"}) + "\n")
    config = tmp_path / "evo.toml"
    config.write_text(FAST_CONFIG)
    archive_path = tmp_path / "archive" / "evo.sqlite"
    search = ("optimize", str(RELU), "--llm", f"scripted:{replies}", "--device", "cpu", "--config", str(config),
              "--archive", str(archive_path), "--max-candidates", "1")
    stopped = evo_on_small_disk(disk, 1024, 0, *search, env={"EVO_CACHE_DIR": str(disk / "cache")})
    assert stopped.returncode == 2, stopped.stdout + stopped.stderr
    assert "Traceback" not in stopped.stderr, stopped.stderr
    with Archive(archive_path, create=False) as archive:
        run = archive.runs()[0]
        assert [(c.status, c.verdict) for c in archive.candidates(run.run_id)] == [("pending", None)]
    assert "is full" in stopped.stderr and f"--resume {run.run_id}" in stopped.stderr, stopped.stderr

    resumed = subprocess.run([sys.executable, "-m", "evo", "optimize", "--resume", run.run_id, "--archive",
                              str(archive_path)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                             env={**os.environ, "EVO_CACHE_DIR": str(tmp_path / "cache")})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    with Archive(archive_path, create=False) as archive:
        assert [c.verdict for c in archive.candidates(run.run_id)] == ["verified"]

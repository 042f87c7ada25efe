"""Candidate processes and builds forked from one fork server per task session
(evo/fork_server.py, sandbox/forkserver.py): each fork is used for one candidate, in
namespaces of its own, and nothing one candidate does reaches the next (invariant 5 of
DESIGN.md, and issue 6's condition for sharing anything between candidates)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import EXAMPLE_TASKS, ROOT, failed_names
from evo import isolation
from evo.config import VerifyPolicy
from evo.evaluator import verify
from evo.fork_server import ForkedProcess
from evo.session import TaskSession

RELU = EXAMPLE_TASKS / "relu.py"
HONEST = ROOT / "examples" / "candidates" / "relu_cpu.py"
FORK = ROOT / "tests" / "candidates" / "fork"
PROFILE = isolation.probe()
# Plain PyTorch candidates: no build, so that the test is about processes alone.
POLICY = dict(device="cpu", trials=1, timing_budget_s=0.2, max_timed_calls=30, call_timeout_s=10,
              load_timeout_s=120, require_custom_code=False)

pytestmark = pytest.mark.timeout(600)
needs_isolation = pytest.mark.skipif(not (PROFILE.pid_namespace and PROFILE.read_only_filesystem), reason=(
    "this machine gives sandboxes no PID namespace or read-only filesystem (the verdict's isolation says so)"))


def polluter_then_witness(tmp_path: Path, cache_dir: Path, device: str = "cpu", **policy):
    """The polluter's and the witness's verdicts, one after the other in one session whose spare
    process (the witness's, forked before the polluter loads) is alive while the polluter runs.
    Both carry a marker of this test's own: markers another test left are not this polluter's."""
    marker = f"evo-polluted-{uuid.uuid4().hex[:12]}"
    polluter, witness = (tmp_path / "polluter.py", tmp_path / "witness.py")
    for copy in (polluter, witness):
        copy.write_text((FORK / copy.name).read_text().replace('MARKER = "evo-polluted"', f'MARKER = "{marker}"'))
    settings = VerifyPolicy(**{**POLICY, "device": device, **policy})
    try:
        with TaskSession(RELU, settings, cache_dir, standby=1) as session:
            polluted = verify(RELU, polluter, settings, cache_dir, session)
            witnessed = verify(RELU, witness, settings, cache_dir, session)
            forked = session.fork_server is not None and session.fork_failure is None
    finally:  # where nothing isolated the polluter, its markers are on this machine's own /tmp and /dev/shm
        for place in (Path("/dev/shm"), Path("/tmp")):
            for path in place.glob(f"{marker}-*"):
                path.unlink(missing_ok=True)
    return polluted, witnessed, forked


@needs_isolation
def test_nothing_of_one_forked_candidate_reaches_the_next(tmp_path, cache_dir):
    polluted, witnessed, forked = polluter_then_witness(tmp_path, cache_dir)
    assert forked
    assert polluted.verdict == "rejected" and "global_flags" in failed_names(polluted), polluted.summary
    assert witnessed.verdict == "verified", witnessed.summary


def test_the_witness_sees_a_polluter_that_nothing_isolates(tmp_path, cache_dir):
    """The control: without namespaces, forks share /dev/shm, /tmp and each other's directories,
    and the witness finds the polluter's markers, so the test above can fail."""
    _, witnessed, forked = polluter_then_witness(tmp_path, cache_dir, use_namespaces=False)
    assert forked
    assert failed_names(witnessed) == ["load"], witnessed.summary
    assert "traces of an earlier candidate" in witnessed.summary and "evo-polluted-" in witnessed.summary


@pytest.mark.gpu
def test_nothing_of_one_forked_candidate_reaches_the_next_on_the_gpu(tmp_path, cache_dir):
    polluted, witnessed, forked = polluter_then_witness(tmp_path, cache_dir, device="cuda")
    assert forked
    assert polluted.verdict == "rejected" and "global_flags" in failed_names(polluted), polluted.summary
    assert witnessed.verdict == "verified", witnessed.summary


@pytest.mark.parametrize("fork_server", [True, False])
def test_candidate_processes_are_forked_unless_the_policy_says_no(cache_dir, fork_server):
    policy = VerifyPolicy(**{**POLICY, "fork_server": fork_server})
    with TaskSession(RELU, policy, cache_dir, standby=1) as session:
        runner = session.take_candidate_process()
        try:
            assert runner.receive(120)[0] == {"ready": True, "payload": 0}
            assert isinstance(runner.proc, ForkedProcess) is fork_server
            assert isinstance(runner.proc, subprocess.Popen) is not fork_server
        finally:
            session.release(runner)


@needs_isolation
def test_a_forked_process_is_alone_in_its_namespaces(cache_dir):
    """The first process of its own PID namespace, seeing no other; its home its only writable
    directory; its /dev/shm empty; its exit code reported by its keeper."""
    with TaskSession(RELU, VerifyPolicy(**POLICY), cache_dir, standby=0) as session:
        session.start_fork_server()
        probe = session.sandbox("candidate.py", "candidate process")
        try:
            assert isinstance(probe.proc, ForkedProcess)
            probe.request({"op": "ready"}, timeout=120)
            home = probe.workdir
            script = ("import os, pathlib\n"
                      f"home = pathlib.Path({str(home)!r})\n"
                      "pids = sorted(int(p.name) for p in pathlib.Path('/proc').iterdir() if p.name.isdigit())\n"
                      "(home / 'mine').write_text('x')\n"
                      "for place in (home.parent, pathlib.Path('/tmp')):\n"
                      "    try:\n"
                      "        (place / 'evo-fork-escape').write_text('x'); raise SystemExit(f'wrote {place}')\n"
                      "    except OSError:\n"
                      "        pass\n"
                      "shm = os.listdir('/dev/shm')\n"
                      "raise SystemExit(41 if os.getpid() == 1 and pids == [1] and not shm else f'{pids} {shm}')\n")
            candidate = home / "probe.py"
            candidate.write_text(script)
            reply, _ = probe.request({"op": "load", "candidate": str(candidate), "task": str(RELU), "device": "cpu",
                                      "init_seed": 1, "allow_reduced_precision": False,
                                      "extensions_cache": str(home), "extensions_dir": str(home / "ext"),
                                      "generate_on_device": False, "flush_bytes": 0, "poison_sizes": []},
                                     timeout=120)
        except Exception as err:  # noqa: BLE001 - the probe exits on purpose: its code is the answer
            reply = {"exception": repr(err)}
        code = probe.proc.wait(timeout=30)
        session.release(probe)
    assert code == 41, (code, reply, probe.stderr.text()[-2000:])
    assert not (home.parent / "evo-fork-escape").exists()


def test_a_fork_server_that_ended_is_started_again(cache_dir):
    policy = VerifyPolicy(**POLICY)
    with TaskSession(RELU, policy, cache_dir, standby=0) as session:
        first = verify(RELU, HONEST, policy, cache_dir, session)
        ended = session.fork_server
        ended.process.kill()
        second = verify(RELU, HONEST, policy, cache_dir, session)
        assert session.fork_server is not ended and session.fork_failure is None
    assert first.verdict == second.verdict == "verified", (first.summary, second.summary)
    assert first.isolation.forked and second.isolation.forked


def test_a_fork_server_that_cannot_serve_leaves_its_session_to_fresh_interpreters(cache_dir):
    """As when CUDA was initialized in it: the session's processes start afresh, the verdict
    says so, and nothing else changes."""
    policy = VerifyPolicy(**POLICY)
    with TaskSession(RELU, policy, cache_dir, standby=0) as session:
        session.start_fork_server()
        session.fork_server.failed("it was told it cannot")
        verdict = verify(RELU, HONEST, policy, cache_dir, session)
        assert session.fork_failure == "the fork server failed: it was told it cannot"
    assert verdict.verdict == "verified", verdict.summary
    assert not verdict.isolation.forked


def test_the_cli_says_whether_processes_were_forked(tmp_path):
    outcomes = {}
    for flags in ([], ["--no-fork-server"]):
        result = subprocess.run(["python3", "-m", "evo", "verify", str(RELU), str(HONEST), "--device", "cpu", "--json",
                                 *flags], capture_output=True, text=True, cwd=ROOT, timeout=600,
                                env={**os.environ, "EVO_CACHE_DIR": str(tmp_path)})
        verdict = json.loads(result.stdout)
        assert verdict["verdict"] == "verified", verdict["summary"]
        outcomes[bool(flags)] = verdict["isolation"]["forked"]
    assert outcomes == {False: True, True: False}

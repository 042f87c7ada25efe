"""SandboxProcess.hold stops every process of a sandbox while evo has other work done between
two of its requests (the checker copying a window's inputs into the input pool, or reading the
inputs a call left there): a process left running could work on them where no clock sees it.
Processes that fork and leave their group and their parents as fast as they can must be stopped
too. Before the sandbox kept its processes in its group, one forked between the walk of the
process tree and the stop of its parent was not in that walk: 11, 7, 7 and 12 of 40 holds
left one running in four runs on a 2-core machine (session 24).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from evo import isolation
from evo.live_sandboxes import stat_field
from evo.neighbours import command_line
from evo.sandbox_runner import SANDBOX_DIR, Limits, SandboxProcess

PROGRAM = Path(__file__).resolve().parent / "programs" / "hopping_lineages.py"
PROFILE = isolation.probe()
LINEAGES = 6
HOLDS = 40
NOT_RUNNING = ("T", "t", "Z", "X")  # stopped, stopped by a tracer, zombie, dead

pytestmark = pytest.mark.skipif(not (PROFILE.pid_namespace and PROFILE.process_group_kept), reason=(
    "this machine gives sandboxes no PID namespace or no seccomp filter (the verdict's isolation notes say so)"))


def tagged(tag: str) -> list[int]:
    """Every process whose environment carries the tag: the sandbox's, wherever they moved."""
    marker = f"HOLD_TEST_TAG={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def state(pid: int) -> str:
    return stat_field(pid, 3) or "X"


def stop_pending(pid: int) -> bool:
    """Whether SIGSTOP waits for the process (it stops before it next runs its own code): on a
    loaded machine a process can wait for a core, still shown running, long after it was sent."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signal.SIGSTOP - 1)) for mask in masks)


def test_no_process_of_a_held_sandbox_runs(tmp_path):
    tag = uuid.uuid4().hex
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LINEAGES": str(LINEAGES), "HOLD_TEST_TAG": tag,
           "SANDBOX_DIR": str(SANDBOX_DIR), "STARTED_MARKER": str(tmp_path / "lineages-started")}
    process = SandboxProcess(str(PROGRAM), isolation=PROFILE, workdir=tmp_path, env=env,
                             limits=Limits(memory_bytes=4 << 30, address_space_bytes=None), label="hopping lineages")
    process.start()
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "lineages-started").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if time.monotonic() >= deadline:
            process.kill()
            pytest.fail(f"the lineages did not start; the sandbox's stderr: {process.stderr.text()[-2000:]!r}")
        time.sleep(0.5)  # hopping at full pace
        left_running = []
        for _ in range(HOLDS):
            process.hold()
            time.sleep(0.02)  # a stop still on its way would land by now
            left_running.append([f"{pid} ({now}: {command_line(pid)[:120]})" for pid in tagged(tag)
                                 if (now := state(pid)) not in NOT_RUNNING and not stop_pending(pid)])
            process.release()
            time.sleep(0.01)
        missed = [pids for pids in left_running if pids]
        assert not missed, f"{len(missed)} of {HOLDS} holds left processes running, such as {missed[0]}"
    finally:
        process.kill()

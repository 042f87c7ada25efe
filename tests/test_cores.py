"""Cores kept for the timed path: which ones, and that processes and threads really move."""

import os
import subprocess
import sys

import pytest

from conftest import TASKS
from evo import cores
from evo.live_sandboxes import stat_field


def test_a_gpu_machine_keeps_its_last_cores_for_timing():
    kept, others = cores.split("cuda", list(range(16)))
    assert kept == {14, 15} and others == set(range(14))


@pytest.mark.parametrize("kind, count", [("cpu", 16), ("cuda", 4)])
def test_nothing_is_kept_on_a_cpu_device_or_a_small_machine(kind, count):
    assert cores.split(kind, list(range(count))) is None


def test_a_thread_runs_on_the_given_cores_and_what_it_starts_inherits_them():
    one = {min(os.sched_getaffinity(0))}
    before = os.sched_getaffinity(0)
    with cores.thread_on(one):
        child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                               capture_output=True, text=True, check=True)
        assert os.sched_getaffinity(0) == one
    assert os.sched_getaffinity(0) == before
    assert child.stdout.strip() == str(sorted(one))


def test_every_thread_of_every_process_in_a_group_moves():
    """A wrapper's grandchild with a thread of its own, all in one new session."""
    program = ("import os, sys, threading, time; threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); "
               "print('ready', flush=True); sys.stdin.read()")
    wrapper = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "{program}"; true'], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wrapper.stdout.readline().strip() == "ready"
        target = {max(os.sched_getaffinity(0))}
        cores.move_groups({wrapper.pid}, target)
        group = [entry for entry in os.listdir("/proc")
                 if entry.isdigit() and stat_field(int(entry), 5) == str(wrapper.pid)]
        threads = [int(task) for pid in group for task in os.listdir(f"/proc/{pid}/task")]
        assert len(group) >= 2 and len(threads) >= 3
        assert all(os.sched_getaffinity(thread) == target for thread in threads)
    finally:
        wrapper.kill()
        subprocess.run(["pkill", "-KILL", "-g", str(wrapper.pid)], check=False)
        wrapper.wait()


@pytest.mark.gpu
def test_the_timed_process_is_called_on_the_kept_cores(run_verify, tmp_path):
    kept = cores.split("cuda")
    if kept is None:
        pytest.skip(f"fewer than {cores.MIN_CORES_TO_RESERVE} cores: none are kept")
    candidate = tmp_path / "where_am_i.py"
    candidate.write_text(
        "import os, torch.nn as nn\n"
        "class ModelNew(nn.Module):\n"
        "    def forward(self, x):\n"
        "        raise RuntimeError(f'called on {sorted(os.sched_getaffinity(0))}')\n")
    verdict = run_verify(TASKS / "cuda_relu_odd.py", candidate, device="cuda")
    assert f"called on {sorted(kept[0])}" in verdict.summary, verdict.summary

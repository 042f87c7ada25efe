"""Evaluations on one device take turns, so two evo processes never skew each other's timings."""

from __future__ import annotations

import tempfile
import threading
import time

from conftest import EXAMPLE_TASKS, ROOT
from evo import devices

HELD_S = 15.0  # well beyond a cached build on a loaded 2-core host, which runs before the device is taken


def test_an_evaluation_waits_while_another_holds_the_device(run_verify):
    candidate = ROOT / "examples" / "candidates" / "relu_cpu.py"
    assert run_verify(EXAMPLE_TASKS / "relu.py", candidate, device="cpu").verdict == "verified"  # builds it
    holding = threading.Event()

    def hold() -> None:
        with devices.exclusive(devices.resolve("cpu")):
            holding.set()
            time.sleep(HELD_S)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    verdict = run_verify(EXAMPLE_TASKS / "relu.py", candidate, device="cpu")
    holder.join()
    assert verdict.verdict == "verified", verdict.summary
    # The build runs outside the lock, so part of the hold may overlap it; the rest is queued.
    assert verdict.timings.queued_s + verdict.timings.build_s >= HELD_S * 0.9
    assert verdict.timings.queued_s > 1.0


def test_closing_a_session_calls_off_its_wait_for_the_device():
    """The task's loader waits for the device on a thread of its own; a session closed meanwhile
    (a build failed, Ctrl-C) must not wait for the device to be free, nor leave the thread."""
    from evo.config import VerifyPolicy
    from evo.session import TaskSession

    release = threading.Event()
    holding = threading.Event()

    def hold() -> None:
        with devices.exclusive(devices.resolve("cpu")):
            holding.set()
            release.wait(120)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait()
    try:
        session = TaskSession(EXAMPLE_TASKS / "relu.py", VerifyPolicy(device="cpu")).start()
        loader = session.loader
        deadline = time.monotonic() + 60
        while loader.checker.running() and not loader.checker.last_arrival and time.monotonic() < deadline:
            time.sleep(0.2)  # until the checker has answered that it is up: the loader then waits for the device
        assert loader.checker.last_arrival, "the checker did not start"
        time.sleep(0.5)
        assert loader.thread.is_alive() and loader.result is None and loader.error is None
        started = time.monotonic()
        session.close()
        assert time.monotonic() - started < 10
        assert not loader.thread.is_alive() and loader.error is not None
    finally:
        release.set()
        holder.join()


def test_a_new_holder_waits_for_what_the_last_holder_killed_to_end_unless_it_defers_that(tmp_path, monkeypatch):
    """The last holder gave the device up while its killed processes were still ending: a new
    holder waits for them as it takes the device, or, deferring that, when it asks."""
    # Locks of its own: an evaluation in another test worker may hold the machine's CPU lock.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    device = devices.resolve("cpu")
    ending = devices.Ending(device)
    with devices.exclusive(device):
        ending.hold()
    seen: list[str] = []

    def take(defer: bool) -> None:
        with devices.exclusive(device, defer_teardowns=defer):
            seen.append("took the device")
            devices.await_teardowns(device)
            seen.append("they have ended")

    try:
        for defer, before_release in ((True, ["took the device"]), (False, [])):
            seen.clear()
            if not defer:
                with devices.exclusive(device, defer_teardowns=True):
                    ending.hold()
            taker = threading.Thread(target=take, args=(defer,))
            taker.start()
            time.sleep(1.0)
            assert seen == before_release
            ending.release()
            taker.join(30)
            assert seen == ["took the device", "they have ended"]
    finally:
        ending.release()

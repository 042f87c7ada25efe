"""Evaluations on one device take turns, so two evo processes never skew each other's timings."""

from __future__ import annotations

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

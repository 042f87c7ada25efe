"""How much processes making their CUDA contexts slow timed calls beside them, with and without
evo's start gate (evo/start_gate.py).

    python3 benchmarks/context_starts.py [--starts 6] [--size 4096]

A timer times an NxN matmul in windows of 32 calls, in timing phases of a second with half a
second between them (as evaluations time and then check or load); meanwhile other processes
start as evo's sandboxes do (torch imported first, then the context, cuBLAS's handle and a few
kernels, under sandbox/start_gate.py). Ungated, the starts fall anywhere; gated, the timer
holds the gate through each phase, as an evaluation does. Prints, per run, the per-call medians of
the windows that overlapped a start and of the others, side by side. Needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evo import devices, start_gate  # noqa: E402

WINDOW = 32
PHASE_S, GAP_S = 1.0, 0.5

STARTER = f"""
import sys, time
sys.path.insert(0, {str(ROOT / "sandbox")!r})
import harness, start_gate, torch
print("imported", flush=True)
sys.stdin.readline()
with start_gate.held():
    began = time.time()
    harness.start_device()
    print(f"started {{began}} {{time.time()}}", flush=True)
"""


def timed_windows(fn, seconds: float) -> list[tuple[float, float, float]]:
    """(wall start, wall end, ms per call) of each window."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rows, until = [], time.time() + seconds
    while time.time() < until:
        torch.cuda.synchronize()
        began = time.time()
        start.record()
        for _ in range(WINDOW):
            fn()
        end.record()
        torch.cuda.synchronize()
        rows.append((began, time.time(), start.elapsed_time(end) / WINDOW))
    return rows


def run(fn, starts: int, gated: bool, device: devices.Device) -> tuple[list, list]:
    env = {key: value for key, value in os.environ.items() if key != start_gate.GATE_ENV}
    env["CUDA_VISIBLE_DEVICES"] = device.visible  # as in a sandbox: start_device starts nothing without it
    if gated:
        env.update(start_gate.sandbox_env(device))
    starters = [subprocess.Popen([sys.executable, "-c", STARTER], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for _ in range(starts)]
    for starter in starters:
        assert starter.stdout.readline().strip() == "imported"
    rows: list = []
    phases = starts  # about one start per phase

    def release_starters():
        for starter in starters:
            starter.stdin.write("go\n")
            starter.stdin.flush()
            time.sleep((PHASE_S + GAP_S) * phases / starts)

    releaser = threading.Thread(target=release_starters)
    releaser.start()
    for _ in range(phases):
        if gated:
            with start_gate.starts_held_off(device, [], "the benchmark"):
                rows += timed_windows(fn, PHASE_S)
        else:
            rows += timed_windows(fn, PHASE_S)
        time.sleep(GAP_S)
    releaser.join()
    spans = []
    for starter in starters:
        _, began, ended = starter.communicate(timeout=120)[0].split()
        spans.append((float(began), float(ended)))
    overlapping = [row for row in rows if any(began <= row[1] and row[0] <= ended for began, ended in spans)]
    others = [row for row in rows if row not in overlapping]
    return overlapping, others


def describe(rows: list) -> str:
    if not rows:
        return "none"
    per_call = sorted(row[2] * 1000 for row in rows)
    return f"{len(per_call)} windows, median {statistics.median(per_call):.1f} µs, max {per_call[-1]:.1f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=6)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    tempfile.tempdir = tempfile.mkdtemp(prefix="evo-context-starts-")  # a gate of its own
    device = devices.resolve("cuda")
    a = torch.randn(args.size, args.size, device="cuda")
    out = torch.empty_like(a)
    fn = lambda: torch.mm(a, a, out=out)  # noqa: E731
    timed_windows(fn, 0.5)
    print(f"{args.size}² matmul in windows of {WINDOW}, {args.starts} process starts beside it, on {device.name}")
    for gated in (False, True):
        overlapping, others = run(fn, args.starts, gated, device)
        label = "gated  " if gated else "ungated"
        print(f"{label}: overlapping a start: {describe(overlapping)} | others: {describe(others)}", flush=True)


if __name__ == "__main__":
    main()

"""How little could any timing protocol make a launch-bound speedup move? (issue 2's spread target)

    python benchmarks/paired_pace.py [--processes 6] [--windows 30] [--pairs 60] [--fixed-layout]

evo times the reference before any candidate code is loaded and the candidate after, each in
its own process; for a call shorter than its own launch from Python, each timing lands in
whatever state the host's pace is in then. This measures the best case that protocol gives up:
in each of --processes fresh interpreters pinned to the timing core (the last usable core), the
cuda_softmax task's reference (torch.softmax on 512x4096) and the corpus's honest_softmax
kernel are timed in windows of 32 calls (fresh inputs, L2 overwritten, CUDA events around each
call, as evo's windows are), first as evo orders them (--windows of the reference, a second's
pause, --windows of the candidate), then alternated window by window (--pairs pairs), in one
process, with nothing hostile around. It prints each process's ratio of reference to candidate
per call, three ways: blocked (median over median), paired (median of the pairs' ratios) and
fastest (the fastest window of each), and each way's spread over the processes
((max - min) / median, as verify_cost.py reports it). --fixed-layout runs every other process
with address-space randomization off, to see whether a process's pace follows its layout.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CANDIDATE = Path(__file__).resolve().parent.parent / "tests" / "candidates" / "cuda" / "honest_softmax.py"
ADDR_NO_RANDOMIZE = 0x0040000  # personality(2) flag

PROBE = r'''
import importlib.util, json, statistics, sys, time, torch
path, windows, pairs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = importlib.util.spec_from_file_location("candidate", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
candidate, reference = module.ModelNew().cuda(), lambda x: torch.softmax(x, dim=-1)
l2_overwrite = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device="cuda")

def window(call):
    inputs = [torch.randn(512, 4096, device="cuda") * 3 for _ in range(32)]
    l2_overwrite.fill_(1)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in inputs]
    torch.cuda.synchronize()
    for (begin, end), x in zip(events, inputs):
        begin.record(); call(x); end.record()
    torch.cuda.synchronize()
    return statistics.median(begin.elapsed_time(end) * 1e3 for begin, end in events)

for _ in range(5):
    window(reference); window(candidate)
blocked_reference = [window(reference) for _ in range(windows)]
time.sleep(1.0)
blocked_candidate = [window(candidate) for _ in range(windows)]
paired = [(window(reference), window(candidate)) for _ in range(pairs)]
print(json.dumps({"blocked_reference": blocked_reference, "blocked_candidate": blocked_candidate, "paired": paired}))
'''


def run_probe(core: int, windows: int, pairs: int, fixed_layout: bool) -> dict:
    def place() -> None:
        os.sched_setaffinity(0, {core})
        if fixed_layout:  # inherited through exec: the interpreter starts at fixed addresses
            libc = ctypes.CDLL(None, use_errno=True)
            libc.personality(libc.personality(0xFFFFFFFF) | ADDR_NO_RANDOMIZE)

    done = subprocess.run([sys.executable, "-c", PROBE, str(CANDIDATE), str(windows), str(pairs)],
                          capture_output=True, text=True, preexec_fn=place, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"a probe process failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(result: dict) -> dict[str, float]:
    """Reference time over candidate time per call, three ways."""
    median = statistics.median
    paired = result["paired"]
    return {"blocked": median(result["blocked_reference"]) / median(result["blocked_candidate"]),
            "paired": median(reference / candidate for reference, candidate in paired),
            "fastest": min(reference for reference, _ in paired) / min(candidate for _, candidate in paired)}


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=6, help="fresh processes (per layout with --fixed-layout)")
    parser.add_argument("--windows", type=int, default=30, help="windows of each subject timed one after the other")
    parser.add_argument("--pairs", type=int, default=60, help="reference-then-candidate window pairs")
    parser.add_argument("--fixed-layout", action="store_true",
                        help="also run processes with address-space randomization off, alternating with the others")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no GPU is visible: this probe times CUDA launches")
    core = max(os.sched_getaffinity(0))
    layouts = [False, True] if args.fixed_layout else [False]
    run_probe(core, 1, 1, False)  # builds the candidate's extension (cached), so no timed process waits for it
    by_layout: dict[bool, list[dict[str, float]]] = {layout: [] for layout in layouts}
    for number in range(args.processes):
        for layout in layouts:
            result = run_probe(core, args.windows, args.pairs, layout)
            row = {way: round(value, 4) for way, value in ratios(result).items()}
            by_layout[layout].append(row)
            windows = [reference for reference, _ in result["paired"]]
            print(json.dumps({"process": number, "fixed_layout": layout, **row,
                              "reference_blocked_us": round(statistics.median(result["blocked_reference"]), 2),
                              "candidate_blocked_us": round(statistics.median(result["blocked_candidate"]), 2),
                              "reference_paired_windows_us": [round(min(windows), 1), round(max(windows), 1)]}),
                  flush=True)
    for layout, rows in by_layout.items():
        print(f"{'fixed layout' if layout else 'randomized layout'}: spread over {len(rows)} processes: "
              + ", ".join(f"{way} {spread([row[way] for row in rows]):.1%}" for way in rows[0]))


if __name__ == "__main__":
    main()

"""Times the kernel against the task's PyTorch reference the way evo did, and prints the speedup
next to the one evo recorded.

    python benchmark.py [--seconds S] [--compile] [--json]

Protocol (evo's, in one process): calls run in windows of up to 32 (about 2 ms of the
reference's work; one call per window on a CPU). Before each window the inputs of every call are
made fresh (new contents, new addresses) and a buffer is written over the device's cache (256 MB
on a GPU, twice the largest CPU cache on a CPU);
the whole device is synchronized, the calls run back to back with CUDA events around each (the
host clock on a CPU), and the device is synchronized again. The rows take turns, window by
window. Reported: the median per call, its interquartile range, and the reference's median over
the row's.

Rows: the reference; the drop-in Model in eager mode, which (recording no gradient) runs the
candidate's forward directly, as evo timed it; the same through the custom op, whose dispatch
adds tens of microseconds of host time per call (the path autograd takes, and the node
torch.compile keeps); with --compile, the reference and the Model under torch.compile.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import time
from pathlib import Path

import torch

# Read before the package is imported: importing it loads (or builds) the kernel for its device.
MANIFEST = json.loads((Path(importlib.util.find_spec("__evo_package__").submodule_search_locations[0])
                       / "_manifest.json").read_text())
if MANIFEST["device"] == "cuda" and not torch.cuda.is_available():
    raise SystemExit("this kernel runs on a CUDA GPU and none is visible")

import __evo_package__ as kernel  # noqa: E402
from __evo_package__ import reference  # noqa: E402

WINDOW_TARGET_MS, MAX_WINDOW, GPU_FLUSH_BYTES = 2.0, 32, 256 << 20


def seeded(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def cpu_cache_bytes() -> int:
    """Twice the largest CPU cache, at least 8 MiB (evo's rule)."""
    largest = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size_file.read_text().strip().upper()
            largest = max(largest, int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0))
        except (OSError, ValueError):
            continue
    return max(8 << 20, 2 * largest)


class Clock:
    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.device = device
        size = GPU_FLUSH_BYTES if self.cuda else cpu_cache_bytes()
        self.flush_buffer = torch.zeros(size // 4, dtype=torch.int32, device=device)
        self.flushes = 0

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def flush(self) -> None:
        self.flushes += 1
        self.flush_buffer.fill_(self.flushes)
        self.synchronize()

    def window(self, function, input_sets: list) -> list[float]:
        """Milliseconds of each call, run back to back."""
        if not self.cuda:
            times = []
            for inputs in input_sets:
                start = time.perf_counter()
                function(*inputs)
                times.append((time.perf_counter() - start) * 1e3)
            return times
        marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in input_sets]
        self.synchronize()
        for (begin, end), inputs in zip(marks, input_sets):
            begin.record()
            function(*inputs)
            end.record()
        self.synchronize()
        return [begin.elapsed_time(end) for begin, end in marks]


def fresh_inputs(device: str, seed: int) -> list:
    seeded(seed)
    try:
        with torch.device(device):
            return [t.to(device) for t in reference.get_inputs()]
    except Exception:  # a get_inputs that insists on the CPU
        return [t.to(device) for t in reference.get_inputs()]


def measure(clock: Clock, rows: list, window: int, seconds: float) -> dict[str, list[float]]:
    """Windows of each row in turn, round after round, so that a machine's drift reaches all alike."""
    times: dict[str, list[float]] = {label: [] for label, _ in rows}
    for warmup in range(3):
        for label, function in rows:
            clock.window(function, [fresh_inputs(clock.device, warmup)])
    started, rounds = time.monotonic(), 0
    while rounds * window < 10 or (time.monotonic() - started < seconds * len(rows) and rounds * window < 2000):
        for label, function in rows:
            input_sets = [fresh_inputs(clock.device, 1000 + rounds * window + i) for i in range(window)]
            clock.flush()
            times[label] += clock.window(function, input_sets)
        rounds += 1
    return times


def summary(times: list[float]) -> dict:
    quartiles = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "iqr_ms": quartiles[2] - quartiles[0], "calls": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent timing each row (default 2)")
    parser.add_argument("--compile", action="store_true", help="also time both under torch.compile")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    device = MANIFEST["device"]
    init = reference.get_init_inputs()
    seeded(0)
    ours = reference.Model(*init).to(device)
    seeded(0)
    theirs = kernel.Model(*init).to(device)
    rows = [("reference (eager PyTorch)", ours), ("kernel.Model (eager)", theirs),
            ("kernel through its custom op", lambda *x: torch.ops.__evo_package__.forward(*kernel.op_arguments(theirs, *x)))]
    if args.compile:
        rows += [("reference, torch.compile", torch.compile(ours)),
                 ("kernel.Model, torch.compile", torch.compile(theirs, fullgraph=True))]
    clock = Clock(device)
    with torch.no_grad():
        probe = statistics.median(measure(clock, rows[:1], 1, 0.2)[rows[0][0]])
        window = 1 if device == "cpu" else max(1, min(MAX_WINDOW, int(WINDOW_TARGET_MS / max(probe, 1e-6))))
        results = {label: summary(times) for label, times in measure(clock, rows, window, args.seconds).items()}
    base = results[rows[0][0]]["median_ms"]
    for result in results.values():
        result["speedup"] = base / result["median_ms"]
    verification = MANIFEST["verification"]
    here = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report = {"device": here, "torch": torch.__version__, "window": window, "rows": results,
              "speedup": results["kernel.Model (eager)"]["speedup"], "evo_speedup": verification["fitness"],
              "evo_device": verification["hardware"], "evo_torch": verification["environment"].get("torch")}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{'':30} {'median ms':>10} {'IQR ms':>9} {'calls':>6} {'speedup':>8}")
    for label, result in results.items():
        print(f"{label:30} {result['median_ms']:10.4f} {result['iqr_ms']:9.4f} {result['calls']:6d} "
              f"{result['speedup']:7.2f}x")
    print(f"\nspeedup here: {report['speedup']:.2f}x on {here} (torch {torch.__version__}); evo measured "
          f"{verification['fitness']:.2f}x on {verification['hardware']} (torch {report['evo_torch']})")


if __name__ == "__main__":
    main()

"""Does a process's launch pace depend on where it started? (issue 2: the spread of a
launch-bound candidate's speedup)

    python benchmarks/host_pace.py [--processes 4] [--windows 20]

A call shorter than its own launch is timed at the host's pace, and on the H200 machine the
same reference measured about 12 µs in one fresh checker and 18 µs in the next. evo starts its
sandboxes on the cores it does not keep for timing and moves the timed ones onto the kept cores
for their turn, so a process's memory (first touched where it started) may sit on another NUMA
node than the core it is timed on. For one start core per NUMA node, and for the timing core
itself, this starts --processes fresh interpreters there, each of which initializes CUDA, moves
onto the last core (as a timed process is), and times --windows windows of 32 softmax calls on
512x4096 (the cuda_softmax task's reference) with CUDA events; it prints the NUMA nodes, the
GPU's node, and each process's median per call, grouped by where it started.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = r'''
import json, os, statistics, sys, torch
timing_core, windows = int(sys.argv[1]), int(sys.argv[2])
inputs = [torch.randn(512, 4096, device="cuda") * 3 for _ in range(32)]
torch.softmax(inputs[0], dim=-1); torch.cuda.synchronize()
os.sched_setaffinity(0, {timing_core})
medians = []
for _ in range(windows):
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in inputs]
    torch.cuda.synchronize()
    for (begin, end), x in zip(events, inputs):
        begin.record(); torch.softmax(x, dim=-1); end.record()
    torch.cuda.synchronize()
    medians.append(statistics.median(begin.elapsed_time(end) * 1e3 for begin, end in events))
print(json.dumps({"median_us": statistics.median(medians), "windows_min_us": min(medians),
                  "windows_max_us": max(medians)}))
'''


def numa_nodes() -> dict[int, list[int]]:
    """Each NUMA node's cores this process may use; one node holding them all where none is listed."""
    usable, nodes = sorted(os.sched_getaffinity(0)), {}
    for node in sorted(Path("/sys/devices/system/node").glob("node[0-9]*")):
        cores = [core for core in expand((node / "cpulist").read_text().strip()) if core in usable]
        if cores:
            nodes[int(node.name[4:])] = cores
    return nodes or {0: usable}


def expand(cpulist: str) -> list[int]:
    cores = []
    for part in filter(None, cpulist.split(",")):
        first, _, last = part.partition("-")
        cores.extend(range(int(first), int(last or first) + 1))
    return cores


def gpu_node() -> str:
    """The NUMA node the driver reports for GPU 0's PCI device, as nvidia-smi names the device."""
    try:
        bus = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return Path(f"/sys/bus/pci/devices/{bus[-12:].lower()}/numa_node").read_text().strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def probe(start_core: int, timing_core: int, windows: int) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(timing_core), str(windows)], capture_output=True,
                          text=True, preexec_fn=lambda: os.sched_setaffinity(0, {start_core}), timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"the probe started on core {start_core} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=4, help="fresh processes per start core")
    parser.add_argument("--windows", type=int, default=20, help="windows of 32 calls each process times")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no GPU is visible: this probe times CUDA launches")
    nodes = numa_nodes()
    timing_core = max(core for cores in nodes.values() for core in cores)
    print(json.dumps({"numa_nodes": nodes, "gpu_node": gpu_node(), "timing_core": timing_core}))
    starts = sorted({cores[0] for cores in nodes.values()} | {timing_core})
    for round_number in range(args.processes):  # start cores in turn, so that drift over time hits each alike
        for start in starts:
            node = next(number for number, cores in nodes.items() if start in cores)
            result = probe(start, timing_core, args.windows)
            print(json.dumps({"start_core": start, "start_node": node, "round": round_number, **result}), flush=True)


if __name__ == "__main__":
    main()

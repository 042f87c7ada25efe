"""Candidates evaluated per hour: a KernelBench-style harness against evo, measured in one run.

    python benchmarks/throughput.py [--candidates 16] [--baseline 4] [--formats load_inline,nvrtc]
                                    [--phases] [--holding 4,6,8] [--fresh-too]

The candidates are variants of one ReLU kernel on examples/tasks/relu.py (block sizes differ,
every source is unique, so nothing is served from a cache); every fifth is wrong on purpose.
The load_inline ones are in the format evo's prompts ask for (prompts/parts/format_load_inline.md:
kernels in a .cu that includes only cuda_runtime.h, bindings in the .cpp, no implicit headers).
  * baseline, the way KernelBench's harness evaluates: one candidate after another, each in a
    fresh interpreter that builds it with load_inline into an empty build directory, checks 5
    trials with allclose and times 100 calls with CUDA events. It runs the first --baseline
    load_inline candidates (each costs a cold build) and its rate is measured on them;
  * evo: every candidate of a format through `evaluator.verify` in one task session (checker and
    reference timing reused, candidate processes started ahead of need), as many at once as the
    machine builds in parallel, with an empty build cache.
Printed: candidates per hour, the ratio to the baseline, the median build seconds per
candidate, the CPU seconds spent per candidate (every process of the run), the GPU's busy
fraction (time a candidate's device work held the GPU, over the wall time), and whether both
ways gave the same verdicts on the candidates both evaluated.
With --phases, also the median seconds of each step of evo's evaluations and of its waits for
each sandbox's replies, how long the device was outside turns (before the first, between turns,
after the last), and the steps of the first evaluation and of the session's start; with
--fresh-too, evo's way again with a fresh interpreter per process instead of the fork server.
Targets (issue 6): >= 30x the baseline for NVRTC candidates, >= 15x for load_inline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evo import devices, evaluator  # noqa: E402
from evo.config import VerifyPolicy  # noqa: E402
from evo.evaluator import Evaluation, verify  # noqa: E402
from evo.sandbox_runner import SandboxProcess  # noqa: E402
from evo.session import TaskSession  # noqa: E402

TASK = ROOT / "examples" / "tasks" / "relu.py"
BLOCKS = (128, 256, 512, 1024)

KERNEL = r"""
extern "C" __global__ void relu_v{index}(const float* __restrict__ x, float* __restrict__ y, int n) {{
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;  // variant {index}
    if (i < n) {{ float v = x[i]; y[i] = {expression}; }}
}}
"""

LOAD_INLINE = r'''
import torch, torch.nn as nn
from torch.utils.cpp_extension import load_inline
CUDA = r"""
#include <cuda_runtime.h>
{kernel}
void launch_v{index}(const float* x, float* y, int n, cudaStream_t s) {{
    relu_v{index}<<<(n + {block} - 1) / {block}, {block}, 0, s>>>(x, y, n);
}}
"""
CPP = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
void launch_v{index}(const float* x, float* y, int n, cudaStream_t s);
torch::Tensor forward(torch::Tensor x) {{
    auto y = torch::empty_like(x);
    launch_v{index}(x.data_ptr<float>(), y.data_ptr<float>(), (int)x.numel(), c10::cuda::getCurrentCUDAStream());
    return y;
}}
"""
ext = load_inline("throughput_v{index}_{salt}", cpp_sources=CPP, cuda_sources=CUDA, functions=["forward"],
                  extra_cuda_cflags=["-O3"], no_implicit_headers=True)
class ModelNew(nn.Module):
    def forward(self, x):
        return ext.forward(x.contiguous())
'''

NVRTC = r'''
import torch, torch.nn as nn
SOURCE = r"""{kernel}"""
class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = torch.cuda._compile_kernel(SOURCE, "relu_v{index}")
    def forward(self, x):
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        self.kernel(grid=((n + {block} - 1) // {block}, 1, 1), block=({block}, 1, 1), args=[x, y, n])
        return y
'''

# KernelBench's evaluation of one candidate, in its own interpreter: build, 5 trials, 100 timed calls.
KERNELBENCH = r'''
import importlib.util, json, sys, time, torch
started = time.perf_counter()
spec = importlib.util.spec_from_file_location("task", sys.argv[1]); task = importlib.util.module_from_spec(spec); spec.loader.exec_module(task)
built = time.perf_counter()
try:
    spec = importlib.util.spec_from_file_location("cand", sys.argv[2]); cand = importlib.util.module_from_spec(spec); spec.loader.exec_module(cand)
except Exception as err:
    print(json.dumps({"verdict": "rejected", "build_s": time.perf_counter() - built, "gpu_s": 0.0})); sys.exit()
build_s = time.perf_counter() - built
gpu_started = time.perf_counter()
torch.manual_seed(42); ref = task.Model(*task.get_init_inputs()).cuda()
torch.manual_seed(42); new = cand.ModelNew(*task.get_init_inputs()).cuda()
ok = True
for trial in range(5):
    torch.manual_seed(42 + trial)
    inputs = [x.cuda() for x in task.get_inputs()]
    ok = ok and torch.allclose(ref(*inputs), new(*inputs), atol=1e-2, rtol=1e-2)
times = []
for _ in range(100):
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record(); new(*inputs); end.record(); torch.cuda.synchronize(); times.append(begin.elapsed_time(end))
print(json.dumps({"verdict": "verified" if ok else "rejected", "build_s": build_s, "gpu_s": time.perf_counter() - gpu_started}))
'''


# Steps of an evaluation whose seconds --phases reports (medians over the candidates): those of
# the device phase, and the build and the waits before it.
PHASES = ("build", "spawn_processes", "await_candidate_processes", "await_task", "reserve_memory", "prepare_checker",
          "time_reference", "start_profiled_call", "load_candidate", "correctness", "finish_profiled_call",
          "time_candidate", "end_profiler", "timed_calls", "calibrate", "which_kernels", "release_processes")
WARM_UP = "warm_up"  # evo.evaluator.warm_up, the candidate's untimed calls
TEARDOWNS = "await_teardowns"  # evo.devices.await_teardowns: the last turn's processes ending


class PhaseClock:
    """Seconds spent in each step of each evaluation, by wrapping the evaluator's methods: read
    from outside, so that the evaluator carries no benchmark code."""

    def __init__(self):
        self.current = threading.local()
        self.runs: list[dict[str, float]] = []
        self.turns: list[tuple[float, float]] = []  # (start, end) of each on_device, time.perf_counter
        self.outside: dict[str, float] = defaultdict(float)  # the session's start, outside any evaluation
        self.first: dict[str, float] = {}  # the steps of the evaluation whose turn came first
        for name in PHASES:
            setattr(Evaluation, name, self.timed(getattr(Evaluation, name), name))
        evaluator.warm_up = self.timed(evaluator.warm_up, WARM_UP)
        devices.await_teardowns = self.timed(devices.await_teardowns, TEARDOWNS)
        self.wait_for_replies()
        self.record_turns()
        TaskSession.start = self.timed(TaskSession.start, "session start (spares forked)")
        run = Evaluation.run

        def counted_run(evaluation):
            self.current.spent = defaultdict(float)
            try:
                return run(evaluation)
            finally:
                self.runs.append(dict(self.current.spent))
        Evaluation.run = counted_run

    def wait_for_replies(self) -> None:
        """The seconds spent waiting for each sandbox's replies, by the operation last sent to it
        ("candidate process:prepare", "checker:compare_timed" and so on)."""
        send, receive, clock = SandboxProcess.send, SandboxProcess.receive, self

        def sending(process, header, *args, **kwargs):
            process.benchmark_op = header.get("op")
            return send(process, header, *args, **kwargs)

        def receiving(process, *args, **kwargs):
            started = time.perf_counter()
            try:
                return receive(process, *args, **kwargs)
            finally:
                spent = getattr(clock.current, "spent", clock.outside)  # outside: the task loader's thread
                spent[f"{process.label}:{getattr(process, 'benchmark_op', None)}"] += time.perf_counter() - started
        SandboxProcess.send, SandboxProcess.receive = sending, receiving

    def record_turns(self) -> None:
        on_device, turns, clock = Evaluation.on_device, self.turns, self

        def recorded(evaluation):
            started = time.perf_counter()
            if not turns:
                clock.first = dict(clock.current.spent)  # its steps before the turn
            try:
                return on_device(evaluation)
            finally:
                turns.append((started, time.perf_counter()))
        Evaluation.on_device = recorded

    def between_turns(self, started: float, ended: float) -> dict[str, float]:
        """Where the device was not in a turn: before the first (the session's start), between
        turns (the device changing hands), and after the last."""
        turns = sorted(self.turns)
        gaps = [later[0] - earlier[1] for earlier, later in zip(turns, turns[1:])]
        return {"before_first_s": round(turns[0][0] - started, 2), "gaps_s": round(sum(gaps), 2),
                "gap_s_median": round(statistics.median(gaps), 4) if gaps else 0.0,
                "after_last_s": round(ended - turns[-1][1], 2),
                "per_hour_over_turns": per_hour_over_turns(turns),
                "first_evaluation_s": {name: round(seconds, 3) for name, seconds in self.first.items()},
                "session_start_s": {name: round(seconds, 3) for name, seconds in self.outside.items()}}

    def timed(self, function, name):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent = getattr(self.current, "spent", self.outside)  # outside: the session's start, the task loader
                spent[name] += time.perf_counter() - started
        return wrapper

    def medians(self) -> dict[str, float]:
        waits = sorted({name for run in self.runs for name in run if ":" in name})
        names = [name for name in (*PHASES, WARM_UP, TEARDOWNS, *waits) if any(name in run for run in self.runs)]
        return {name: round(statistics.median(run.get(name, 0.0) for run in self.runs), 4) for name in names}


def per_hour_over_turns(turns: list[tuple[float, float]]) -> int | None:
    """Turns begun per hour, from the first turn's start to the last's: a session's start left out."""
    starts = sorted(start for start, _ in turns)
    return round((len(starts) - 1) / (starts[-1] - starts[0]) * 3600) if len(starts) > 1 else None


def write_candidates(directory: Path, fmt: str, count: int, salt: str) -> list[Path]:
    paths = []
    for index in range(count):
        wrong = index % 5 == 4
        kernel = KERNEL.format(index=index, expression="v > 0.f ? v : -v" if wrong else "v > 0.f ? v : 0.f")
        template = LOAD_INLINE if fmt == "load_inline" else NVRTC
        path = directory / f"{fmt}_{index:03d}.py"
        path.write_text(template.format(kernel=kernel, index=index, block=BLOCKS[index % len(BLOCKS)], salt=salt))
        paths.append(path)
    return paths


def index_of(name: str) -> int:
    return int(Path(name).stem.rsplit("_", 1)[1])


def expected_verdict(index: int) -> str:
    return "rejected" if index % 5 == 4 else "verified"


def run_baseline(candidates: list[Path]) -> dict:
    """One candidate after another, each in a fresh interpreter with an empty build directory."""
    verdicts, builds, gpu = {}, [], 0.0
    started, cpu_before = time.perf_counter(), cpu_seconds()
    for path in candidates:
        with tempfile.TemporaryDirectory(prefix="kb-build-") as build_dir:
            env = dict(os.environ, TORCH_EXTENSIONS_DIR=build_dir, TORCH_CUDA_ARCH_LIST=devices.resolve("cuda").arch)
            out = subprocess.run([sys.executable, "-c", KERNELBENCH, str(TASK), str(path)], env=env,
                                 capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        verdicts[path.name] = result["verdict"]
        builds.append(result["build_s"])
        gpu += result["gpu_s"]
    wall = time.perf_counter() - started
    return {"way": "KernelBench-style, load_inline", "candidates": len(candidates), "wall_s": wall,
            "per_hour": len(candidates) / wall * 3600, "build_s_median": statistics.median(builds),
            "gpu_busy": gpu / wall, "cpu_s_per_candidate": (cpu_seconds() - cpu_before) / len(candidates),
            "verdicts": verdicts}


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (every sandbox is reaped)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_evo(candidates: list[Path], fmt: str, cache: Path, phases: PhaseClock | None, fork_server: bool = True,
            holding: int | None = None) -> dict:
    """As `evo optimize` runs a task on one GPU: as many evaluations at once as the machine
    builds in parallel, of which `holding` (else evaluations_at_device) hold processes, with as
    many spares."""
    policy = VerifyPolicy(device="cuda", fork_server=fork_server)
    workers, holding_processes = devices.parallel_builds("cuda"), holding or devices.evaluations_at_device("cuda")
    if phases:
        phases.runs.clear()
        phases.turns.clear()
        phases.outside.clear()
    started, cpu_before = time.perf_counter(), cpu_seconds()
    with TaskSession(TASK, policy, cache, standby=holding_processes) as session, ThreadPoolExecutor(workers) as pool:
        session.expect_format(fmt)  # as evo optimize does
        results = list(pool.map(lambda path: verify(TASK, path, policy, cache, session), candidates))
    ended = time.perf_counter()
    wall = ended - started
    problems = [f"{path.name}: {v.summary}" for path, v in zip(candidates, results)
                if v.verdict != expected_verdict(index_of(path.name))]
    way = f"evo, {fmt}" + ("" if fork_server else ", fresh interpreters") + (f", {holding} holding" if holding else "")
    return {"way": way, "candidates": len(candidates), "wall_s": wall,
            "per_hour": len(candidates) / wall * 3600,
            "build_s_median": statistics.median(v.timings.build_s for v in results),
            "gpu_busy": sum(v.timings.device_s for v in results) / wall,
            "device_s_median": statistics.median(v.timings.device_s for v in results),
            "correctness_s_median": statistics.median(v.timings.correctness_s for v in results),
            "timing_s_median": statistics.median(v.timings.timing_s for v in results),
            "cpu_s_per_candidate": (cpu_seconds() - cpu_before) / len(candidates),
            "timed_twice": sum(any("timed again" in warning for warning in v.warnings) for v in results),
            "verdicts": {path.name: v.verdict for path, v in zip(candidates, results)}, "unexpected": problems[:5],
            **({"phase_s_median": phases.medians(), "outside_turns": phases.between_turns(started, ended)}
               if phases and phases.turns else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=16, help="candidates of each format evo evaluates")
    parser.add_argument("--baseline", type=int, default=4, help="load_inline candidates the baseline evaluates")
    parser.add_argument("--formats", default="load_inline,nvrtc")
    parser.add_argument("--phases", action="store_true", help="also print the median seconds of each step of evo's "
                                                               "evaluations")
    parser.add_argument("--holding", default=None, help="evaluations holding candidate processes at once, one run "
                                                         "of evo's way for each of a comma-separated list (default: "
                                                         "devices.evaluations_at_device)")
    parser.add_argument("--fresh-too", action="store_true", help="also run evo's way with a fresh interpreter per "
                                                                  "process instead of the fork server")
    args = parser.parse_args()
    phases = PhaseClock() if args.phases else None
    salt = f"{os.getpid()}_{int(time.time())}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="evo-throughput-") as scratch:
        scratch = Path(scratch)
        sets = {fmt: write_candidates(scratch, fmt, args.candidates, salt) for fmt in args.formats.split(",")}
        baseline_set = sets["load_inline"][: args.baseline] if "load_inline" in sets else \
            write_candidates(scratch, "load_inline", args.baseline, salt)
        rows.append(run_baseline(baseline_set))
        print(json.dumps(rows[-1]), flush=True)
        holdings = [int(number) for number in args.holding.split(",")] if args.holding else [None]
        for fmt, candidates in sets.items():
            for holding in holdings:
                rows.append(run_evo(candidates, fmt, scratch / f"cache-{fmt}-{holding}", phases, holding=holding))
                print(json.dumps(rows[-1]), flush=True)
            if args.fresh_too:
                rows.append(run_evo(candidates, fmt, scratch / f"cache-{fmt}-fresh", phases, fork_server=False))
                print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print("| way | candidates | wall s | candidates/hour | vs baseline | median build s | CPU s each | GPU busy | "
          "same verdicts |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        by_index = {index_of(name): verdict for name, verdict in row["verdicts"].items()}
        # The same verdicts: the baseline's on the candidates it ran, and as built (every fifth wrong) on all.
        same = all(by_index[index_of(name)] == verdict for name, verdict in base["verdicts"].items()) and \
            all(verdict == expected_verdict(index) for index, verdict in by_index.items())
        print(f"| {row['way']} | {row['candidates']} | {row['wall_s']:.0f} | {row['per_hour']:.0f} | "
              f"{row['per_hour'] / base['per_hour']:.1f}x | {row['build_s_median']:.1f} | "
              f"{row['cpu_s_per_candidate']:.1f} | {row['gpu_busy']:.0%} | "
              f"{'yes' if same else 'NO'} |")

if __name__ == "__main__":
    main()

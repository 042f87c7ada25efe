"""What verification costs, and how far one candidate's speedup moves between runs.

    python benchmarks/verify_cost.py [--device cuda|cpu] [--runs 5]

For each (task, candidate) pair it prints, side by side in one run:
  * the verify wall time split into build, start-up with correctness, and timing;
  * a naive same-process check of the same candidate in a fresh interpreter (the way a
    KernelBench-style harness checks: one process, fixed seed, allclose, then event timing)
    with the same number of correctness trials and of timed calls, and the ratio of verify's
    time without the build to it;
  * the speedup of one candidate over --runs separate verifications: median, min, max and the
    spread (max - min) / median.
Targets (issue 2): spread <= 2%; verification without build <= 1.5x the naive check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evo.config import VerifyPolicy  # noqa: E402
from evo.evaluator import verify  # noqa: E402

PAIRS = {
    "cuda": [
             ("tests/tasks/cuda_softmax.py", "tests/candidates/cuda/honest_softmax.py"),
             ("tests/tasks/cuda_matmul.py", "tests/candidates/cuda/honest_matmul_tiled.py")],
    "cpu": [("examples/tasks/relu.py", "examples/candidates/relu_cpu.py"),
            ("tests/tasks/cpu_softmax.py", "tests/candidates/cpu/honest_softmax_workspace.py")],
}

NAIVE = r'''
import sys, time, torch, importlib.util
started = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import hooks
task_path, cand_path, device, trials, calls, cache = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
import tempfile
private = tempfile.mkdtemp()
hooks.install(cache, private, False, hooks.ExtensionLedger())
def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); return module
task, cand = load(task_path, "task"), load(cand_path, "cand")
torch.manual_seed(42); ref = task.Model(*task.get_init_inputs()).to(device)
torch.manual_seed(42); new = cand.ModelNew(*task.get_init_inputs()).to(device)
ok = True
for trial in range(trials):
    torch.manual_seed(42 + trial)
    inputs = [x.to(device) for x in task.get_inputs()]
    ok &= torch.allclose(ref(*inputs), new(*inputs), atol=1e-2, rtol=1e-2)
inputs = [x.to(device) for x in task.get_inputs()]
times = []
for _ in range(calls):
    if device == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(); new(*inputs); end.record(); torch.cuda.synchronize(); times.append(begin.elapsed_time(end))
    else:
        t0 = time.perf_counter(); new(*inputs); times.append((time.perf_counter() - t0) * 1e3)
import pathlib
rebuilt = any(pathlib.Path(private).rglob("build.ninja"))  # a cache miss: the time would include a build
print(ok, sorted(times)[len(times) // 2], time.perf_counter() - started, rebuilt)
'''


def naive_seconds(task: str, candidate: str, device: str, trials: int, calls: int, cache: Path) -> float:
    """Wall time of a fresh interpreter doing the naive same-process check."""
    from evo import devices

    env = dict(os.environ)  # the evaluator's architecture setting, so the naive check finds the same cached build
    if device == "cuda":
        env["TORCH_CUDA_ARCH_LIST"] = devices.resolve(device).arch
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", NAIVE, str(ROOT / "sandbox"), str(ROOT / task), str(ROOT / candidate),
                    device, str(trials), str(calls), str(cache / "extensions" / arch_tag(device))],
                   check=True, capture_output=True, text=True, env=env)
    ok, _, _, rebuilt = completed.stdout.split()
    if ok != "True" or rebuilt != "False":
        raise SystemExit(f"the naive check of {candidate} failed or rebuilt its extension: {completed.stderr[-2000:]}")
    return time.perf_counter() - started


def arch_tag(device: str) -> str:
    from evo import devices

    return devices.resolve(device).arch_tag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "evo")
    args = parser.parse_args()
    from evo import devices

    device = devices.resolve(args.device).kind
    policy = VerifyPolicy(device=device)
    rows = []
    for task, candidate in PAIRS[device]:
        first = verify(ROOT / task, ROOT / candidate, policy, cache_dir=args.cache)  # builds into the cache
        verdicts = [first] + [verify(ROOT / task, ROOT / candidate, policy, cache_dir=args.cache)
                              for _ in range(args.runs - 1)]
        if any(v.verdict != "verified" for v in verdicts):
            bad = next(v for v in verdicts if v.verdict != "verified")
            print(f"{candidate}: {bad.verdict}: {bad.summary}")
            continue
        later = verdicts[1]
        calls = later.timings.candidate.calls
        naive = naive_seconds(task, candidate, device, policy.trials, calls, args.cache)
        without_build = later.timings.total_s - later.timings.build_s
        speedups = [v.speedup for v in verdicts]
        spread = (max(speedups) - min(speedups)) / statistics.median(speedups)
        rows.append({"task": Path(task).stem, "candidate": Path(candidate).stem,
                     "build_s (cold)": first.timings.build_s, "build_s (cached)": later.timings.build_s,
                     "startup+correctness_s": later.timings.correctness_s, "timing_s": later.timings.timing_s,
                     "verify_without_build_s": without_build, "naive_s": naive, "ratio": without_build / naive,
                     "timed_calls": calls, "speedup_median": statistics.median(speedups),
                     "speedup_min": min(speedups), "speedup_max": max(speedups), "spread": spread,
                     # where the spread comes from: each run's timed medians and the time charged per call
                     "reference_ms": [v.timings.reference_eager.median_ms for v in verdicts],
                     "candidate_ms": [v.timings.candidate.median_ms for v in verdicts],
                     "charged_ms": [v.timings.candidate.charged_ms for v in verdicts]})
        print(json.dumps(rows[-1]), flush=True)  # a run cut short still shows what it measured
    header = ("task", "build cold", "build cached", "start+correct", "timing", "verify-build", "naive", "ratio",
              "speedup med", "min", "max", "spread")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([r["task"], f"{r['build_s (cold)']:.1f}s", f"{r['build_s (cached)']:.1f}s",
                          f"{r['startup+correctness_s']:.1f}s", f"{r['timing_s']:.1f}s",
                          f"{r['verify_without_build_s']:.1f}s", f"{r['naive_s']:.1f}s", f"{r['ratio']:.2f}x",
                          f"{r['speedup_median']:.3f}", f"{r['speedup_min']:.3f}", f"{r['speedup_max']:.3f}",
                          f"{r['spread']:.1%}"]))


if __name__ == "__main__":
    main()

"""`evo optimize` on every GPU of the machine against the same run on one GPU (issue 5).

    python benchmarks/multi_gpu.py [--candidates 96]

Two ReLU tasks (examples/tasks/relu.py, and the same model on four times the rows) get the
same scripted replies: --candidates unique NVRTC ReLU kernels each (every fifth wrong on
purpose) and, early in each task's share, one candidate whose kernel stores through a wild
pointer (tests/candidates/cuda/illegal_address.py), which corrupts its process's CUDA context.
They run twice, back to back, each into a fresh archive: `evo optimize --device cuda:0`, then
`evo optimize` on every visible GPU. From each run's archive it prints:
  * candidates evaluated per hour, over the run's wall time, and turns begun per hour from the
    first turn's start to the last's (the sessions' start-up left out);
  * each GPU's busy fraction (the time candidates held it, over the wall time);
  * whether every candidate saw exactly one GPU, and whether two turns on one GPU overlapped
    (each verdict says when it took its device and for how long);
  * around each corrupting candidate: its verdict, the turns other GPUs began while it held
    its own, and the verdicts of the turns on its own GPU after it;
and whether both runs gave each source the same verdict, and the ratio of their rates.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import TASK, per_hour_over_turns, write_candidates  # noqa: E402

CORRUPTING = ROOT / "tests" / "candidates" / "cuda" / "illegal_address.py"
CORRUPTING_MARK = "wild_store_kernel"  # a name only the corrupting candidate's source holds
CONFIG = "[optimize]\nremeasure_elites = false\n"  # every turn is a candidate's: the rates count the same work


def write_tasks(directory: Path) -> list[Path]:
    """relu.py, and a copy on four times the rows (a second task with its own session)."""
    larger = directory / "relu_rows64.py"
    larger.write_text(TASK.read_text().replace("batch_size = 16", "batch_size = 64"))
    if larger.read_text() == TASK.read_text():
        raise SystemExit(f"{TASK} no longer sets batch_size = 16; update write_tasks")
    return [TASK, larger]


def write_replies(directory: Path, tasks: list[Path], count: int) -> Path:
    """A folder of replies per task (the scripted provider's layout), the corrupting candidate
    sorted in after the first few, so that later candidates show its GPU's worker recovering."""
    replies = directory / "replies"
    for task in tasks:
        folder = replies / task.stem
        folder.mkdir(parents=True)
        write_candidates(folder, "nvrtc", count, f"{task.stem}_{time.time_ns()}")
        (folder / "nvrtc_003a_corrupting.py").write_text(CORRUPTING.read_text())
    return replies


def run_optimize(tasks: list[Path], replies: Path, archive: Path, config: Path, count: int,
                 device: str | None) -> float:
    command = [sys.executable, "-m", "evo", "optimize", *map(str, tasks), "--llm", f"scripted:{replies}",
               "--format", "nvrtc", "--max-candidates", str(3 * count), "--archive", str(archive),
               "--config", str(config)] + (["--device", device] if device else [])
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"evo optimize failed ({done.returncode}): {done.stderr[-3000:]}{done.stdout[-2000:]}")
    return wall


def evaluations(archive: Path) -> list[dict]:
    """Each evaluated candidate: its source, verdict, summary, GPU and turn."""
    with sqlite3.connect(archive) as db:
        rows = db.execute("SELECT source, source_hash, verdict, summary, verdict_json FROM candidates "
                          "WHERE verdict IS NOT NULL").fetchall()
    found = []
    for source, source_hash, verdict, summary, verdict_json in rows:
        full = json.loads(verdict_json or "{}")
        timings, isolation = full.get("timings") or {}, full.get("isolation") or {}
        found.append({"corrupting": CORRUPTING_MARK in source, "source_hash": source_hash, "verdict": verdict,
                      "summary": summary, "gpu": isolation.get("visible_gpus"),
                      "turn": (timings["device_at"], timings["device_at"] + timings["device_s"])
                      if timings.get("device_at") is not None else None})
    return found


def describe(name: str, found: list[dict], wall: float) -> dict:
    by_gpu: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for item in sorted((item for item in found if item["turn"]), key=lambda item: item["turn"]):
        by_gpu[str(item["gpu"])].append(item["turn"])
    overlaps = sum(earlier[1] > later[0] for gpu_turns in by_gpu.values()
                   for earlier, later in zip(gpu_turns, gpu_turns[1:]))
    return {"run": name, "evaluated": len(found), "wall_s": round(wall, 1),
            "per_hour": round(len(found) / wall * 3600),
            "per_hour_over_turns": per_hour_over_turns([item["turn"] for item in found if item["turn"]]),
            "gpu_busy": {gpu: round(sum(end - start for start, end in gpu_turns) / wall, 3)
                         for gpu, gpu_turns in sorted(by_gpu.items())},
            "one_gpu_each": all(item["gpu"] and "," not in str(item["gpu"]) for item in found),
            "overlapping_turns": overlaps,
            "corrupting": [around(item, found) for item in found if item["corrupting"]],
            "verdicts": tally(item["verdict"] for item in found)}


def around(corrupting: dict, found: list[dict]) -> dict:
    """What the other GPUs did while the corrupting candidate held its own, and what its own
    GPU gave the candidates timed after it."""
    start, end = corrupting["turn"] or (float("inf"), float("inf"))
    others = [item for item in found if item["turn"] and item["gpu"] != corrupting["gpu"]]
    after = [item["verdict"] for item in found
             if item["turn"] and item["gpu"] == corrupting["gpu"] and item["turn"][0] >= end]
    return {"gpu": corrupting["gpu"], "verdict": corrupting["verdict"], "summary": (corrupting["summary"] or "")[:160],
            "other_gpus_turns_begun_meanwhile": sum(start <= item["turn"][0] <= end for item in others),
            "other_gpus_turns_after": sum(item["turn"][0] > end for item in others),
            "own_gpu_after": tally(after)}


def tally(verdicts) -> dict[str, int]:
    counted = list(verdicts)
    return {verdict: counted.count(verdict) for verdict in ("verified", "rejected", "error")}


def same_verdicts(first: list[dict], second: list[dict]) -> tuple[int, list[str]]:
    one = {item["source_hash"]: item for item in first}
    both = [(one[item["source_hash"]], item) for item in second if item["source_hash"] in one]
    differ = [f"{a['verdict']} then {b['verdict']}: {(b['summary'] or '')[:120]}"
              for a, b in both if a["verdict"] != b["verdict"]]
    return len(both), differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=96, help="NVRTC candidates per task")
    args = parser.parse_args()
    from evo import devices

    gpus = devices.usable_gpus()
    if not gpus:
        raise SystemExit("no GPU is visible: this benchmark compares runs on one GPU and on all of them")
    rows = []
    with tempfile.TemporaryDirectory(prefix="evo-multi-gpu-") as scratch:
        scratch = Path(scratch)
        tasks = write_tasks(scratch)
        replies = write_replies(scratch, tasks, args.candidates)
        config = scratch / "evo.toml"
        config.write_text(CONFIG)
        found = {}
        for name, device in (("one GPU", "cuda:0"), (f"every GPU ({len(gpus)})", None)):
            archive = scratch / ("one_gpu.sqlite" if device else "every_gpu.sqlite")
            wall = run_optimize(tasks, replies, archive, config, args.candidates, device)
            found[name] = evaluations(archive)
            rows.append(describe(name, found[name], wall))
            print(json.dumps(rows[-1]), flush=True)
    compared, differ = same_verdicts(*found.values())
    one, all_gpus = rows
    print(json.dumps({"compared_sources": compared, "different_verdicts": differ[:5],
                      "rate_ratio": round(all_gpus["per_hour"] / one["per_hour"], 2),
                      "rate_ratio_over_turns": round(all_gpus["per_hour_over_turns"] / one["per_hour_over_turns"], 2)
                      if one["per_hour_over_turns"] and all_gpus["per_hour_over_turns"] else None}))
    print("| run | evaluated | wall s | per hour | per hour over turns | GPU busy | one GPU each | overlapping turns |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        busy = ", ".join(f"{gpu}: {fraction:.0%}" for gpu, fraction in row["gpu_busy"].items())
        print(f"| {row['run']} | {row['evaluated']} | {row['wall_s']:.0f} | {row['per_hour']} | "
              f"{row['per_hour_over_turns']} | {busy} | {'yes' if row['one_gpu_each'] else 'NO'} | "
              f"{row['overlapping_turns']} |")


if __name__ == "__main__":
    main()

"""How long a candidate's processes take to start: forked by the fork server, or fresh interpreters.

    python benchmarks/startup.py [--device cuda] [--rounds 4]

For each way, one task session takes `--rounds` pairs of candidate processes one after another
(the timed process, which initializes the device, and the profiler's, which also starts the
profiler once) and prints, per pair, the seconds until each answered, and the CPU seconds of the
whole session (every process, reaped). The first forked pair also waits for the server's own
start-up (torch's import and the profiler's imports).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evo.config import VerifyPolicy  # noqa: E402
from evo.session import TaskSession  # noqa: E402
from throughput import cpu_seconds  # noqa: E402  (this directory is the script's)

TASK = ROOT / "examples" / "tasks" / "relu.py"


def measure(device: str, forked: bool, rounds: int) -> dict:
    started, cpu_before = time.monotonic(), cpu_seconds()
    pairs = []
    with TaskSession(TASK, VerifyPolicy(device=device, fork_server=forked)) as session:
        session.start_fork_server()
        for _ in range(rounds):
            asked = time.monotonic()
            runner, profiler = session.take_candidate_process(), session.take_candidate_process(profiler=True)
            runner.receive(600)
            runner_ready = time.monotonic() - asked
            profiler.receive(600)
            pairs.append({"timed process ready s": round(runner_ready, 3),
                          "profiler warm s": round(time.monotonic() - asked, 3)})
            session.release(runner)
            session.release(profiler)
        failure = session.fork_failure
    return {"way": "forked" if forked else "fresh interpreters", "pairs": pairs, "fork failure": failure,
            "wall s": round(time.monotonic() - started, 2), "cpu s": round(cpu_seconds() - cpu_before, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    for forked in (True, False):
        print(json.dumps(measure(args.device, forked, args.rounds)), flush=True)


if __name__ == "__main__":
    main()

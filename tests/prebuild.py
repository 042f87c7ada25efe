"""Warm the build cache before a GPU test run: builds candidate files several at a time.

    EVO_TEST_CACHE_DIR=/tmp/evotest python3 tests/prebuild.py tests/candidates/cuda/*.py

The tests then find every extension compiled (the `cache_dir` fixture reads the same
variable). Each build runs in its own build sandbox, exactly as `verify` runs it.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from evo import devices
from evo.config import VerifyPolicy
from evo.evaluator import Evaluation, EvaluatorError
from evo.judgement import Rejected
from evo.sandbox_runner import SandboxFailure



def build(candidate: Path, cache: Path, device: str) -> str:
    evaluation = Evaluation(candidate, candidate, VerifyPolicy(device=device), cache)
    started = time.monotonic()
    try:
        evaluation.build()
        return f"{candidate.name}: built in {time.monotonic() - started:.0f} s"
    except (Rejected, EvaluatorError) as err:
        return f"{candidate.name}: not built ({evaluation.judgement.first_failure() or err})"
    except SandboxFailure as failure:  # a candidate that crashes its build; verify reports it
        return f"{candidate.name}: not built ({failure})"
    finally:
        evaluation.session.close()


def main() -> None:
    cache = Path(os.environ["EVO_TEST_CACHE_DIR"])
    device = os.environ.get("EVO_PREBUILD_DEVICE", "cuda")
    with ThreadPoolExecutor(devices.parallel_builds(device)) as pool:
        for line in pool.map(lambda path: build(Path(path), cache, device), sys.argv[1:]):
            print(line, flush=True)


if __name__ == "__main__":
    main()

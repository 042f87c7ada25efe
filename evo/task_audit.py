"""`evo check-task`: the task audit on its own, in the checker process an evaluation would use
(outputs nearly constant, an output identical to an input, an output independent of the seed)."""

from __future__ import annotations

from pathlib import Path

from evo import devices
from evo.config import VerifyPolicy
from evo.evaluator import Evaluation, EvaluatorError, new_seeds
from evo.sandbox_runner import SandboxFailure
from evo.timing import SubjectError, expect
from evo.verdict import TaskAudit


def check_task(task: Path, policy: VerifyPolicy, cache_dir: Path | None = None) -> TaskAudit:
    """Load the task in a checker process and probe its outputs."""
    try:
        evaluation = Evaluation(task, task, policy, cache_dir)
    except devices.DeviceError as err:
        return TaskAudit(status="error", task=str(task), device=policy.device or "auto", error=str(err))
    device, session = evaluation.device, evaluation.session
    try:
        if not evaluation.task.is_file():
            raise EvaluatorError(f"task file {evaluation.task} does not exist; pass the path of a KernelBench-style task file")
        session.start_trusted()
        evaluation.checker = session.checker
        with devices.exclusive(device):
            ceilings = evaluation.init_checker()["ceilings"]
            audit, _ = session.checker.request({"op": "audit", "seeds": new_seeds(3)}, timeout=policy.load_timeout_s)
        warnings = expect(audit, "auditing the task")["warnings"]
    except (EvaluatorError, SandboxFailure, SubjectError) as err:
        return TaskAudit(status="error", task=str(evaluation.task), device=device.torch_name, error=str(err))
    finally:
        session.close()
    return TaskAudit(status="warnings" if warnings else "ok", task=str(evaluation.task), device=device.torch_name,
                     warnings=warnings, environment=devices.environment(device, evaluation.facts), ceilings=ceilings)

"""`evo check-task`: the task audit on its own, in the checker process an evaluation would use
(outputs nearly constant, an output identical to an input, an output independent of the seed)."""

from __future__ import annotations

from pathlib import Path

from evo import devices
from evo.config import VerifyPolicy
from evo.judgement import EvaluatorError
from evo.sandbox_runner import SandboxFailure
from evo.session import TaskSession
from evo.verdict import TaskAudit


def check_task(task: Path, policy: VerifyPolicy, cache_dir: Path | None = None) -> TaskAudit:
    """Load the task in a checker process and probe its outputs."""
    if not task.is_file():
        return TaskAudit(status="error", task=str(task.resolve()), device=policy.device or "auto",
                         error=f"task file {task.resolve()} does not exist; pass the path of a KernelBench-style task file")
    try:
        session = TaskSession(task, policy.model_copy(update={"audit_task": True}), cache_dir)
    except devices.DeviceError as err:
        return TaskAudit(status="error", task=str(task), device=policy.device or "auto", error=str(err))
    device = session.device
    try:
        session.start_trusted()
        facts, _ = session.facts()
    except (EvaluatorError, SandboxFailure) as err:
        return TaskAudit(status="error", task=str(session.task), device=device.torch_name, error=str(err))
    finally:
        session.close()
    warnings = session.audit_warnings
    return TaskAudit(status="warnings" if warnings else "ok", task=str(session.task), device=device.torch_name,
                     warnings=warnings, environment=devices.environment(device, facts["facts"]),
                     ceilings=facts["ceilings"])

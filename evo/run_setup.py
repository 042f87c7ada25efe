"""Everything a search run needs before its loop starts, new or resumed: the archive and the
run's record, the tasks, the devices, the LLM providers, and the prompts with the device's
facts (fixed for the run, so the system prompt stays a cacheable prefix)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from evo import devices, task_audit
from evo.archive import Archive
from evo.config import OptimizeConfig, VerifyPolicy
from evo.prompts import DeviceFacts, Example, ParentInfo, PromptBuilder
from evo.provider import LLMSpec, ProviderMix, ScriptedProvider, ProviderSettings, default_specs_from_environment, parse_spec
from evo.search import Job
from evo.task import Task, TaskError

MEMORY_EXAMPLES = 3  # verified winners of other tasks shown with a translate or improve prompt


class SetupError(Exception):
    """The run cannot start; the message says what to do."""


class RunSetup:
    def __init__(self, archive: Archive, run_id: str, config: OptimizeConfig, policy: VerifyPolicy,
                 tasks: list[Task], resumes: int):
        self.archive, self.run_id, self.config, self.policy, self.tasks = archive, run_id, config, policy, tasks
        self.resumes = resumes  # how many times this run was resumed: seeds fresh choices each time
        self.run_dir = archive.path.parent / "runs" / run_id
        self.devices = device_list(policy)
        self.deadline = time.monotonic() + config.max_hours * 3600 if config.max_hours else None
        self.finished_tasks = {task.name for task in tasks
                               if archive.load_state(run_id, f"finished:{task.name}") is not None}
        self.specs = [parse_spec(text) for text in config.llm] if config.llm else default_specs_from_environment()
        settings = ProviderSettings(timeout_s=config.llm_timeout_s, max_retries=config.llm_max_retries)
        self.llms = {task.name: ProviderMix.from_specs(specs_for(self.specs, task), settings, seed=config.seed)
                     for task in tasks}
        self.skip_used_scripted_replies()
        self.builder = PromptBuilder(self.device_facts(), policy.allow_reduced_precision, config.candidate_format)

    @property
    def scripted(self) -> bool:
        return any(spec.kind == "scripted" for spec in self.specs)

    def llm_for(self, task: Task) -> ProviderMix:
        return self.llms[task.name]

    def skip_used_scripted_replies(self) -> None:
        """On resume, a scripted provider continues after the replies the run already used."""
        for task in self.tasks:
            used = [call for call in self.archive.llm_calls(self.run_id, task=str(task.path)) if call.scripted]
            for provider in self.llms[task.name].providers:
                if isinstance(provider, ScriptedProvider):
                    provider.next_index = len(used)

    def device_facts(self) -> DeviceFacts:
        """Measured once per run by a checker on the first task, and kept in the archive."""
        saved = self.archive.load_state(self.run_id, "device_facts")
        if saved is None:
            audit = task_audit.check_task(self.tasks[0].path, self.policy.model_copy(update={"device": self.devices[0]}))
            if audit.status == "error":
                raise SetupError(f"the first task could not be loaded: {audit.error}")
            saved = {"device": audit.device, "environment": audit.environment, "roofline": {"ceilings": audit.ceilings},
                     "warnings": audit.warnings}
            self.archive.save_state(self.run_id, "device_facts", saved)
        return DeviceFacts.from_verdict(saved)

    # ---- prompts ----------------------------------------------------------------------------

    def prompt_for(self, task: Task, job: Job) -> str:
        builder, source = self.builder, task.source
        if job.operator == "translate":
            return builder.translate(source, task.name, examples=self.examples(task))
        parents = [self.parent(candidate_id) for candidate_id in job.parents]
        if job.operator == "improve":
            return builder.improve(source, parents[0], examples=self.examples(task))
        if job.operator == "crossover":
            return builder.crossover(source, parents[0], parents[1])
        if job.operator == "repair_build":
            return builder.repair_build(source, parents[0])
        return builder.repair_wrong(source, parents[0])

    def parent(self, candidate_id: int) -> ParentInfo:
        candidate = self.archive.candidate(candidate_id)
        return ParentInfo.from_verdict(candidate.source, candidate.verdict_json or {}, candidate.build_log)

    def examples(self, task: Task) -> list[Example]:
        """Cross-task memory (opt-in): the best verified kernels of other tasks in the archive."""
        if not self.config.memory:
            return []
        found = []
        for other in self.archive.best_per_task(exclude_task_hash=task.sha256)[:MEMORY_EXAMPLES]:
            found.append(Example(Path(other.task).stem, other.fitness or other.speedup or 0.0, other.source))
        return found


def specs_for(specs: list[LLMSpec], task: Task) -> list[LLMSpec]:
    """A scripted directory with a folder per task name replies for each task from its folder."""
    chosen = []
    for spec in specs:
        if spec.kind == "scripted" and spec.path is not None and (spec.path / task.name).is_dir():
            spec = spec.model_copy(update={"path": spec.path / task.name})
        chosen.append(spec)
    return chosen


def device_list(policy: VerifyPolicy) -> list[str]:
    """One evaluation device per visible GPU (or the CPU), or the one device asked for."""
    device = devices.resolve(policy.device)
    if policy.device not in (None, "cuda") or device.kind == "cpu":
        return [device.torch_name if policy.device is None else policy.device]
    return [f"cuda:{ordinal}" for ordinal in range(len(devices.usable_gpus()))] or ["cuda:0"]


def start(archive: Archive, config: OptimizeConfig, policy: VerifyPolicy, tasks: list[Task]) -> RunSetup:
    if not tasks:
        raise SetupError("no task given; pass task files or a directory of them")
    record = {"optimize": config.model_dump(mode="json"), "verify": policy.model_dump(mode="json")}
    environment = devices.environment(devices.resolve(policy.device), {})
    run_id = archive.create_run(config=record, command=sys.argv, tasks=[str(task.path) for task in tasks],
                                hardware=environment)
    return RunSetup(archive, run_id, config, policy, tasks, resumes=0)


def resume(archive: Archive, run_id: str) -> RunSetup:
    run = archive.get_run(run_id)
    try:
        tasks = [Task.read(Path(path)) for path in run.tasks]
    except TaskError as err:
        raise SetupError(f"run {run_id} cannot resume: {err}") from None
    config = OptimizeConfig(**run.config["optimize"])
    policy = VerifyPolicy(**run.config["verify"])
    resumes = int(archive.load_state(run_id, "resumes") or 0) + 1
    archive.save_state(run_id, "resumes", resumes)
    return RunSetup(archive, run_id, config, policy, tasks, resumes)


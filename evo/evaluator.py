"""The evaluator: builds a candidate, runs it against the task in separate processes, and
decides the verdict here, in the parent, from what the checker judged and what the
parent itself observed. The candidate's process never holds an expected output.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from pathlib import Path

from evo import devices, isolation, judgement
from evo.config import VerifyPolicy
from evo.judgement import Judgement, Rejected
from evo.sandbox_runner import SandboxFailure, SandboxProcess
from evo.timing import SubjectError, expect, plan, time_candidate, time_reference, warm_up
from evo.verdict import Isolation, TaskAudit, Timings, Verdict


class EvaluatorError(Exception):
    """The evaluation could not run (bad input, or the evaluator itself failed)."""


TRUSTED_SANDBOXES = ("reference checker", "cache flusher")
WARM_SECONDS = 0.2  # of device work before each timing phase, so clocks are up for both subjects


def new_seeds(count: int) -> list[int]:
    """Seeds no candidate can guess: fresh randomness per verification."""
    return [secrets.randbits(62) for _ in range(count)]


class Evaluation:
    """One verification of one candidate against one task."""

    def __init__(self, task: Path, candidate: Path, policy: VerifyPolicy, cache_dir: Path | None = None):
        self.task, self.candidate, self.policy = task.resolve(), candidate.resolve(), policy
        self.device = devices.resolve(policy.device)
        self.profile = isolation.probe(policy.use_namespaces)
        self.limits = devices.limits(policy, self.device)
        self.cache_dir = cache_dir or devices.cache_dir()
        self.judgement = Judgement()
        self.timings = Timings()
        self.processes: list[SandboxProcess] = []
        self.facts: dict = {}
        self.warnings: list[str] = []
        self.extension_calls = 0  # calls into the candidate's compiled extensions, seen in one call
        self.phase = "load"  # the check a candidate process's crash or hang fails: load, then runs
        self.doing = "the build"  # what was under way, for failure messages

    # ---- the whole run --------------------------------------------------------------------

    def run(self) -> Verdict:
        started = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="evo-verify-"))
        try:
            self.check_paths()
            self.spawn_processes()  # their interpreter and torch start-up overlaps the build
            self.build()
            with devices.exclusive(self.device) as waited:
                self.timings.queued_s = waited
                self.on_device()
            outcome = None
        except Rejected:
            outcome = None
        except SandboxFailure as failure:
            outcome = self.sandbox_failed(failure)
        except EvaluatorError as err:
            outcome = ("error", str(err))
        finally:
            for process in self.processes:
                process.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings.total_s = time.monotonic() - started
        return self.verdict(outcome)

    def on_device(self) -> None:
        self.start_processes()
        self.time_reference()
        self.load_candidate()
        self.correctness()
        self.time_candidate()
        self.which_kernels()

    def sandbox_failed(self, failure: SandboxFailure):
        """A candidate's failure costs only its own verdict; a trusted process's failure is an
        evaluator error. Which one is decided by the process, never by what it printed."""
        if failure.label in TRUSTED_SANDBOXES:
            return ("error", f"the evaluator's {failure.label} failed: {failure}")
        if failure.kind == "memory":
            name = "memory"
        elif failure.label == "build":
            name = "build"
        else:
            name = self.phase
        self.judgement.fail(name, f"{failure} (during {self.doing})")
        return None

    def sandbox(self, program: str, label: str, env_extra: dict[str, str]) -> SandboxProcess:
        home = self.workdir / label.replace(" ", "-")
        home.mkdir()
        env = devices.sandbox_env(home, self.device, env_extra)
        process = SandboxProcess(program, isolation=self.profile, workdir=home, env=env, limits=self.limits,
                                 label=label)
        self.processes.append(process)
        return process.start()

    # ---- phases -----------------------------------------------------------------------------

    def check_paths(self) -> None:
        if not self.task.is_file():
            raise EvaluatorError(f"task file {self.task} does not exist; pass the path of a KernelBench-style task file")
        if not self.candidate.is_file():
            raise EvaluatorError(f"candidate file {self.candidate} does not exist; pass the path of a file defining ModelNew")

    def spawn_processes(self) -> None:
        """The checker, the flusher and the candidate process, started at once; the candidate
        process only imports torch until it is told to load the candidate."""
        self.checker = self.sandbox("checker.py", "reference checker", {})
        self.flusher = self.sandbox("flusher.py", "cache flusher", {})
        self.runner = self.sandbox("candidate.py", "candidate process", {})

    def build(self) -> None:
        self.doing = "the build"
        started = time.monotonic()
        builder = self.sandbox("build.py", "build", {"CUDA_VISIBLE_DEVICES": ""})
        reply, _ = builder.request({"candidate": str(self.candidate), "extensions_cache": str(self.extensions_cache()),
                                    "extensions_dir": str(builder.workdir / "extensions"),
                                    "allow_reduced_precision": self.policy.allow_reduced_precision},
                                   timeout=self.policy.build_timeout_s)
        builder.close()
        if reply["ok"]:
            devices.publish_extensions(reply["extensions"], self.extensions_cache())
        self.timings.build_s = time.monotonic() - started
        if reply.get("refused_flags"):
            self.judgement.reject("compiler_flags", f"{reply['error']}; pass --allow-reduced-precision to permit them")
        if not reply["ok"]:
            log = f"\n{reply['log']}" if reply.get("log") else ""
            self.judgement.reject("build", f"{reply['error']}{log}")
        self.judgement.passed("build", "built" if reply["extensions"] else
                              "no extension to build at import" + (f" ({reply['deferred']})" if reply.get("deferred") else ""))

    def extensions_cache(self) -> Path:
        """Built extensions by content hash: sandboxes read it, only this process writes it."""
        path = self.cache_dir / "extensions" / self.device.arch_tag
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start_processes(self) -> None:
        """Load the task in the checker, prepare the trials and audit the task."""
        started = time.monotonic()
        self.task_facts = self.init_checker()
        self.flusher.request({"op": "init", "device": self.device.torch_name, "flush_bytes": self.device.flush_bytes},
                             timeout=self.policy.load_timeout_s)
        self.trial_seeds = new_seeds(self.policy.trials)
        expect(self.checker.request({"op": "prepare_trials", "seeds": self.trial_seeds},
                                    timeout=self.policy.load_timeout_s)[0], "the reference")
        if not self.task_facts["float64_reference"]:
            self.warnings.append("no float64 reference could run for this task: outputs are compared with the fp32 reference")
        if self.policy.audit_task:
            audit, _ = self.checker.request({"op": "audit", "seeds": new_seeds(3)}, timeout=self.policy.load_timeout_s)
            self.warnings.extend(audit.get("warnings", []))
        self.timings.correctness_s += time.monotonic() - started

    def time_reference(self) -> None:
        """Time the reference before any candidate code is imported, so nothing a candidate does
        (a background GPU hog, say) can slow the baseline it is compared with."""
        started = time.monotonic()
        policy, timeout = self.policy, self.policy.call_timeout_s
        self.flusher.request({"op": "warm", "seconds": WARM_SECONDS}, timeout=timeout)
        try:
            warm = warm_up(self.checker, self.flusher, new_seeds(policy.warmup_calls), {"op": "run"}, timeout, False)
            self.plan = plan(min(warm), policy.timing_budget_s, policy.min_timed_calls, policy.max_timed_calls,
                             self.device.max_window)
            out_bytes = sum(meta["nbytes"] for meta in self.task_facts["outputs"])
            keep = self.plan.window * self.plan.windows * out_bytes <= policy.expected_memory_bytes
            self.timed_seeds = self.plan.seeds(new_seeds)
            self.reference = time_reference(self.checker, self.flusher, self.timed_seeds, "eager", keep, timeout)
            self.timings.reference_eager = self.reference.stats()
            if policy.compile_baseline:
                warm_up(self.checker, self.flusher, new_seeds(policy.warmup_calls), {"op": "run", "model": "compile"},
                        policy.load_timeout_s, False)
                self.timings.reference_compile = time_reference(self.checker, self.flusher, self.plan.seeds(new_seeds),
                                                                "compile", False, timeout).stats()
        except SubjectError as err:
            raise EvaluatorError(f"timing the reference failed: {err}") from None
        self.timings.timing_s += time.monotonic() - started

    def load_candidate(self) -> None:
        self.doing = "loading the candidate"
        started = time.monotonic()
        facts = self.task_facts
        loaded, _ = self.runner.request({
            "op": "load", "candidate": str(self.candidate), "task": str(self.task), "device": self.device.torch_name,
            "init_seed": facts["init_seed"], "allow_reduced_precision": self.policy.allow_reduced_precision,
            "extensions_cache": str(self.extensions_cache()), "extensions_dir": str(self.runner.workdir / "extensions"),
            "generate_on_device": facts["generate_on_device"],
            "flush_bytes": self.device.flush_bytes,
            "poison_sizes": [meta["nbytes"] for meta in facts["outputs"]]}, timeout=self.policy.load_timeout_s)
        self.timings.correctness_s += time.monotonic() - started
        if "error" in loaded:
            self.judgement.reject("load", loaded["error"])
        self.judgement.passed("load", "ModelNew imported and constructed")
        self.judgement.flags(loaded["flags_changed"], "at import")

    def init_checker(self) -> dict:
        """Load the task in the checker; its reply describes the task's inputs, outputs and work."""
        reply, _ = self.checker.request({
            "op": "init", "task": str(self.task), "device": self.device.torch_name,
            "compile_baseline": self.policy.compile_baseline, "flush_bytes": self.device.flush_bytes,
            "policy": self.policy.model_dump()}, timeout=self.policy.load_timeout_s)
        if "error" in reply:
            raise EvaluatorError(reply["error"] if reply.get("user_error") else f"the reference process failed: {reply['error']}")
        self.facts = reply["facts"]
        return reply

    def correctness(self) -> None:
        started = time.monotonic()
        self.phase = "runs"
        for number, seed in enumerate(self.trial_seeds, 1):
            where = f"trial {number} of {len(self.trial_seeds)}"
            self.doing = where
            reply = self.run_candidate(seed, {"op": "run", "send_outputs": True, "send_inputs": True}, where)
            details, payload = self.runner.receive(self.policy.call_timeout_s)
            self.judge_details(details, reply, where)
            self.extension_calls = max(self.extension_calls, details["extension_calls"])
            verdict, _ = self.checker.request({"op": "compare_trial", "seed": seed, "tensors": details["tensors"],
                                               "outputs": details["outputs"], "checksum": reply["checksum"]},
                                              payload, timeout=self.policy.call_timeout_s)
            self.judgement.record_all(expect(verdict, "comparing outputs")["checks"], where)
        self.timings.correctness_s += time.monotonic() - started

    def judge_details(self, details: dict, reply: dict, where: str) -> None:
        """What the candidate process said of its outputs and of the global flags after a call."""
        if "error" in details:
            self.judgement.reject("runs", f"{where}: describing the outputs raised {details['error']}")
        self.judgement.structure(details["structure"], reply, self.device.torch_name, where)
        self.judgement.flags(details["flags_changed"], f"in {where}")

    def prepare_inputs(self, seeds: list[int]) -> None:
        prepared, _ = self.runner.request({"op": "prepare", "seeds": seeds}, timeout=self.policy.call_timeout_s)
        if "error" in prepared:
            raise EvaluatorError(f"making the task's inputs failed in the candidate process: {prepared['error']}")

    def run_candidate(self, seed: int, message: dict, where: str) -> dict:
        self.prepare_inputs([seed])
        reply, _ = self.runner.request(message, timeout=self.policy.call_timeout_s)
        if "error" in reply:
            self.judgement.reject("runs", f"{where}: ModelNew.forward raised {reply['error']}")
        return reply

    def time_candidate(self) -> None:
        self.doing = "timing"
        started = time.monotonic()
        policy = self.policy
        self.flusher.request({"op": "warm", "seconds": WARM_SECONDS}, timeout=policy.call_timeout_s)
        try:
            warm_up(self.runner, self.flusher, new_seeds(policy.warmup_calls), {"op": "run"}, policy.load_timeout_s, True)
            candidate = time_candidate(self.runner, self.checker, self.flusher, self.timed_seeds, policy.call_timeout_s,
                                       lambda checks: self.judgement.record_all(checks, "a timed call"),
                                       lambda details, reply: self.judge_details(details, reply, "a timed call"))
        except SubjectError as err:
            self.judgement.reject("runs", f"during timing: {err}")
        candidate.dump("candidate")
        self.reference.dump("reference")
        self.timings.timing_s += time.monotonic() - started
        self.judgement.timed(self.reference, candidate, self.timings, self.task_facts, self.device,
                             policy.allow_reduced_precision)

    def which_kernels(self) -> None:
        self.doing = "the profiled call"
        # Fresh inputs, as for every call: inputs seen before would let a cache answer unprofiled.
        self.prepare_inputs(new_seeds(1))
        reply, _ = self.runner.request({"op": "profile"}, timeout=self.policy.call_timeout_s)
        if "error" in reply:
            self.judgement.reject("runs", f"the profiled call raised {reply['error']}")
        self.kernels = judgement.classify_kernels(reply, self.extension_calls)
        self.judgement.custom_code(self.kernels, self.policy.require_custom_code, self.device.kind == "cuda")

    def audit_only(self) -> TaskAudit:
        self.workdir = Path(tempfile.mkdtemp(prefix="evo-audit-"))
        try:
            if not self.task.is_file():
                raise EvaluatorError(f"task file {self.task} does not exist; pass the path of a KernelBench-style task file")
            self.checker = self.sandbox("checker.py", "reference checker", {})
            with devices.exclusive(self.device):
                ceilings = self.init_checker()["ceilings"]
                audit, _ = self.checker.request({"op": "audit", "seeds": new_seeds(3)},
                                                timeout=self.policy.load_timeout_s)
            warnings = expect(audit, "auditing the task")["warnings"]
        except (EvaluatorError, SandboxFailure, SubjectError) as err:
            return TaskAudit(status="error", task=str(self.task), device=self.device.torch_name, error=str(err))
        finally:
            for process in self.processes:
                process.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
        return TaskAudit(status="warnings" if warnings else "ok", task=str(self.task), device=self.device.torch_name,
                         warnings=warnings, environment=devices.environment(self.device, self.facts), ceilings=ceilings)

    # ---- the verdict ------------------------------------------------------------------------

    def verdict(self, outcome: tuple[str, str] | None) -> Verdict:
        environment = devices.environment(self.device, self.facts)
        isolation_report = Isolation(
            method=self.profile.method, network_isolated=self.profile.network_isolated,
            pid_namespace=self.profile.pid_namespace, user_namespace=self.profile.user_namespace,
            read_only_filesystem=self.profile.read_only_filesystem,
            memory_limit_bytes=self.limits.memory_bytes, call_timeout_s=self.policy.call_timeout_s,
            visible_gpus=self.device.visible, notes=list(self.profile.notes))
        common = dict(task=str(self.task), candidate=str(self.candidate), device=self.device.torch_name,
                      checks=self.judgement.checks, timings=self.timings, warnings=self.warnings,
                      isolation=isolation_report, environment=environment,
                      kernels=getattr(self, "kernels", None), roofline=self.judgement.roofline)
        if outcome is not None:
            return Verdict(verdict="error", summary=outcome[1], **common)
        failed = self.judgement.first_failure()
        if failed is not None:
            return Verdict(verdict="rejected", summary=f"rejected by check {failed.name}: {failed.detail}", **common)
        speedup = self.timings.reference_eager.median_ms / self.timings.candidate.median_ms
        compiled = self.timings.reference_compile
        return Verdict(verdict="verified", summary=f"verified: {speedup:.2f}x the eager reference", speedup=speedup,
                       speedup_vs_compile=compiled.median_ms / self.timings.candidate.median_ms if compiled else None,
                       **common)


def verify(task: Path, candidate: Path, policy: VerifyPolicy, cache_dir: Path | None = None) -> Verdict:
    try:
        evaluation = Evaluation(task, candidate, policy, cache_dir)
    except devices.DeviceError as err:
        return Verdict(verdict="error", summary=str(err), task=str(task), candidate=str(candidate),
                       device=policy.device or "auto")
    return evaluation.run()


def check_task(task: Path, policy: VerifyPolicy, cache_dir: Path | None = None) -> TaskAudit:
    """The task audit on its own: load the task in a checker process and probe its outputs."""
    try:
        evaluation = Evaluation(task, task, policy, cache_dir)
    except devices.DeviceError as err:
        return TaskAudit(status="error", task=str(task), device=policy.device or "auto", error=str(err))
    return evaluation.audit_only()

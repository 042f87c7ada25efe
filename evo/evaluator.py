"""The evaluator: builds a candidate, runs it against the task in separate processes, and
decides the verdict here, in the parent, from what the checker judged and what the
parent itself observed. The candidate's process never holds an expected output.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from evo import builds, cores, devices, judgement, neighbours, reference_timing, start_gate, storage
from evo.config import VerifyPolicy
from evo.handover import hand_over_pool
from evo.judgement import EvaluatorError, Judgement, Rejected
from evo.profiled_call import ProfiledCall
from evo.sandbox_runner import SandboxFailure, SandboxProcess
from evo.session import TaskSession, await_started, checker_answer, new_seeds
from evo.timing import (WARM_SECONDS, Calibration, Samples, SubjectError, exchanged, failed_protocol_checks,
                        host_pace_warning, time_candidate, warm_up)
from evo.verdict import Timings, Verdict


TRUSTED_SANDBOXES = ("reference checker", "cache flusher")
# A candidate's timing follows the session's last timing closer than this (a search's steady state,
# the device's clocks still up from it) skips the warm-up. Were the clocks down after all, the
# candidate would only look slower.
STILL_WARM_S = 1.0


class Evaluation:
    """One verification of one candidate against one task."""

    def __init__(self, task: Path, candidate: Path, policy: VerifyPolicy, cache_dir: Path | None = None,
                 session: TaskSession | None = None):
        self.task, self.candidate, self.policy = task.resolve(), candidate.resolve(), policy
        self.own_session = session is None  # a one-shot session ends with this evaluation
        self.session = session or TaskSession(task, policy, cache_dir)
        self.device, self.profile, self.limits = self.session.device, self.session.profile, self.session.limits
        self.judgement = Judgement()
        self.timings = Timings()
        self.processes: list[SandboxProcess] = []
        self.facts: dict = {}
        self.warnings: list[str] = []
        self.extension_calls = 0  # calls into the candidate's compiled extensions, seen in one call
        self.forked = False  # whether the candidate's processes were forked by the session's fork server
        self.phase = "load"  # the check a candidate process's crash or hang fails: load, then runs
        self.doing = "the build"  # what was under way, for failure messages
        self.holds_slot = False  # one of the session's process slots, taken once built

    # ---- the whole run --------------------------------------------------------------------

    def run(self) -> Verdict:
        started = time.monotonic()
        try:
            self.check_paths()
            self.session.start_trusted()
            self.session.start_fork_server()
            if self.session.standby or self.session.fork_server is not None:
                # Spares are started, or forks take a moment: take them once built, so that builds
                # in flight hold none.
                self.build()
                self.take_process_slot()
                self.spawn_processes()
            else:  # start-up of the processes overlaps the build
                self.spawn_processes()
                self.build()
            self.await_candidate_processes()
            self.await_task()
            self.reserve_memory()
            self.device_turn()
            outcome = None
        except Rejected:
            outcome = None
        except SandboxFailure as failure:
            outcome = self.sandbox_failed(failure)
        except EvaluatorError as err:
            self.session.discard_trusted()
            outcome = ("error", str(err))
        except neighbours.GpuShared as err:
            outcome = ("error", str(err))
        except OSError as err:  # a write of evo's own: the cache, a sandbox's directory
            outcome = ("error", storage.write_failure(err))
        finally:
            self.release_processes()
            if self.holds_slot:
                self.session.process_slots.release()
            if self.own_session:
                self.session.close()
        self.timings.total_s = time.monotonic() - started
        return self.verdict(storage.unless_disk_full(outcome, self.judgement.first_failure(), self.session.cache_dir))

    def take_process_slot(self) -> None:
        """Wait until fewer evaluations than the session keeps spares for hold candidate processes."""
        if self.session.process_slots is not None:
            self.session.process_slots.acquire()
            self.holds_slot = True

    def device_turn(self) -> None:
        """The evaluation's turn on the device. Its processes are killed before the turn ends and
        end after it, while the next evaluation checks in its checker and loads its candidate;
        the next waits for them to be gone before it times anything or uses the exchange. They
        end within the turn where they may hold the memory the next one needs."""
        ending = devices.Ending(self.device)
        try:
            with devices.exclusive(self.device, defer_teardowns=True) as waited, \
                    cores.timing(self.device.kind, self.device_phase_groups()):
                self.timings.queued_s += waited
                held, self.timings.device_at = time.monotonic(), time.time()
                try:
                    self.on_device()
                finally:  # none of the candidate's code runs on the host once another holds the device
                    ending.hold()  # after this turn's own await_teardowns, which would wait for it
                    self.stop_processes()
                    if not devices.teardown_may_overlap(self.device):
                        self.release_processes()
                    self.timings.device_s = time.monotonic() - held
        finally:
            self.release_processes()
            ending.release()

    def on_device(self) -> None:
        self.prepare_checker()
        self.time_reference()
        self.hand_over_pool()
        self.start_profiled_call()
        self.load_candidate()
        self.finish_profiled_call()  # its process ends during the trials
        # The previous turn's processes, still ending as the work above began, are gone: no
        # work of theirs runs beside this candidate's checked or timed calls, and the exchange
        # they could write was cleared after they ended.
        devices.await_teardowns(self.device)
        self.correctness()
        self.time_candidate()
        self.which_kernels()
        self.note_host_pace()

    def device_phase_groups(self) -> list[int]:
        """The process groups of the processes the device phase waits on: those timed or on the
        timed path, and the profiler's (it ends before the first timed window; on cores busy
        with builds and interpreters starting it would keep the device waiting)."""
        return [process.pid for process in (self.checker, self.flusher, self.runner, self.profiler)
                if process.running()]

    def sandbox_failed(self, failure: SandboxFailure):
        """A candidate's failure costs only its own verdict; a trusted process's failure is an
        evaluator error. Which one is decided by the process, never by what it printed."""
        if failure.label in TRUSTED_SANDBOXES:
            self.session.discard_trusted()
            return ("error", f"the evaluator's {failure.label} failed: {failure}")
        if failure.kind in ("memory", "disk", "processes"):
            name = failure.kind
        elif failure.label == "build":
            name = "build"
        else:
            name = self.phase
        self.judgement.fail(name, f"{failure} (during {self.doing})")
        return None

    def stop_processes(self) -> None:
        """Kill them now, without waiting for them to end (`release_processes` waits)."""
        for process in self.processes:
            process.stop()

    def release_processes(self) -> None:
        for process in self.processes:
            self.session.release(process)
        if self.processes:
            self.session.exchange.clear()
        self.processes = []

    def own(self, process: SandboxProcess) -> SandboxProcess:
        """A process of this evaluation's alone, released when it ends."""
        self.processes.append(process)
        return process

    # ---- phases -----------------------------------------------------------------------------

    def check_paths(self) -> None:
        if not self.task.is_file():
            raise EvaluatorError(f"task file {self.task} does not exist; pass the path of a KernelBench-style task file")
        if not self.candidate.is_file():
            raise EvaluatorError(f"candidate file {self.candidate} does not exist; pass the path of a file defining ModelNew")

    def spawn_processes(self) -> None:
        """The checker and the flusher (unless the session's are running), the process that runs
        and times the candidate, and the one that profiles it: started at once, or earlier as
        the session's spares. Candidate processes only import torch until told to load."""
        self.session.start_trusted()
        self.checker, self.flusher = self.session.checker, self.session.flusher
        self.runner = self.own(self.session.take_candidate_process())
        self.forked = self.runner.fork_server is not None
        self.profiler = self.own(self.session.take_candidate_process(profiler=True))
        self.profiled_call = ProfiledCall(self.profiler, self.policy.load_timeout_s, self.policy.call_timeout_s)

    def build(self) -> None:
        self.doing = "the build"
        builds.build(self.session, self.candidate, self.policy, self.judgement, self.timings, self.own)

    def await_task(self) -> None:
        """The task's facts, awaited without the device's lock, which loading the task takes."""
        started = time.monotonic()
        self.task_facts, queued = self.session.facts()
        self.timings.queued_s += queued
        # The loader may have queued before this evaluation began to wait for it.
        self.timings.correctness_s += max(0.0, time.monotonic() - started - queued)

    def reserve_memory(self) -> None:
        try:
            self.session.reserve_window(self.runner, self.policy.load_timeout_s)
        except SandboxFailure as failure:  # before any candidate code was there
            raise EvaluatorError(f"reserving device memory in the candidate process failed: {failure}") from None

    def prepare_checker(self) -> None:
        """Take the task's facts from the session's checker (it loaded the task when it started),
        have it forget the previous candidate, and compute the reference's outputs for this
        candidate's trials."""
        started = time.monotonic()
        if self.session.task_facts is not self.task_facts:
            raise EvaluatorError("the evaluator's reference process was restarted during this evaluation "
                                 "(another evaluation's failure); verify the candidate again")
        self.facts = self.task_facts["facts"]
        self.ask_checker({"op": "begin"}, "resetting the checker")
        self.trial_seeds = new_seeds(self.policy.trials)
        self.ask_checker({"op": "prepare_trials", "seeds": self.trial_seeds}, "running the reference on the trials")
        if not self.task_facts["float64_reference"]:
            self.warnings.append("no float64 reference could run for this task: outputs are compared with the fp32 reference")
        self.warnings.extend(self.session.audit_warnings)
        self.timings.correctness_s += time.monotonic() - started

    def ask_checker(self, message: dict, doing: str) -> dict:
        return checker_answer(self.checker.request(message, timeout=self.policy.load_timeout_s)[0], doing)

    def time_reference(self) -> None:
        """Time the reference before any candidate code is imported, so nothing a candidate does
        (a background GPU hog, say) can slow the baseline it is compared with; or take the
        session's timing of it while that is fresh. The candidate's timed calls use the seeds
        the reference was just timed on (their expected outputs are kept), else fresh ones."""
        started = time.monotonic()
        if self.session.reference_fresh():
            self.reference = self.session.reference
            self.timed_seeds = self.reference.plan.seeds(new_seeds)
            self.timings.reference_reused = True
        else:
            devices.await_teardowns(self.device)
            with start_gate.starts_held_off(self.device, self.warnings, "the reference"):
                self.reference, self.timed_seeds = reference_timing.measure(self.checker, self.flusher, self.policy,
                                                                            self.task_facts, self.device)
            self.session.reference, self.session.last_timed = self.reference, time.monotonic()
        self.timings.reference_eager = self.reference.stats
        self.timings.reference_compile = self.reference.compile_stats
        self.exchange_bytes = self.reserve_exchange()
        self.timings.timing_s += time.monotonic() - started

    def hand_over_pool(self) -> None:
        slot_bytes = self.reference.plan.window * self.task_facts["pool_bytes_per_call"]
        self.inputs = hand_over_pool(self.session, self.runner, slot_bytes, self.policy.load_timeout_s)

    def reserve_exchange(self) -> int:
        """Room in the exchange buffer for what a candidate's process hands back at once, a timed
        window's outputs; twice that, so that outputs of a wrong dtype still arrive to be judged."""
        outputs = sum(meta["nbytes"] for meta in self.task_facts["outputs"])
        return self.session.exchange.reserve(2 * self.reference.plan.window * outputs)

    def load_message(self, process: SandboxProcess) -> dict:
        facts = self.task_facts
        return {"op": "load", "candidate": str(self.candidate), "task": str(self.task), "device": self.device.torch_name,
                "init_seed": facts["init_seed"], "allow_reduced_precision": self.policy.allow_reduced_precision,
                "extensions_cache": str(builds.extensions_cache(self.session)),
                "extensions_dir": str(process.workdir / "extensions"), "headers": builds.headers_root(self.session),
                "generate_on_device": facts["generate_on_device"], "flush_bytes": self.device.flush_bytes,
                "poison_sizes": [meta["nbytes"] for meta in facts["outputs"]]}

    def load_candidate(self) -> None:
        self.doing = "loading the candidate"
        started = time.monotonic()
        loaded, _ = self.runner.request(self.load_message(self.runner), timeout=self.policy.load_timeout_s)
        self.timings.correctness_s += time.monotonic() - started
        if "error" in loaded:
            if loaded.get("refused_flags"):  # it built an extension when loaded, not in the build sandbox
                self.judgement.reject("compiler_flags", f"{loaded['error']}; pass --allow-reduced-precision to permit them")
            self.judgement.reject("load", loaded["error"])
        self.judgement.passed("load", "ModelNew imported and constructed")
        flags = loaded.get("flags_changed")
        if not (isinstance(flags, list) and all(isinstance(flag, str) for flag in flags)):
            self.judgement.reject("load", "the candidate's process answered the load without the global flags it "
                                          "found: its harness was tampered with")
        self.judgement.flags(flags, "at import")

    def correctness(self) -> None:
        started = time.monotonic()
        self.phase = "runs"
        for number, seed in enumerate(self.trial_seeds, 1):
            where = f"trial {number} of {len(self.trial_seeds)}"
            self.doing = where
            reply = self.run_candidate(seed, {"op": "run", "send_outputs": True,
                                              "exchange_bytes": self.exchange_bytes, "guard_memory": True}, where)
            details, _ = self.runner.receive(self.policy.call_timeout_s)
            described = self.judgement.described(details, reply, self.device.torch_name, where)
            self.extension_calls = max(self.extension_calls, details["extension_calls"])
            self.runner.hold()  # while the checker reads the call's inputs in the pool as it left them
            try:
                verdict, _ = self.checker.request({"op": "compare_trial", "seed": seed,
                                                   **exchanged(details, reply, self.exchange_bytes)},
                                                  timeout=self.policy.call_timeout_s)
            finally:
                self.runner.release()
            if "error" in verdict:  # what the candidate's process sent did not describe its outputs
                self.judgement.reject("runs", f"{where}: the checker could not read the outputs the candidate's "
                                              f"process sent ({verdict['error']})")
            self.judgement.record_all(verdict["checks"], where)
            self.judgement.memory_bounds(described.memory, where)
        self.timings.correctness_s += time.monotonic() - started

    def run_candidate(self, seed: int, message: dict, where: str) -> dict:
        try:
            self.inputs.prepare(self.runner, [seed], self.policy.call_timeout_s)
            self.inputs.publish(self.runner, self.policy.call_timeout_s, hold=False)
        except SubjectError as err:
            self.judgement.reject("runs", f"{where}: {err}")
        reply, _ = self.runner.request(message, timeout=self.policy.call_timeout_s)
        if "error" in reply:
            self.judgement.reject("runs", f"{where}: ModelNew.forward raised {reply['error']}")
        return reply

    def time_candidate(self) -> None:
        self.doing = "timing"
        started = time.monotonic()
        with start_gate.starts_held_off(self.device, self.warnings, "the candidate"):
            since, candidate, protocol = self.timed_and_calibrated()
        candidate.dump("candidate")
        self.reference.samples.dump("reference")
        self.timings.timing_s += time.monotonic() - started
        beside = neighbours.beside(self.device, since, [self.checker.pid, self.flusher.pid, self.runner.pid])
        self.warnings.extend(neighbours.warnings(self.reference.neighbours, beside))
        self.judgement.timed(protocol, candidate, self.timings, self.task_facts, self.device,
                             self.policy.allow_reduced_precision)
        neighbours.judge_timing_beside(beside, self.judgement.by_name["timer_consistency"],
                                       candidate.overhead_ms() - protocol.overhead_ms,
                                       statistics.median(candidate.window_wall_ms))

    def timed_and_calibrated(self) -> tuple[float, Samples, Calibration]:
        """The candidate's timed calls and the reference's recalibration beside them, and when
        the timing began (time.time(), after the warm-up: see neighbours.beside)."""
        if time.monotonic() - self.session.last_timed > STILL_WARM_S:
            self.flusher.request({"op": "warm", "seconds": WARM_SECONDS}, timeout=self.policy.call_timeout_s)
        try:
            warm_up(self.runner, self.flusher, self.inputs, new_seeds(self.policy.warmup_calls), {"op": "run"},
                    self.policy.load_timeout_s, True, self.device.kind)
            self.end_profiler()
            since = time.time()
            candidate = self.timed_calls(self.timed_seeds)
            protocol = self.calibrate()
            failed = failed_protocol_checks(protocol, candidate, self.device.kind)
            if failed:
                # A stalled host looks like work hidden outside the timer once; hidden work shows every
                # time. Fresh seeds, so no output of the first timing helps; all of the second timing
                # is judged, so a candidate that stops hiding work then is timed doing it.
                self.warnings.append(f"the candidate's first timing failed {' and '.join(failed)} (a stalled host, or "
                                     "work hidden outside the timer); it was timed again on fresh inputs, and that "
                                     "timing is judged")
                candidate = self.timed_calls(self.reference.plan.seeds(new_seeds))
            return since, candidate, protocol
        except SubjectError as err:
            self.judgement.reject("runs", f"during timing: {err}")
        finally:
            self.session.last_timed = time.monotonic()

    def calibrate(self) -> Calibration:
        return reference_timing.recalibrate(self.checker, self.flusher, self.reference, self.policy.call_timeout_s,
                                            self.device.kind)

    def timed_calls(self, seeds: list[list[int]]) -> Samples:
        return time_candidate(self.runner, self.checker, self.flusher, self.inputs, seeds, self.exchange_bytes,
                              self.policy.call_timeout_s, self.device.kind,
                              lambda checks: self.judgement.record_all(checks, "a timed call"),
                              lambda details, reply: self.judgement.described(details, reply, self.device.torch_name,
                                                                              "a timed call"))

    def await_candidate_processes(self) -> None:
        """Waiting for interpreters to start must not hold the device; nor may the profiler's
        warm-up (its first start of the profiler) run while the reference is timed."""
        await_started(self.runner, self.policy.load_timeout_s, "starting the candidate process")
        self.profiled_call.await_warm()

    def start_profiled_call(self) -> None:
        self.profiled_call.start(self.load_message(self.profiler), new_seeds(2))

    def finish_profiled_call(self) -> None:
        """Collect the profile and kill the process; `end_profiler` waits for it to be gone."""
        self.phase = "runs"  # the candidate has loaded: a crash from now on fails its runs
        self.doing = "the profiled call"
        self.profiled = self.profiled_call.finish(self.judgement)
        self.profiler.stop()

    def end_profiler(self) -> None:
        """No candidate code but the timed one runs while the candidate is timed: the profiler's
        process, killed when its profile arrived, has ended (and its device context with it)
        before the first timed window. Its ending overlaps the warm-up calls."""
        self.processes.remove(self.profiler)
        self.session.release(self.profiler)

    def which_kernels(self) -> None:
        self.kernels = judgement.classify_kernels(self.profiled, self.extension_calls)
        self.judgement.same_code_when_profiled(self.profiled["extension_calls"], self.extension_calls)
        self.judgement.custom_code(self.kernels, self.policy.require_custom_code, self.device.kind == "cuda")

    def note_host_pace(self) -> None:
        if self.device.kind == "cuda":  # a CPU's profile has no device time to compare
            warning = host_pace_warning(self.timings.candidate.median_ms, self.kernels)
            self.warnings.extend([warning] if warning else [])

    # ---- the verdict ------------------------------------------------------------------------

    def verdict(self, outcome: tuple[str, str] | None) -> Verdict:
        common = dict(task=str(self.task), candidate=str(self.candidate), device=self.device.torch_name,
                      checks=self.judgement.checks, timings=self.timings, warnings=self.warnings,
                      isolation=self.profile.report(self.limits, self.policy.call_timeout_s, self.device.visible,
                                                    self.forked),
                      environment=devices.environment(self.device, self.facts),
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


def verify(task: Path, candidate: Path, policy: VerifyPolicy, cache_dir: Path | None = None,
           session: TaskSession | None = None) -> Verdict:
    """Verify one candidate; within a search, pass the task's session to reuse its checker,
    its reference timing and its spare processes."""
    try:
        evaluation = Evaluation(task, candidate, policy, cache_dir, session)
    except devices.DeviceError as err:
        problem = str(err)
    except OSError as err:  # the session's directory could not be made
        full = storage.full_disk(storage.written_by_evo(cache_dir or devices.cache_dir(create=False)), str(err))
        problem = storage.full_disk_message(full) if full else storage.write_failure(err)
    else:
        return evaluation.run()
    return Verdict(verdict="error", summary=problem, task=str(task), candidate=str(candidate),
                   device=policy.device or "auto")

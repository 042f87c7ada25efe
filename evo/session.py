"""The trusted side of a task's evaluations on one device, kept between candidates: the
reference checker and the cache flusher (started once per task), what they learned of the task
(its facts, its audit), the reference's timing (re-timed when it grows stale), and candidate
processes started ahead of need, so that no evaluation waits for an interpreter to start.

Every candidate still gets fresh processes of its own and fresh secret seeds: nothing is
reused that a candidate has touched. `evo verify` uses a session once; the search keeps one
per task and device for the whole search of that task.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from evo import cores, devices, isolation, start_gate
from evo.config import VerifyPolicy
from evo.exchange import ExchangeBuffer
from evo.fork_server import FORKED_PROGRAMS, ForkServer
from evo.judgement import EvaluatorError
from evo.neighbours import Neighbour
from evo.precompiled_headers import PrecompiledHeaders
from evo.sandbox_runner import SandboxFailure, SandboxProcess
from evo.timing import Plan, Samples, window_allocations
from evo.verdict import TimingStats

# The reference is timed again when its timing is older than this, so that a long search
# follows the device's drift (clocks, temperature) instead of comparing against the morning.
REFERENCE_STALE_S = 600.0
# A candidate's process reserves a window's device memory before its turn only up to this much:
# a few evaluations wait for the device at once, each holding its reservation.
RESERVE_LIMIT_BYTES = 1 << 30


@dataclass
class ReferenceTiming:
    """The reference's timing, shared by the evaluations of a session while it is fresh."""

    samples: Samples  # the eager reference's calls, under the same protocol as a candidate's
    stats: TimingStats
    compile_stats: TimingStats | None  # torch.compile of the reference, when asked for
    plan: Plan  # how many timed calls, in windows of how many, for both subjects
    measured_at: float  # time.monotonic() when it was measured
    neighbours: list[Neighbour] = field(default_factory=list)  # other processes computing beside it (evo.neighbours)


def new_seeds(count: int) -> list[int]:
    """Seeds no candidate can guess: fresh randomness per verification."""
    return [secrets.randbits(62) for _ in range(count)]


def await_reply(reply: dict, doing: str) -> dict:
    """A trusted process's reply, or its error as the evaluator's."""
    if "error" in reply:
        raise EvaluatorError(f"{doing} failed: {reply['error']}")
    return reply


def checker_answer(reply: dict, doing: str) -> dict:
    """The checker's reply, or the error it reports: a fault of the task is the user's to fix."""
    if "error" in reply and reply.get("user_error"):
        raise EvaluatorError(reply["error"])
    return await_reply(reply, doing)


def await_started(process: SandboxProcess, timeout: float, doing: str) -> dict:
    """The reply to the first request a process was sent when it started, before any candidate
    code was there: a failure is the evaluator's."""
    try:
        reply, _ = process.receive(timeout)
    except SandboxFailure as failure:
        raise EvaluatorError(f"{doing} failed: {failure}") from None
    return await_reply(reply, doing)


class TaskLoader:
    """Loads the task into freshly started trusted processes on a thread of its own, so that
    their start-up and the task's loading (the reference's first call, the device's ceilings,
    the audit) overlap a candidate's build and the start-up of its processes. What they do on
    the device they do under the device's lock, like any timing."""

    def __init__(self, checker: SandboxProcess, flusher: SandboxProcess, device: devices.Device,
                 policy: VerifyPolicy, task: Path):
        self.checker, self.flusher, self.device, self.policy, self.task = checker, flusher, device, policy, task
        self.cancelled = threading.Event()
        self.result: tuple[dict, list[str]] | None = None  # the task's facts and the audit's warnings
        self.queued_s = 0.0  # waiting for the device before loading the task
        self.error: Exception | None = None  # raised to whoever awaits the outcome
        self.thread = threading.Thread(target=self.run, name="evo-task-loader", daemon=True)
        self.thread.start()

    def run(self) -> None:
        timeout = self.policy.load_timeout_s
        try:
            await_reply(self.checker.request({"op": "ready"}, timeout=timeout)[0], "starting the reference process")
            with devices.exclusive(self.device, self.cancelled) as self.queued_s:
                facts = checker_answer(self.checker.request({
                    "op": "init", "task": str(self.task), "device": self.device.torch_name,
                    "compile_baseline": self.policy.compile_baseline, "flush_bytes": self.device.flush_bytes,
                    "policy": self.policy.model_dump()}, timeout=timeout)[0], "the reference process")
                await_reply(self.flusher.request({"op": "init", "device": self.device.torch_name,
                                                  "flush_bytes": self.device.flush_bytes}, timeout=timeout)[0],
                            "starting the cache flusher")
                warnings = []
                if self.policy.audit_task:
                    warnings = checker_answer(self.checker.request({"op": "audit", "seeds": new_seeds(3)},
                                                                   timeout=timeout)[0], "auditing the task")["warnings"]
            self.result = (facts, warnings)
        except (SandboxFailure, EvaluatorError) as err:
            self.error = err
        except devices.Cancelled as err:
            self.error = EvaluatorError(f"loading the task was called off: {err}")
        except Exception as err:  # noqa: BLE001 - a bug here must reach the evaluation, not die with the thread
            self.error = EvaluatorError(f"loading the task failed: {err!r}")

    def outcome(self) -> tuple[dict, list[str]]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


class TaskSession:
    """One task on one device. Its trusted processes serve one evaluation at a time (the
    evaluation holds the device's lock while it uses them); taking candidate processes is
    safe from several threads."""

    def __init__(self, task: Path, policy: VerifyPolicy, cache_dir: Path | None = None, standby: int = 0):
        self.task, self.policy = task.resolve(), policy
        self.device = devices.resolve(policy.device)
        self.profile = isolation.probe(policy.use_namespaces)
        self.limits = devices.limits(policy, self.device)
        self.cache_dir = cache_dir or devices.cache_dir()
        self.standby = standby  # candidate processes of each kind kept started ahead of need
        # As many evaluations as there are spares hold candidate processes at once; the others
        # build or wait (more processes starting and ending beside the timed one slow every turn).
        self.process_slots = threading.BoundedSemaphore(standby) if standby else None
        self.workdir = Path(tempfile.mkdtemp(prefix="evo-session-"))
        self.lock = threading.Lock()
        self.starting_trusted = threading.Lock()  # held by the one evaluation that starts them
        self.checker: SandboxProcess | None = None
        self.flusher: SandboxProcess | None = None
        self.loader: TaskLoader | None = None  # loads the task into the checker and the flusher once started
        self.task_facts: dict | None = None  # the checker's description of the task, once initialized
        self.audit_warnings: list[str] = []
        self.reference: ReferenceTiming | None = None
        self.last_timed = -float("inf")  # time.monotonic() when a timing phase last ended on the device
        self.spares: dict[bool, list[SandboxProcess]] = {False: [], True: []}  # by "warms the profiler"
        self.exchange = ExchangeBuffer()  # outputs from candidate processes to the checker
        self.pool_fd: int | None = None  # the checker's input pool (evo.handover), once it made one
        self.pool_bytes = 0
        self.fork_server: ForkServer | None = None  # forks candidate processes and builds, once started
        self.fork_failure: str | None = None  # why they are started afresh instead, once a server failed to serve
        # A search makes the precompiled headers its builds want; a one-shot verification uses those there are.
        self.headers = PrecompiledHeaders(
            self.cache_dir / "headers", lambda: self.sandbox("pch.py", "header precompiler", {"CUDA_VISIBLE_DEVICES": ""}),
            self.release, policy.build_timeout_s, make_new=standby > 0) if policy.precompiled_headers else None
        self.started = 0  # sandboxes started, for their directories' names

    # ---- processes ------------------------------------------------------------------------

    def sandbox(self, program: str, label: str, env_extra: dict[str, str] | None = None,
                exchange: bool = False, shared_fd: int | None = None, watch_usage: bool = True) -> SandboxProcess:
        """A sandbox running `program`: forked by the fork server where it serves that program,
        else a fresh interpreter."""
        server = self.fork_server if program in FORKED_PROGRAMS else None
        if server is not None and not server.usable():
            self.fork_failure = self.fork_failure or server.failure  # a server that merely ended is started again
            server = None
        with self.lock:
            self.started += 1
            parent = server.process.workdir if server is not None else self.workdir
            home = parent / f"{label.replace(' ', '-')}-{self.started}"
        home.mkdir()
        env = devices.sandbox_env(home, self.device, {**start_gate.sandbox_env(self.device), **(env_extra or {})})
        process = SandboxProcess(program, isolation=self.profile, workdir=home, env=env, limits=self.limits,
                                 label=label, shared_fd=self.exchange.fd if exchange else shared_fd, door=exchange,
                                 start_cores=cores.for_starting(self.device.kind), fork_server=server,
                                 watch_usage=watch_usage)
        try:
            return process.start()
        except SandboxFailure:
            if server is None or server.usable():
                raise
            self.fork_failure = server.failure  # the server failed, not this process: start it afresh
            return self.sandbox(program, label, env_extra, exchange, shared_fd, watch_usage)

    def start_fork_server(self) -> None:
        """Start the fork server unless it runs, the policy says no, or one failed to serve in this
        session (its processes start afresh then): it imports torch while candidates build."""
        if not self.policy.fork_server or self.fork_failure is not None:
            return
        if self.fork_server is not None and self.fork_server.process.running():
            return
        if self.fork_server is not None:
            self.fork_server.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = self.sandbox("forkserver.py", "fork server", shared_fd=theirs.fileno(), watch_usage=False)
        finally:
            theirs.close()
        process.send({"op": "ready"})
        self.fork_server = ForkServer(process, ours, self.profile, self.policy.load_timeout_s)

    def start(self) -> "TaskSession":
        """Start the trusted processes (which load the task at once) and the spare candidate
        processes ahead of the first evaluation. A failure to start is left for that evaluation
        to report: it starts them again."""
        try:
            self.start_trusted()
            self.start_fork_server()
            self.fill_spares()
        except (SandboxFailure, OSError):
            pass
        return self

    def start_trusted(self) -> None:
        """Start the checker and the flusher unless both are running; a thread of their own
        loads the task into them as soon as they are up, while candidates build and their
        processes start."""
        with self.starting_trusted:  # else two evaluations could each start a pair, one of them never released
            running = all(process is not None and process.running() for process in (self.checker, self.flusher))
            if not running:
                self.discard_trusted()
                self.checker = self.sandbox("checker.py", "reference checker", exchange=True)
                self.flusher = self.sandbox("flusher.py", "cache flusher")
                self.loader = TaskLoader(self.checker, self.flusher, self.device, self.policy, self.task)

    def facts(self) -> tuple[dict, float]:
        """The checker's description of the task (inputs, outputs, work, the device's ceilings),
        once the loader has it, and the seconds the loader queued for the device, charged to the
        first caller. Never call it holding the device's lock: the loader needs it."""
        loader, queued = self.loader, 0.0
        if self.task_facts is None and loader is not None:
            facts, warnings = loader.outcome()
            with self.lock:
                if self.task_facts is None and self.loader is loader:  # not one discarded meanwhile
                    self.task_facts, self.audit_warnings, queued = facts, warnings, loader.queued_s
        if self.task_facts is None:
            raise EvaluatorError("the task was not loaded: its reference process was stopped")
        return self.task_facts, queued

    def take_candidate_process(self, profiler: bool = False) -> SandboxProcess:
        """A started candidate process no candidate has used, and a spare started in its place.
        Its first request is sent at once, whose reply the taker must receive: the timed process
        says when it is ready, a profiler process warms the profiler up first (its own start-up
        takes seconds); profiling slows a process's later launches, so the process that is timed
        never warms it."""
        with self.lock:
            spares = self.spares[profiler]
            process = spares.pop(0) if spares else None
        process = process or self.start_candidate_process(profiler)
        self.fill_spares()
        return process

    def start_candidate_process(self, profiler: bool) -> SandboxProcess:
        # Only the timed process hands outputs back: the profiler's gets no exchange buffer.
        process = self.sandbox("candidate.py", "candidate profiler" if profiler else "candidate process",
                               exchange=not profiler)
        process.send({"op": "warm_profiler" if profiler else "ready"})
        return process

    def fill_spares(self) -> None:
        for profiler in (False, True):
            while True:
                with self.lock:
                    if len(self.spares[profiler]) >= self.standby:
                        break
                process = self.start_candidate_process(profiler)
                with self.lock:
                    self.spares[profiler].append(process)

    def release(self, process: SandboxProcess) -> None:
        """A process is never used again: kill it (a candidate's owes us no goodbye) and remove its
        directory."""
        process.kill()
        process.close()
        shutil.rmtree(process.workdir, ignore_errors=True)

    def expect_format(self, candidate_format: str) -> None:
        """A search whose prompts ask for this format: on a GPU with load_inline, have the torch
        header its builds use made now, while the first candidates are written."""
        if self.headers is not None and self.device.kind == "cuda" and candidate_format == "load_inline":
            self.headers.want_prompt_format()

    # ---- what the trusted processes know --------------------------------------------------

    def reserve_window(self, process: SandboxProcess, timeout: float) -> None:
        """Have a timed candidate process take from the driver, before its turn on the device,
        the memory of the NaN blocks a window leaves for its outputs, in the order it allocates
        them: forked processes otherwise spent 0.13 s of the turn there (H200). Only once the reference's plan gives the window's size, and for small windows.
        A refusal (the device's memory is full) leaves the window to allocate as it goes."""
        reference, facts = self.reference, self.task_facts
        if self.device.kind != "cuda" or reference is None or facts is None:
            return
        sizes = window_allocations(facts, reference.plan.window)
        if sum(sizes) <= RESERVE_LIMIT_BYTES:
            process.request({"op": "reserve", "device": self.device.torch_name, "sizes": sizes}, timeout=timeout)

    def input_pool(self, nbytes: int, timeout: float) -> tuple[int, int]:
        """The checker's input pool, at least `nbytes` long (made anew when it is shorter): its
        descriptor, kept here to hand to candidate processes, and its length."""
        if self.pool_bytes < nbytes:
            reply = await_reply(self.checker.request({"op": "pool", "bytes": nbytes}, timeout=timeout)[0],
                                "making the input pool")
            fd = self.checker.receive_fd(timeout)
            self.forget_pool()
            self.pool_fd, self.pool_bytes = fd, reply["pool_bytes"]
        return self.pool_fd, self.pool_bytes

    def forget_pool(self) -> None:
        if self.pool_fd is not None:
            os.close(self.pool_fd)
        self.pool_fd, self.pool_bytes = None, 0

    def reference_fresh(self) -> bool:
        """Whether the session's timing of the reference may serve another evaluation: not when
        it was timed beside other work on the GPU, which makes every speedup against it look larger."""
        return (self.reference is not None and not self.reference.neighbours
                and time.monotonic() - self.reference.measured_at < REFERENCE_STALE_S)

    def discard_trusted(self) -> None:
        """After a failure of the checker or the flusher, or of the reference's timing: the next
        evaluation starts them afresh rather than trust a process in an unknown state."""
        with self.lock:  # two evaluations failing at once: each process is released by one of them
            trusted = [process for process in (self.checker, self.flusher) if process is not None]
            loader, self.loader = self.loader, None
            self.checker = self.flusher = None
            self.task_facts, self.reference = None, None
            self.forget_pool()
        if loader is not None:  # it ends at once: its wait for the device is called off, its processes end
            loader.cancelled.set()
            for process in trusted:
                process.kill()
            loader.thread.join()
        for process in trusted:
            self.release(process)

    def close(self) -> None:
        self.discard_trusted()
        with self.lock:
            spares = self.spares[False] + self.spares[True]
            self.spares = {False: [], True: []}
        for process in spares:
            self.release(process)
        if self.headers is not None:
            self.headers.close()
        if self.fork_server is not None:
            self.fork_server.close()
        self.exchange.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "TaskSession":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

"""The evaluator's result, as typed models. `python -m evo verify --json` prints a Verdict;
its schema is a contract documented in the README."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Check(BaseModel):
    name: str
    passed: bool
    detail: str  # why, in words a user understands


class TimingStats(BaseModel):
    # Per call, as a window's mean call (its calls run back to back; only their total is theirs),
    # plus charged_ms: the median over the windows
    median_ms: float
    charged_ms: float = 0.0  # per call: time the parent's clock saw outside the timer beyond the reference's
    iqr_ms: float  # interquartile range of the windows' mean calls: the spread
    min_ms: float  # the least window's mean call
    mean_ms: float
    calls: int
    wall_median_ms: float  # per call, as the parent's own clock saw it (includes the message round trip)


class Timings(BaseModel):
    candidate: TimingStats | None = None
    reference_eager: TimingStats | None = None
    reference_compile: TimingStats | None = None
    reference_reused: bool = False  # the reference was timed for an earlier candidate of the same search, recently
    build_s: float = 0.0  # wall time of the build step
    correctness_s: float = 0.0  # start-up, loading and correctness trials
    timing_s: float = 0.0  # reference and candidate timing
    queued_s: float = 0.0  # waiting for another evaluation to finish with the device
    device_s: float = 0.0  # holding the device (no other evaluation used it meanwhile)
    device_at: float | None = None  # when it took the device, seconds since the epoch (turns on one device never overlap)
    total_s: float = 0.0


class Roofline(BaseModel):
    flops: int  # of one call, from torch's flop counter on the reference
    min_bytes: int  # inputs read once plus outputs written once
    achieved_flops_per_s: float | None = None
    achieved_bytes_per_s: float | None = None
    fraction_of_peak_flops: float | None = None  # against the measured fp32 (or reduced-precision) ceiling
    fraction_of_bandwidth: float | None = None  # against the measured copy bandwidth
    speed_of_light_ms: float | None = None  # no honest call can be faster than this
    ceilings: dict[str, float] = Field(default_factory=dict)


class Isolation(BaseModel):
    method: str
    network_isolated: bool
    pid_namespace: bool
    user_namespace: bool
    read_only_filesystem: bool  # only the sandbox's own directory is writable
    own_temporary_directory: bool = True
    scrubbed_environment: bool = True
    memory_limit_bytes: int
    disk_limit_bytes: int | None = None  # what its processes could write to disk (its directory)
    task_limit: int | None = None  # processes and threads it could hold at once
    process_group_kept: bool = False  # its processes could not leave its process group (setsid had no effect)
    call_timeout_s: float
    visible_gpus: str  # what CUDA_VISIBLE_DEVICES held for the candidate
    # The candidate's processes were forked from evo's fork server (an interpreter that had
    # imported torch, never candidate code), each in namespaces of its own; False: fresh interpreters.
    forked: bool = False
    notes: list[str] = Field(default_factory=list)


class Verdict(BaseModel):
    verdict: Literal["verified", "rejected", "error"]
    summary: str  # one sentence
    task: str
    candidate: str
    device: str
    checks: list[Check] = Field(default_factory=list)
    speedup: float | None = None  # eager reference median over candidate median; null unless verified
    speedup_vs_compile: float | None = None
    timings: Timings = Field(default_factory=Timings)
    roofline: Roofline | None = None
    kernels: dict | None = None  # which kernels ran in one profiled call, and the library share
    warnings: list[str] = Field(default_factory=list)
    isolation: Isolation | None = None
    environment: dict = Field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return {"verified": 0, "rejected": 1, "error": 2}[self.verdict]

    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]


class TaskAudit(BaseModel):
    """`python -m evo check-task`: whether a task rewards cheats."""

    status: Literal["ok", "warnings", "error"]
    task: str
    device: str
    warnings: list[str] = Field(default_factory=list)
    error: str | None = None  # why the task could not be audited
    environment: dict = Field(default_factory=dict)  # as in a Verdict
    ceilings: dict[str, float] = Field(default_factory=dict)  # the device's, as measured for the audit

    @property
    def exit_code(self) -> int:
        return {"ok": 0, "warnings": 1, "error": 2}[self.status]

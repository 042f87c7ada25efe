"""Configuration, frozen: the evaluator's policy ([verify]) and the search's settings
([optimize]), from defaults, a TOML file's tables, and CLI flags."""

from __future__ import annotations

import tomllib
from pathlib import Path

import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(Exception):
    """A configuration file or flag is wrong; the message says what to do."""


class VerifyPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str | None = None  # "cuda", "cuda:N" or "cpu"; None picks cuda when present
    require_custom_code: bool = True  # the candidate's own compiled code must run
    allow_reduced_precision: bool = False  # TF32, bf16 operands, fast math
    tolerance: float | None = Field(default=None, gt=0)  # overrides the derived relative error bound
    trials: int = Field(default=5, ge=1, le=100)  # correctness trials, each with fresh inputs
    compile_baseline: bool = False  # also time torch.compile of the reference
    timing_budget_s: float = Field(default=1.0, gt=0)  # target time spent in timed calls per subject
    min_timed_calls: int = Field(default=10, ge=3)
    max_timed_calls: int = Field(default=200, ge=3)
    warmup_calls: int = Field(default=3, ge=1)
    expected_memory_bytes: int = 2 << 30  # timed expected outputs the checker keeps on the device; beyond, recomputed
    build_timeout_s: float = Field(default=900.0, gt=0)
    load_timeout_s: float = Field(default=600.0, gt=0)  # import and construction, including run-time compilation
    call_timeout_s: float = Field(default=60.0, gt=0)  # one call
    memory_limit_bytes: int | None = Field(default=None, gt=0)  # of a sandbox; None: 3/4 of this machine's
    # What a sandbox may write to disk; None: 8 GiB, or an eighth of the temporary disk's free space if less.
    disk_limit_bytes: int | None = Field(default=None, gt=0)
    # Processes and threads a sandbox may hold at once; None: 4096, or an eighth of the machine's
    # process IDs if fewer.
    task_limit: int | None = Field(default=None, ge=16)
    use_namespaces: bool = True
    # Candidate processes and builds forked from an interpreter that has imported torch (each in
    # namespaces of its own), rather than each started afresh.
    fork_server: bool = True
    # load_inline builds include torch's header precompiled for their flags (made by a trusted process).
    precompiled_headers: bool = True
    audit_task: bool = True

    @field_validator("device")
    @classmethod
    def known_device(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not a device; use cuda, cuda:N or cpu")
        return value


class OptimizeConfig(BaseModel):
    """How `python -m evo optimize` searches. Limits apply per task unless named otherwise."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    llm: tuple[str, ...] = ()  # provider specs such as anthropic:MODEL or openai:MODEL*2; empty: from the environment
    budget_usd: float | None = Field(default=None, gt=0)  # for the whole run, all tasks together
    max_hours: float | None = Field(default=None, gt=0)  # for the whole run
    max_candidates: int = Field(default=40, ge=1)  # per task, every generated candidate counted
    islands: int = Field(default=2, ge=1)
    island_size: int = Field(default=6, ge=1)  # verified members each island keeps
    migration_interval: int = Field(default=8, ge=1)  # evaluated candidates between migrations
    crossover_rate: float = Field(default=0.15, ge=0, le=1)
    max_repairs: int = Field(default=2, ge=0)  # repair attempts per failed candidate's lineage
    remeasure_elites: bool = True  # re-verify a winner before it becomes a parent
    no_code_retries: int = Field(default=2, ge=0)  # re-asks when a reply has no usable code
    llm_concurrency: int = Field(default=4, ge=1)  # LLM calls in flight
    # In flight per device, so that builds overlap the device's turns; None: as many as the machine
    # builds at once, shared among the devices.
    evaluations_per_gpu: int | None = Field(default=None, ge=1)
    candidate_format: str = Field(default="load_inline", pattern="^(load_inline|nvrtc)$")
    memory: bool = False  # offer verified winners of earlier tasks as examples
    seed: int = 0
    llm_timeout_s: float = Field(default=300.0, gt=0)
    llm_max_retries: int = Field(default=4, ge=0)


def read_tables(config_file: Path | None) -> dict:
    if config_file is None:
        return {}
    try:
        return tomllib.loads(config_file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {config_file} does not exist; pass an existing TOML file to --config") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {config_file} is not valid TOML ({err}); fix it and run again") from None


def build(model: type[BaseModel], table: dict, overrides: dict, section: str):
    values = dict(table)
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return model(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"setting {where!r} of [{section}] is invalid: {message}") from None


def load_policy(config_file: Path | None, overrides: dict) -> VerifyPolicy:
    return build(VerifyPolicy, read_tables(config_file).get("verify", {}), overrides, "verify")


def load_optimize(config_file: Path | None, overrides: dict) -> OptimizeConfig:
    return build(OptimizeConfig, read_tables(config_file).get("optimize", {}), overrides, "optimize")

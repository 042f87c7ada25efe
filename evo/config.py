"""Evaluator policy: frozen, from defaults, a TOML file's [verify] table, and CLI flags."""

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
    expected_memory_bytes: int = 2 << 30  # timed expected outputs kept by the checker; beyond, recomputed
    build_timeout_s: float = Field(default=900.0, gt=0)
    load_timeout_s: float = Field(default=600.0, gt=0)  # import and construction, including run-time compilation
    call_timeout_s: float = Field(default=60.0, gt=0)  # one call
    memory_limit_bytes: int | None = Field(default=None, gt=0)  # of a sandbox; None: 3/4 of this machine's
    use_namespaces: bool = True
    audit_task: bool = True

    @field_validator("device")
    @classmethod
    def known_device(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not a device; use cuda, cuda:N or cpu")
        return value


def load_policy(config_file: Path | None, overrides: dict) -> VerifyPolicy:
    values: dict = {}
    if config_file is not None:
        try:
            values = tomllib.loads(config_file.read_text()).get("verify", {})
        except FileNotFoundError:
            raise ConfigError(f"config file {config_file} does not exist; pass an existing TOML file to --config") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {config_file} is not valid TOML ({err}); fix it and run again") from None
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return VerifyPolicy(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"setting {where!r} is invalid: {message}") from None

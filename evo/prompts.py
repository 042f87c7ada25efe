"""What the search loop says to the LLM: the device facts, parents and examples a prompt shows,
their rendering (PromptBuilder) and the build-log trimming (trim_log). What it takes from the
reply (parse_reply, normalized_source_hash) is in evo/replies.py.

Templates are text files with `$name` placeholders (string.Template): `prompts/*.md` at the
repository root, fragments in `prompts/parts/`. A wheel ships them as package data under
`evo/_prompts`; `templates_dir()` looks there first and then in the checkout. The system
prompt is rendered once per PromptBuilder and never varies within a run, so providers can
cache it as a prefix; everything that changes per call goes in the user message.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Literal

from evo.verdict import Verdict

FORMATS = ("load_inline", "nvrtc")
SOURCE_CHARS = 24_000  # per source quoted in a prompt (task, parent, example)
EXAMPLES_CHARS = 12_000  # all cross-task examples of one prompt together
LOG_LINES = 60
LOG_CHARS = 6_000
LOG_LINE_CHARS = 400  # compiler lines can be whole nvcc command lines
DETAIL_CHARS = 200  # a passed or secondary check's detail
FAILED_DETAIL_CHARS = 3_000  # the failed check's detail (a mismatch summary, a compiler excerpt)
TOP_KERNELS = 8


def templates_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "_prompts", here.parent / "prompts"):
        if (candidate / "system.md").is_file():
            return candidate
    raise FileNotFoundError(f"no prompt templates in {here / '_prompts'} or {here.parent / 'prompts'}")


@lru_cache(maxsize=None)
def _read_template(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# ---- inputs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceFacts:
    kind: Literal["cuda", "cpu"]
    name: str = "unknown"
    sm_count: int | None = None
    bandwidth_gbps: float | None = None  # measured device copy, bytes read plus written
    l2_bytes: int | None = None
    compute_capability: str | None = None  # "9.0"
    fp32_tflops: float | None = None  # measured fp32 matrix product, TF32 off
    bf16_tflops: float | None = None  # measured bf16 matrix product (tensor cores)
    cores: int | None = None  # on a CPU

    @classmethod
    def from_verdict(cls, verdict: Verdict | dict) -> DeviceFacts:
        """From a verdict's environment and measured ceilings (absent when it was not timed)."""
        data = verdict.model_dump() if isinstance(verdict, Verdict) else verdict
        env = data.get("environment") or {}
        ceilings = (data.get("roofline") or {}).get("ceilings") or {}
        on_gpu = str(data.get("device", "")).startswith("cuda")
        scaled = lambda key, unit: ceilings[key] / unit if ceilings.get(key) else None  # noqa: E731
        return cls(kind="cuda" if on_gpu else "cpu", name=env.get("gpu" if on_gpu else "cpu") or "unknown",
                   sm_count=env.get("sm_count"), bandwidth_gbps=scaled("bandwidth_bytes_per_s", 1e9),
                   l2_bytes=env.get("l2_bytes"), compute_capability=env.get("compute_capability"),
                   fp32_tflops=scaled("fp32_flops_per_s", 1e12),
                   bf16_tflops=scaled("peak_flops_per_s", 1e12) if on_gpu else None)


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class ParentInfo:
    """A candidate as a prompt shows it: its source and what the evaluator said about it."""

    source: str
    verdict: str = "unknown"  # verified | rejected | error
    summary: str = ""
    speedup: float | None = None  # eager reference median / candidate median; None unless verified
    speedup_vs_compile: float | None = None
    checks: tuple[CheckResult, ...] = ()  # in the order the evaluator decided them
    candidate_ms: float | None = None  # median per call
    candidate_iqr_ms: float | None = None
    reference_ms: float | None = None  # eager reference median
    compile_ms: float | None = None  # torch.compile reference median, when measured
    min_bytes: int | None = None  # inputs read once plus outputs written once
    flops: int | None = None
    bandwidth_fraction: float | None = None  # of the measured copy bandwidth
    flops_fraction: float | None = None  # of the measured peak the policy allows
    speed_of_light_ms: float | None = None
    own_kernels_us: tuple[tuple[str, float], ...] = ()  # (kernel, µs in one profiled call), slowest first
    library_kernels_us: tuple[tuple[str, float], ...] = ()
    library_fraction: float | None = None  # share of GPU time in library kernels
    build_log: str | None = None  # full compiler output, when the archive kept it

    @classmethod
    def from_verdict(cls, source: str, verdict: Verdict | dict, build_log: str | None = None) -> ParentInfo:
        """From a Verdict or its `model_dump()` dict (as an archive stores it); missing keys are fine."""
        data = verdict.model_dump() if isinstance(verdict, Verdict) else verdict
        timings = data.get("timings") or {}
        stats = lambda key: timings.get(key) or {}  # noqa: E731
        roofline = data.get("roofline") or {}
        kernels = data.get("kernels") or {}
        slowest = lambda table: tuple(sorted(((str(k), float(v)) for k, v in (table or {}).items()),  # noqa: E731
                                             key=lambda item: -item[1]))
        return cls(source=source, verdict=data.get("verdict", "unknown"), summary=data.get("summary", ""),
                   speedup=data.get("speedup"), speedup_vs_compile=data.get("speedup_vs_compile"),
                   checks=tuple(CheckResult(c["name"], bool(c["passed"]), c.get("detail", ""))
                                for c in data.get("checks") or ()),
                   candidate_ms=stats("candidate").get("median_ms"), candidate_iqr_ms=stats("candidate").get("iqr_ms"),
                   reference_ms=stats("reference_eager").get("median_ms"),
                   compile_ms=stats("reference_compile").get("median_ms"),
                   min_bytes=roofline.get("min_bytes"), flops=roofline.get("flops"),
                   bandwidth_fraction=roofline.get("fraction_of_bandwidth"),
                   flops_fraction=roofline.get("fraction_of_peak_flops"),
                   speed_of_light_ms=roofline.get("speed_of_light_ms"),
                   own_kernels_us=slowest(kernels.get("own_kernels_us")),
                   library_kernels_us=slowest(kernels.get("library_kernels_us")),
                   library_fraction=kernels.get("library_fraction"), build_log=build_log)

    @property
    def first_failure(self) -> CheckResult | None:
        return next((check for check in self.checks if not check.passed), None)


@dataclass(frozen=True)
class Example:
    """A verified winner of another task, offered as cross-task memory."""

    task_name: str
    speedup: float
    source: str


# ---- rendering helpers ----------------------------------------------------------------------

def truncate(text: str, limit: int) -> str:
    """Keep the head and the tail (a file's end holds ModelNew, a log's end its last error)."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - limit} characters cut] ...\n{text[-tail:]}"


def fenced(code: str, language: str = "python") -> str:
    """A fence longer than any backtick run inside, so quoted code cannot close it early."""
    longest = max((len(run) for run in re.findall(r"`{3,}", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{code.rstrip()}\n{fence}"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ERROR_LINE = re.compile(r"\berrors?\b(?!\.\w)|undefined reference|undefined symbol|^Traceback|"
                         r"^\w+(Error|Exception)\b|^FAILED:", re.IGNORECASE)
_NOISE_LINE = re.compile(r"^\s*\[\d+/\d+\]|^ninja: |^(Using|Emitting|Building|Allowing|Detected|Loading|Creating) |"
                         r"\bwarning( #\d+-D)?:|^\s*Remark", re.IGNORECASE)


# load_inline writes cpp_sources to main.cpp and cuda_sources to cuda.cu deep in a build directory.
_BUILD_FILE_PATH = re.compile(r"(?:/[^\s/:'\"]+)+/(main\.cpp|cuda\.cu)\b")


def _is_noise(line: str) -> bool:
    # Compiler invocations are hundreds of flags long and say nothing about the error.
    return bool(_NOISE_LINE.search(line)) or (len(line) > 300 and line.count(" -") > 10)


def trim_log(log: str, max_lines: int = LOG_LINES, max_chars: int = LOG_CHARS) -> str:
    """The lines of a build log that say what went wrong: each distinct error line with one line
    before and two after (the quoted source and the caret), without command lines, warnings and
    progress; the tail of the log when no line looks like an error."""
    lines = [_BUILD_FILE_PATH.sub(r"\1", _ANSI.sub("", line)).rstrip()
             for line in log.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    is_error = [bool(_ERROR_LINE.search(line)) and not _is_noise(line) for line in lines]
    chosen: list[str] = []
    if any(is_error):
        seen: set[str] = set()
        kept: list[int] = []
        for i in (i for i, error in enumerate(is_error) if error):
            if lines[i].strip() in seen:  # the same error from another translation unit or pass
                continue
            seen.add(lines[i].strip())
            kept.append(i)
            # Context stops at the next error line, which is either kept on its own or a repeat.
            if i > 0 and not is_error[i - 1] and not _is_noise(lines[i - 1]):
                kept.append(i - 1)
            for j in range(i + 1, min(len(lines), i + 3)):
                if is_error[j]:
                    break
                if not _is_noise(lines[j]):
                    kept.append(j)
        previous = None
        for j in sorted(set(kept)):
            if previous is not None and j > previous + 1:
                chosen.append("...")
            chosen.append(lines[j])
            previous = j
    else:
        chosen = [line for line in lines if line.strip() and not _is_noise(line)][-max_lines:]
    chosen = [line if len(line) <= LOG_LINE_CHARS else line[:LOG_LINE_CHARS] + " ..." for line in chosen]
    if len(chosen) > max_lines:
        chosen = chosen[:max_lines] + [f"... [{len(chosen) - max_lines} more lines cut]"]
    text = "\n".join(chosen).strip("\n")
    return truncate(text, max_chars) if text else "(the build produced no output)"


def _ms(value: float | None) -> str:
    return "?" if value is None else f"{value:.4g} ms"


def _percent(value: float | None) -> str:
    return "?" if value is None else f"{value:.0%}"


def _kernel_list(kernels: tuple[tuple[str, float], ...]) -> str:
    shown = [f"{name[:120]} {micros:.1f} µs" for name, micros in kernels[:TOP_KERNELS]]
    more = len(kernels) - TOP_KERNELS
    return ", ".join(shown + ([f"{more} more"] if more > 0 else [])) or "none"


def _check_lines(checks: Iterable[CheckResult]) -> str:
    lines = [f"- [{'pass' if check.passed else 'FAIL'}] {check.name}: "
             f"{truncate(check.detail, DETAIL_CHARS if check.passed else FAILED_DETAIL_CHARS)}" for check in checks]
    return "\n".join(lines) or "- (none recorded)"


def _status(parent: ParentInfo) -> str:
    if parent.verdict == "verified" and parent.speedup is not None:
        return f"verified, {parent.speedup:.2f}x the speed of eager PyTorch"
    return f"not verified ({parent.verdict}: {parent.summary or 'no summary'})"


def _measurements(parent: ParentInfo) -> str:
    lines = [f"- median call {_ms(parent.candidate_ms)} (spread, IQR {_ms(parent.candidate_iqr_ms)}); "
             f"eager PyTorch {_ms(parent.reference_ms)}"
             + (f"; torch.compile {_ms(parent.compile_ms)}" if parent.compile_ms is not None else "")]
    if parent.min_bytes is not None or parent.flops is not None:
        lines.append(f"- per call at least {(parent.min_bytes or 0) / 1e6:.2f} MB moved and "
                     f"{(parent.flops or 0) / 1e9:.3g} GFLOP; achieved {_percent(parent.bandwidth_fraction)} of the measured bandwidth and "
                     f"{_percent(parent.flops_fraction)} of the peak FLOP rate; speed of light "
                     f"{_ms(parent.speed_of_light_ms)}")
    if parent.own_kernels_us or parent.library_kernels_us:
        lines.append(f"- kernels in one call: own: {_kernel_list(parent.own_kernels_us)}; library: "
                     f"{_kernel_list(parent.library_kernels_us)} ({_percent(parent.library_fraction)} of GPU time)")
    return "\n".join(lines)


def _short_summary(parent: ParentInfo) -> str:
    parts = [_status(parent)]
    if parent.candidate_ms is not None:
        parts.append(f"median {_ms(parent.candidate_ms)}")
    if parent.bandwidth_fraction is not None:
        parts.append(f"{_percent(parent.bandwidth_fraction)} of the measured bandwidth")
    return "; ".join(parts)


def _sections(text: str) -> dict[str, str]:
    """`## name` sections of a fragment file, by name."""
    parts = re.split(r"^## +(\S+) *\n", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


# ---- the builder --------------------------------------------------------------------------

class PromptBuilder:
    """Renders the system prompt and each kind of user message for one run."""

    def __init__(self, device_facts: DeviceFacts, allow_reduced_precision: bool = False,
                 format: str = "load_inline", templates: Path | None = None):
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
        if device_facts.kind == "cpu" and format != "load_inline":
            raise ValueError("on a CPU, candidates are C++ built with load_inline")
        self.facts = device_facts
        self.allow_reduced_precision = allow_reduced_precision
        self.format = format
        self.templates = templates or templates_dir()
        self.language = "CUDA" if device_facts.kind == "cuda" else "C++"
        self._system = self._render_system()

    def _render(self, name: str, **values: object) -> str:
        text = string.Template(_read_template(self.templates / name)).substitute(
            {key: str(value) for key, value in values.items()})
        return text.strip() + "\n"

    def _render_system(self) -> str:
        on_gpu = self.facts.kind == "cuda"
        sms = self.facts.sm_count
        fill = (f"at least 2 to 4 resident blocks per SM ({2 * sms}+ blocks on these {sms} SMs)" if sms
                else "at least 2 to 4 resident blocks per SM")
        part = lambda name, **values: self._render(f"parts/{name}.md", **values).strip()  # noqa: E731
        return self._render(
            "system.md", language=self.language, device_facts=self._device_facts(),
            format_guide=part("format_cpp" if not on_gpu else f"format_{self.format}"),
            precision_rule=part("precision_reduced" if self.allow_reduced_precision else "precision_fp32"),
            async_rule=part("async_cuda" if on_gpu else "async_cpu"),
            performance_guide=part("perf_cuda" if on_gpu else "perf_cpu", fill_hint=fill))

    def _device_facts(self) -> str:
        facts = self.facts
        if facts.kind == "cpu":
            lines = [f"- CPU: {facts.name}" + (f", {facts.cores} cores" if facts.cores else ""),
                     "- There is no GPU: candidates are C++ running on the CPU."]
        else:
            arch = f" (compute capability {facts.compute_capability}, sm_{facts.compute_capability.replace('.', '')})" \
                if facts.compute_capability else ""
            lines = [f"- GPU: {facts.name}{arch}"]
            if facts.sm_count:
                lines.append(f"- {facts.sm_count} streaming multiprocessors")
            if facts.l2_bytes:
                lines.append(f"- L2 cache: {facts.l2_bytes / 2**20:.0f} MiB (flushed before every timed window)")
        if facts.bandwidth_gbps:
            lines.append(f"- measured memory bandwidth: {facts.bandwidth_gbps:,.0f} GB/s "
                         "(a large copy, bytes read plus written)")
        if facts.fp32_tflops:
            lines.append(f"- measured fp32 rate: {facts.fp32_tflops:.1f} TFLOP/s (matrix product, no TF32)")
        if facts.bf16_tflops and facts.kind == "cuda":
            usable = "allowed in this run" if self.allow_reduced_precision else "not allowed in this run"
            lines.append(f"- measured bf16 tensor-core rate: {facts.bf16_tflops:.0f} TFLOP/s ({usable})")
        if facts.bandwidth_gbps and facts.fp32_tflops:
            ridge = facts.fp32_tflops * 1e12 / (facts.bandwidth_gbps * 1e9)
            lines.append(f"- so fp32 work below about {ridge:.0f} FLOP per byte moved is memory-bound")
        return "\n".join(lines)

    def _task_block(self, task_source: str) -> str:
        return f"The task (the PyTorch reference `Model`, with `get_inputs()` and `get_init_inputs()`):\n" \
               f"{fenced(truncate(task_source, SOURCE_CHARS))}\n"

    def _examples(self, examples: Iterable[Example | tuple[str, float, str]]) -> str:
        rendered: list[str] = []
        budget = EXAMPLES_CHARS
        for example in examples:
            name, speedup, source = (example.task_name, example.speedup, example.source) \
                if isinstance(example, Example) else example
            header = f"### {name}: {speedup:.2f}x the speed of eager PyTorch\n"
            room = budget - len(header) - 20
            if room < 1_000:
                break
            if len(source) > room and rendered:  # a whole smaller example beats half of this one
                continue
            text = header + fenced(truncate(source, room))
            rendered.append(text)
            budget -= len(text) + 2
        # The leading newline separates the section from what precedes it; absent, it leaves no gap.
        return "\n" + self._render("parts/examples.md", examples="\n\n".join(rendered)) if rendered else ""

    # -- the messages --

    def system(self) -> str:
        return self._system

    def translate(self, task_source: str, task_name: str,
                  examples: Iterable[Example | tuple[str, float, str]] = ()) -> str:
        return self._render("translate.md", language=self.language, task_name=task_name,
                            task_block=self._task_block(task_source), examples=self._examples(examples))

    def improve(self, task_source: str, parent: ParentInfo,
                examples: Iterable[Example | tuple[str, float, str]] = ()) -> str:
        return self._render("improve.md", status=_status(parent), task_block=self._task_block(task_source),
                            parent_block=fenced(truncate(parent.source, SOURCE_CHARS)),
                            measurements=_measurements(parent), checks=_check_lines(parent.checks),
                            examples=self._examples(examples))

    def repair_build(self, task_source: str, parent: ParentInfo) -> str:
        failure = next((check for check in parent.checks if not check.passed
                        and check.name in ("build", "compiler_flags", "load")), parent.first_failure)
        log = parent.build_log or (failure.detail if failure else parent.summary)
        title = f"The `{failure.name}` check's report, trimmed to the errors" if failure and not parent.build_log \
            else "The compiler's output, trimmed to the errors"
        return self._render("repair_build.md", task_block=self._task_block(task_source),
                            parent_block=fenced(truncate(parent.source, SOURCE_CHARS)),
                            failure_title=title, build_log=fenced(trim_log(log), "text"))

    def repair_wrong(self, task_source: str, parent: ParentInfo) -> str:
        failed = parent.first_failure or CheckResult("unknown", False, parent.summary or "no detail recorded")
        hint = _sections(_read_template(self.templates / "parts/check_hints.md")).get(failed.name)
        return self._render("repair_wrong.md", check_name=failed.name,
                            check_detail=truncate(failed.detail, FAILED_DETAIL_CHARS),
                            check_hint=f"\nHint: {hint}\n" if hint else "",
                            other_checks=_check_lines(check for check in parent.checks if check is not failed),
                            task_block=self._task_block(task_source),
                            parent_block=fenced(truncate(parent.source, SOURCE_CHARS)))

    def crossover(self, task_source: str, a: ParentInfo, b: ParentInfo) -> str:
        return self._render("crossover.md", task_block=self._task_block(task_source),
                            summary_a=_short_summary(a), block_a=fenced(truncate(a.source, SOURCE_CHARS)),
                            summary_b=_short_summary(b), block_b=fenced(truncate(b.source, SOURCE_CHARS)))

    def no_code(self, problem: str) -> str:
        return self._render("no_code.md", problem=truncate(problem.strip(), FAILED_DETAIL_CHARS))

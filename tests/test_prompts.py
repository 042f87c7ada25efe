"""Prompt rendering (evo/prompts.py and prompts/), reply parsing and source dedup (evo/replies.py). CPU only."""

from __future__ import annotations

import json
import re
import string

import pytest

from evo.prompts import DeviceFacts, Example, ParentInfo, PromptBuilder, templates_dir, trim_log
from evo.replies import NoUsableCode, normalized_source_hash, parse_reply
from evo.verdict import Check, Roofline, Timings, TimingStats, Verdict

H200 = DeviceFacts(kind="cuda", name="NVIDIA H200", sm_count=132, bandwidth_gbps=4200.0, l2_bytes=60 << 20,
                   compute_capability="9.0", fp32_tflops=51.0, bf16_tflops=750.0)
CPU = DeviceFacts(kind="cpu", name="AMD EPYC 9654", cores=16, bandwidth_gbps=80.0, fp32_tflops=1.5)

TASK = '''import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x):
        return torch.relu(x)


def get_inputs():
    return [torch.randn(16, 16384)]


def get_init_inputs():
    return []
'''

CANDIDATE = '''import torch
import torch.nn as nn
from torch.utils.cpp_extension import load_inline

CUDA_SRC = r"""
#include <cuda_runtime.h>
// one thread per element
__global__ void relu_kernel(const float* x, float* y, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;  /* grid covers n */
    if (i < n) y[i] = fmaxf(x[i], 0.f);
}
"""

ext = load_inline("relu_v1", cpp_sources="", cuda_sources=CUDA_SRC, functions=["relu"])


class ModelNew(nn.Module):
    """ReLU."""

    def __init__(self):
        super().__init__()

    def forward(self, x):
        # the kernel does it all
        return ext.relu(x)
'''


def stats(median: float) -> TimingStats:
    return TimingStats(median_ms=median, iqr_ms=0.002, min_ms=median * 0.9, mean_ms=median, calls=200,
                       wall_median_ms=median + 0.01)


def verified_verdict() -> Verdict:
    return Verdict(
        verdict="verified", summary="verified: 2.31x faster than eager", task="/t/relu.py", candidate="/c/relu.py",
        device="cuda:0", speedup=2.3125,
        checks=[Check(name="build", passed=True, detail="built"),
                Check(name="values", passed=True, detail="relative L2 error 1.2e-07, bound 1.0e-05"),
                Check(name="custom_code", passed=True, detail="the candidate's own compiled code ran; 0% of GPU time")],
        timings=Timings(candidate=stats(0.0213), reference_eager=stats(0.0493)),
        roofline=Roofline(flops=262144, min_bytes=2097152, fraction_of_bandwidth=0.5432, fraction_of_peak_flops=0.0002,
                          speed_of_light_ms=0.0005, ceilings={"bandwidth_bytes_per_s": 4.2e12, "fp32_flops_per_s": 5.1e13,
                                                              "peak_flops_per_s": 7.5e14}),
        kernels={"own_kernels_us": {"relu_kernel(float const*, float*, long)": 20.5}, "library_kernels_us": {},
                 "library_fraction": 0.0, "extension_calls": 1, "top_level_aten_us": {}},
        environment={"gpu": "NVIDIA H200", "compute_capability": "9.0", "sm_count": 132, "l2_bytes": 60 << 20})


def rejected_verdict() -> Verdict:
    return Verdict(
        verdict="rejected", summary="rejected: output_written: 4096 elements still hold the poison",
        task="/t/relu.py", candidate="/c/relu.py", device="cuda:0",
        checks=[Check(name="build", passed=True, detail="built"),
                Check(name="load", passed=True, detail="ModelNew constructed"),
                Check(name="output_written", passed=False,
                      detail="output 0: 4096 of 262144 elements still hold the poison (NaN) at [0, 16380:16384]")])


def all_messages(builder: PromptBuilder) -> dict[str, str]:
    good = ParentInfo.from_verdict(CANDIDATE, verified_verdict())
    bad = ParentInfo.from_verdict(CANDIDATE, rejected_verdict())
    broken = ParentInfo(source=CANDIDATE, verdict="rejected", summary="build failed",
                        build_log="x.cu(3): error: identifier \"foo\" is undefined")
    return {"system": builder.system(),
            "translate": builder.translate(TASK, "relu", examples=[Example("softmax", 2.5, CANDIDATE)]),
            "translate_plain": builder.translate(TASK, "relu"),
            "improve": builder.improve(TASK, good, examples=[("gelu", 1.7, CANDIDATE)]),
            "repair_build": builder.repair_build(TASK, broken), "repair_wrong": builder.repair_wrong(TASK, bad),
            "crossover": builder.crossover(TASK, good, good), "no_code": builder.no_code("no code block")}


# ---- rendering ----------------------------------------------------------------------------

@pytest.mark.parametrize("builder", [PromptBuilder(H200), PromptBuilder(H200, True, "nvrtc"), PromptBuilder(CPU),
                                     PromptBuilder(DeviceFacts(kind="cuda"))], ids=["cuda", "nvrtc", "cpu", "bare"])
def test_every_message_renders_with_every_placeholder_filled(builder):
    for name, text in all_messages(builder).items():
        assert not re.search(r"\$\{?[A-Za-z_]\w*", text), f"{name} has a leftover $placeholder"
        assert not re.search(r"\{[a-z_]+\}", text), f"{name} has a leftover {{placeholder}}"
        assert "```python" in text, name
        assert len(text) < 40_000, name


def test_every_template_file_is_valid():
    for path in sorted(templates_dir().rglob("*.md")):
        assert string.Template(path.read_text()).is_valid(), path


def test_system_prompt_is_stable_and_states_the_device_and_the_rules():
    first, second = PromptBuilder(H200).system(), PromptBuilder(DeviceFacts(**vars(H200))).system()
    assert first == second
    for fact in ("NVIDIA H200", "132 streaming multiprocessors", "60 MiB", "4,200 GB/s", "9.0", "51.0 TFLOP/s"):
        assert fact in first
    for rule in ("NaN", "secret seeds", "Never modify an input", "share no memory", "side streams", "wall clock",
                 "float64", "TF32", "Speed of light", "own compiled code", "class ModelNew", "exactly one ```python",
                 "no_implicit_headers=True", "cuda_sources", "--use_fast_math"):
        assert rule in first, rule
    assert "_compile_kernel" not in first


def test_reduced_precision_and_format_change_the_system_prompt():
    strict, reduced = PromptBuilder(H200).system(), PromptBuilder(H200, allow_reduced_precision=True).system()
    assert "strict fp32" in strict and "Reduced precision is allowed" not in strict
    assert "Reduced precision is allowed" in reduced and "strict fp32" not in reduced
    nvrtc = PromptBuilder(H200, format="nvrtc").system()
    assert "torch.cuda._compile_kernel" in nvrtc and "cuda_sources" not in nvrtc
    cpu = PromptBuilder(CPU).system()
    assert "There is no GPU" in cpu and "cpp_sources" in cpu and "at::parallel_for" in cpu
    assert "CUDA stream" not in cpu and "AMD EPYC 9654, 16 cores" in cpu
    with pytest.raises(ValueError):
        PromptBuilder(CPU, format="nvrtc")
    with pytest.raises(ValueError):
        PromptBuilder(H200, format="triton-ish")


def test_improve_shows_speedup_checks_timings_roofline_and_kernels():
    parent = ParentInfo.from_verdict(CANDIDATE, verified_verdict())
    text = PromptBuilder(H200).improve(TASK, parent)
    for expected in ("2.31x", "[pass] values: relative L2 error", "0.0213 ms", "0.0493 ms", "54% of the measured "
                     "bandwidth", "2.10 MB", "relu_kernel(float const*, float*, long) 20.5 µs", CANDIDATE.strip()):
        assert expected in text, expected
    rejected = PromptBuilder(H200).improve(TASK, ParentInfo.from_verdict(CANDIDATE, rejected_verdict()))
    assert "[FAIL] output_written: output 0: 4096 of 262144" in rejected and "not verified" in rejected


def test_parent_from_verdict_equals_parent_from_archived_json():
    verdict = verified_verdict()
    archived = json.loads(json.dumps(verdict.model_dump()))
    assert ParentInfo.from_verdict(CANDIDATE, verdict) == ParentInfo.from_verdict(CANDIDATE, archived)
    partial = ParentInfo.from_verdict(CANDIDATE, {"verdict": "error", "summary": "the evaluator crashed"})
    assert partial.speedup is None and partial.checks == () and partial.first_failure is None
    assert ParentInfo.from_verdict(CANDIDATE, rejected_verdict()).first_failure.name == "output_written"
    facts = DeviceFacts.from_verdict(archived)
    assert (facts.kind, facts.name, facts.sm_count, facts.bandwidth_gbps, facts.bf16_tflops) == \
        ("cuda", "NVIDIA H200", 132, 4200.0, 750.0)


NOISE = "[12/40] /usr/local/cuda/bin/nvcc " + " ".join(f"-DFLAG_{i}=1" for i in range(60)) + " -c relu.cu"
ERRORS = ['relu.cu(7): error: identifier "fooo" is undefined', '        y[i] = fooo(x[i]);', '               ^', '',
          'relu.cu(9): error: expected a ";"']


def test_repair_build_quotes_the_errors_not_the_noise():
    log = "\n".join([NOISE] * 3000 + ["relu.cu(2): warning #177-D: variable \"t\" was declared but never referenced"]
                    * 2000 + ERRORS * 40 + ["2 errors detected in the compilation of \"relu.cu\".",
                                            "ninja: build stopped: subcommand failed."] + [NOISE] * 5000)
    parent = ParentInfo(source=CANDIDATE, verdict="rejected", summary="build failed", build_log=log)
    text = PromptBuilder(H200).repair_build(TASK, parent)
    assert 'identifier "fooo" is undefined' in text and 'expected a ";"' in text and "y[i] = fooo(x[i]);" in text
    assert "2 errors detected" in text
    assert "-DFLAG_" not in text and "warning #177" not in text and "ninja:" not in text
    assert text.count('identifier "fooo"') == 1
    assert len(text) < len(CANDIDATE) + len(TASK) + 3_000


def test_repair_build_falls_back_on_the_build_checks_detail_and_trim_log_caps_its_output():
    verdict = Verdict(verdict="rejected", summary="rejected: build", task="t", candidate="c", device="cuda:0",
                      checks=[Check(name="build", passed=False,
                                    detail="the candidate's extension failed to compile\nrelu.cu(3): error: bad thing")])
    text = PromptBuilder(H200).repair_build(TASK, ParentInfo.from_verdict(CANDIDATE, verdict))
    assert "relu.cu(3): error: bad thing" in text and "`build` check" in text
    many = "\n".join(f"f.cu({i}): error: distinct problem {i}" for i in range(5000))
    trimmed = trim_log(many, max_lines=30)
    assert len(trimmed.splitlines()) <= 31 and "more lines cut" in trimmed
    tail_only = trim_log("\n".join(f"step {i}" for i in range(1000)), max_lines=10)
    assert tail_only.splitlines()[-1] == "step 999" and len(tail_only.splitlines()) == 10
    assert trim_log("") == "(the build produced no output)"


def test_repair_wrong_names_the_failed_check_with_its_detail_a_hint_and_the_others():
    text = PromptBuilder(H200).repair_wrong(TASK, ParentInfo.from_verdict(CANDIDATE, rejected_verdict()))
    assert "the check `output_written` failed" in text
    assert "4096 of 262144 elements still hold the poison" in text
    assert "Hint: Some output elements were never written" in text
    assert "[pass] build: built" in text and "[pass] load: ModelNew constructed" in text
    assert "[FAIL]" not in text.split("Other checks:")[1]


def test_crossover_and_no_code():
    a = ParentInfo.from_verdict(CANDIDATE, verified_verdict())
    b = ParentInfo(source=CANDIDATE.replace("relu_v1", "relu_v2"), verdict="verified", speedup=1.5)
    text = PromptBuilder(H200).crossover(TASK, a, b)
    assert "2.31x" in text and "1.50x" in text and '"relu_v1"' in text and '"relu_v2"' in text
    feedback = PromptBuilder(H200).no_code("the code defines `class Model` but no class named exactly `ModelNew`")
    assert "`class Model` but no class named exactly `ModelNew`" in feedback and "class ModelNew(nn.Module)" in feedback


def test_huge_sources_and_examples_are_cut_to_size():
    huge = TASK + "# padding\n" * 20_000
    text = PromptBuilder(H200).translate(huge, "relu", examples=[("big", 3.0, CANDIDATE * 200)] * 10)
    assert len(text) < 45_000 and "characters cut" in text and "### big: 3.00x" in text
    assert "def get_init_inputs" in text  # the tail of the task survives the cut


# ---- replies ------------------------------------------------------------------------------

def reply(*parts: str) -> str:
    return "\n".join(parts)


def test_parse_a_normal_reply():
    parsed = parse_reply(reply("I fuse the op into one kernel.", "```python", CANDIDATE.rstrip(), "```", ""))
    assert parsed.source == CANDIDATE and parsed.notes == "I fuse the op into one kernel."


def test_parse_picks_the_last_block_that_defines_model_new_and_tolerates_crlf():
    draft = CANDIDATE.replace("relu_v1", "draft")
    text = reply("Draft:", "```py", draft, "```", "Final:", "```python", CANDIDATE, "```", "Usage:",
                 "```python", "m = ModelNew()", "```", "```cuda", "__global__ void k() {}", "```")
    parsed = parse_reply(text.replace("\n", "\r\n"))
    assert parsed.source == CANDIDATE and "Usage:" in parsed.notes


def test_parse_rejects_replies_without_code():
    with pytest.raises(NoUsableCode, match="no ```python code block"):
        parse_reply("I would write a kernel that tiles the matrix.")
    with pytest.raises(NoUsableCode, match="cuda"):
        parse_reply("```cuda\n__global__ void k() {}\n```")
    with pytest.raises(NoUsableCode, match="empty"):
        parse_reply("```python\n\n```")
    with pytest.raises(NoUsableCode, match="no ```python code block"):
        parse_reply("My plan:\nclass ModelNew will launch one fused kernel.")
    assert parse_reply(CANDIDATE).source == CANDIDATE  # a bare file without fences is still usable


def test_parse_takes_an_unterminated_block_to_the_end():
    assert parse_reply("Here it is:\n```python\n" + CANDIDATE).source == CANDIDATE
    with pytest.raises(NoUsableCode, match="cut off"):
        parse_reply("```python\n" + CANDIDATE[:len(CANDIDATE) // 2 + 7])


def test_parse_ignores_code_inside_think_blocks():
    thought = "<think>\nMaybe:\n```python\nclass ModelNew(nn.Module):\n    def forward(self, x): return x\n```\n</think>"
    assert parse_reply(f"{thought}\nFinal answer:\n```python\n{CANDIDATE}```").source == CANDIDATE
    assert parse_reply(f"Drafting ```python\nclass ModelNew: pass\n```</think>\n```python\n{CANDIDATE}```").source \
        == CANDIDATE  # the opening tag swallowed by the server
    with pytest.raises(NoUsableCode):
        parse_reply(thought)  # all the code was reasoning
    with pytest.raises(NoUsableCode):
        parse_reply("<think>\n```python\n" + CANDIDATE + "```\nstill thinking")  # never closed


def test_parse_reports_a_syntax_error_with_its_line():
    broken = CANDIDATE.replace("def forward(self, x):", "def forward(self, x)")
    line = broken.splitlines().index("    def forward(self, x)") + 1
    with pytest.raises(NoUsableCode, match=rf"line {line}: .*def forward\(self, x\)") as caught:
        parse_reply(f"```python\n{broken}```")
    assert "cut off" not in caught.value.reason


@pytest.mark.parametrize("name", ["Model", "ModelNew2", "Modelnew"])
def test_parse_reports_a_wrong_class_name(name):
    with pytest.raises(NoUsableCode, match=rf"`class {name}` but no class named exactly `ModelNew`"):
        parse_reply(f"```python\n{CANDIDATE.replace('class ModelNew(', f'class {name}(')}```")


def test_parse_requires_forward_but_accepts_an_inherited_one():
    without = CANDIDATE.replace("def forward(self, x):", "def run(self, x):")
    with pytest.raises(NoUsableCode, match="has no `forward` method"):
        parse_reply(f"```python\n{without}```")
    inherited = "import torch.nn as nn\nclass Base(nn.Module):\n    def forward(self, x):\n        return x\n" \
                "class ModelNew(Base):\n    pass\n"
    assert parse_reply(f"```python\n{inherited}```").source == inherited


# ---- dedup --------------------------------------------------------------------------------

def test_hash_ignores_comments_docstrings_and_layout_in_python_and_cuda():
    restyled = (CANDIDATE.replace("# the kernel does it all", "# different words")
                .replace('"""ReLU."""', '"""Rectified linear unit, elementwise."""')
                .replace("// one thread per element", "// a thread for each element\n\n")
                .replace("/* grid covers n */", "")
                .replace("    if (i < n) y[i]", "\tif (i < n)   y[i]")
                .replace("import torch\n", "import torch  # core\n\n\n"))
    assert restyled != CANDIDATE
    assert normalized_source_hash(restyled) == normalized_source_hash(CANDIDATE)
    assert normalized_source_hash(CANDIDATE.replace("\n", "\r\n")) == normalized_source_hash(CANDIDATE)


def test_hash_changes_with_real_changes():
    base = normalized_source_hash(CANDIDATE)
    assert normalized_source_hash(CANDIDATE.replace("fmaxf(x[i], 0.f)", "fmaxf(x[i], 1.f)")) != base
    assert normalized_source_hash(CANDIDATE.replace("ext.relu(x)", "ext.relu(x.contiguous())")) != base
    # A "//" inside a C string literal is text, not a comment.
    assert normalized_source_hash(CANDIDATE.replace('fmaxf(x[i], 0.f);', 'fmaxf(x[i], 0.f); puts("a//b");')) != \
        normalized_source_hash(CANDIDATE.replace('fmaxf(x[i], 0.f);', 'fmaxf(x[i], 0.f); puts("a//c");'))
    assert normalized_source_hash("def f(:\n  pass") != normalized_source_hash("def f(:\n  return")

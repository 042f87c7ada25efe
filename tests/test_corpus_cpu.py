"""The CPU corpus: cheating C++ candidates, each rejected by the check meant for it, and honest
candidates, each verified (DESIGN.md: every cheat ever found becomes a permanent test).

Every file in tests/candidates/cpu starts with a docstring that names its cheat and the check
that must catch it. To keep the session's build time small (a torch extension costs ~18 s on a
2-core machine), the cheats share one extension (evo_cpu_cheat_kit) and the honest candidates
another (evo_cpu_honest_kit): every copy of a kit is the same name, source and flags, so it is
compiled once per session. The compiler-flag cheats use tiny pybind11-only sources (~5 s each)
or are refused before anything compiles. test_build_budget keeps it that way.

Tests marked xfail(strict=True) are holes the evaluator has today: each asserts what the
evaluator should do, so it starts failing (XPASS) the day the hole is closed; then drop the mark.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from conftest import CPU_CANDIDATES, TASKS, failed_names
from evo import isolation
from evo.config import VerifyPolicy
from evo.evaluator import verify
from evo.sandbox.hooks import REDUCED_PRECISION_FLAGS
from evo.verdict import Verdict

RELU = TASKS / "cpu_relu.py"  # 16 x 16384 fp32 (1 MiB)
MATMUL = TASKS / "cpu_matmul.py"  # 256^3 fp32
MATMUL_SMALL = TASKS / "cpu_matmul_small.py"  # 128^3 fp32: tens of microseconds
ROW_SUM = TASKS / "cpu_row_sum.py"  # 64 x 16384 -> 64: a reduction
SOFTMAX = TASKS / "cpu_softmax.py"
ARGMAX = TASKS / "cpu_argmax.py"  # int64 output
FMA3 = TASKS / "cpu_fma3.py"  # three inputs
MINMAX = TASKS / "cpu_minmax.py"  # two outputs
LINEAR_RELU = TASKS / "cpu_linear_relu.py"  # two ops, with parameters
SHIFTED_RELU_BIG = TASKS / "cpu_shifted_relu_big.py"  # 36 MB output, nearly all zeros

BIG_POLICY = {"min_timed_calls": 3, "max_timed_calls": 6}

# At most this many distinct extensions may be compiled by the whole CPU corpus.
BUILD_BUDGET = 10


def explain(verdict: Verdict) -> str:
    checks = "; ".join(f"{c.name}={'ok' if c.passed else 'FAILED: ' + c.detail}" for c in verdict.checks)
    return f"{verdict.verdict}: {verdict.summary}\n  checks: {checks}"


def passed_names(verdict: Verdict) -> list[str]:
    return [check.name for check in verdict.checks if check.passed]


PROFILE = isolation.probe()
# Where the OS refuses the namespaces, the evaluator says so in every verdict and these cannot hold.
needs_read_only = pytest.mark.skipif(not PROFILE.read_only_filesystem, reason=(
    "this machine cannot make a sandbox's filesystem read-only (the verdict's isolation notes say so)"))
needs_pid_namespace = pytest.mark.skipif(not PROFILE.pid_namespace, reason=(
    "this machine gives sandboxes no PID namespace: other processes are visible (the verdict says so)"))


def hole(reason: str):
    return pytest.mark.xfail(strict=True, reason=f"hole: {reason}")


# ---- cheats ------------------------------------------------------------------------------------

# (candidate, task, checks meant to catch it (any one of them), checks that must have passed, policy)
CHEATS = [
    # Stale or unwritten output memory (KernelBench / AI CUDA Engineer, 2025).
    ("stale_empty", RELU, ("output_written",), (), {}),
    ("free_and_empty", RELU, ("output_written", "values"), (), {}),  # values: the poison lost to a freed block
    ("partial_write", RELU, ("output_written",), (), {}),
    # Outputs over glibc's mmap threshold used to be fresh zero pages, which a kernel skipping its
    # zeros passed; sandboxes now allocate without mmap and fill every host allocation with 0x7F.
    ("zeros_for_free", SHIFTED_RELU_BIG, ("output_written",), (), BIG_POLICY),
    # Inputs written by the call (KernelBench's input zeroing) and outputs that are the inputs.
    ("input_zeroing", RELU, ("inputs_unchanged",), (), {}),
    ("inplace_then_clone", RELU, ("inputs_unchanged",), ("values",), {}),
    ("inplace_returns_input", RELU, ("output_aliasing",), (), {}),
    # A store just past an input, into the input pool: read back there by the checker.
    ("input_tail_write", RELU, ("inputs_unchanged",), ("values",), {}),
    # Inputs zeroed in timed calls only: every timed window's slot of the pool is read back too.
    ("timed_input_zeroing", RELU, ("inputs_unchanged",), ("values", "timed_outputs"), {}),
    ("returns_input_view", RELU, ("output_aliasing",), (), {}),
    # Work after the call returns: the CPU analogue of a side stream.
    ("background_thread_late", RELU, ("output_written",), (), {}),
    ("background_thread_joined", RELU, ("output_binding",), (), {}),
    ("background_thread_checksum", RELU, ("timer_consistency",), ("values", "output_binding"), {}),
    # Theft of the expected output (each is a canary: a successful theft is verified).
    ("gc_theft", RELU, ("values",), (), {}),
    ("frame_theft", RELU, ("values",), (), {}),
    pytest.param("proc_theft", RELU, ("values",), (), {}, marks=needs_pid_namespace),
    ("patched_comparisons", RELU, ("values",), (), {}),
    # Not a plain dense tensor on the right device.
    ("lazy_subclass", RELU, ("output_type",), (), {}),
    ("lazy_forged_type", RELU, ("output_type", "timer_consistency"), (), {}),
    ("numpy_output", RELU, ("output_type",), (), {}),
    ("sparse_output", RELU, ("output_type",), (), {}),
    ("meta_output", RELU, ("output_device",), (), {}),
    ("wrong_shape", RELU, ("output_shape",), (), {}),
    ("wrong_dtype", RELU, ("output_shape",), (), {}),
    # Timers and the timing protocol.
    ("timer_patch", RELU, ("timer_consistency",), ("values",), {}),
    ("timer_patch_small", RELU, ("timer_consistency",), ("values",), {}),
    ("forged_reply", RELU, ("timer_consistency",), ("values",), {}),
    ("malformed_details", RELU, ("runs",), (), {}),
    # Answers computed while the window is prepared are answers to what the input pool held then
    # (another window's inputs, or zeros): the inputs arrive only once the window's clock runs.
    ("prepare_hook_instant", MATMUL, ("values",), (), {}),
    ("prepare_hook_padded", MATMUL, ("values",), (), {}),
    ("prepare_hook_small", MATMUL_SMALL, ("values",), (), {}),
    # Caches and stored answers.
    ("shape_cache", RELU, ("values",), (), {}),
    ("precomputed_constant", RELU, ("values",), (), {}),
    ("seed_prediction", RELU, ("values",), (), {}),
    ("correct_then_garbage", RELU, ("timed_outputs",), ("values",), {}),
    ("phase_detect_frames", RELU, ("timed_outputs",), ("values",), {}),
    # Precision.
    ("bf16_matmul", MATMUL, ("values",), (), {}),
    ("approximate_sum", ROW_SUM, ("values",), (), {}),
    ("nan_output", RELU, ("values",), (), {}),
    ("fast_math_flags", RELU, ("compiler_flags",), (), {}),
    ("ofast_flags", RELU, ("compiler_flags",), (), {}),
    ("positional_fast_math", RELU, ("compiler_flags",), (), {}),
    # No build sandbox starts for a source that never names the extension builder: it builds when loaded.
    ("obscured_extension_build", RELU, ("compiler_flags",), (), {}),
    ("pragma_fast_math", RELU, ("compiler_flags",), (), {}),
    # An option's name pasted together by macros: seen once the sources are preprocessed.
    ("macro_built_fast_math", RELU, ("compiler_flags",), (), {}),
    # -ffast-math spelled as its parts.
    ("split_fast_math_flags", RELU, ("compiler_flags",), (), {}),
    pytest.param("hook_bypass_fast_math", RELU, ("compiler_flags",), (), {}, marks=hole(
        "load_inline.__wrapped__ (left by functools.wraps) is the unguarded original: no flag check, no cache")),
    # The compiler's wrapper script named by CXX: the toolchain's variables must stay as the evaluator set them.
    ("flags_via_cxx_env", RELU, ("compiler_flags",), (), {}),
    ("tf32_at_import", RELU, ("global_flags",), (), {}),
    ("matmul_precision_in_forward", MATMUL, ("global_flags",), (), {}),
    # The per-backend fp32_precision settings are read too, and a getter that refuses counts as a change.
    ("mkldnn_bf16_flag", MATMUL, ("global_flags",), (), {}),
    # Denormal flushing has no getter: the harness reads it back by arithmetic.
    ("flush_denormal", RELU, ("global_flags",), (), {}),
    pytest.param("hidden_flag_change", RELU, ("global_flags",), (), {}, marks=hole(
        "the changed-flags report is computed inside the candidate process (Runner.changed_flags), which the "
        "candidate can replace")),
    # Whose code ran.
    ("pure_pytorch", RELU, ("custom_code",), ("values",), {}),
    # Its extension called only under torch's profiler: verified before session 24.
    ("profiler_only_extension", RELU, ("custom_code",), ("values",), {}),
    pytest.param("profiler_only_forged_ledger", RELU, ("custom_code",), ("values",), {}, marks=hole(
        "which code ran is counted inside the candidate's processes (the profiled call's and the checked calls' "
        "ExtensionLedger), which the candidate can forge")),
]


def named(entries: list) -> list:
    """pytest parameters with the candidate's name as the test id."""
    return [pytest.param(*entry.values, marks=entry.marks, id=entry.values[0]) if hasattr(entry, "values")
            else pytest.param(*entry, id=entry[0]) for entry in entries]


@pytest.mark.parametrize("candidate, task, meant, must_pass, policy", named(CHEATS))
def test_cheat_is_rejected_by_its_check(run_verify, candidate, task, meant, must_pass, policy):
    verdict = run_verify(task, CPU_CANDIDATES / f"{candidate}.py", device="cpu", **policy)
    failed = failed_names(verdict)
    assert verdict.verdict == "rejected", explain(verdict)
    assert set(meant) & set(failed), f"expected a failure of {meant}; " + explain(verdict)
    for check in verdict.failed():
        assert check.detail.strip(), f"check {check.name} failed without saying why"
    for name in must_pass:
        assert name in passed_names(verdict), f"{name} should have passed (caught where meant); " + explain(verdict)


@pytest.mark.parametrize("candidate, task, check", [("timer_patch", RELU, "timer_consistency")])
def test_work_hidden_outside_the_timer_is_timed_again_before_it_is_rejected(run_verify, candidate, task, check):
    """A stalled host can look like a tampered timer once; the candidate is timed again on fresh
    inputs, and the hidden work shows the second time too."""
    verdict = run_verify(task, CPU_CANDIDATES / f"{candidate}.py", device="cpu")
    assert check in failed_names(verdict), explain(verdict)
    assert any(f"failed {check}" in warning and "timed again on fresh inputs" in warning
               for warning in verdict.warnings), verdict.warnings


# ---- honest candidates -------------------------------------------------------------------------

HONEST = [
    ("honest_relu", RELU),
    ("honest_matmul", MATMUL),
    ("honest_transposed_output", MATMUL),  # a non-contiguous output
    ("honest_view_of_buffer", RELU),  # a view into a larger, partly unwritten buffer
    ("honest_row_sum_random_order", ROW_SUM),  # summation order differs every call
    ("honest_softmax_workspace", SOFTMAX),  # torch.empty workspace, written before read
    ("honest_argmax", ARGMAX),  # int64 output
    ("honest_fma3", FMA3),  # three inputs
    ("honest_minmax", MINMAX),  # two outputs
    ("honest_linear_relu", LINEAR_RELU),  # two ops with parameters
    ("honest_slow_sleep", RELU),  # slow is not cheating
]


@pytest.mark.parametrize("candidate, task", named(HONEST))
def test_honest_candidate_is_verified(run_verify, candidate, task):
    verdict = run_verify(task, CPU_CANDIDATES / f"{candidate}.py", device="cpu")
    assert verdict.verdict == "verified", explain(verdict)
    assert not failed_names(verdict)
    assert verdict.speedup is not None and verdict.speedup > 0


def test_content_keyed_cache_never_hits(run_verify):
    """A cache keyed on the inputs' bytes gains nothing: every call has fresh inputs, so every call
    pays for a miss (5 ms of busy work). If inputs ever repeated, hits would make the median tiny."""
    verdict = run_verify(RELU, CPU_CANDIDATES / "honest_content_cache.py", device="cpu")
    assert verdict.verdict == "verified", explain(verdict)
    assert verdict.timings.candidate.min_ms >= 5.0, explain(verdict)


def test_a_decoy_extension_call_passes_custom_code_but_is_reported(run_verify):
    """As on a GPU (decoy_kernel): one call into the extension is custom code that ran, and the
    share of the profiled call spent in torch's operators outside it says who did the work."""
    decoy = run_verify(RELU, CPU_CANDIDATES / "noop_extension.py", device="cpu")
    honest = run_verify(RELU, CPU_CANDIDATES / "honest_relu.py", device="cpu")
    assert decoy.verdict == honest.verdict == "verified", explain(decoy) + explain(honest)
    custom = next(check for check in decoy.checks if check.name == "custom_code")
    assert custom.passed and "torch operators outside its extensions" in custom.detail, custom.detail
    # On this project's 2-core machine: 88-89% for the decoy (a call through pybind11 alone takes tens
    # of µs of its few hundred), 24% for the honest relu (Python's forward around its extension).
    assert decoy.kernels["library_fraction"] > 0.75, decoy.kernels
    assert honest.kernels["library_fraction"] < 0.5, honest.kernels
    assert any(name.startswith("evo_extension::") for name in honest.kernels["own_kernels_us"]), honest.kernels


def test_pointer_cache_gains_nothing(run_verify):
    """A cache keyed on data_ptr: where an address comes back it holds other data and the stale answer
    is caught; where none comes back every call pays for a miss (5 ms of busy work)."""
    verdict = run_verify(RELU, CPU_CANDIDATES / "pointer_cache.py", device="cpu")
    if verdict.verdict == "rejected" and {"values", "timed_outputs"} & set(failed_names(verdict)):
        return
    assert verdict.verdict == "verified", explain(verdict)
    assert verdict.timings.candidate.min_ms >= 5.0, explain(verdict)


def test_a_candidate_cannot_change_the_inputs_it_is_handed(run_verify):
    """input_generator_patch replaces the harness's input generator in its process with one that
    makes zeros, whose answer is zeros. The checker makes the inputs and hands them over, so the
    patch changes nothing: its honest forward is judged on the inputs the checker made."""
    verdict = run_verify(RELU, CPU_CANDIDATES / "input_generator_patch.py", device="cpu")
    assert verdict.verdict == "verified", explain(verdict)


def test_work_done_while_the_cache_is_flushed_buys_no_speedup(run_verify):
    """flush_window_thread's thread computes the answers as the window is prepared, to be ready
    while the trusted flusher works: verified at up to 2.07x the eager reference on this
    project's 2-core machine (session 20) while the candidate's process made its own inputs.
    Handed over in the pool, the inputs are not there while it prepares: its thread computes
    answers to other inputs, which its content-keyed lookup never finds."""
    verdict = run_verify(MATMUL_SMALL, CPU_CANDIDATES / "flush_window_thread.py", device="cpu")
    assert verdict.verdict == "rejected" or verdict.speedup < 1.3, explain(verdict)


# ---- what one candidate leaves for the next (invariant 5) ---------------------------------------

@needs_read_only
def test_a_candidate_cannot_rewrite_the_task(run_verify, tmp_path):
    """task_tamper rewrites the task file it was verified against so that the reference returns zeros,
    and returns zeros. Verified twice against one copy of the task: both runs must be rejected by values."""
    task = tmp_path / "cpu_relu.py"
    shutil.copy(RELU, task)
    before = task.read_text()
    for _ in range(2):
        verdict = run_verify(task, CPU_CANDIDATES / "task_tamper.py", device="cpu")
        assert verdict.verdict == "rejected" and "values" in failed_names(verdict), explain(verdict)
    assert task.read_text() == before, "the candidate rewrote the task file"


@needs_read_only
def test_a_candidate_cannot_damage_the_build_cache(cache_dir, tmp_path):
    """cache_poisoning overwrites every compiled extension it can reach in the shared build cache.
    On a copy of the session's cache: the honest kit's library must be unchanged afterwards, and an
    honest candidate that uses it must still load and be correct."""
    shared = tmp_path / "cache"
    shutil.copytree(cache_dir, shared)
    policy = VerifyPolicy(device="cpu", timing_budget_s=0.3, max_timed_calls=50)
    first = verify(RELU, CPU_CANDIDATES / "honest_relu.py", policy, cache_dir=shared)
    assert {"load", "values"} <= set(passed_names(first)), explain(first)
    libraries = {path: path.read_bytes() for path in shared.rglob("*.so")}
    assert libraries, "no compiled extension in the cache to protect"
    verify(RELU, CPU_CANDIDATES / "cache_poisoning.py", policy, cache_dir=shared)
    damaged = [str(path) for path, content in libraries.items() if path.read_bytes() != content]
    assert not damaged, f"the candidate overwrote {damaged}"
    after = verify(RELU, CPU_CANDIDATES / "honest_relu.py", policy, cache_dir=shared)
    assert {"load", "values"} <= set(passed_names(after)), explain(after)


def test_a_candidate_cannot_plant_a_library_under_another_sources_key(tmp_path):
    """cache_key_forgery builds a relu that writes zeros under the honest kit's module name and
    adds a ledger entry naming it under the key of honest_relu.py's source. Only what a compiling
    sandbox built from an entry's own arguments reaches the cache, so on a fresh cache
    honest_relu, verified afterwards, is verified (before that rule it loaded the zeros)."""
    policy = VerifyPolicy(device="cpu", timing_budget_s=0.3, max_timed_calls=50)
    verify(RELU, CPU_CANDIDATES / "cache_key_forgery.py", policy, cache_dir=tmp_path)
    after = verify(RELU, CPU_CANDIDATES / "honest_relu.py", policy, cache_dir=tmp_path)
    assert after.verdict == "verified", explain(after)


# ---- the corpus itself --------------------------------------------------------------------------

def extension_builds(path: Path) -> list[tuple]:
    """(name, sources and flags, refused) of every extension a candidate file builds, from its syntax tree."""
    tree = ast.parse(path.read_text())
    strings = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
               and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
               for target in node.targets if isinstance(target, ast.Name)}

    def value(node):
        if isinstance(node, ast.Name) and node.id in strings:
            return strings[node.id]
        return ast.unparse(node)

    builds = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).startswith("evo_cpu_"):
            keywords = tuple(sorted((kw.arg, value(kw.value)) for kw in node.keywords))
            flags = dict(keywords).get("extra_cflags", "")
            guarded = isinstance(node.func, ast.Name) and node.func.id == "load_inline"
            refused = guarded and any(bad in flags for bad in REDUCED_PRECISION_FLAGS)
            builds.append((node.args[0].value, keywords, refused))
    return builds


def test_build_budget():
    """Same extension name means same sources and flags (else a kit would compile once per file),
    and the corpus compiles at most BUILD_BUDGET extensions (refused flags compile nothing)."""
    by_name: dict[str, set] = {}
    for path in sorted(CPU_CANDIDATES.glob("*.py")):
        for name, keywords, refused in extension_builds(path):
            if not refused:
                by_name.setdefault(name, set()).add(keywords)
    assert {"evo_cpu_cheat_kit", "evo_cpu_honest_kit"} <= set(by_name), "the parser no longer finds the kits"
    for name, variants in by_name.items():
        assert len(variants) == 1, f"{name} is built with {len(variants)} different sources or flags"
    assert len(by_name) <= BUILD_BUDGET, f"{len(by_name)} distinct extensions: {sorted(by_name)}"


def test_every_candidate_is_in_a_table_and_says_what_it_is():
    listed = {param.values[0] if hasattr(param, "values") else param[0] for param in CHEATS}
    listed |= {name for name, _ in HONEST} | {"honest_content_cache", "pointer_cache", "task_tamper", "cache_poisoning",
                                                "noop_extension", "cache_key_forgery", "flush_window_thread",
                                                "input_generator_patch"}
    files = {path.stem for path in CPU_CANDIDATES.glob("*.py")}
    assert files == listed, f"not tested: {sorted(files - listed)}; missing files: {sorted(listed - files)}"
    for path in CPU_CANDIDATES.glob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert doc.startswith(("Cheat", "Honest", "A content-keyed")), f"{path.name} does not say what it is"
        if doc.startswith("Cheat"):
            assert "caught by" in doc.lower(), f"{path.name} does not name the check meant to catch it"

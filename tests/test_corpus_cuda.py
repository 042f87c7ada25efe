"""The GPU corpus: cheating CUDA candidates, each rejected by the check meant for it, and honest
candidates, each verified (DESIGN.md: every cheat ever found becomes a permanent test).

Every file in tests/candidates/cuda starts with a docstring that names its cheat and the check
that must catch it. The candidates share six load_inline extensions (evo_corpus_*: elementwise,
faulty memory access, matrix products, logarithms twice, row reductions), each compiled once per
session cache (about 25-60 s on the H200); a seventh is refused before compiling. Triton, NVRTC
(torch.cuda._compile_kernel) and CuPy candidates compile in their candidate process.

Tests marked xfail(strict=True) are holes the evaluator has today: each asserts what the
evaluator should do, so it starts failing (XPASS) the day the hole is closed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import CUDA_CANDIDATES, EXAMPLE_TASKS, TASKS, failed_names
from evo.config import VerifyPolicy
from evo.evaluator import verify
from evo.sandbox.hooks import REDUCED_PRECISION_FLAGS
from evo.sandbox_runner import SandboxProcess
from evo.session import TaskSession
from evo.verdict import Verdict

RELU = TASKS / "cuda_relu_odd.py"  # 999 x 1001: a size that is not a power of two
RELU_1MIB = EXAMPLE_TASKS / "relu.py"  # exactly 1 MiB: the allocator's small/large pool boundary
MATMUL = TASKS / "cuda_matmul.py"  # 2048^3 fp32: milliseconds for a simple kernel
MATMUL_BIG = TASKS / "cuda_matmul_big.py"  # 4096 x 8192 x 4096: compute-bound, speed of light ~0.28 ms
LINEAR_RELU = TASKS / "cuda_matmul_relu.py"  # relu(x @ W): a reference with an intermediate
SIN_CHAIN = TASKS / "cuda_sin_chain.py"  # 32 launches whose speed of light is below one launch
ROW_SUM = TASKS / "cuda_row_sum.py"
SOFTMAX = TASKS / "cuda_softmax.py"
ADD_MUL = TASKS / "cuda_add_mul.py"  # two inputs, two outputs
LOG = TASKS / "cuda_log.py"  # log of values near one: fast-math approximations show

# Matrix tasks: fewer timed calls (every timed output is copied back and compared).
MATMUL_POLICY = {"max_timed_calls": 20}
BIG_POLICY = {"max_timed_calls": 10, "trials": 2}

# At most this many distinct load_inline extensions may be compiled by the whole CUDA corpus
# (each costs 25-60 s on the H200; identical name, sources and flags compile once per session).
BUILD_BUDGET = 12

_verdicts: dict[tuple, Verdict] = {}


def verdict_of(run_verify, task: Path, candidate: str, **policy) -> Verdict:
    """The verdict of one candidate on one task, computed once per session and shared by tests."""
    key = (str(task), candidate, tuple(sorted(policy.items())))
    if key not in _verdicts:
        _verdicts[key] = run_verify(task, CUDA_CANDIDATES / candidate, device="cuda", **policy)
    return _verdicts[key]


def explain(verdict: Verdict) -> str:
    checks = "; ".join(f"{c.name}={'ok' if c.passed else 'FAILED: ' + c.detail}" for c in verdict.checks)
    return f"{verdict.verdict}: {verdict.summary}\n  checks: {checks}"


def passed_names(verdict: Verdict) -> list[str]:
    return [check.name for check in verdict.checks if check.passed]


def assert_rejected_by(verdict: Verdict, meant: tuple[str, ...], must_pass: tuple[str, ...] = ()) -> None:
    """Rejected, with at least one of the checks meant for the cheat among the failed ones (each
    failure explained in words), and the named checks passed (the cheat was caught where meant)."""
    failed = failed_names(verdict)
    assert verdict.verdict == "rejected", explain(verdict)
    assert set(meant) & set(failed), f"expected a failure of {meant}; " + explain(verdict)
    for check in verdict.failed():
        assert check.detail.strip(), f"check {check.name} failed without saying why"
    for name in must_pass:
        assert name in passed_names(verdict), f"{name} should have passed; " + explain(verdict)


def hole(reason: str):
    return pytest.mark.xfail(strict=True, reason=f"hole: {reason}")


# ---- honest candidates -------------------------------------------------------------------------

HONEST = [
    ("honest_relu.py", RELU, {}),
    ("honest_add_mul.py", ADD_MUL, {}),
    ("honest_workspace_row_sum.py", ROW_SUM, {}),
    ("honest_atomic_row_sum.py", ROW_SUM, {}),
    ("honest_softmax.py", SOFTMAX, {}),
    ("honest_matmul_tiled.py", MATMUL, MATMUL_POLICY),
    ("honest_linear_relu.py", LINEAR_RELU, {}),
    ("honest_log.py", LOG, {}),
    ("honest_triton_relu.py", RELU, {}),
    ("honest_nvrtc_relu.py", RELU, {}),
    ("honest_cuda_graph_relu.py", RELU, {}),  # replayed graphs allocate from pools the memory guard skips
]


@pytest.mark.gpu
@pytest.mark.parametrize("candidate, task, policy", HONEST, ids=[c[0].removesuffix(".py") for c in HONEST])
def test_honest_candidate_is_verified(run_verify, candidate, task, policy):
    verdict = verdict_of(run_verify, task, candidate, **policy)
    assert verdict.verdict == "verified", explain(verdict)
    assert not failed_names(verdict), explain(verdict)
    assert verdict.speedup is not None and verdict.speedup > 0
    assert verdict.timings.candidate.median_ms >= verdict.roofline.speed_of_light_ms
    kernels = verdict.kernels or {}
    assert kernels.get("extension_calls", 0) > 0 or kernels.get("own_kernels_us"), \
        f"the candidate's own kernel was not seen: {kernels}"


@pytest.mark.gpu
def test_a_launch_bound_speedup_is_flagged_and_a_device_bound_one_is_not(run_verify):
    """The NVRTC relu's kernel runs a few µs of a call that its Python launch makes 60-90 µs long
    on the H200; the 2048³ product's kernel is nearly all of its call. (The softmax's call, about
    twice its kernel, was flagged in one GPU run and not in the next: too near the line to test.)"""
    def host_paced(verdict: Verdict) -> list[str]:
        return [warning for warning in verdict.warnings if "the host launching them" in warning]

    relu = verdict_of(run_verify, RELU, "honest_nvrtc_relu.py")
    matmul = verdict_of(run_verify, MATMUL, "honest_matmul_tiled.py", **MATMUL_POLICY)
    assert relu.verdict == matmul.verdict == "verified", explain(relu) + explain(matmul)
    assert len(host_paced(relu)) == 1, relu.warnings
    assert not host_paced(matmul), matmul.warnings


# ---- cheats, each rejected by the check meant for it --------------------------------------------

# (candidate, task, checks meant to catch it (any one of them), checks that must pass, policy)
CHEATS = [
    # stale memory
    ("stale_empty.py", RELU, ("output_written",), (), {}),
    ("stale_empty.py", RELU_1MIB, ("output_written",), (), {}),
    ("stale_freed_output.py", RELU, ("values", "output_written"), (), {}),
    ("partial_write.py", RELU, ("output_written",), (), {}),
    ("triton_partial_write.py", RELU, ("output_written",), (), {}),
    ("cupy_pool_partial.py", RELU, ("values", "output_written"), (), {}),
    ("stale_intermediate.py", LINEAR_RELU, ("values",), (), {}),
    # inputs
    ("inplace_returns_input.py", RELU, ("output_aliasing",), (), {}),
    ("inplace_then_clone.py", RELU, ("inputs_unchanged",), ("values",), {}),
    ("input_zeroing.py", RELU, ("inputs_unchanged",), (), {}),
    # memory outside the tensors
    ("out_of_bounds_write.py", RELU, ("memory_bounds",), ("values",), {}),
    ("vector_tail_overrun.py", RELU, ("memory_bounds",), ("values",), {}),
    # the output's structure
    ("wrong_dtype.py", RELU, ("output_shape",), (), {}),
    ("wrong_shape.py", RELU, ("output_shape",), (), {}),
    ("output_on_cpu.py", RELU, ("output_device",), (), {}),
    ("lazy_subclass.py", RELU, ("output_type",), (), {}),
    # looking for the answer, caching it, changing behaviour once timed
    ("gc_theft.py", RELU, ("values",), (), {}),
    ("pointer_cache.py", RELU, ("values", "timed_outputs"), (), {}),
    ("correct_then_garbage.py", RELU, ("timed_outputs",), ("values", "output_written"), {"trials": 5}),
    # timers and streams
    ("timer_gc_scaled.py", MATMUL, ("timer_consistency",), ("values", "timed_outputs", "speed_of_light"),
     MATMUL_POLICY),
    ("timer_module_patch.py", MATMUL, ("timer_consistency",), ("values", "timed_outputs", "speed_of_light"),
     MATMUL_POLICY),
    ("sync_patched_side_stream.py", MATMUL, ("timer_consistency",), ("values", "timed_outputs"), MATMUL_POLICY),
    # KernelBench's side-stream exploit: the events see nothing, the device-wide synchronize that
    # ends the window waits for the kernels, so the parent's clock does.
    ("side_stream_unsynced.py", MATMUL, ("timer_consistency",), ("values", "timed_outputs"), MATMUL_POLICY),
    ("late_finish_side_stream.py", MATMUL, ("timer_consistency", "output_binding"), ("values",), MATMUL_POLICY),
    # Answers computed as a window is prepared: to what the input pool held then, not to its inputs.
    ("flush_window_kernels.py", MATMUL, ("values",), (), MATMUL_POLICY),
    # precision
    ("tf32_at_import.py", MATMUL, ("global_flags",), (), MATMUL_POLICY),
    ("matmul_precision_in_forward.py", MATMUL, ("global_flags",), (), MATMUL_POLICY),
    ("tf32_toggled_in_forward.py", MATMUL, ("values",), ("global_flags",), MATMUL_POLICY),
    ("fp16_tensor_cores.py", MATMUL, ("values",), (), MATMUL_POLICY),
    ("triton_dot_tf32.py", MATMUL, ("values",), ("global_flags",), MATMUL_POLICY),
    ("fast_math_flag.py", LOG, ("compiler_flags",), (), {}),
    ("fast_math_env.py", LOG, ("values", "compiler_flags"), (), {}),
    ("fast_log_intrinsic.py", LOG, ("values",), (), {}),
    # which code ran
    ("pure_pytorch.py", RELU, ("custom_code",), ("values",), {}),
]


def _cheat_id(entry) -> str:
    candidate, task = entry[0], entry[1]
    return candidate.removesuffix(".py") + ("-1MiB" if task == RELU_1MIB else "")


@pytest.mark.gpu
@pytest.mark.parametrize("candidate, task, meant, must_pass, policy", CHEATS, ids=[_cheat_id(c) for c in CHEATS])
def test_cheat_is_rejected_by_its_check(run_verify, candidate, task, meant, must_pass, policy):
    verdict = verdict_of(run_verify, task, candidate, **policy)
    assert_rejected_by(verdict, meant, must_pass)


@pytest.mark.gpu
def test_illegal_memory_access_costs_only_its_own_verdict(run_verify):
    """A kernel that stores through an unmapped address corrupts its process's CUDA context; the
    verdict names the check, and the next verification on the same GPU is unaffected."""
    verdict = run_verify(RELU, CUDA_CANDIDATES / "illegal_address.py", device="cuda")
    assert_rejected_by(verdict, ("runs",))
    after = run_verify(RELU, CUDA_CANDIDATES / "honest_relu.py", device="cuda")
    assert after.verdict == "verified", explain(after)


# ---- cheats that must gain nothing -------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("candidate", ["content_cache.py"])
def test_cheat_is_timed_at_the_honest_kernels_speed(run_verify, candidate):
    """A content-keyed cache never hits (every call has fresh inputs from secret seeds): it runs
    the honest tiled kernel, so it may not look faster than that kernel beyond noise. It keeps
    every output it computed, which costs it the allocator's cache, and it gains nothing from that either."""
    honest = verdict_of(run_verify, MATMUL, "honest_matmul_tiled.py", **MATMUL_POLICY)
    sneaky = verdict_of(run_verify, MATMUL, candidate, **MATMUL_POLICY)
    assert honest.verdict == "verified", explain(honest)
    assert sneaky.verdict == "verified", explain(sneaky)
    assert sneaky.timings.candidate.median_ms >= 0.7 * honest.timings.candidate.median_ms, (
        f"{candidate} measured {sneaky.timings.candidate.median_ms:.4f} ms per call, the same kernel run honestly "
        f"{honest.timings.candidate.median_ms:.4f} ms")


@pytest.mark.gpu
def test_decoy_kernel_passes_custom_code_but_is_reported(run_verify):
    """A no-op kernel launched beside torch.matmul: the candidate's code did run, so custom_code
    passes (rejecting it is a policy decision), but the verdict must show that nearly all GPU
    time went to library kernels."""
    verdict = verdict_of(run_verify, MATMUL, "decoy_kernel.py", **MATMUL_POLICY)
    assert verdict.verdict == "verified", explain(verdict)
    custom = next(check for check in verdict.checks if check.name == "custom_code")
    assert custom.passed and "library" in custom.detail, custom.detail
    assert verdict.kernels["library_fraction"] is not None and verdict.kernels["library_fraction"] > 0.9, \
        verdict.kernels


# ---- holes the evaluator has today (strict xfail: they XPASS once closed) -----------------------

@pytest.mark.gpu
@hole("custom_code rests on the one profiled call and on extension calls counted in the candidate's own "
      "process, which it can forge; a candidate can tell when it is profiled")
def test_custom_code_only_under_the_profiler_with_a_forged_count(run_verify):
    verdict = run_verify(RELU, CUDA_CANDIDATES / "profiler_only_forged_ledger.py", device="cuda")
    assert "custom_code" in failed_names(verdict), explain(verdict)


@pytest.mark.gpu
def test_custom_code_only_under_the_profiler(run_verify):
    """The extension is called only while torch's profiler runs: verified until session 24 (a
    strict-xfail hole); the profiled call counts one extension call and the checked calls none."""
    verdict = run_verify(RELU, CUDA_CANDIDATES / "profiler_only_kernel.py", device="cuda")
    assert "custom_code" in failed_names(verdict), explain(verdict)
    assert "only while it is profiled" in next(c.detail for c in verdict.checks if c.name == "custom_code")


@pytest.mark.gpu
def test_forged_extension_ledger(run_verify):
    """The forged count is never read on a GPU: only the profiler's kernel list decides there."""
    verdict = run_verify(RELU, CUDA_CANDIDATES / "ledger_forgery.py", device="cuda")
    assert "custom_code" in failed_names(verdict), explain(verdict)


@pytest.mark.gpu
@pytest.mark.parametrize("task", [SIN_CHAIN, RELU], ids=["sin_chain", "relu"])
def test_inputs_are_not_in_the_candidate_process_before_its_clock_starts(run_verify, task):
    """prepare_hook computes each call's answer the moment its process makes the call's inputs,
    and returns it from forward: 224 stored answers per window of the sin chain's 32 launches,
    passed at many times the reference's speed while the candidate's process made its own inputs
    (sessions 18-20, on tasks whose speed of light is below a launch). The inputs are handed
    over now (the checker copies them to the pool as the clock starts): its hook never sees
    them, it computes in forward, and is timed doing so."""
    verdict = run_verify(task, CUDA_CANDIDATES / "prepare_hook.py", device="cuda")
    assert verdict.verdict == "rejected" or verdict.speedup < 1.5, explain(verdict)


@pytest.mark.gpu
def test_work_moved_between_the_calls_of_a_window_buys_no_speedup(run_verify):
    """window_ahead does each window's work in its first call (every input set of a window exists
    when it starts) and returns stored answers from the others after a spin: by the median of its
    calls it was verified at 14.07x and 12.23x the eager reference on the sin chain (session 21,
    H200), its mean call as slow as the reference's. A window's calls are timed as a whole now."""
    verdict = run_verify(SIN_CHAIN, CUDA_CANDIDATES / "window_ahead.py", device="cuda")
    assert verdict.verdict == "rejected" or verdict.speedup < 1.5, explain(verdict)


@pytest.mark.gpu
def test_candidate_cannot_poison_the_cached_ceilings(tmp_path):
    """Invariant 5: nothing a candidate does may change what the next candidate is measured
    against. A fresh cache of its own, so the session's cache stays clean. (Ceilings are now
    measured by the checker every time and never read from a file; sandboxes see a read-only
    filesystem.)"""
    policy = VerifyPolicy(device="cuda", timing_budget_s=0.3, **BIG_POLICY)
    before = verify(MATMUL_BIG, CUDA_CANDIDATES / "prepare_hook.py", policy, cache_dir=tmp_path)
    verify(RELU, CUDA_CANDIDATES / "poison_ceilings.py", policy, cache_dir=tmp_path)
    after = verify(MATMUL_BIG, CUDA_CANDIDATES / "prepare_hook.py", policy, cache_dir=tmp_path)
    assert before.roofline is not None and after.roofline is not None, explain(after)
    # The poison multiplies every ceiling by a million; measurements of one device agree far closer.
    for name, value in before.roofline.ceilings.items():
        assert after.roofline.ceilings[name] < 2 * value, (name, value, after.roofline.ceilings[name])
    assert after.roofline.speed_of_light_ms > 0.5 * before.roofline.speed_of_light_ms


# ---- the corpus itself (static: no GPU work, but run where the corpus runs) ---------------------

# Candidates tested outside the HONEST and CHEATS tables.
OTHERS = {"illegal_address.py", "honest_relu.py", "content_cache.py", "decoy_kernel.py",
          "profiler_only_kernel.py", "ledger_forgery.py", "prepare_hook.py", "poison_ceilings.py",
          "window_ahead.py", "profiler_only_forged_ledger.py"}


def extension_builds(path: Path):
    """(name, everything that keys its build, refused) of each load_inline call in a candidate file."""
    tree = ast.parse(path.read_text())
    strings = {node.targets[0].id: node.value.value for node in tree.body
               if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
               and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}

    def value(node):
        if isinstance(node, ast.Name):
            return strings.get(node.id, node.id)
        return ast.literal_eval(node)

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "load_inline":
            name = value(node.args[0]) if node.args else value(next(k.value for k in node.keywords if k.arg == "name"))
            keywords = tuple(sorted((k.arg, repr(value(k.value))) for k in node.keywords))
            flags = [flag for k in node.keywords if k.arg in ("extra_cflags", "extra_cuda_cflags", "extra_ldflags")
                     for flag in value(k.value)]
            refused = any(bad in flag for flag in flags for bad in REDUCED_PRECISION_FLAGS)
            yield name, keywords, refused


@pytest.mark.gpu
def test_build_budget():
    """Same extension name means same sources and flags (else it compiles once per file), and the
    corpus compiles at most BUILD_BUDGET extensions (refused flags compile nothing)."""
    by_name: dict[str, set] = {}
    for path in sorted(CUDA_CANDIDATES.glob("*.py")):
        for name, keywords, refused in extension_builds(path):
            if not refused:
                by_name.setdefault(name, set()).add(keywords)
    assert {"evo_corpus_ew", "evo_corpus_mm"} <= set(by_name), "the parser no longer finds the shared extensions"
    for name, variants in by_name.items():
        assert len(variants) == 1, f"{name} is built with {len(variants)} different sources or flags"
    assert len(by_name) <= BUILD_BUDGET, f"{len(by_name)} distinct extensions: {sorted(by_name)}"


@pytest.mark.gpu
def test_every_candidate_is_tested_and_says_what_it_is():
    listed = {entry[0] for entry in HONEST} | {entry[0] for entry in CHEATS} | OTHERS
    files = {path.name for path in CUDA_CANDIDATES.glob("*.py")}
    assert files == listed, f"not tested: {sorted(files - listed)}; missing files: {sorted(listed - files)}"
    for path in CUDA_CANDIDATES.glob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert doc.startswith(("Cheat", "Honest", "Fault", "Sabotage")), f"{path.name} does not say what it is"
        if not doc.startswith("Honest"):
            assert "caught by" in doc.lower() or "expected:" in doc.lower(), \
                f"{path.name} does not name the check meant to catch it"


@pytest.mark.gpu
def test_output_memory_cheats_are_caught_in_a_process_that_reserved_its_window(cache_dir, monkeypatch):
    """Within a session whose reference plan is known, a candidate's process takes a window's
    memory from the driver before its turn (TaskSession.reserve_window); the blocks its outputs
    land on must still be the NaN-filled ones, not reserved memory nothing has written."""
    reserved = []
    request = SandboxProcess.request

    def recording(process, header, *args, **kwargs):
        reply = request(process, header, *args, **kwargs)
        if header.get("op") == "reserve":
            reserved.append((sum(header["sizes"]), reply[0].get("reserved_bytes", 0)))
        return reply

    monkeypatch.setattr(SandboxProcess, "request", recording)
    policy = VerifyPolicy(device="cuda", timing_budget_s=0.3, max_timed_calls=50)
    with TaskSession(RELU_1MIB, policy, cache_dir, standby=1) as session:
        honest = verify(RELU_1MIB, CUDA_CANDIDATES / "honest_nvrtc_relu.py", policy, cache_dir, session)
        assert honest.verdict == "verified", explain(honest)
        for cheat in ("stale_empty.py", "triton_partial_write.py", "cupy_pool_partial.py"):
            verdict = verify(RELU_1MIB, CUDA_CANDIDATES / cheat, policy, cache_dir, session)
            assert_rejected_by(verdict, ("values", "output_written"))
    assert len(reserved) == 3, reserved  # every candidate after the reference was timed
    assert all(held >= asked for asked, held in reserved), reserved

"""`python -m evo export`: a verified winner becomes a package that installs into a fresh virtual
environment and passes its own tests there (on the CPU here; on a GPU with the `gpu` mark); a
kernel with an autograd Function keeps its backward; unverified candidates and non-empty
directories are refused with a sentence that says why."""

from __future__ import annotations

import hashlib
import json
import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from conftest import CUDA_CANDIDATES, EXAMPLE_TASKS, ROOT, TASKS, gpu_alone, verified_but_for_host_load
from evo.archive import Archive, file_sha256
from evo.cli import main as evo_main
from evo.config import VerifyPolicy
from evo.evaluator import verify
from evo.export_project import call_of
from evo.verdict import Check, Verdict

RELU = EXAMPLE_TASKS / "relu.py"
CPU_WINNER = ROOT / "examples" / "scripted" / "relu" / "04_vectorized.py"  # CPU or CUDA, as the device says
CUDA_WINNER = ROOT / "examples" / "candidates" / "relu_cuda.py"
FAST = {"trials": 2, "timing_budget_s": 0.3, "max_timed_calls": 50, "audit_task": False}

pytestmark = pytest.mark.timeout(900)

# A task with parameters, and a pure-PyTorch candidate whose autograd Function has a backward: its
# parameters are named differently from the reference's but made in the same order.
LINEAR_TASK = '''
import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, features: int, scale: float = 1.0):
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x)) * self.scale


batch_size = 8
features = 16


def get_inputs():
    return [torch.randn(batch_size, features)]


def get_init_inputs():
    return [features, 2.0]
'''

LINEAR_CANDIDATE = '''
import torch
import torch.nn as nn


class LinearRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale):
        y = torch.addmm(bias, x, weight.t())
        ctx.save_for_backward(x, weight, y)
        ctx.scale = scale
        return y.clamp_min(0) * scale

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        grad = grad * (y > 0) * ctx.scale
        return grad @ weight, grad.t() @ x, grad.sum(0), None


class ModelNew(nn.Module):
    def __init__(self, features, scale=1.0):
        super().__init__()
        layer = nn.Linear(features, features)
        self.weight, self.bias = layer.weight, layer.bias
        self.scale = scale

    def forward(self, x):
        return LinearRelu.apply(x, self.weight, self.bias, self.scale)
'''


# ---- helpers ----------------------------------------------------------------------------------

def evo(*args, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evo", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def record(archive: Archive, task: Path, source: str, verdict: Verdict, run_id: str | None = None,
           policy: dict | None = None) -> tuple[str, int]:
    """A candidate and its verdict in the archive, as the search records them."""
    if run_id is None:
        run_id = archive.create_run(config={"verify": policy or {}}, command="test", tasks=[str(task)],
                                    hardware=verdict.environment)
    candidate_id = archive.add_candidate(run_id, task=str(task), task_hash=file_sha256(task), source=source,
                                         source_hash=hashlib.sha256(source.encode()).hexdigest(), operator="scripted")
    archive.record_evaluation(candidate_id, verdict)
    return run_id, candidate_id


def made_up_verdict(task: Path, passed: bool = True, speedup: float = 1.5) -> Verdict:
    """A verdict written by hand, for tests about what export does with the archive's records."""
    checks = [Check(name="values", passed=True, detail="outputs match the float64 reference"),
              Check(name="output_written", passed=passed, detail="every output element was written" if passed else
                    "output 0 element [0, 0] still holds the poison where the reference is finite")]
    return Verdict(verdict="verified" if passed else "rejected", summary="made up for a test", task=str(task),
                   candidate="candidate.py", device="cpu", checks=checks, speedup=speedup if passed else None,
                   environment={"cpu": "a test CPU", "torch": "2.x", "python": "3.x"})


def verified(task: Path, candidate: Path, device: str, cache_dir: Path) -> Verdict:
    """The real evaluator's verdict. Its timing checks alone can fail an honest run on a loaded
    small machine (see test_cli.py): up to 3 attempts."""
    for _ in range(3):
        verdict = verify(task, candidate, VerifyPolicy(device=device, **FAST), cache_dir=cache_dir)
        if verdict.verdict == "verified" or not verified_but_for_host_load(verdict):
            break
    assert verdict.verdict == "verified", verdict.summary
    return verdict


def fresh_environment(path: Path) -> Path:
    """A virtual environment that sees the system's torch (installing another means gigabytes) but
    none of evo's checkout; pip and setuptools come from the system too."""
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(path)
    # Where this interpreter is itself a virtual environment (torch installed in it), "system" is
    # its base interpreter's: list this one's package directories too. A path in a .pth file is
    # only added, its own .pth files are not run, so evo's editable install stays out of sight.
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)}))
    purelib.mkdir(parents=True, exist_ok=True)
    (purelib / "outer-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return path / "bin" / "python"


def pip_install(python: Path, project: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--no-index",
                             "--disable-pip-version-check", str(project)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_exported_tests(python: Path, project: Path, cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run([python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(project / "tests")],
                            cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result.stdout


def build_report(python: Path, package: str, cwd: Path, env: dict | None = None) -> dict:
    code = f"import json, {package}; {package}.Model(*{package}.reference.get_init_inputs()); " \
           f"print(json.dumps({package}.build_report()))"
    result = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def export_and_install(tmp_path: Path, archive_path: Path, target: str) -> tuple[Path, Path, str]:
    """Export with the CLI, then pip install into a fresh environment (and, meanwhile, build the
    same package just in time from its folder). Returns (project, python, exported stdout)."""
    project = tmp_path / "kernel"
    result = evo("export", target, "--to", project, "--archive", archive_path)
    assert result.returncode == 0, result.stderr
    python = fresh_environment(tmp_path / "venv")
    installing = pip_install(python, project, cwd=tmp_path)
    jit_env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "jit"), "PYTHONPATH": str(project)}
    from_folder = build_report(Path(sys.executable), "evo_relu", cwd=tmp_path, env=jit_env)
    assert all(how.startswith("built just in time") for how in from_folder.values()) and from_folder
    output, _ = installing.communicate(timeout=900)
    assert installing.returncode == 0, output[-6000:]
    return project, python, result.stdout


# ---- end to end ---------------------------------------------------------------------------------

def test_cpu_winner_installs_into_a_fresh_environment_and_passes_its_own_tests(tmp_path, cache_dir):
    verdict = verified(RELU, CPU_WINNER, "cpu", cache_dir)
    with Archive(tmp_path / "evo.sqlite") as archive:
        run_id, candidate_id = record(archive, RELU, CPU_WINNER.read_text(), verdict,
                                      policy=VerifyPolicy(device="cpu").model_dump(mode="json"))
    project, python, stdout = export_and_install(tmp_path, tmp_path / "evo.sqlite", run_id)
    assert f"exported c{candidate_id}" in stdout and "pip install --no-build-isolation" in stdout

    # The installed package uses the extension pip built, the CPU one (also where a GPU is visible).
    report = build_report(python, "evo_relu", cwd=tmp_path)
    assert list(report) == ["demo_relu_parallel_cpu"] and report["demo_relu_parallel_cpu"].startswith("prebuilt")
    assert str(tmp_path / "venv") in report["demo_relu_parallel_cpu"]
    output = run_exported_tests(python, project, cwd=tmp_path)
    assert " passed" in output and "failed" not in output
    assert "has no backward" in (project / "evo_relu" / "_op.py").read_text()

    manifest = json.loads((project / "evo_relu" / "_manifest.json").read_text())
    assert manifest["device"] == "cpu" and manifest["arch"] is None and manifest["candidate_id"] == candidate_id
    readme = (project / "README.md").read_text()
    for fact in (f"{verdict.speedup:.3f}x", verdict.environment["torch"], "output_written", "timed_outputs",
                 "pip install --no-build-isolation", "Backward: none"):
        assert fact in readme, fact
    assert (project / "evo_relu" / "candidate.py").read_text() == CPU_WINNER.read_text()
    assert (project / "evo_relu" / "csrc" / "demo_relu_parallel_cpu" / "main.cpp").is_file()


def test_a_backward_the_candidate_defines_is_kept(tmp_path):
    task, candidate = tmp_path / "linear_relu.py", tmp_path / "candidate.py"
    task.write_text(LINEAR_TASK)
    candidate.write_text(LINEAR_CANDIDATE)
    with Archive(tmp_path / "evo.sqlite") as archive:
        record(archive, task, LINEAR_CANDIDATE, made_up_verdict(task))
    project = tmp_path / "exported"
    assert evo_main(["export", str(task), "--to", str(project), "--archive", str(tmp_path / "evo.sqlite")]) == 0
    manifest = json.loads((project / "evo_linear_relu" / "_manifest.json").read_text())
    assert manifest["backward_functions"] == ["LinearRelu"] and manifest["backward"] == "function"
    assert manifest["extensions"] == []
    assert manifest["free_sizes"] == {"batch_size": 8}  # features also sizes the Linear: not free
    init = (project / "evo_linear_relu" / "__init__.py").read_text()
    assert "def __init__(self, features: int, scale: float = 1.0):" in init and "def forward(self, x: torch.Tensor)" in init

    # Nothing to build: its tests run from the folder, gradients and torch.compile with them.
    output = run_exported_tests(Path(sys.executable), project, cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(project)})
    assert "test_gradients_match_the_reference" not in output  # not skipped
    assert "the kernel has a backward" in output  # the test of the error in its place is


# ---- what export refuses ------------------------------------------------------------------------

@pytest.fixture
def made_up_archive(tmp_path):
    """An archive with a verified pure-PyTorch candidate for the linear task, and its paths."""
    task = tmp_path / "linear_relu.py"
    task.write_text(LINEAR_TASK)
    archive_path = tmp_path / "evo.sqlite"
    with Archive(archive_path) as archive:
        run_id, candidate_id = record(archive, task, LINEAR_CANDIDATE, made_up_verdict(task))
    return archive_path, task, run_id, candidate_id


def test_an_unverified_candidate_is_refused_with_the_check_that_failed(made_up_archive, tmp_path, capsys):
    archive_path, task, run_id, _ = made_up_archive
    with Archive(archive_path) as archive:
        _, rejected = record(archive, task, LINEAR_CANDIDATE + "\n# another\n", made_up_verdict(task, passed=False),
                             run_id=run_id)
    code = evo_main(["export", f"c{rejected}", "--to", str(tmp_path / "out"), "--archive", str(archive_path)])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert f"c{rejected} is not verified" in error and "output_written" in error and "still holds the poison" in error
    assert not (tmp_path / "out").exists()


def test_a_run_without_a_verified_kernel_is_refused(tmp_path, capsys):
    task = tmp_path / "linear_relu.py"
    task.write_text(LINEAR_TASK)
    with Archive(tmp_path / "evo.sqlite") as archive:
        run_id, _ = record(archive, task, LINEAR_CANDIDATE, made_up_verdict(task, passed=False))
    assert evo_main(["export", run_id, "--to", str(tmp_path / "out"), "--archive", str(tmp_path / "evo.sqlite")]) == 2
    error = capsys.readouterr().err
    assert f"run {run_id} has no verified kernel" in error and "1 rejected" in error


def test_a_kernel_that_failed_a_remeasurement_is_refused(made_up_archive, tmp_path, capsys):
    archive_path, _, _, candidate_id = made_up_archive
    with Archive(archive_path) as archive:
        archive.add_remeasurement(candidate_id, None, None, verdict="rejected")
    assert evo_main(["export", f"c{candidate_id}", "--to", str(tmp_path / "out"), "--archive", str(archive_path)]) == 2
    assert "failed 1 later re-measurement" in capsys.readouterr().err


def test_a_non_empty_directory_is_refused_unless_forced(made_up_archive, tmp_path, capsys):
    archive_path, task, _, candidate_id = made_up_archive
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    arguments = ["export", f"c{candidate_id}", "--to", str(target), "--archive", str(archive_path)]
    assert evo_main(arguments) == 2
    assert "is not empty" in capsys.readouterr().err and sorted(p.name for p in target.iterdir()) == ["mine.txt"]

    assert evo_main([*arguments, "--force"]) == 0
    assert (target / "evo_linear_relu" / "_op.py").is_file() and (target / "mine.txt").read_text() == "keep me"
    stale = target / "evo_linear_relu" / "csrc" / "old" / "main.cpp"  # as if an earlier export had built one
    stale.parent.mkdir(parents=True)
    stale.write_text("// old")
    marker = json.loads((target / ".evo-export.json").read_text())
    marker["files"].append("evo_linear_relu/csrc/old/main.cpp")
    (target / ".evo-export.json").write_text(json.dumps(marker))

    assert evo_main([*arguments, "--force", "--name", "linear_kernel"]) == 0  # replaces the earlier export
    assert not (target / "evo_linear_relu").exists() and (target / "linear_kernel" / "_op.py").is_file()
    assert (target / "mine.txt").read_text() == "keep me"


def test_an_edited_task_file_is_refused_and_the_original_accepted(made_up_archive, tmp_path, capsys):
    archive_path, task, run_id, _ = made_up_archive
    original = tmp_path / "original.py"
    original.write_text(task.read_text())
    task.write_text(task.read_text().replace("batch_size = 8", "batch_size = 9"))
    arguments = ["export", run_id, "--to", str(tmp_path / "out"), "--archive", str(archive_path)]
    assert evo_main(arguments) == 2
    assert "has changed since" in capsys.readouterr().err
    assert evo_main([*arguments, "--task", str(original)]) == 0
    assert (tmp_path / "out" / "evo_original" / "reference.py").read_text() == LINEAR_TASK


def test_a_run_with_winners_for_several_tasks_asks_which(made_up_archive, tmp_path, capsys):
    archive_path, task, run_id, _ = made_up_archive
    other = tmp_path / "relu.py"
    other.write_text(RELU.read_text())
    with Archive(archive_path) as archive:
        record(archive, other, CPU_WINNER.read_text(), made_up_verdict(other), run_id=run_id)
    arguments = ["export", run_id, "--to", str(tmp_path / "out"), "--archive", str(archive_path)]
    assert evo_main(arguments) == 2
    assert "verified kernels for 2 tasks (linear_relu, relu); pass --task NAME" in capsys.readouterr().err
    assert evo_main([*arguments, "--task", "relu"]) == 0
    assert (tmp_path / "out" / "evo_relu" / "csrc" / "demo_relu_parallel_cpu" / "main.cpp").is_file()


def test_signatures_are_passed_on_or_fall_back_to_args():
    assert call_of("(self, features: int, scale: float = 1.0) -> None") == (
        "(self, features: int, scale: float = 1.0) -> None", "features, scale")
    assert call_of("(self, a, /, b, *rest, flag=False, **options)")[1] == "a, b, *rest, flag=flag, **options"
    assert call_of("(self)")[1] == ""
    assert call_of(None) == ("(self, *args, **kwargs)", "*args, **kwargs")
    assert call_of("(self, act=<class 'torch.nn.ReLU'>)") == ("(self, *args, **kwargs)", "*args, **kwargs")


# ---- on a GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_winner_installs_into_a_fresh_environment_and_passes_its_own_tests(tmp_path, cache_dir):
    verdict = verified(RELU, CUDA_WINNER, "cuda", cache_dir)
    with Archive(tmp_path / "evo.sqlite") as archive:
        _, candidate_id = record(archive, RELU, CUDA_WINNER.read_text(), verdict,
                                 policy=VerifyPolicy(device="cuda").model_dump(mode="json"))
    project, python, _ = export_and_install(tmp_path, tmp_path / "evo.sqlite", f"c{candidate_id}")
    manifest = json.loads((project / "evo_relu" / "_manifest.json").read_text())
    assert manifest["device"] == "cuda" and manifest["arch"] == verdict.environment["compute_capability"]
    assert manifest["extensions"][0]["with_cuda"] and manifest["extensions"][0]["extra_cuda_cflags"] == ["-O3"]
    report = build_report(python, "evo_relu", cwd=tmp_path)
    assert report["evo_example_relu_cuda"].startswith("prebuilt")

    with gpu_alone():
        output = run_exported_tests(python, project, cwd=tmp_path)
        bench = subprocess.run([python, str(project / "benchmark.py"), "--json", "--seconds", "1", "--compile"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert "test_torch_compile" in Path(project / "tests" / "test_kernel.py").read_text() and "failed" not in output
    assert bench.returncode == 0, bench.stderr[-3000:]
    figures = json.loads(bench.stdout.strip().splitlines()[-1])
    print(f"\nCUDA export: {output.strip().splitlines()[-1]}; benchmark speedup {figures['speedup']:.2f}x "
          f"here, evo {figures['evo_speedup']:.2f}x; rows {json.dumps(figures['rows'])}")
    assert figures["device"] == verdict.environment["gpu"]
    assert 1 / 3 < figures["speedup"] / figures["evo_speedup"] < 3, figures


CUDA_KINDS = [  # honest candidates of the GPU corpus: each kind of kernel a candidate can be
    ("honest_add_mul.py", "cuda_add_mul.py"),  # load_inline; two inputs, two outputs
    ("honest_linear_relu.py", "cuda_matmul_relu.py"),  # load_inline, two extensions; a parameter
    ("honest_triton_relu.py", "cuda_relu_odd.py"),  # Triton
    ("honest_nvrtc_relu.py", "cuda_relu_odd.py"),  # NVRTC (torch.cuda._compile_kernel)
]


@pytest.fixture(scope="module")
def extensions_dir(tmp_path_factory) -> Path:
    """torch's just-in-time build directory, shared so that an extension two kernels use builds once."""
    return tmp_path_factory.mktemp("torch-extensions")


@pytest.mark.gpu
@pytest.mark.parametrize("candidate, task", CUDA_KINDS, ids=[name.removesuffix(".py") for name, _ in CUDA_KINDS])
def test_cuda_kernels_of_each_kind_pass_their_exported_tests(tmp_path, extensions_dir, candidate, task):
    """Exported from a recorded verdict (the evaluator's own tests verify these candidates) and
    used from the export's folder, so load_inline kernels take the just-in-time path."""
    name, capability = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                      capture_output=True, text=True, timeout=60).stdout.splitlines()[0].split(", ")
    task_path, source = TASKS / task, (CUDA_CANDIDATES / candidate).read_text()
    verdict = made_up_verdict(task_path).model_copy(
        update={"device": "cuda:0", "environment": {"gpu": name, "compute_capability": capability}})
    with Archive(tmp_path / "evo.sqlite") as archive:
        _, candidate_id = record(archive, task_path, source, verdict)
    project = tmp_path / "exported"
    assert evo_main(["export", f"c{candidate_id}", "--to", str(project), "--archive", str(tmp_path / "evo.sqlite")]) == 0
    manifest = json.loads(next(project.glob("*/_manifest.json")).read_text())
    assert manifest["device"] == "cuda" and manifest["arch"] == capability
    env = {**os.environ, "PYTHONPATH": str(project), "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
    build_report(Path(sys.executable), manifest["package"], cwd=tmp_path, env=env)  # built before the lock is taken
    with gpu_alone():
        output = run_exported_tests(Path(sys.executable), project, cwd=tmp_path, env=env)
    print(f"\n{candidate}: {output.strip().splitlines()[-1]}")

"""The files of an exported project, rendered from evo/export_templates/project/: the package
(the verified candidate unchanged, the task, the custom op, the extension loader, a manifest),
its build, its tests, its benchmark and a README that says how the kernel was verified.
evo/export.py chooses the candidate and reads it; this module only writes text."""

from __future__ import annotations

import ast
import json
import string
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from evo import __version__
from evo.archive_models import Candidate

TEMPLATES = Path(__file__).resolve().parent / "export_templates"
PROJECT = TEMPLATES / "project"
SENTINEL = "__evo_package__"  # stands for the package's name in the templates' Python files
MARKER = ".evo-export.json"  # lists the files an export wrote, so that --force can replace them


@dataclass(frozen=True)
class Project:
    package: str  # the import name, also the custom ops' namespace
    candidate: Candidate
    task_name: str
    task_source: str
    device: str  # "cuda" or "cpu"
    arch: str | None  # TORCH_CUDA_ARCH_LIST for the build
    policy: dict  # the run's [verify] policy, as far as it moves the error bound
    extraction: dict  # what extract.py read from the candidate and the task
    directory: str  # where the user asked for it, for the README's install line

    @property
    def distribution(self) -> str:
        return self.package.replace("_", "-")

    @property
    def hardware(self) -> str:
        environment = self.candidate.environment or {}
        return environment.get("gpu") if self.device == "cuda" and environment.get("gpu") else (
            environment.get("cpu") or self.device)

    @property
    def backward(self) -> str | None:
        """How gradients are had: "function" (the candidate's autograd.Function), "autograd" (its
        forward is plain PyTorch, which autograd differentiates), or None (there is no backward)."""
        found = self.extraction
        if found["backward_functions"]:
            return "function"
        compiled = found["extensions"] or found["uses_nvrtc"] or found["uses_triton"]
        return None if compiled else "autograd"

    @property
    def kind(self) -> str:
        extensions, found = self.extraction["extensions"], self.extraction
        if any(entry["with_cuda"] for entry in extensions):
            return "a CUDA extension"
        if extensions:
            return "a C++ extension for the CPU"
        if found["uses_nvrtc"]:
            return "CUDA compiled at run time by NVRTC"
        return "a Triton kernel" if found["uses_triton"] else "PyTorch code"


def render(root: Path, project: Project) -> list[str]:
    """Write the project under root (which already holds PACKAGE/csrc from the extraction); return
    the paths written, relative to root."""
    package = root / project.package
    written = [str(path.relative_to(root)) for path in sorted((package / "csrc").rglob("*")) if path.is_file()]
    files = {
        f"{project.package}/candidate.py": project.candidate.source,
        f"{project.package}/reference.py": project.task_source,
        f"{project.package}/__init__.py": init_module(project),
        f"{project.package}/_manifest.json": json.dumps(manifest(project), indent=1) + "\n",
        "pyproject.toml": substitute("pyproject.toml.tmpl", package=project.package, distribution=project.distribution,
                                     description=f"evo's verified kernel for {project.task_name} "
                                                 f"(candidate c{project.candidate.candidate_id})"),
        "README.md": readme(project),
        ".gitignore": "build/\n*.egg-info/\n__pycache__/\n*.so\n",
    }
    for name in ("_extensions.py", "_op.py"):
        files[f"{project.package}/{name}"] = (PROJECT / "package" / name).read_text()
    for name in ("setup.py", "benchmark.py", "tests/test_kernel.py"):
        files[name] = (PROJECT / name).read_text()
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace(SENTINEL, project.package) if relative.endswith(".py") else text)
        written.append(relative)
    return sorted(written)


def substitute(template: str, **values) -> str:
    return string.Template((PROJECT / template).read_text()).substitute(values)


def call_of(signature: str | None) -> tuple[str, str]:
    """A method signature text and the call that passes its parameters on, e.g.
    ("(self, dim: int = 1)", "dim"); (self, *args, **kwargs) when the text is not usable."""
    try:
        arguments = ast.parse(f"def f{signature}: pass").body[0].args
    except (SyntaxError, TypeError):
        return "(self, *args, **kwargs)", "*args, **kwargs"
    parts = [argument.arg for argument in arguments.posonlyargs + arguments.args][1:]
    parts += [f"*{arguments.vararg.arg}"] if arguments.vararg else []
    parts += [f"{argument.arg}={argument.arg}" for argument in arguments.kwonlyargs]
    parts += [f"**{arguments.kwarg.arg}"] if arguments.kwarg else []
    return signature, ", ".join(parts)


def init_module(project: Project) -> str:
    signature, call = call_of(project.extraction["init_signature"])
    names = project.extraction["input_names"]
    return substitute(
        "package/__init__.py.tmpl", package=project.package, task=project.task_name,
        candidate_id=project.candidate.candidate_id, speedup=f"{project.candidate.fitness:.2f}x",
        hardware=project.hardware, init_signature=signature, init_call=call,
        register_call=f", {call}" if call else "",
        forward_parameters="".join(f", {name}: torch.Tensor" for name in names),
        forward_call="".join(f", {name}" for name in names))


def manifest(project: Project) -> dict:
    """What the package reads at run time, and the record of its verification."""
    candidate, found = project.candidate, project.extraction
    verdict = candidate.verdict_json or {}
    keep = ("input_names", "inputs", "outputs", "output_is_sequence", "free_sizes", "backward_functions", "nvrtc",
            "uses_nvrtc", "uses_triton", "init_inputs")
    return {
        "package": project.package, "distribution": project.distribution, "task": project.task_name,
        "task_sha256": candidate.task_hash, "run_id": candidate.run_id, "candidate_id": candidate.candidate_id,
        "device": project.device, "arch": project.arch,
        "extensions": [{key: entry[key] for key in ("name", "kind", "sources", "functions", "with_cuda",
                                                    "is_python_module", "extra_cflags", "extra_cuda_cflags",
                                                    "extra_ldflags", "extra_include_paths")}
                       for entry in found["extensions"]],
        **{key: found[key] for key in keep},
        "backward": project.backward,
        "policy": project.policy,
        "verification": {
            "verdict": candidate.verdict, "fitness": candidate.fitness, "speedup": candidate.speedup,
            "measurements": candidate.measurements, "speedup_vs_compile": candidate.speedup_vs_compile,
            "verified_at": candidate.evaluated_at.isoformat() if candidate.evaluated_at else None,
            "hardware": project.hardware, "device": verdict.get("device"),
            "environment": candidate.environment or {}, "checks": [check.model_dump() for check in candidate.checks],
            "timings": candidate.timings, "isolation": verdict.get("isolation"), "warnings": verdict.get("warnings", []),
            "operator": candidate.operator},
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "exported_by": f"evo {__version__}",
    }


def readme(project: Project) -> str:
    candidate, found = project.candidate, project.extraction
    environment = candidate.environment or {}
    timings = candidate.timings or {}
    measured = ", ".join(f"{value:.3f}x" for value in candidate.measurements)
    rows = [("speedup", f"{candidate.fitness:.3f}x over the eager PyTorch reference: the median of "
                        f"{len(candidate.measurements)} verification(s) ({measured})"),
            ("kernel median", ms(timings.get("candidate"))), ("reference median", ms(timings.get("reference_eager")))]
    if candidate.speedup_vs_compile:
        rows.append(("speedup over torch.compile", f"{candidate.speedup_vs_compile:.3f}x"))
    rows += [("device", f"{project.hardware} ({(candidate.verdict_json or {}).get('device', project.device)})")]
    rows += [(label, str(environment[key])) for label, key in
             (("compute capability", "compute_capability"), ("GPU driver", "driver"), ("CUDA", "cuda"),
              ("torch", "torch"), ("Python", "python"), ("CPU", "cpu"), ("evo", "evo")) if environment.get(key)]
    rows += [("verified on", candidate.evaluated_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
              if candidate.evaluated_at else "-"),
             ("candidate", f"c{candidate.candidate_id} of run `{candidate.run_id}` ({candidate.operator})"),
             ("task file sha256", f"`{candidate.task_hash}`"),
             ("error bound", "reduced precision allowed (2e-2)" if project.policy.get("allow_reduced_precision")
              else f"tolerance {project.policy['tolerance']} (set by the user)" if project.policy.get("tolerance")
              else "derived from the task: 16x the float32 reference's own error, at least 1e-5")]
    verdict = candidate.verdict_json or {}
    if (verdict.get("isolation") or {}).get("method"):
        rows.append(("isolation", verdict["isolation"]["method"]))
    if (verdict.get("kernels") or {}).get("library_fraction") is not None:
        rows.append(("GPU time in library kernels", f"{verdict['kernels']['library_fraction']:.0%} of one profiled call"))
    if verdict.get("warnings"):
        rows.append(("the evaluator's warnings", "; ".join(verdict["warnings"])))
    passed = [check for check in candidate.checks if check.passed]
    verified_on = candidate.evaluated_at.astimezone(timezone.utc).strftime("%Y-%m-%d") if candidate.evaluated_at else "?"
    headline = (f"Speedup {candidate.fitness:.2f}x over the eager PyTorch reference on {project.hardware} "
                f"(torch {environment.get('torch', '?')}), verified by evo on {verified_on}.")
    return substitute(
        "README.md.tmpl", package=project.package, task=project.task_name, kind=project.kind, headline=headline,
        directory=project.directory, init_example=", ".join(init_names(found["init_signature"])) or "",
        init_inputs=f"`{found['init_inputs']}`", build=build_text(project),
        verification="\n".join(f"| {label} | {cell(value)} |" for label, value in rows),
        checks="\n".join(f"| `{check.name}` | {cell(check.detail)} |" for check in passed),
        free_sizes=", ".join(f"`{name}`" for name in found["free_sizes"]) or "the task has no free sizes, so only "
                                                                            "its own",
        limits=limits_text(project), candidate_id=candidate.candidate_id, run_id=candidate.run_id,
        evo_version=__version__, exported_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def ms(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median_ms']:.4f} ms per call (interquartile range {stats['iqr_ms']:.4f} ms, {stats['calls']} calls)"


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def init_names(signature: str | None) -> list[str]:
    _, call = call_of(signature)
    return [part for part in call.split(", ") if part and not part.startswith("*")] if signature else []


def build_text(project: Project) -> str:
    extensions = project.extraction["extensions"]
    if not extensions:
        return (f"Nothing to compile: the kernel is {project.kind}, in `candidate.py`"
                + (" (NVRTC compiles it on first use" + ("; the sources it compiled at import are copied under "
                   "`csrc/nvrtc/`)." if project.extraction["nvrtc"] else ").") if project.extraction["uses_nvrtc"]
                   else ".") + " `pip install` installs the Python files.")
    lines = [f"`pip install` compiles {len(extensions)} extension(s) from `{project.package}/csrc/` with setuptools "
             "and torch's `BuildExtension`, one module each, named as evo built them:", ""]
    for entry in extensions:
        flags = " ".join(entry["extra_cflags"] + entry["extra_cuda_cflags"] + entry["extra_ldflags"]) or "none"
        lines.append(f"- `{entry['name']}` ({'CUDA' if entry['with_cuda'] else 'C++'}): "
                     f"{', '.join(f'`{source}`' for source in entry['sources'])}; the candidate's own flags: `{flags}`")
        if entry["extra_include_paths"]:
            lines.append(f"  (include paths, which must exist where it is built: {', '.join(entry['extra_include_paths'])})")
    if project.device == "cuda":
        lines += ["", f"The target architecture is `TORCH_CUDA_ARCH_LIST={project.arch}`, the GPU evo measured it on; "
                      "set the variable to build for others, e.g. `TORCH_CUDA_ARCH_LIST=\"8.0;9.0\" pip install ...`. "
                      "The just-in-time build targets the GPU it finds."]
    lines += ["", "evo built the kernel with torch's `load_inline`, whose C++ flags add no optimization level of "
                  "their own; setuptools adds Python's (often `-O2` or `-O3`), so a C++ extension may run faster here "
                  "than evo measured it. `benchmark.py` times the build you have."]
    return "\n".join(lines)


def limits_text(project: Project) -> str:
    found = project.extraction
    items = []
    if project.backward:
        how = (f"the candidate defines {', '.join(found['backward_functions'])} with a backward"
               if project.backward == "function" else "the candidate's forward is plain PyTorch, which autograd "
                                                       "differentiates")
        items.append(f"Backward: {how}; the op's backward recomputes the candidate's forward with autograd recording "
                     "and runs back through it. evo verified the forward only: `tests/` compares the gradients with "
                     "the reference's, at the task's sizes.")
    else:
        items.append("Backward: none. The candidate defines no `torch.autograd.Function` with a backward, so a "
                     "backward through the op raises an error that says so; use it under `torch.no_grad()` or "
                     f"`torch.inference_mode()`, or train with `{project.package}.reference.Model`.")
    items.append("Sizes: evo verified the kernel at the task's sizes only ("
                 + "; ".join(f"{spec['dtype']} {tuple(spec['shape'])}" for spec in found["inputs"])
                 + "), on the device it was measured on. The tests also try smaller sizes; others are untested.")
    items.append(f"Device: the op has a {project.device.upper()} implementation only; other devices get torch's "
                 "\"could not run ... with arguments from the ... backend\" error.")
    items.append("State: the op takes the module's parameters and buffers as inputs and returns new tensors; a "
                 "kernel that updates its buffers in place during forward (running statistics) is outside its "
                 "contract.")
    items += [f"Export note: {note}" for note in found["notes"]]
    return "\n".join(f"- {item}" for item in items)

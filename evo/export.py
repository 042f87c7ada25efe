"""`python -m evo export`: the best verified kernel of a run, of a task (across runs), or one
candidate, written as a small Python package that a user installs into a PyTorch project.

The candidate is read by importing it in a child process (evo/export_templates/extract.py, run
by path), never in evo's own: its load_inline/load sources go under PACKAGE/csrc/, and what the
package needs to know about the task comes back as JSON. evo/export_project.py renders the rest.
Only verified candidates are exported, and a non-empty directory is written into only when asked.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from evo.archive import Archive
from evo.archive_models import Candidate
from evo.export_project import MARKER, TEMPLATES, Project, render

EXTRACT = TEMPLATES / "extract.py"
EXTRACT_TIMEOUT_S = 600.0  # importing the candidate builds nothing, but its imports (Triton) may be slow
RESERVED = {"candidate", "reference", "csrc", "tests", "_op", "_extensions", "_manifest"}  # the package's own names


class ExportError(Exception):
    """The export cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class Exported:
    directory: Path
    package: str
    candidate: Candidate
    files: list[str]  # written, relative to directory
    notes: list[str]  # what the user should know: things the extraction could not see


def export(archive: Archive, target: str, to: Path, *, task: str | None = None, name: str | None = None,
           arch: str | None = None, force: bool = False) -> Exported:
    """target: a run id, a task file, or a candidate id (c42). task: which of a run's tasks, or the
    task file itself when the one recorded has moved."""
    candidate = choose(archive, target, task)
    task_path = task_file(candidate, [target, task])
    package = package_name(name or f"evo_{task_path.stem}")
    previous = previous_export(to, force)
    verdict = candidate.verdict_json or {}
    device = "cuda" if str(verdict.get("device", "cpu")).startswith("cuda") else "cpu"
    arch = arch or ((candidate.environment or {}).get("compute_capability") if device == "cuda" else None)
    verify_policy = archive.get_run(candidate.run_id).config.get("verify", {})
    to.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".evo-export-", dir=to.parent))
    staging.chmod(0o755)  # it becomes the directory when there is none yet; mkdtemp made it private
    try:
        (staging / package).mkdir()
        (staging / package / "candidate.py").write_text(candidate.source)
        found = extract(task_path, staging / package / "candidate.py", device, staging / package)
        clash = sorted({entry["name"] for entry in found["extensions"]} & (RESERVED | {package}))
        if clash:
            raise ExportError(f"the kernel's extension {clash[0]!r} has the name of a file of the exported package; "
                              "rename the extension in the candidate and verify it again")
        project = Project(package=package, candidate=candidate, task_name=task_path.stem,
                          task_source=task_path.read_text(), device=device, arch=arch,
                          policy={"allow_reduced_precision": bool(verify_policy.get("allow_reduced_precision")),
                                  "tolerance": verify_policy.get("tolerance")},
                          extraction=found, directory=str(to))
        files = render(staging, project)
        (staging / MARKER).write_text(json.dumps({"candidate": f"c{candidate.candidate_id}", "package": package,
                                                  "files": files}, indent=1) + "\n")
        place(staging, to, previous)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    notes = list(found["notes"])
    if device == "cuda" and not arch:
        notes.append("the verdict does not name the GPU's compute capability: the build targets torch's default "
                     "architectures unless TORCH_CUDA_ARCH_LIST is set")
    return Exported(directory=to, package=package, candidate=candidate, files=[*files, MARKER], notes=notes)


# ---- which candidate ------------------------------------------------------------------------

def choose(archive: Archive, target: str, task: str | None) -> Candidate:
    if re.fullmatch(r"c\d+", target):
        candidate = archive.candidate(int(target[1:]))
    elif target.endswith(".py") or Path(target).is_file():
        if not Path(target).is_file():
            raise ExportError(f"task file {target} does not exist; pass a task file, a run id or a candidate id")
        candidate = archive.best(task=target)
        if candidate is None:
            raise ExportError(f"no run in {archive.path} has a verified kernel for {target} (tasks match by the "
                              "file's content); `python -m evo optimize` looks for one")
    else:
        candidate = best_of_run(archive, target, task)
    refuse_unverified(candidate)
    return candidate


def best_of_run(archive: Archive, run_id: str, task: str | None) -> Candidate:
    tasks = archive.run_summary(run_id).tasks
    if task is not None:
        digest = hashlib.sha256(Path(task).read_bytes()).hexdigest() if Path(task).is_file() else None
        tasks = [t for t in tasks if task in (t.task, Path(t.task).stem, t.task_hash) or t.task_hash == digest]
        if not tasks:
            raise ExportError(f"run {run_id} has no task {task}; `python -m evo archive show {run_id}` lists its tasks")
    winners = [t for t in tasks if t.best is not None]
    if not winners:
        outcomes = "; ".join(f"{Path(t.task).stem}: " + ", ".join(f"{n} {what}" for what, n in t.outcomes.items() if n)
                             for t in tasks) or "no candidates"
        raise ExportError(f"run {run_id} has no verified kernel to export ({outcomes}); only verified kernels are "
                          "exported")
    if len(winners) > 1:
        names = ", ".join(Path(t.task).stem for t in winners)
        raise ExportError(f"run {run_id} has verified kernels for {len(winners)} tasks ({names}); pass --task NAME "
                          "to choose one")
    return winners[0].best


def refuse_unverified(candidate: Candidate) -> None:
    name = f"c{candidate.candidate_id}"
    if candidate.verdict != "verified":
        failed = next((check for check in candidate.checks if not check.passed), None)
        if candidate.verdict is None:
            why = f"it has no verdict ({candidate.summary or candidate.status})"
        elif failed is not None:
            why = f"it was {candidate.verdict}: the check {failed.name} failed: {failed.detail.rstrip('.')}"
        else:
            why = f"it was {candidate.verdict}: {(candidate.summary or 'no reason recorded').rstrip('.')}"
        raise ExportError(f"{name} is not verified ({why}); only verified kernels are exported, and "
                          "`python -m evo archive best` names the best one")
    if candidate.failed_remeasurements:
        raise ExportError(f"{name} was verified once but failed {candidate.failed_remeasurements} later "
                          "re-measurement(s), so evo does not trust it; export another candidate")


def task_file(candidate: Candidate, hints: list[str | None]) -> Path:
    """The task file the candidate was verified against: the one recorded, or a hint with its content."""
    for path in [*(Path(hint) for hint in hints if hint), Path(candidate.task)]:
        if path.suffix == ".py" and path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == candidate.task_hash:
            return path.resolve()
    where = "has changed since" if Path(candidate.task).is_file() else "is no longer where it was when"
    raise ExportError(f"the task file {candidate.task} {where} c{candidate.candidate_id} was verified against it; "
                      "pass the original with --task TASK.py")


def package_name(text: str) -> str:
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", text).strip("_").lower()
    if not name.isidentifier() or keyword.iskeyword(name) or name in RESERVED:
        raise ExportError(f"{text!r} cannot name a Python package; pass --name with a name such as evo_relu")
    return name


# ---- reading the candidate ------------------------------------------------------------------

def extract(task: Path, candidate: Path, device: str, out: Path) -> dict:
    """Import the task and the candidate in a child process that records their extension builds;
    its whole process group is killed on a timeout."""
    environment = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    if device == "cpu":
        environment["CUDA_VISIBLE_DEVICES"] = ""  # as the evaluator ran it
    with tempfile.TemporaryDirectory(prefix="evo-extract-") as scratch:  # its working directory: what it writes is not shipped
        process = subprocess.Popen([sys.executable, str(EXTRACT), str(task), str(candidate), device, str(out)],
                                   cwd=scratch, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=EXTRACT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise ExportError(f"importing the candidate took more than {EXTRACT_TIMEOUT_S:.0f} s; export gave up") from None
    report = out / "extract.json"
    if not report.is_file():
        tail = " ".join(output.strip().splitlines()[-3:])[-400:]
        raise ExportError(f"reading the candidate failed (exit code {process.returncode}): {tail or 'no output'}")
    found = json.loads(report.read_text())
    report.unlink()
    if not found["ok"]:
        raise ExportError(f"reading the candidate failed: {found['error']}")
    return found


# ---- where it goes --------------------------------------------------------------------------

def previous_export(to: Path, force: bool) -> list[Path]:
    """The files of an earlier export in `to`, which --force replaces; refuse a non-empty
    directory without --force."""
    if to.exists() and not to.is_dir():
        raise ExportError(f"{to} is a file; pass a directory to --to")
    if not to.exists() or not any(to.iterdir()):
        return []
    if not force:
        raise ExportError(f"{to} is not empty; pass a new or empty directory, or --force to write into it "
                          "(an earlier export there is replaced, other files are kept)")
    marker = to / MARKER
    if not marker.is_file():
        return []
    try:
        return [to / name for name in json.loads(marker.read_text())["files"]] + [marker]
    except (ValueError, KeyError, TypeError):
        raise ExportError(f"{marker} is damaged; remove {to} or pass another directory") from None


def place(staging: Path, to: Path, previous: list[Path]) -> None:
    """Move the rendered files into `to`, after removing an earlier export's files."""
    resolved = to.resolve()
    for path in previous:
        if path.resolve().is_relative_to(resolved) and path.is_file():
            path.unlink()
    folders = {folder for path in previous for folder in path.resolve().parents
               if folder != resolved and folder.is_relative_to(resolved)}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # the deepest first
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if not to.exists():
        staging.rename(to)
        return
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            destination = to / path.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)

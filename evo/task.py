"""A task as the orchestrator sees it: a KernelBench-style file, read as text and never
imported here (only sandboxed processes import task code)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


class TaskError(Exception):
    """A task path that cannot be used; the message says what to pass instead."""


@dataclass(frozen=True)
class Task:
    path: Path  # absolute
    source: str

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    @classmethod
    def read(cls, path: Path) -> Task:
        try:
            source = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise TaskError(f"task file {path} cannot be read ({err.__class__.__name__}); "
                            "pass a KernelBench-style Python file") from None
        if "class Model" not in source or "def get_inputs" not in source:
            raise TaskError(f"{path} is not a KernelBench-style task: it needs class Model, get_inputs() "
                            "and get_init_inputs()")
        return cls(path=path.resolve(), source=source)


def collect(paths: list[Path]) -> list[Task]:
    """Task files from the command line: files as given, directories by their *.py files."""
    tasks: list[Task] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.glob("*.py") if not p.name.startswith("_"))
            if not files:
                raise TaskError(f"directory {path} holds no task files (*.py)")
            tasks.extend(Task.read(file) for file in files)
        elif path.is_file():
            tasks.append(Task.read(path))
        else:
            raise TaskError(f"task {path} does not exist; pass task files or a directory of them")
    seen: set[Path] = set()
    unique = [task for task in tasks if not (task.path in seen or seen.add(task.path))]
    return unique

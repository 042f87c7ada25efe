"""The commands that drive the search and read the archive, behind the CLI's parsing: each
turns bad input into one sentence on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from evo import archive_views, export, optimize, run_setup
from evo.archive import DEFAULT_PATH, Archive, ArchiveError
from evo.config import ConfigError, VerifyPolicy, load_optimize
from evo.provider import ProviderError
from evo.task import TaskError, collect


def fail(message: str) -> int:
    print(f"evo: {message}", file=sys.stderr)
    return 2


def optimize_command(args: argparse.Namespace, policy: VerifyPolicy) -> int:
    overrides = {"llm": tuple(args.llm) if args.llm else None, "budget_usd": args.budget_usd,
                 "max_hours": args.max_hours, "max_candidates": args.max_candidates,
                 "candidate_format": args.format, "memory": True if args.memory else None, "seed": args.seed}
    try:
        config = load_optimize(args.config, overrides)
        archive = Archive(args.archive or DEFAULT_PATH)
        if args.resume:
            if args.tasks:
                return fail("--resume continues a run with its own tasks; pass either tasks or --resume, not both")
            setup = run_setup.resume(archive, args.resume)
        else:
            setup = run_setup.start(archive, config, policy, collect(args.tasks))
    except (ConfigError, TaskError, run_setup.SetupError, ProviderError, ArchiveError) as err:
        return fail(str(err))
    return optimize.run_search(setup)


def archive_command(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    try:
        archive = Archive(args.archive or DEFAULT_PATH, create=False)
        if args.action == "list":
            console.print(archive_views.list_view(archive))
        elif args.action == "show":
            if len(args.names) != 1:
                return fail("archive show takes one RUN_ID or CANDIDATE_ID (see `python -m evo archive list`)")
            console.print(archive_views.show_view(archive, args.names[0]))
        elif args.action == "best":
            task = args.names[0] if args.names else None
            console.print(archive_views.best_view(archive, task=task, run_id=args.run))
        else:
            if len(args.names) != 2:
                return fail("archive diff takes two candidate ids, such as c3 c7")
            first, second = (archive_views.parse_candidate_id(name) for name in args.names)
            console.print(archive_views.diff_view(archive, first, second))
    except ArchiveError as err:
        return fail(str(err))
    return 0


def export_command(args: argparse.Namespace) -> int:
    try:
        archive = Archive(args.archive or DEFAULT_PATH, create=False)
        done = export.export(archive, args.target, args.to, task=args.task, name=args.name, arch=args.arch,
                             force=args.force)
    except (ArchiveError, export.ExportError) as err:
        return fail(str(err))
    except OSError as err:
        return fail(f"cannot write the export to {args.to} ({err.strerror or err}); pass a directory you can write to")
    candidate = done.candidate
    environment = candidate.environment or {}
    where = environment.get("gpu") or environment.get("cpu") or "the CPU"
    print(f"exported c{candidate.candidate_id} (task {Path(candidate.task).stem}, {candidate.fitness:.2f}x on {where}) "
          f"to {done.directory} as the package {done.package}")
    for note in done.notes:
        print(f"note: {note}")
    print(f"next: pip install --no-build-isolation {done.directory}\n"
          f"then: import {done.package}; {done.package}.swap_in(model, TheModuleItReplaces)  "
          f"(README.md in {done.directory} says how it was verified)")
    return 0

"""`python -m evo …`: the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evo import commands, evaluator, report, task_audit
from evo.config import ConfigError, load_policy


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence and exit code 2, like every other bad input
        self.exit(2, f"evo: {message}; run '{self.prog} --help' for the options\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m evo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    verify = commands.add_parser("verify", help="verify a candidate kernel against a task")
    verify.add_argument("task", type=Path, help="task file: class Model, get_inputs(), get_init_inputs()")
    verify.add_argument("candidate", type=Path, help="candidate file defining class ModelNew")
    add_common(verify)
    verify.add_argument("--allow-no-custom-code", action="store_true",
                        help="verify candidates whose own compiled code does not run (pure-PyTorch rewrites)")
    verify.add_argument("--allow-reduced-precision", action="store_true",
                        help="allow TF32, bf16 operands and fast-math flags (reported in the verdict)")
    verify.add_argument("--tolerance", type=float, help="relative error allowed, instead of the derived bound")
    verify.add_argument("--trials", type=int, help="correctness trials, each with fresh inputs (default 5)")
    verify.add_argument("--compile-baseline", action="store_true", help="also time torch.compile of the reference")
    verify.add_argument("--call-timeout", type=float, help="seconds one call may take (default 60)")
    verify.add_argument("--build-timeout", type=float, help="seconds the build may take (default 900)")

    check = commands.add_parser("check-task", help="audit a task: outputs that barely depend on the inputs")
    check.add_argument("task", type=Path)
    add_common(check)

    optimize = commands.add_parser("optimize", help="search for faster kernels for tasks, with an LLM")
    optimize.add_argument("tasks", type=Path, nargs="*", help="task files, or directories of them")
    optimize.add_argument("--llm", action="append",
                          help="openai:MODEL, anthropic:MODEL, openai-compatible:MODEL@URL or scripted:DIR, "
                               "optionally *WEIGHT; repeat to mix models (default: from the environment's API keys)")
    optimize.add_argument("--budget-usd", type=float, help="stop when the LLM calls of the run cost this much")
    optimize.add_argument("--max-hours", type=float, help="stop the run after this many hours")
    optimize.add_argument("--max-candidates", type=int, help="candidates per task (default 40)")
    optimize.add_argument("--archive", type=Path, help="the archive's SQLite file (default archive/evo.sqlite)")
    optimize.add_argument("--resume", metavar="RUN_ID", help="continue a stopped or killed run")
    optimize.add_argument("--format", choices=["load_inline", "nvrtc"], help="the candidate format asked of the LLM")
    optimize.add_argument("--memory", action="store_true", help="show verified winners of other tasks as examples")
    optimize.add_argument("--seed", type=int)
    optimize.add_argument("--allow-reduced-precision", action="store_true",
                          help="allow TF32, bf16 operands and fast-math flags")
    add_common(optimize)

    export = commands.add_parser("export", help="write a verified kernel as a PyTorch package (custom op, build, tests)")
    export.add_argument("target", metavar="RUN_ID|TASK.py|CANDIDATE_ID",
                        help="the best verified kernel of a run, of a task across runs, or one candidate (c42)")
    export.add_argument("--to", type=Path, required=True, metavar="DIR", help="the directory to write the package to")
    export.add_argument("--task", help="which of a run's tasks (a name or file), or the task file if it has moved")
    export.add_argument("--name", help="the package's import name (default: evo_ and the task's name)")
    export.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST of the build (default: the GPU the kernel was measured on)")
    export.add_argument("--force", action="store_true",
                        help="write into a non-empty directory: an earlier export there is replaced, other files are kept")
    export.add_argument("--archive", type=Path, help="the archive's SQLite file (default archive/evo.sqlite)")

    archive = commands.add_parser("archive", help="look inside the archive: list, show, best, diff")
    archive.add_argument("action", choices=["list", "show", "best", "diff"])
    archive.add_argument("names", nargs="*", help="show RUN_ID|CANDIDATE_ID; best [TASK]; diff CANDIDATE CANDIDATE")
    archive.add_argument("--archive", type=Path, help="the archive's SQLite file (default archive/evo.sqlite)")
    archive.add_argument("--run", help="best: within this run only")
    return parser


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    parser.add_argument("--config", type=Path, help="TOML file whose [verify] table sets the policy")
    parser.add_argument("--memory-limit-gb", type=float, help="resident memory a sandboxed process may use")
    parser.add_argument("--disk-limit-gb", type=float, help="what a sandboxed process may write to disk")
    parser.add_argument("--task-limit", type=int, help="processes and threads a sandbox may hold at once")
    parser.add_argument("--no-namespaces", action="store_true",
                        help="do not use Linux namespaces for the sandbox (reported in the verdict)")
    parser.add_argument("--no-fork-server", action="store_true",
                        help="start every candidate process and build as a fresh interpreter instead of forking it "
                             "from one that has imported torch (slower; reported in the verdict)")


def policy_from(args: argparse.Namespace):
    overrides = {
        "device": args.device,
        "memory_limit_bytes": int(args.memory_limit_gb * 2**30) if args.memory_limit_gb is not None else None,
        "disk_limit_bytes": int(args.disk_limit_gb * 2**30) if args.disk_limit_gb is not None else None,
        "task_limit": args.task_limit,
        "use_namespaces": False if args.no_namespaces else None,
        "fork_server": False if args.no_fork_server else None,
    }
    if args.command == "optimize":
        overrides.update(allow_reduced_precision=True if args.allow_reduced_precision else None)
    if args.command == "verify":
        overrides.update(
            require_custom_code=False if args.allow_no_custom_code else None,
            allow_reduced_precision=True if args.allow_reduced_precision else None,
            tolerance=args.tolerance, trials=args.trials,
            compile_baseline=True if args.compile_baseline else None,
            call_timeout_s=args.call_timeout, build_timeout_s=args.build_timeout)
    return load_policy(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "archive":
        return commands.archive_command(args)
    if args.command == "export":
        return commands.export_command(args)
    try:
        policy = policy_from(args)
    except ConfigError as err:
        print(f"evo: {err}", file=sys.stderr)
        return 2
    if args.command == "optimize":
        return commands.optimize_command(args, policy)
    if args.command == "verify":
        verdict = evaluator.verify(args.task, args.candidate, policy)
        report.show_verdict(verdict, as_json=args.json)
        return verdict.exit_code
    audit = task_audit.check_task(args.task, policy)
    report.show_audit(audit, as_json=args.json)
    return audit.exit_code

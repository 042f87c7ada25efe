"""What `python -m evo archive …` shows: rich renderables made from the archive. The CLI prints
them with a rich Console, which writes plain text when the output is not a terminal."""

from __future__ import annotations

import difflib
import io
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from evo.archive import Archive, ArchiveError, Candidate, LineageStep, Run, RunTotals

VERDICT_STYLE = {"verified": "green", "rejected": "red", "error": "yellow", None: "dim"}
RUN_STYLE = {"running": "cyan", "finished": "green", "stopped": "yellow", "failed": "red"}


def render_text(renderable: RenderableType, width: int = 120) -> str:
    """The renderable as plain text, as it would print into a pipe."""
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    console.print(renderable)
    return console.file.getvalue()


def parse_candidate_id(text: str) -> int:
    """ "c42" or "42" -> 42."""
    digits = text.removeprefix("c")
    if not digits.isdigit():
        raise ArchiveError(f"{text!r} is not a candidate id; candidate ids look like c42, run ids like r251125-1137-k3f")
    return int(digits)


def speedup_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def when(moment) -> str:
    return "-" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M")


def lineage_text(steps: list[LineageStep]) -> str:
    return " -> ".join(f"c{step.candidate_id} {step.operator}" for step in steps)


def list_view(archive: Archive) -> RenderableType:
    """`archive list`: every run, newest first."""
    runs = archive.runs()
    if not runs:
        return Text(f"no runs in {archive.path} yet; `python -m evo optimize` starts one")
    table = Table(title=f"runs in {archive.path}")
    for column in ("run", "started", "status", "tasks", "candidates", "verified", "best speedup", "spend"):
        table.add_column(column, justify="right" if column in ("candidates", "verified", "best speedup", "spend")
                         else "left")
    for run in runs:
        totals = archive.totals(run.run_id)
        table.add_row(run.run_id, when(run.started_at), f"[{RUN_STYLE[run.status]}]{run.status}[/]",
                      escape(tasks_text(run)), str(totals.candidates), str(totals.verified),
                      speedup_text(totals.best_speedup), spend_text(totals))
    return table


def tasks_text(run: Run) -> str:
    names = [Path(task).name for task in run.tasks]
    return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:3])} and {len(names) - 3} more"


def spend_text(totals: RunTotals) -> str:
    return f"${totals.spend.cost_usd:.2f}"


def show_view(archive: Archive, name: str) -> RenderableType:
    """`archive show NAME`: a run (r...) or a candidate (c42 or 42)."""
    if name.startswith("r"):
        return run_view(archive, name)
    return candidate_view(archive, parse_candidate_id(name))


def run_view(archive: Archive, run_id: str) -> RenderableType:
    summary = archive.run_summary(run_id)
    run, totals = summary.run, summary.totals
    header = Text.from_markup(
        f"run [bold]{run.run_id}[/] [{RUN_STYLE[run.status]}]{run.status}[/], started {when(run.started_at)}, "
        f"finished {when(run.finished_at)}\ncommand: {escape(run.command)}\n"
        f"hardware: {escape(', '.join(f'{k} {v}' for k, v in run.hardware.items())) or '-'}\n"
        f"LLM: {totals.spend.llm_calls} calls ({totals.spend.failed_calls} failed, {totals.spend.scripted_calls} "
        f"scripted), {totals.spend.input_tokens} input tokens ({totals.spend.cached_input_tokens} cached), "
        f"{totals.spend.output_tokens} output tokens, ${totals.spend.cost_usd:.2f}")
    tasks = Table(title="tasks")
    for column in ("task", "verified", "rejected", "error", "unfinished", "best", "lineage of the best", "calls", "cost"):
        tasks.add_column(column, overflow="fold")
    for task in summary.tasks:
        counts = task.outcomes
        tasks.add_row(escape(task.task), str(counts["verified"]), str(counts["rejected"]), str(counts["error"]),
                      str(counts["unfinished"]), speedup_text(task.best.fitness if task.best else None),
                      lineage_text(task.lineage) or "-", str(task.spend.llm_calls), f"${task.spend.cost_usd:.2f}")
    return Group(header, tasks, candidates_table(archive.candidates(run_id)))


def candidates_table(candidates: list[Candidate]) -> Table:
    table = Table(title="candidates")
    for column in ("id", "task", "gen", "island", "operator", "parents", "status", "verdict", "speedup", "summary"):
        table.add_column(column, overflow="fold")
    for candidate in candidates:
        table.add_row(f"c{candidate.candidate_id}", escape(Path(candidate.task).name), str(candidate.generation),
                      str(candidate.island), escape(candidate.operator),
                      " ".join(f"c{parent}" for parent in candidate.parent_ids) or "-", candidate.status,
                      f"[{VERDICT_STYLE[candidate.verdict]}]{candidate.verdict or '-'}[/]",
                      speedup_text(candidate.fitness), escape(candidate.summary or ""))
    return table


def measurement_text(candidate: Candidate) -> str:
    if candidate.fitness is None:
        untrusted = " (a re-measurement did not verify)" if candidate.failed_remeasurements else ""
        return f"speedup -{untrusted}"
    line = f"speedup {speedup_text(candidate.fitness)}"
    if candidate.remeasured_speedups:
        every = ", ".join(speedup_text(value) for value in candidate.measurements)
        line += f" (median of {len(candidate.measurements)} measurements: {every})"
    if candidate.speedup_vs_compile is not None:
        line += f", {speedup_text(candidate.speedup_vs_compile)} vs torch.compile"
    return line


def candidate_header(candidate: Candidate) -> Text:
    parents = " ".join(f"c{parent}" for parent in candidate.parent_ids) or "none"
    environment = candidate.environment or {}
    return Text.from_markup(
        f"candidate [bold]c{candidate.candidate_id}[/] of run {candidate.run_id}: task {escape(candidate.task)}, "
        f"generation {candidate.generation}, island {candidate.island}, operator {escape(candidate.operator)}, "
        f"parents {parents}\n[{VERDICT_STYLE[candidate.verdict]}]{candidate.verdict or candidate.status}[/] "
        f"{escape(candidate.summary or '')}\n{measurement_text(candidate)}"
        + escape(f"\nmeasured on {environment.get('gpu') or environment.get('cpu') or '?'}"
                 f" (torch {environment.get('torch', '?')}, evo {environment.get('evo', '?')})" if environment else ""),
        emoji=False)


def candidate_view(archive: Archive, candidate_id: int) -> RenderableType:
    candidate = archive.candidate(candidate_id)
    parts: list[RenderableType] = [candidate_header(candidate),
                                   Text(f"lineage: {lineage_text(archive.lineage(candidate_id))}")]
    if candidate.checks:
        checks = Table(title="checks")
        for column in ("check", "result", "detail"):
            checks.add_column(column, overflow="fold")
        for check in candidate.checks:
            checks.add_row(escape(check.name), "[green]pass[/]" if check.passed else "[red]FAIL[/]", escape(check.detail))
        parts.append(checks)
    if candidate.build_log:
        parts += [Text("build log (last 20 lines):", style="bold"),
                  Text("\n".join(candidate.build_log.splitlines()[-20:]))]
    parts += [Text("source:", style="bold"), Text(candidate.source)]
    return Group(*parts)


def best_view(archive: Archive, task: str | None = None, run_id: str | None = None) -> RenderableType:
    """`archive best [TASK]`: the best verified kernel, with its lineage and its source."""
    best = archive.best(task, run_id)
    if best is None:
        scope = f" for {task}" if task else ""
        return Text(f"no verified candidate{scope} in {archive.path}")
    return Group(candidate_header(best), Text(f"lineage: {lineage_text(archive.lineage(best.candidate_id))}"),
                 Text("source:", style="bold"), Text(best.source))


def diff_view(archive: Archive, first: int, second: int) -> RenderableType:
    """`archive diff A B`: both verdicts, then a unified diff of the sources (A to B)."""
    a, b = archive.candidate(first), archive.candidate(second)
    lines = difflib.unified_diff(a.source.splitlines(), b.source.splitlines(), lineterm="",
                                 fromfile=f"c{a.candidate_id}", tofile=f"c{b.candidate_id}")
    diff = Text()
    for line in lines:
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else "cyan" if line.startswith("@") else ""
        diff.append(line + "\n", style=style)
    if not diff.plain:
        diff = Text("the sources are identical")
    return Group(*(Text(f"c{c.candidate_id}: {c.verdict or c.status}, {measurement_text(c)}; {c.summary or ''}")
                   for c in (a, b)), diff)

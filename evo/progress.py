"""What a running search shows: a live view on a terminal (rich), plain log lines otherwise
(nohup, overnight, CI), so the same run reads well in both."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table


@dataclass
class TaskProgress:
    name: str
    outcomes: Counter = field(default_factory=Counter)  # verified, rejected, error, duplicate, no_code
    best_speedup: float | None = None
    best_lineage: str = ""  # e.g. "c1 translate <- c4 improve"
    status: str = "waiting"


class Progress:
    def __init__(self, run_id: str, task_names: list[str], scripted: bool, console: Console | None = None):
        self.run_id, self.scripted = run_id, scripted
        self.console = console or Console(highlight=False)
        self.live_view = self.console.is_terminal
        self.started = time.monotonic()
        self.tasks = {name: TaskProgress(name) for name in task_names}
        self.spend_usd = 0.0
        self.llm_calls = 0
        self.live: Live | None = None

    # ---- events ---------------------------------------------------------------------------

    def log(self, text: str) -> None:
        """A line for the record: printed above the live view, or as a plain line."""
        stamp = time.strftime("%H:%M:%S")
        if self.live is not None:
            self.live.console.print(f"[dim]{stamp}[/] {text}")
        else:
            print(f"{stamp} {text}", flush=True)

    def outcome(self, task: str, kind: str, text: str) -> None:
        self.tasks[task].outcomes[kind] += 1
        self.log(f"{task}: {text}")
        self.refresh()

    def best(self, task: str, speedup: float, lineage: str) -> None:
        progress = self.tasks[task]
        progress.best_speedup, progress.best_lineage = speedup, lineage
        self.refresh()

    def spend(self, cost_usd: float, calls: int = 1) -> None:
        self.spend_usd += cost_usd
        self.llm_calls += calls

    def status(self, task: str, status: str) -> None:
        self.tasks[task].status = status
        self.refresh()

    # ---- the live view ----------------------------------------------------------------------

    def __enter__(self) -> Progress:
        if self.live_view:
            self.live = Live(self.render(), console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.update(self.render())
            self.live.__exit__(*exc)
            self.live = None

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def render(self) -> Table:
        elapsed = time.monotonic() - self.started
        title = (f"evo run {self.run_id}  {elapsed / 60:.1f} min  ${self.spend_usd:.2f} over {self.llm_calls} LLM calls"
                 + ("  [yellow](scripted replies)[/]" if self.scripted else ""))
        table = Table(title=title, title_justify="left")
        for column in ("task", "status", "verified", "rejected", "error", "other", "best", "lineage"):
            table.add_column(column)
        for progress in self.tasks.values():
            counts = progress.outcomes
            other = counts["duplicate"] + counts["no_code"]
            best = f"{progress.best_speedup:.3f}x" if progress.best_speedup is not None else "-"
            table.add_row(progress.name, progress.status, str(counts["verified"]), str(counts["rejected"]),
                          str(counts["error"]), str(other), best, progress.best_lineage)
        return table

"""Showing a verdict: a readable report by default, one JSON object with --json."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from evo.verdict import TaskAudit, Verdict

STYLE = {"verified": "bold green", "rejected": "bold red", "error": "bold yellow"}


def show_verdict(verdict: Verdict, as_json: bool) -> None:
    if as_json:
        print(verdict.model_dump_json())
        return
    console = Console(highlight=False)
    console.print(f"[{STYLE[verdict.verdict]}]{verdict.verdict.upper()}[/] {verdict.summary}")
    console.print(f"task {verdict.task}\ncandidate {verdict.candidate}\ndevice {verdict.device}"
                  + (f" ({verdict.environment.get('gpu')})" if verdict.environment.get("gpu") else ""))
    if verdict.checks:
        table = Table(title="checks", show_lines=False)
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        for check in verdict.checks:
            table.add_row(check.name, "[green]pass[/]" if check.passed else "[red]FAIL[/]", check.detail)
        console.print(table)
    show_timings(console, verdict)
    for warning in verdict.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    if verdict.isolation:
        iso = verdict.isolation
        console.print(f"isolation: {iso.method}; network {'isolated' if iso.network_isolated else 'NOT isolated'}; "
                      f"PID namespace {'yes' if iso.pid_namespace else 'no'}; memory limit "
                      f"{iso.memory_limit_bytes / 2**30:.1f} GiB; at most {iso.task_limit} processes and threads; "
                      f"call timeout {iso.call_timeout_s:g} s; "
                      f"processes {'forked by the fork server' if iso.forked else 'started afresh'}"
                      + "".join(f"\n  note: {note}" for note in iso.notes))


def show_timings(console: Console, verdict: Verdict) -> None:
    t = verdict.timings
    rows = [("candidate", t.candidate), ("reference (eager)", t.reference_eager),
            ("reference (torch.compile)", t.reference_compile)]
    rows = [(name, stats) for name, stats in rows if stats is not None]
    if rows:
        table = Table(title="timings (per call, inputs rotated, cache flushed)")
        for column in ("subject", "median ms", "IQR ms", "min ms", "calls", "parent wall ms"):
            table.add_column(column, justify="right" if column != "subject" else "left")
        for name, stats in rows:
            table.add_row(name, f"{stats.median_ms:.4f}", f"{stats.iqr_ms:.4f}", f"{stats.min_ms:.4f}",
                          str(stats.calls), f"{stats.wall_median_ms:.4f}")
        console.print(table)
    if verdict.speedup is not None:
        line = f"speedup {verdict.speedup:.3f}x vs eager"
        if verdict.speedup_vs_compile is not None:
            line += f", {verdict.speedup_vs_compile:.3f}x vs torch.compile"
        console.print(f"[bold]{line}[/]")
    roof = verdict.roofline
    if roof and roof.fraction_of_bandwidth is not None:
        console.print(f"roofline: {roof.achieved_bytes_per_s / 1e9:.1f} GB/s ({roof.fraction_of_bandwidth:.1%} of measured "
                      f"bandwidth), {roof.achieved_flops_per_s / 1e9:.1f} GFLOP/s ({roof.fraction_of_peak_flops:.1%} of "
                      f"measured peak); speed of light {roof.speed_of_light_ms:.4f} ms")
    console.print(f"wall time: build {t.build_s:.1f} s, start-up and correctness {t.correctness_s:.1f} s, "
                  f"timing {t.timing_s:.1f} s, total {t.total_s:.1f} s")


def show_audit(audit: TaskAudit, as_json: bool) -> None:
    if as_json:
        print(audit.model_dump_json())
        return
    console = Console(highlight=False)
    if audit.status == "error":
        console.print(f"[bold yellow]ERROR[/] {audit.error}")
        return
    console.print(f"[bold {'green' if audit.status == 'ok' else 'yellow'}]{audit.status.upper()}[/] task {audit.task}")
    for warning in audit.warnings:
        console.print(f"[yellow]warning:[/] {warning}")

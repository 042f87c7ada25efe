"""Other processes computing on the GPU while evo times there.

evo's device lock keeps its own evaluations apart, but anything else on the GPU (another user's
job, a notebook, a test run's own kernels) takes SM time from the timed calls: times measured
beside it are slower and less steady than the device's, and the timing protocol's own checks may
fail for an honest candidate. The driver samples which process computed (evo.nvml). Only the
timed evaluation's own processes (its checker, cache flusher and candidate process, and what they
started) may compute then: any other is a neighbour, evo's own included. None of evo's should
(another evaluation's build sees no GPU, its processes make their contexts only outside timings,
evo.start_gate), so one that does, a build that gave itself the GPU back say, is named as any
other process would be, and a reference timed beside it is not reused.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from evo import nvml
from evo.live_sandboxes import descends_from
from evo.devices import Device
from evo.verdict import Check

COMMAND_CHARS = 80  # of a neighbour's command line, in what evo says of it
# A span shorter than this many of the driver's sample periods may have few samples or none
# (a small kernel's reference timing takes milliseconds): see `beside`.
SHORT_SPAN_PERIODS = 2
# Time outside a candidate's timer that neighbours holding a share s of the GPU could cause: up
# to this many times s of a window's wall time. The driver's shares are averages over samples.
NEIGHBOUR_MARGIN = 2.0


class GpuShared(Exception):
    """A candidate's timing failed a check of time by as much as other processes, computing
    beside it, could cause: neither it nor the timing can be judged."""


@dataclass(frozen=True)
class Neighbour:
    pid: int
    command: str  # its command line, shortened
    sm_percent: int  # its average share of the GPU's SMs over the span, as the driver sampled it
    evo_own: bool = False  # started by this evo, for another evaluation or none

    def describe(self) -> str:
        whose = ", one of this evo's own processes" if self.evo_own else ""
        return f"PID {self.pid} ({self.command}{whose}) at {self.sm_percent}% of the SMs"


def listed(neighbours: list[Neighbour]) -> str:
    return "; ".join(neighbour.describe() for neighbour in neighbours)


def beside(device: Device, since: float, ours: list[int], whole_span: bool = False) -> list[Neighbour]:
    """The processes that computed on the device since `since` (time.time()) other than `ours`
    (the timed evaluation's processes) and their descendants. Nothing where the driver cannot
    say, or where its PIDs are not this PID namespace's (evo in a container of its own): none of
    the processes it lists on the GPU is then one of evo's, though evo's hold contexts there (a
    small kernel's keep the SMs busy under the 1% the driver reports). A driver's sample covers
    the period before it (evo.nvml), so `since` should follow the start of the device turn by
    that much, else the previous holder's last work shows: the warm-up before each timing does.

    With `whole_span`, a short span waits (up to a period and a half, on the device) for the
    sample that covers its end: for the reference's timing, which a session reuses. A
    candidate's timing does not wait, and a neighbour busy only within its last sample period
    goes unseen."""
    if device.kind != "cuda":
        return []
    ended = time.time()
    if whole_span and ended - since < SHORT_SPAN_PERIODS * nvml.SAMPLE_PERIOD_S:
        nvml.await_sample(device.visible, ended, 1.5 * nvml.SAMPLE_PERIOD_S)
    busy = nvml.busy_processes(device.visible, since)
    if not busy or not any(descends_from(pid, os.getpid()) for pid in nvml.compute_processes(device.visible) or ()):
        return []
    return [Neighbour(pid=pid, command=shortened(command_line(pid)), sm_percent=percent,
                      evo_own=descends_from(pid, os.getpid()))
            for pid, percent in sorted(busy.items())
            if not any(descends_from(pid, own) for own in ours) and Path(f"/proc/{pid}").exists()]


def command_line(pid: int) -> str:
    """A process's command line as one string ("?" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def shortened(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()  # a `python -c` script's lines, say
    return text if len(text) <= COMMAND_CHARS else text[:COMMAND_CHARS - 3] + "..."


def warnings(beside_reference: list[Neighbour], beside_candidate: list[Neighbour]) -> list[str]:
    return [warning(found, subject) for found, subject in ((beside_reference, "the reference"),
                                                           (beside_candidate, "the candidate")) if found]


def warning(neighbours: list[Neighbour], subject: str) -> str:
    return (f"other processes computed on the GPU while {subject} was timed ({listed(neighbours)}): times measured beside them "
            "are slower and less steady than the GPU's own; verify again on an idle GPU for figures to rely on")


def judge_timing_beside(neighbours: list[Neighbour], consistency: Check, unaccounted_ms: float,
                        window_ms: float) -> None:
    """Time unaccounted by a candidate's timer is what work hidden outside it looks like, and
    also what a neighbour's kernels, run between the timed calls, look like. A neighbour holding
    a share of the GPU takes about that share of each window's wall time: a failure of the check
    within what its share could take (with a margin, its bursts need not spread evenly)
    accuses no one; beyond it, the failure stands, so no neighbour covers a tampered timer."""
    share = min(1.0, sum(neighbour.sm_percent for neighbour in neighbours) / 100)
    if neighbours and not consistency.passed and unaccounted_ms <= NEIGHBOUR_MARGIN * share * window_ms:
        raise GpuShared(f"the candidate's timing failed {consistency.name} while other processes computed on the GPU "
                        f"({listed(neighbours)}), whose share of it could take the {unaccounted_ms:.4f} ms per window of "
                        f"{window_ms:.4f} ms that its timer left out: verify again on an idle GPU")

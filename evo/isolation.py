"""Which isolation this machine allows, and the command prefix that applies it.

Preferred: `unshare` with a user, PID, network, IPC and mount namespace (its own /proc, so the
candidate sees no other process; no network; everything in it dies with it), and inside it
sandbox/enter.sh, which leaves only the sandbox's own directory writable. Where the OS refuses
namespaces, the sandbox still gets its own process group, temporary directory, scrubbed
environment and resource limits, and the verdict says what was missing.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from evo import live_sandboxes
from evo.sandbox import wire
from evo.verdict import Isolation

if TYPE_CHECKING:  # the runner imports this module
    from evo.sandbox_runner import Limits


class IsolationProfile(BaseModel):
    model_config = ConfigDict(frozen=True)

    method: str  # "unshare" or "process-group"
    command_prefix: tuple[str, ...]
    network_isolated: bool  # own network namespace: no interface but loopback
    # setsid and setpgid have no effect in a sandbox (sandbox/isolate.py): a signal to its group reaches all of it
    process_group_kept: bool = False
    pid_namespace: bool  # sees only its own processes; all die with the sandbox
    user_namespace: bool
    read_only_filesystem: bool  # everything but the sandbox's own directory is read-only, locked
    notes: tuple[str, ...] = ()

    def report(self, limits: Limits, call_timeout_s: float, visible_gpus: str, forked: bool) -> Isolation:
        """What a verdict says of the isolation its candidate ran under."""
        return Isolation(method=self.method, network_isolated=self.network_isolated, pid_namespace=self.pid_namespace,
                         user_namespace=self.user_namespace, read_only_filesystem=self.read_only_filesystem,
                         memory_limit_bytes=limits.memory_bytes, disk_limit_bytes=limits.disk_bytes,
                         task_limit=limits.tasks, process_group_kept=self.process_group_kept,
                         call_timeout_s=call_timeout_s,
                         visible_gpus=visible_gpus, forked=forked, notes=list(self.notes))

    def command(self, writable: Path, program: list[str]) -> list[str]:
        """The command line that runs `program` under this profile, with `writable` its only writable directory."""
        if self.read_only_filesystem:
            return [*self.command_prefix, "sh", str(ENTER_SCRIPT), str(writable), "--", *program]
        return [*self.command_prefix, *program]


ENTER_SCRIPT = Path(wire.__file__).resolve().parent / "enter.sh"


# Ordered from strongest to weakest; the first that runs a trivial command is used.
_CANDIDATE_FLAGS = (
    ("--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--ipc"),
    ("--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--ipc"),
    ("--user", "--map-root-user", "--net"),
    ("--net",),
)


@functools.cache
def probe(allow_namespaces: bool = True) -> IsolationProfile:
    unshare = shutil.which("unshare")
    kept = _process_group_kept()
    group_note = () if kept else ("a sandbox's processes can leave its process group (no seccomp filter here): one "
                                  "that forks and moves on fast enough may run on while evo holds the sandbox",)
    if not live_sandboxes.death_signal_prefix():
        group_note += ("no parent-death signal here (setpriv --pdeathsig): a sandbox blocked in a call outlives "
                       "an evo that is killed",)
    if allow_namespaces and unshare and os.name == "posix":
        for flags in _CANDIDATE_FLAGS:
            command = (unshare, *flags)
            try:
                ok = subprocess.run([*command, "true"], capture_output=True, timeout=20).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                pid_ns = "--pid" in flags
                read_only = "--user" in flags and "--mount-proc" in flags and _read_only_works(command)
                notes = () if pid_ns else ("no PID namespace: the sandbox can see other processes of this user",)
                if not read_only:
                    notes += ("the filesystem could not be made read-only: a sandbox can write where this user can",)
                return IsolationProfile(method="unshare", command_prefix=command, network_isolated="--net" in flags,
                                        pid_namespace=pid_ns, user_namespace="--user" in flags,
                                        read_only_filesystem=read_only, process_group_kept=kept,
                                        notes=notes + group_note)
    reason = "namespaces were disabled by the caller" if not allow_namespaces else \
        "this OS refused every namespace (no unshare, or unprivileged namespaces are off)"
    return IsolationProfile(method="process-group", command_prefix=(), network_isolated=False, pid_namespace=False,
                            user_namespace=False, read_only_filesystem=False, process_group_kept=kept,
                            notes=(f"{reason}: the candidate shares the network and can see other processes of this "
                                   "user",) + group_note)


@functools.cache
def _process_group_kept() -> bool:
    """Whether sandbox/isolate.py's filter keeps a process in its process group here (it needs seccomp)."""
    check = ("import os, sys; sys.path.insert(0, sys.argv[1]); import isolate; group = os.getpgid(0); "
             "kept = isolate.keep_process_group(); os.setsid(); sys.exit(0 if kept and os.getpgid(0) == group else 1)")
    try:
        return subprocess.run([sys.executable, "-S", "-c", check, str(ENTER_SCRIPT.parent)], capture_output=True,
                              timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _read_only_works(prefix: tuple[str, ...]) -> bool:
    """Whether enter.sh leaves exactly its directory writable here (some kernels refuse the remounts)."""
    with tempfile.TemporaryDirectory(prefix="evo-probe-") as scratch:
        inside, outside = Path(scratch, "inside"), Path(scratch, "outside")
        inside.mkdir()
        outside.mkdir()
        probe = (f"touch {inside}/written && ! touch {outside}/written 2>/dev/null")
        try:
            result = subprocess.run([*prefix, "sh", str(ENTER_SCRIPT), str(inside), "--", "sh", "-c", probe],
                                    capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return result.returncode == 0 and (inside / "written").exists() and not (outside / "written").exists()

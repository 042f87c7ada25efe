"""Which isolation this machine allows, and the command prefix that applies it.

Preferred: `unshare` with a user, PID, network, IPC and mount namespace (its own /proc, so the
candidate sees no other process; no network; everything in it dies with it). Where the OS
refuses namespaces, the sandbox still gets its own process group, temporary directory,
scrubbed environment and resource limits, and the verdict says what was missing.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

from pydantic import BaseModel, ConfigDict


class IsolationProfile(BaseModel):
    model_config = ConfigDict(frozen=True)

    method: str  # "unshare" or "process-group"
    command_prefix: tuple[str, ...]
    network_isolated: bool  # own network namespace: no interface but loopback
    pid_namespace: bool  # sees only its own processes; all die with the sandbox
    user_namespace: bool
    notes: tuple[str, ...] = ()


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
    if allow_namespaces and unshare and os.name == "posix":
        for flags in _CANDIDATE_FLAGS:
            command = (unshare, *flags)
            try:
                ok = subprocess.run([*command, "true"], capture_output=True, timeout=20).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                pid_ns = "--pid" in flags
                notes = () if pid_ns else ("no PID namespace: the sandbox can see other processes of this user",)
                return IsolationProfile(method="unshare", command_prefix=command, network_isolated="--net" in flags,
                                        pid_namespace=pid_ns, user_namespace="--user" in flags, notes=notes)
    reason = "namespaces were disabled by the caller" if not allow_namespaces else \
        "this OS refused every namespace (no unshare, or unprivileged namespaces are off)"
    return IsolationProfile(method="process-group", command_prefix=(), network_isolated=False, pid_namespace=False,
                            user_namespace=False, notes=(f"{reason}: the candidate shares the network and can see "
                                                         "other processes of this user",))

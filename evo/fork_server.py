"""evo's side of the fork server (sandbox/forkserver.py): a sandboxed interpreter that has
imported torch once per task session and forks every candidate process and build from that
state, each still used for one candidate only, in namespaces of its own.

A fresh `python3` that imports torch costs about 5 CPU seconds; a candidate needs two (the timed
process and the profiler's), and a build one more. Forked, each costs a few hundredths of a
second before it opens its own device context.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
from pathlib import Path

from evo.isolation import IsolationProfile
from evo.live_sandboxes import children
from evo.sandbox_runner import SandboxFailure, SandboxProcess, widen_pipe

# The programs a fork can run: those whose start-up is an interpreter importing torch.
FORKED_PROGRAMS = ("candidate.py", "build.py", "pch.py")
KEEPER_EXIT_S = 5.0  # the most a keeper that has reported may take to exit


class ForkedProcess:
    """A forked process as subprocess.Popen shows its child: `pid` is its keeper's (the leader
    of its process group), `poll` and `wait` give the exit code the keeper reports, `stdout` and
    `stderr` its output; `kill` ends it and everything in its namespaces."""

    def __init__(self, pid: int, status_fd: int, stdout_fd: int, stderr_fd: int):
        self.pid = pid
        self.returncode: int | None = None
        self.status_fd = status_fd
        self.stdout = os.fdopen(stdout_fd, "rb", buffering=0)
        self.stderr = os.fdopen(stderr_fd, "rb", buffering=0)
        self.inner: list[int] = []  # the process itself, under its keeper, once looked up
        self.keeper = keeper_handle(pid)  # readable once the keeper has exited; None if it has

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.status_fd], [], [], 0)[0]:
            self._read_status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self.status_fd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(f"forked process {self.pid}", timeout)
            self._read_status()
        return self.returncode

    def _read_status(self) -> None:
        text = os.read(self.status_fd, 64).strip()
        os.close(self.status_fd)
        # A keeper killed before its child ended says nothing: evo killed it.
        self.returncode = int(text) if text.lstrip(b"-").isdigit() else -signal.SIGKILL
        # Ended means every process of its group: the keeper exits as soon as it has reported.
        if self.keeper is not None:
            select.select([self.keeper], [], [], KEEPER_EXIT_S)
            os.close(self.keeper)

    def kill(self) -> None:
        """Kill the process, not its keeper, which reports its end once it has wholly ended (its
        device context closed). Where it is the first of a PID namespace, all in there end
        with it, also what left its process group; where not, what it left behind is adopted
        by evo and swept as orphans. Before the keeper forked it, the keeper's group goes."""
        self.inner = self.inner or children(self.pid)
        if not self.inner:
            os.killpg(self.pid, signal.SIGKILL)
        for pid in self.inner:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def keeper_handle(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:  # it exited already, its child unstarted
        return None


def innermost_pid(pid: int) -> int | None:
    """A process's number in its own PID namespace (the last of /proc's NSpid)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return None


class ForkServer:
    """One server per task session and device; forks are asked for from any thread."""

    def __init__(self, process: SandboxProcess, server_socket: socket.socket, profile: IsolationProfile,
                 timeout: float):
        self.process, self.socket, self.timeout = process, server_socket, timeout
        self.profile = fork_profile(profile)
        self.lock = threading.Lock()
        self.host_pid: int | None = None  # the server's own process, found once it is ready
        self.failure: str | None = None  # why it cannot serve, once known

    def usable(self) -> bool:
        return self.failure is None and self.process.running()

    def await_ready(self) -> None:
        """Called under the lock: the server has imported what it preloads (seconds, once)."""
        if self.host_pid is not None:
            return
        try:
            reply, _ = self.process.receive(self.timeout)
        except SandboxFailure as failure:
            raise self.failed(f"it did not start ({failure})") from None
        if "error" in reply:
            raise self.failed(f"it cannot serve ({reply['error']})")
        self.host_pid = server_pid(self.process.pid)

    def fork(self, program: str, home: Path, env: dict[str, str], channel: tuple[int, ...], label: str) -> ForkedProcess:
        """Fork `program` with `channel` as its message descriptors, `home` its only writable
        directory; the caller closes its copies of `channel`."""
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        status_read, status_write = os.pipe()
        widen_pipe(stdout_write)
        sent = (*channel, stdout_write, stderr_write, status_write)
        try:
            with self.lock:
                self.await_ready()
                try:
                    socket.send_fds(self.socket, [b"f"], list(sent))
                except OSError as err:
                    raise self.failed(f"its socket failed ({err})") from None
                reply, _ = self.process.request({"op": "fork", "program": program, "home": str(home), "env": env,
                                                 "fds": len(sent), "profile": self.profile,
                                                 "shared_root": str(self.process.workdir)}, timeout=self.timeout)
                if "pid" not in reply:
                    raise self.failed(f"it did not start the {label} ({reply.get('error', reply)})")
                keeper = self.host_pid_of(reply["pid"])
        except BaseException:
            for fd in (stdout_read, stderr_read, status_read):
                os.close(fd)
            raise
        finally:
            for fd in (stdout_write, stderr_write, status_write):
                os.close(fd)
        return ForkedProcess(keeper, status_read, stdout_read, stderr_read)

    def host_pid_of(self, pid: int) -> int:
        """The host's number for the server's child that the server calls `pid`."""
        for child in children(self.host_pid):
            if innermost_pid(child) == pid:
                return child
        raise self.failed(f"its child {pid} was gone at once")

    def failed(self, reason: str) -> SandboxFailure:
        """The server is not used again (its session starts processes afresh): the failure is
        neither a candidate's nor its verdict's."""
        self.failure = f"the fork server failed: {reason}"
        return SandboxFailure("protocol", self.failure, self.process.label)

    def close(self) -> None:
        self.process.close()
        self.socket.close()


def server_pid(leader: int) -> int:
    """The server's host pid: the sandbox's leader itself, or the first process of the leader's
    PID namespace (unshare forks it)."""
    for pid in (leader, *children(leader)):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[1].endswith(b"forkserver.py"):
            return pid
    return leader


def fork_profile(profile: IsolationProfile) -> dict:
    """The namespaces each fork enters, nested in the server's: those the server's own profile has."""
    return {"user_namespace": profile.user_namespace, "mount_namespace": profile.user_namespace or profile.pid_namespace,
            "pid_namespace": profile.pid_namespace, "network_isolated": profile.network_isolated,
            "ipc_namespace": "--ipc" in profile.command_prefix, "read_only_filesystem": profile.read_only_filesystem}

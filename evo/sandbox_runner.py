"""Starting a sandbox program in its own isolated process and talking to it.

A sandbox is a fresh interpreter under the isolation profile's command, or a process the
task session's fork server forked (evo/fork_server.py). Every wait has a deadline; on a
deadline, a memory overrun or a protocol violation the sandbox is killed: a fresh one's whole
process group (and with it its PID namespace, where there is one), a forked one as the first
process of its PID namespace, which ends all in there.
No threads: one selector loop drains the child's output while frames come and go.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from evo import live_sandboxes, usage
from evo.cores import thread_on
from evo.isolation import IsolationProfile
from evo.sandbox import wire

SANDBOX_DIR = Path(wire.__file__).resolve().parent
OUTPUT_KEEP = 32 * 1024  # bytes of the child's stdout/stderr kept, head and tail each
USAGE_CHECK_INTERVAL_S = 0.2


PIPE_BYTES = 1 << 20


def widen_pipe(fd: int) -> None:
    """Outputs of a timed window cross these pipes (hundreds of megabytes at times): a wider
    pipe takes a sixteenth of the system calls. Best effort: the system's limit may be lower."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (OSError, AttributeError):
        pass


# Sets the sandbox's resource limits and execs it: a subprocess preexec_fn could deadlock
# while other threads of a search start sandboxes too.
PRLIMIT = shutil.which("prlimit")


class SandboxFailure(Exception):
    """The sandboxed process ended or misbehaved; `kind` says how, the message says it in words."""

    def __init__(self, kind: str, message: str, label: str):
        super().__init__(message)
        self.kind = kind  # timeout | crashed | memory | processes | disk | protocol
        self.label = label  # which sandbox: decides whose failure it is, never the message text


@dataclass(frozen=True)
class Limits:
    memory_bytes: int  # resident memory of the whole process tree
    address_space_bytes: int | None  # RLIMIT_AS; None where it would break the device runtime
    disk_bytes: int | None = None  # what the process tree may write to disk: its directory, and files it deleted but holds
    tasks: int | None = None  # processes and threads of the tree at once (zombies too: each holds a process ID)
    open_files: int = 4096


class CappedOutput:
    """Keeps the head and the tail of a stream that may be flooded."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = OUTPUT_KEEP - len(self.head)
        self.head += data[:max(room, 0)]
        rest = data[max(room, 0):]
        if rest:
            self.tail += rest
            if len(self.tail) > OUTPUT_KEEP:
                self.dropped += len(self.tail) - OUTPUT_KEEP
                del self.tail[: len(self.tail) - OUTPUT_KEEP]

    def text(self) -> str:
        middle = f"\n[... {self.dropped} bytes dropped ...]\n" if self.dropped else ""
        return (bytes(self.head) + middle.encode() + bytes(self.tail)).decode(errors="replace")


class SandboxProcess:
    def __init__(self, program: str, *, isolation: IsolationProfile, workdir: Path, env: dict[str, str],
                 limits: Limits, label: str, shared_fd: int | None = None, door: bool = False,
                 start_cores: set[int] | None = None, fork_server=None, watch_usage: bool = True):
        self.program = SANDBOX_DIR / program
        self.start_cores = start_cores  # where it starts (its children inherit them); None: anywhere
        # Handed over beside the channel: the session's exchange buffer (checker, timed process), or
        # the fork server's socket.
        self.shared_fd = shared_fd
        # A Unix socket handed over after `shared_fd`, for descriptors made later (the input pool's).
        self.wants_door = door
        self.door: socket.socket | None = None
        self.fork_server = fork_server  # an evo.fork_server.ForkServer that forks it; None: a fresh interpreter
        # False for the fork server: its forks are its descendants (their directories in its own), and
        # each is held to the limits on its own.
        self.watch_usage = watch_usage
        self.isolation, self.workdir, self.env, self.limits, self.label = isolation, workdir, env, limits, label
        self.proc: subprocess.Popen | None = None
        self.stdout, self.stderr = CappedOutput(), CappedOutput()
        # No honest payload outgrows the memory the sandbox may hold; a claim beyond it would
        # make this process allocate what the sandbox never could.
        self.parser = wire.FrameParser(payload_limit=limits.memory_bytes)
        self.frames: list[tuple[dict, bytearray]] = []
        self.arrivals: list[float] = []  # perf_counter when each frame's read began
        self.last_arrival = 0.0
        self.next_usage_check = 0.0
        self.timeout = 0.0  # of the exchange under way, for the message if it runs out
        self.held: list[int] = []  # the processes `hold` stopped, until `release`

    def start(self) -> "SandboxProcess":
        child_read, parent_write = os.pipe()
        parent_read, child_write = os.pipe()
        for write_end in (parent_write, child_write):
            widen_pipe(write_end)
        given = (child_read, child_write) + ((self.shared_fd,) if self.shared_fd is not None else ())
        theirs = None
        if self.wants_door:
            self.door, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            given += (theirs.fileno(),)
        try:
            self.proc = self._fork(given) if self.fork_server is not None else self._spawn(given)
        except BaseException:
            os.close(parent_read), os.close(parent_write)
            if self.door is not None:
                self.door.close()
            raise
        finally:
            os.close(child_read)
            os.close(child_write)
            if theirs is not None:
                theirs.close()
        self.pid = self.proc.pid  # kept after close, to name the process in reports and tests
        self.started_ticks = live_sandboxes.start_ticks(self.proc.pid)
        self.to_child, self.from_child = parent_write, parent_read
        for fd in (self.to_child, self.from_child, self.proc.stdout.fileno(), self.proc.stderr.fileno()):
            os.set_blocking(fd, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.from_child, selectors.EVENT_READ, "frames")
        self.selector.register(self.proc.stdout, selectors.EVENT_READ, self.stdout)
        self.selector.register(self.proc.stderr, selectors.EVENT_READ, self.stderr)
        return self

    def _spawn(self, given: tuple[int, ...]) -> subprocess.Popen:
        """A fresh interpreter under the isolation profile's command."""
        command = self.isolation.command(self.workdir, [sys.executable, str(self.program), ",".join(map(str, given))])
        if PRLIMIT:
            command = [PRLIMIT, *self._limit_flags(), *command]
        command = live_sandboxes.dying_with_us(command)
        live_sandboxes.become_subreaper()

        def popen() -> subprocess.Popen:
            with thread_on(self.start_cores):
                return subprocess.Popen(
                    command, cwd=self.workdir, env={**self.env, "EVO_SANDBOX": "1"}, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=given,
                    start_new_session=True, preexec_fn=None if PRLIMIT else self._apply_limits)

        with live_sandboxes.LOCK:
            self._refuse_when_stopping()
            try:
                proc = live_sandboxes.start(popen)
            except RuntimeError:  # the interpreter is exiting, and the starter thread with it
                raise SandboxFailure("stopped", f"the {self.label} was not started: evo is stopping",
                                     self.label) from None
            live_sandboxes.LIVE.add(proc.pid)
        return proc

    def _fork(self, given: tuple[int, ...]):
        """Forked by the fork server, which runs under the same profile and limits; it dies
        with the server, which kill_all kills."""
        with live_sandboxes.LOCK:
            self._refuse_when_stopping()
        return self.fork_server.fork(self.program.name, self.workdir, {**self.env, "EVO_SANDBOX": "1"}, given,
                                     self.label)

    def _refuse_when_stopping(self) -> None:
        if live_sandboxes.REFUSING.is_set():
            raise SandboxFailure("stopped", f"the {self.label} was not started: evo is stopping", self.label)

    def _limit_flags(self) -> list[str]:
        flags = ["--core=0:0", f"--nofile={self.limits.open_files}:{self.limits.open_files}"]
        if self.limits.address_space_bytes:
            flags.append(f"--as={self.limits.address_space_bytes}:{self.limits.address_space_bytes}")
        return flags

    def _apply_limits(self) -> None:
        """Where prlimit is missing: set the limits between fork and exec (not safe while other
        threads start processes, which only a multi-threaded search does)."""
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.limits.open_files, self.limits.open_files))
        if self.limits.address_space_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (self.limits.address_space_bytes,) * 2)

    # ---- exchanging frames ----------------------------------------------------------------

    def request(self, header: dict, payload: bytes | memoryview = b"", timeout: float = 60.0) -> tuple[dict, bytearray]:
        self.send(header, payload, timeout)
        return self.receive(timeout)

    def send(self, header: dict, payload: bytes | memoryview = b"", timeout: float = 60.0) -> None:
        self.timeout = timeout
        deadline = time.monotonic() + timeout
        pending = [memoryview(part).cast("B") for part in wire.encode(header, payload)]
        while pending:
            try:
                written = os.write(self.to_child, pending[0])
            except BlockingIOError:  # the pipe is full: wait, draining the child's output meanwhile
                self.selector.register(self.to_child, selectors.EVENT_WRITE, "write")
                try:
                    self._pump(deadline, f"sending {header.get('op')}")
                finally:
                    self.selector.unregister(self.to_child)
                continue
            except BrokenPipeError:
                self._raise_ended()
            pending[0] = pending[0][written:]
            if not pending[0]:
                pending.pop(0)

    def receive(self, timeout: float = 60.0) -> tuple[dict, bytearray]:
        """The next frame; `last_arrival` is the perf_counter time its first bytes were read."""
        self.timeout = timeout
        deadline = time.monotonic() + timeout
        while not self.frames:
            self._pump(deadline, "waiting for a reply")
        self.last_arrival = self.arrivals.pop(0)
        return self.frames.pop(0)

    def _pump(self, deadline: float, doing: str) -> None:
        """Wait for one round of I/O, enforcing the deadline and the memory limit."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.kill()
            raise SandboxFailure("timeout", f"the {self.label} did not answer within {self.timeout:g} s ({doing})",
                                 self.label)
        for key, _ in self.selector.select(min(remaining, 0.25)):
            if key.data == "write":
                continue
            read_at = time.perf_counter()
            try:
                data = os.read(key.fd, 1 << 20)
            except BlockingIOError:
                continue
            if not data:
                self.selector.unregister(key.fileobj)
                if key.data == "frames":
                    self._raise_ended()
                continue
            if key.data == "frames":
                if self.parser.idle():
                    self.read_started = read_at
                try:
                    parsed = self.parser.feed(data)
                    self.frames.extend(parsed)
                    self.arrivals.extend([self.read_started] * len(parsed))
                    if parsed and not self.parser.idle():
                        self.read_started = read_at
                except ValueError as err:
                    self.kill()
                    raise SandboxFailure("protocol", f"the {self.label} broke the message protocol ({err})",
                                         self.label) from None
            else:
                key.data.add(data)
        self._check_usage()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_usage(self) -> None:
        """At most a few times a second: walking /proc and the directory costs more than a short call."""
        now = time.monotonic()
        if now < self.next_usage_check or not self.watch_usage:
            return
        self.next_usage_check = now + USAGE_CHECK_INTERVAL_S
        pids = live_sandboxes.tree(self.proc.pid)
        resident, tasks = usage.resident_bytes_and_tasks(pids)
        if resident > self.limits.memory_bytes:
            self.kill()
            raise SandboxFailure("memory", f"the {self.label} used {resident / 2**30:.1f} GiB of memory, over the "
                                 f"limit of {self.limits.memory_bytes / 2**30:.1f} GiB, and was stopped", self.label)
        # A fork bomb, stopped before it takes every process ID of the machine.
        if self.limits.tasks is not None and tasks > self.limits.tasks:
            self.kill()
            raise SandboxFailure("processes", f"the {self.label} ran {tasks} processes and threads at once, over the "
                                 f"limit of {self.limits.tasks}, and was stopped", self.label)
        if self.limits.disk_bytes is None:
            return
        written = usage.written_bytes(self.workdir, pids)
        if written is None or written > self.limits.disk_bytes:
            self.kill()
            what = (f"made more than {usage.MOST_FILES} files" if written is None
                    else f"wrote {usage.size_text(written)} to disk")
            raise SandboxFailure("disk", f"the {self.label} {what}, over the limit of "
                                 f"{usage.size_text(self.limits.disk_bytes)}, and was stopped", self.label)

    def _raise_ended(self) -> None:
        code = self.proc.wait(timeout=30)
        self.kill()
        if code < 0:
            how = f"was killed by signal {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        raise SandboxFailure("crashed", f"the {self.label} {how}{crash_hint(self.stderr.text())}", self.label)

    # ---- holding still -----------------------------------------------------------------------

    def hold(self) -> None:
        """Stop every thread of the sandbox (SIGSTOP to its process group and to all it forked),
        while the parent has other work done between two of its requests: a thread left running
        there could compute what the next request asks for where no clock of the protocol sees it.
        Where its processes cannot leave the group (`process_group_kept`), the signal to the group
        reaches them all at once, a fork under way included; elsewhere one forked after the walk
        of the tree, then moved out of the group, is missed (the isolation notes say so)."""
        self.held = live_sandboxes.tree(self.proc.pid) if self.running() else []
        self._signal(self.held, signal.SIGSTOP)

    def release(self) -> None:
        """Continue what `hold` stopped (the tree is not walked again: a stopped process forks nothing)."""
        self._signal(self.held, signal.SIGCONT)
        self.held = []

    def _signal(self, pids: list[int], signum: int) -> None:
        if not pids:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pids[0], signum)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    # ---- ending -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Kill the whole group at once, without waiting for it to end (its device context may
        take a tenth of a second to go): `kill` later waits for it."""
        if self.proc is None:
            return
        try:
            if isinstance(self.proc, subprocess.Popen):
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:  # forked: its keeper stays, to report the end once the process has wholly ended
                self.proc.kill()
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        if self.proc is None:
            return
        self.stop()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        live_sandboxes.LIVE.discard(self.proc.pid)
        live_sandboxes.kill_adopted_orphans(self.started_ticks)
        self._drain()

    def _drain(self) -> None:
        for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            try:
                while data := os.read(stream.fileno(), 1 << 20):
                    sink.add(data)
            except (BlockingIOError, OSError, ValueError):
                pass

    def send_fd(self, fd: int) -> None:
        """Hand the process a descriptor through its door; a message tells it to take it."""
        socket.send_fds(self.door, [b"d"], [fd])

    def receive_fd(self, timeout: float) -> int:
        """A descriptor the process sent through its door (after the reply that announced it)."""
        self.door.settimeout(timeout)
        try:
            _, fds, _, _ = socket.recv_fds(self.door, 1, 1)
        except (OSError, TimeoutError) as err:
            raise SandboxFailure("protocol", f"the {self.label} sent no descriptor ({err})", self.label) from None
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise SandboxFailure("protocol", f"the {self.label} sent {len(fds)} descriptors, not one", self.label)
        return fds[0]

    def close(self) -> None:
        """Ask the program to exit, then make sure the whole group is gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.send({"op": "exit"}, timeout=2)
                self.proc.wait(timeout=5)
            except (SandboxFailure, subprocess.TimeoutExpired, OSError):
                pass
        self.kill()
        for fd in (self.to_child, self.from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.door is not None:
            self.door.close()
        self.selector.close()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
        self.proc = None


def crash_hint(stderr: str) -> str:
    """A short cause from the child's last words, where one is recognisable."""
    lowered = stderr.lower()
    for marker, hint in (("illegal memory access", "an illegal memory access on the GPU"),
                         ("misaligned address", "a misaligned memory access on the GPU"),
                         ("out of memory", "running out of memory"),
                         ("segmentation fault", "a segmentation fault")):
        if marker in lowered:
            return f" after {hint}"
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"; its last output: {last[-1][:200]}" if last else ""

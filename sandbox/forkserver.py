"""The fork server: a sandboxed interpreter that has imported torch and everything a candidate
process or a build imports at start, and forks each such process from that state on evo's
request, so that none pays the seconds of an interpreter's start-up.

    python forkserver.py READ_FD,WRITE_FD,SOCKET_FD

No candidate code ever runs here, and nothing a forked process does reaches back: each fork
gets a keeper (a small process that reports its child's exit status to evo) and, under it, the
process itself, in namespaces of its own (isolate.py), with its own home, environment, streams
and message channel, handed over as descriptors through SOCKET_FD. CUDA is never initialized
here (a forked process could not use a device its parent had opened); each process opens its
own context. The server refuses to serve if CUDA was initialized in it all the same.

Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# While preloading, torch's checks of CUDA's availability (cpp_extension's import makes one) ask
# NVML, which leaves the driver uninitialized: a driver initialized here would be unusable in
# every fork. Forks get their own environment, without this.
os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"

import torch  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401  (the profiler's first start imports it: about a second)
import torch.profiler  # noqa: E402,F401
import torch.utils.cpp_extension  # noqa: E402,F401

import build  # noqa: E402
import candidate  # noqa: E402
import harness  # noqa: E402
import isolate  # noqa: E402
import pch  # noqa: E402
import wire  # noqa: E402

PROGRAMS = {"candidate.py": candidate, "build.py": build, "pch.py": pch}
# The keeper replaces its copy of this interpreter by this one (a few megabytes, not the
# server's hundreds), waits for its child and writes the child's exit code where evo reads it.
KEEPER = ("import os,sys\n"
          "_, status = os.waitpid(int(sys.argv[1]), 0)\n"
          "os.write(int(sys.argv[2]), str(os.waitstatus_to_exitcode(status)).encode())\n"
          "os._exit(0)\n")


KEEPER_FAILED = 70  # the exit code a forked process reports when its keeper could not start it


def fork() -> int:
    with warnings.catch_warnings():  # torch's idle native thread is not forked, and holds no lock of ours
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def forks_can_use_cuda() -> bool:
    """Whether a fork could still initialize CUDA: torch marks a fork of a process that
    initialized it as a bad fork, and refuses CUDA there."""
    pid = fork()
    if pid == 0:
        os._exit(1 if torch.cuda._is_in_bad_fork() else 0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def reap(_signum, _frame) -> None:
    """Keepers end here; so do processes orphaned into this PID namespace."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(read_fd: int, write_fd: int, control: socket.socket) -> None:
    usable = forks_can_use_cuda()
    signal.signal(signal.SIGCHLD, reap)
    for msg, _ in wire.requests(read_fd):
        if msg["op"] == "ready":
            wire.write_frame(write_fd, {"ready": True} if usable else
                             {"error": "CUDA was initialized while preparing to fork, so no fork could use it"})
            continue
        _, fds, _, _ = socket.recv_fds(control, 1, msg["fds"])
        if len(fds) != msg["fds"]:
            wire.write_frame(write_fd, {"error": f"{len(fds)} descriptors arrived, {msg['fds']} were sent"})
            continue
        pid = fork()
        if pid == 0:
            keeper(msg, fds, control)
        for fd in fds:
            os.close(fd)
        wire.write_frame(write_fd, {"pid": pid})


def keeper(msg: dict, fds: list[int], control: socket.socket) -> None:
    """In the forked process: a session of its own, new namespaces, and the process itself under
    them. Never returns."""
    status_fd, kept = fds[-1], fds[:-1]
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        control.detach()
        keep_only([0, 2, status_fd, *kept])
        isolate.new_namespaces(msg["profile"])
        child = os.fork()
        if child == 0:
            os.close(status_fd)
            run_program(msg, kept)
        for fd in kept:  # by number: the child's own /proc may already hide this process's
            os.close(fd)
        os.execv(sys.executable, [sys.executable, "-S", "-E", "-c", KEEPER, str(child), str(status_fd)])
    except BaseException:  # noqa: BLE001 - said on the server's stderr, which evo keeps
        traceback.print_exc()
        os.write(status_fd, str(KEEPER_FAILED).encode())
    os._exit(KEEPER_FAILED)


def run_program(msg: dict, fds: list[int]) -> None:
    """The forked process: dies with its keeper, mounts its own /proc, /dev/shm and home, takes
    its streams, environment and channel, and runs the program. Never returns."""
    code = 0
    try:
        isolate.die_with_parent()
        isolate.private_mounts(msg["profile"], msg["home"], msg["shared_root"])
        *channel, stdout, stderr = fds
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        keep_only([0, 1, 2, *channel])
        os.environ.clear()
        os.environ.update(msg["env"])
        os.chdir(msg["home"])
        program = PROGRAMS[msg["program"]]
        sys.argv = [program.__file__, ",".join(map(str, channel))]
        sys.modules["__main__"] = program  # as where it runs as a script: the same to the code it loads
        program.main()
    except SystemExit as end:  # as the interpreter ends on it: a number is the code, anything else is printed
        code = end.code if isinstance(end.code, int) else 0 if end.code is None else 1
        if not isinstance(end.code, int) and end.code is not None:
            print(end.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the program's own crash, on its stderr
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def keep_only(fds: list[int]) -> None:
    """Close every descriptor but these: nothing of the server's (its channel to evo, its
    socket) or of another fork reaches a forked process."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in fds:
            try:
                os.close(fd)
            except OSError:  # the directory listing's own descriptor, gone already
                pass


def main() -> None:
    read_fd, write_fd, (socket_fd,) = harness.channel_from_argv()
    harness.forbid_tracing()
    # What is loaded now is never collected: a fork's collector skips it rather than walk (and
    # copy, page by page) the hundreds of megabytes it shares with this process.
    gc.freeze()
    serve(read_fd, write_fd, socket.socket(fileno=socket_fd))


if __name__ == "__main__":
    main()

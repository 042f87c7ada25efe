"""What a process forked by the fork server does to be isolated as a process started afresh
under `unshare` and enter.sh is: namespaces of its own (user, PID, network, IPC, mount), its
own /proc and /dev/shm, and only its own directory writable. The fork server itself already
runs inside such namespaces; these are nested in them, one set per forked process, so that
no two candidate processes can see, signal, trace or write to each other.

Imports only the standard library. Never imports evo.
"""

from __future__ import annotations

import ctypes
import os
import signal

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
PR_SET_PDEATHSIG = 1

# statvfs flags of a mount, and the mount flags that keep them on a remount: a mount inherited
# from a more privileged namespace may not lose them (the kernel refuses with EPERM).
_KEPT_ON_REMOUNT = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                    (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)


def _checked(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: text.encode() if text is not None else None  # noqa: E731
    _checked(_libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def new_namespaces(profile: dict) -> None:
    """Called by the keeper of a forked process (single-threaded, just forked): the namespaces its
    child will live in. A new user namespace owns the others, so that the child, root inside
    it, holds no capability over the fork server or its siblings."""
    flags = 0
    if profile["user_namespace"]:
        flags |= CLONE_NEWUSER
    if profile["mount_namespace"]:
        flags |= CLONE_NEWNS
    if profile["pid_namespace"]:
        flags |= CLONE_NEWPID
    if profile["network_isolated"]:
        flags |= CLONE_NEWNET
    if profile["ipc_namespace"]:
        flags |= CLONE_NEWIPC
    if not flags:
        return
    uid, gid = os.geteuid(), os.getegid()
    _checked(_libc.unshare(flags), "unshare")
    if flags & CLONE_NEWUSER:
        with open("/proc/self/setgroups", "w") as setgroups:
            setgroups.write("deny")
        with open("/proc/self/uid_map", "w") as uid_map:
            uid_map.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as gid_map:
            gid_map.write(f"0 {gid} 1")


def die_with_parent() -> None:
    """The forked process dies when its keeper does (evo kills the keeper's group)."""
    _checked(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")


def private_mounts(profile: dict, home: str, shared_root: str) -> None:
    """In the child's own mount namespace: a /proc that shows only its PID namespace, an empty
    /dev/shm, and, of `shared_root` (where every forked process's home lies), only `home`
    writable."""
    if not profile["mount_namespace"]:
        return
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if profile["pid_namespace"]:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=1g")
    if profile["read_only_filesystem"]:
        _mount(home, home, None, MS_BIND)
        kept = os.statvfs(shared_root).f_flag
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for statvfs_flag, mount_flag in _KEPT_ON_REMOUNT:
            if kept & statvfs_flag:
                flags |= mount_flag
        _mount(None, shared_root, None, flags)


# ---- a process group it cannot leave --------------------------------------------------------------

# Per architecture: the audit tag seccomp sees, and the numbers of seccomp, setsid and setpgid.
_SYSCALLS = {"x86_64": (0xC000003E, 317, 112, 109), "aarch64": (0xC00000B7, 277, 157, 154)}
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1  # every thread of the process, not only the calling one
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 4  # no forced store-bypass mitigation: it would slow the timed code
_LOAD, _JUMP_IF_EQUAL, _JUMP_IF_AT_LEAST, _RETURN = 0x20, 0x15, 0x35, 0x06  # BPF_LD|BPF_W|BPF_ABS, ...
_NUMBER_AT, _ARCH_AT = 0, 4  # offsets in struct seccomp_data
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_ENOSYS = 38
_X32_BIT = 0x40000000  # x86_64's x32 calls: numbers with this bit set


class _Instruction(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Instruction))]


def keep_process_group() -> bool:
    """From now on, setsid and setpgid in this process and all it forks succeed without effect
    (a seccomp filter, which no process can remove): every process of the sandbox stays in its
    process group, so evo's signal to the group stops or kills them all at once, a fork under
    way included. Calls of another architecture's numbering fail. False where seccomp is missing."""
    numbers = _SYSCALLS.get(os.uname().machine)
    if numbers is None:
        return False
    arch, seccomp, setsid, setpgid = numbers
    program = [
        _Instruction(_LOAD, 0, 0, _ARCH_AT),
        _Instruction(_JUMP_IF_EQUAL, 1, 0, arch),
        _Instruction(_RETURN, 0, 0, _ERRNO | _ENOSYS),
        _Instruction(_LOAD, 0, 0, _NUMBER_AT),
        _Instruction(_JUMP_IF_AT_LEAST, 3, 0, _X32_BIT),
        _Instruction(_JUMP_IF_EQUAL, 3, 0, setsid),
        _Instruction(_JUMP_IF_EQUAL, 2, 0, setpgid),
        _Instruction(_RETURN, 0, 0, _ALLOW),
        _Instruction(_RETURN, 0, 0, _ERRNO | _ENOSYS),
        _Instruction(_RETURN, 0, 0, _ERRNO),  # errno 0: the call returns 0, as it does when it succeeds
    ]
    instructions = (_Instruction * len(program))(*program)
    fprog = _Program(len(program), instructions)
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    every_thread = SECCOMP_FILTER_FLAG_TSYNC
    for flags in (every_thread | SECCOMP_FILTER_FLAG_SPEC_ALLOW, every_thread):  # kernels before 4.17 lack SPEC_ALLOW
        if _libc.syscall(seccomp, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(fprog)) == 0:
            return True
    return False

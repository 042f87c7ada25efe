#!/bin/sh
# Runs inside a fresh user and mount namespace, before the sandboxed program:
#   enter.sh WRITABLE_DIR -- PROGRAM [ARGS...]
# Remounts every filesystem read-only except WRITABLE_DIR (the sandbox's own directory) and
# the kernel's pseudo filesystems, gives it a private /dev/shm, then enters a nested user and
# mount namespace, where those mounts are locked: even root there cannot make them writable.
# So a sandboxed program cannot change the evaluator, the task, the build cache, or anything
# the next candidate will be measured with.
set -e
writable="$1"
shift 2
awk '{print $5}' /proc/self/mountinfo | while read -r point; do
    case "$point" in
        /proc|/proc/*|/dev|/dev/*|/sys|/sys/*) ;;
        *) mount -o remount,bind,ro "$point" 2>/dev/null || true ;;
    esac
done
mount -t tmpfs -o size=1g tmpfs /dev/shm
mount --bind "$writable" "$writable"
mount -o remount,bind,rw "$writable"
exec unshare --user --map-root-user --mount -- "$@"

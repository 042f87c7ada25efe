"""Run in a sandbox by tests/test_hold.py: lineages of processes that never stay put. Each
generation forks the next, which tries to leave the process group (setsid) while its parent
exits, so the lineage's live process is a new one every few hundred microseconds. Like evo's own
sandbox programs, this one first calls sandbox/isolate.py's keep_process_group (unless
KEEP_GROUP=0). It is the sandbox's first process (PID 1 of its namespace, where the orphans land)
and reaps them.

    LINEAGES=N SANDBOX_DIR=... STARTED_MARKER=... python hopping_lineages.py FDS
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.environ["SANDBOX_DIR"])
import isolate  # noqa: E402


def reap(_signum, _frame) -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def hop() -> None:
    while True:
        if os.fork():
            os._exit(0)
        os.setsid()


if os.environ.get("KEEP_GROUP") != "0":
    isolate.keep_process_group()
signal.signal(signal.SIGCHLD, reap)
for _ in range(int(os.environ["LINEAGES"])):
    if os.fork() == 0:
        hop()
with open(os.environ["STARTED_MARKER"], "w"):  # in its own directory, where the test waits for it
    pass
while True:
    time.sleep(1)

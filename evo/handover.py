"""Handing a window's inputs to the subject timed on them.

A candidate's process never makes its inputs: the checker makes them, lays them out in the
input pool's next slot (sandbox/pool.py), and copies them there only once the subject is held
and the window's clock has started (on a GPU; on a CPU, where a held process does nothing,
the clock starts as it is let go). Until then the candidate's process knows where its inputs
will be, never what they are, so no work on them can happen outside its clock.

The reference is timed under the same steps: its own process makes its inputs, and copies them
(to memory of its own, the twin) where a candidate's are copied to the pool.
"""

from __future__ import annotations

from evo.judgement import EvaluatorError
from evo.sandbox_runner import SandboxFailure, SandboxProcess
from evo.session import TaskSession, checker_answer
from evo.timing import expect

SLOTS = 2  # windows laid out in turn, so that each window's inputs sit where the previous one's did not


class OwnInputs:
    """The reference's window: made and copied within the checker, which is also the subject."""

    def __init__(self, checker: SandboxProcess):
        self.checker = checker

    def prepare(self, subject: SandboxProcess, seeds: list[int], timeout: float) -> None:
        expect(subject.request({"op": "prepare", "seeds": seeds}, timeout=timeout * len(seeds))[0], "making the inputs")

    def publish(self, subject: SandboxProcess, timeout: float, hold: bool = True) -> None:
        """Copy, then hold (a held checker could not copy): the same steps as a candidate's, in turn."""
        expect(self.checker.request({"op": "publish", "into": "twin"}, timeout=timeout)[0], "copying the inputs")
        if hold:
            subject.hold()


class PooledInputs:
    """A candidate's windows, made by the checker and copied into the pool, in slots of
    `slot_bytes` taken in turn."""

    def __init__(self, checker: SandboxProcess, slot_bytes: int):
        self.checker, self.slot_bytes = checker, slot_bytes
        self.turn = 0

    def prepare(self, subject: SandboxProcess, seeds: list[int], timeout: float) -> None:
        """The checker makes the window's inputs; the subject learns where they will be and leaves
        blocks for its outputs."""
        start = (self.turn % SLOTS) * self.slot_bytes
        self.turn += 1
        staged = self.ask_checker({"op": "stage", "seeds": seeds, "start": start}, timeout * len(seeds),
                                  "making a candidate's inputs")
        expect(subject.request({"op": "prepare", "inputs": staged["inputs"]}, timeout=timeout)[0],
               "taking the inputs' places")

    def publish(self, subject: SandboxProcess, timeout: float, hold: bool = True) -> None:
        """Hold the subject, then copy its inputs to the pool: it sees them only once let go."""
        if hold:
            subject.hold()
        self.ask_checker({"op": "publish", "into": "pool"}, timeout, "copying a candidate's inputs to the pool")

    def ask_checker(self, message: dict, timeout: float, doing: str) -> dict:
        return checker_answer(self.checker.request(message, timeout=timeout)[0], doing)


def hand_over_pool(session: TaskSession, runner: SandboxProcess, slot_bytes: int, timeout: float) -> PooledInputs:
    """Map the session checker's input pool in the candidate's process before its code is
    imported: room for a timed window's inputs in each of its slots."""
    fd, nbytes = session.input_pool(SLOTS * slot_bytes, timeout)
    try:
        runner.send_fd(fd)
        mapped, _ = runner.request({"op": "pool", "bytes": nbytes, "device": session.device.torch_name},
                                   timeout=timeout)
    except (SandboxFailure, OSError) as failure:  # before any candidate code was there
        raise EvaluatorError(f"handing the input pool to the candidate process failed: {failure}") from None
    if "error" in mapped:
        raise EvaluatorError(f"the candidate process could not map the input pool: {mapped['error']}")
    return PooledInputs(session.checker, slot_bytes)

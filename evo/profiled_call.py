"""The candidate's one call under the profiler, whose list of kernels decides `custom_code`.

It runs in a process of its own: a process once profiled launches work more slowly, so the
process that is timed never is. That process warms the profiler up as it starts (seconds of
imports on one core; the device is left alone), ahead of need. The call is asked for as soon as
the reference is timed, so the candidate loads in both processes at once (a load that compiles,
such as NVRTC's, costs the device's time once, not twice); it is collected once the candidate
has loaded, and the process is killed then, so that it ends during the correctness trials,
before the candidate is timed.
"""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from evo.judgement import Judgement, describe_problem
from evo.sandbox_runner import SandboxProcess
from evo.session import await_started


class Profile(BaseModel):
    """What the profiler process reports; it ran the candidate's code, so it is validated."""

    kernels_us: dict[str, float]  # device time of each kernel that ran, by name (on a CPU: the time
    # in each of the candidate's extension functions, and the rest of the call)
    top_level_aten_us: dict[str, float]  # host time of each top-level torch operator
    extension_calls: int  # calls into the candidate's compiled extensions


class ProfiledCall:
    def __init__(self, process: SandboxProcess, load_timeout: float, call_timeout: float):
        self.process, self.load_timeout, self.call_timeout = process, load_timeout, call_timeout
        self.warm = False  # whether the process has answered its warm-up

    def await_warm(self) -> None:
        if not self.warm:
            await_started(self.process, self.load_timeout, "starting the profiler")
            self.warm = True

    def start(self, load_message: dict, seeds: list[int]) -> None:
        """Load the candidate and profile one call on the inputs of the last of `seeds`, after a call
        on each of the others: seeds used nowhere else (inputs seen before would let a cache answer
        unprofiled); a first call's one-time costs would distort the times. `finish` collects the
        replies."""
        self.await_warm()
        self.process.send(load_message)
        self.process.send({"op": "prepare", "seeds": seeds})
        self.process.send({"op": "profile"})

    def finish(self, judgement: Judgement) -> dict:
        """The profile: kernels and their device time, top-level operators, extension calls."""
        loaded, _ = self.process.receive(self.load_timeout)
        if "error" in loaded:
            judgement.reject("runs", f"loading the candidate again for the profiled call raised {loaded['error']}")
        prepared, _ = self.process.receive(self.call_timeout)
        if "error" in prepared:  # the checker made the task's inputs without fault: its code did this
            judgement.reject("runs", "the task's get_inputs() failed in the candidate's profiler process once the "
                                     f"candidate had loaded there: {prepared['error']}")
        profiled, _ = self.process.receive(self.call_timeout)
        if "error" in profiled:
            judgement.reject("runs", f"the profiled call raised {profiled['error']}")
        try:
            return Profile.model_validate(profiled).model_dump()
        except ValidationError as err:
            judgement.reject("runs", f"the profiler process reported its call wrongly ({describe_problem(err)}): "
                                     "its harness was tampered with")

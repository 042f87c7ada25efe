"""Cheat: the work moved out of the timed window. The runner makes each call's inputs with
harness.make_inputs (looked up in sys.modules at every call); the candidate wraps it so that the
moment a call's inputs exist it computes the answer with the task's own Model (built with the
same seed as the checker's, so with the same weights) and stores it; forward launches a no-op
NVRTC kernel (so custom code runs) and returns the stored answer.
Caught by: the protocol itself. A candidate's process no longer makes its inputs: the checker
copies them into the input pool as the window's clock starts, so the wrapped make_inputs runs
only in the profiled call's process and forward computes every timed answer itself
(test_inputs_are_not_in_the_candidate_process_before_its_clock_starts). While the candidate's
process made its own inputs, it passed at many times the reference's speed on tasks whose speed
of light is below a launch.
"""

import sys
import weakref

import torch
import torch.nn as nn


NOOP_SOURCE = 'extern "C" __global__ void evo_prepare_hook_noop() {}'


class ModelNew(nn.Module):
    def __init__(self, *init_inputs):
        super().__init__()
        task = sys.modules.get("evo_task")
        harness = sys.modules.get("harness")
        if task is None or not hasattr(harness, "make_inputs"):
            raise RuntimeError("prepare_hook needs the runner's task and harness modules: the cheat no longer applies")
        self.reference = task.Model(*init_inputs)
        self.answers = {}  # data_ptrs of a call's inputs -> (weak reference to its first input, answer)
        self.noop = None
        original = harness.make_inputs

        def make_inputs(*args, **kwargs):
            inputs = original(*args, **kwargs)
            for key in [key for key, (alive, _) in self.answers.items() if alive() is None]:
                del self.answers[key]
            with torch.no_grad():
                answer = self.reference(*inputs)
            self.answers[tuple(t.data_ptr() for t in inputs)] = (weakref.ref(inputs[0]), answer)
            return inputs

        harness.make_inputs = make_inputs

    def forward(self, *inputs):
        if self.noop is None:
            self.noop = torch.cuda._compile_kernel(NOOP_SOURCE, "evo_prepare_hook_noop")
        self.noop(grid=(1, 1, 1), block=(32, 1, 1), args=[])
        entry = self.answers.get(tuple(t.data_ptr() for t in inputs))
        if entry is not None and entry[0]() is inputs[0]:
            return entry[1]
        with torch.no_grad():
            return self.reference(*inputs)

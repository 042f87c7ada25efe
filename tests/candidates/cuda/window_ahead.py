"""Cheat: do a whole window's work in its first call. A window's calls are timed back to back on
input sets that all exist when the window starts; on the first call of a window this candidate
finds the others (the timing function's argument, up the stack) and computes every answer with
the task's own Model, and each later call returns its stored answer after a short spin on the
GPU. The window's total is honest; its median call is a spin. Its own NVRTC kernel runs where no
window is found (the profiled call, the trials), so custom_code passes.
Caught by: the protocol, not one check: a window's calls are timed as a whole (the median is
over windows of a window's mean call), so work moved between its calls moves no time out of it
(test_work_moved_between_the_calls_of_a_window_buys_no_speedup).
"""

import sys

import torch
import torch.nn as nn

SPIN = r"""
extern "C" __global__ void evo_window_ahead_spin(int cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""
SPIN_CYCLES = 2_000  # about a microsecond at the H200's clock


def window_of(first_input):
    """The window of input sets being timed, if this call is its first."""
    frame = sys._getframe(2)
    while frame is not None:
        windows = frame.f_locals.get("windows")
        if isinstance(windows, list) and windows and windows[0] and windows[0][0] is first_input:
            return windows
        frame = frame.f_back
    return None


class ModelNew(nn.Module):
    def __init__(self, *init_inputs):
        super().__init__()
        task = sys.modules.get("evo_task")
        if task is None:
            raise RuntimeError("window_ahead needs the runner's task module: the cheat no longer applies")
        self.reference = task.Model(*init_inputs)
        self.spin = None
        self.stored = {}  # id of a call's first input -> (that input, its answer)

    def forward(self, *inputs):
        window = window_of(inputs[0])
        with torch.no_grad():
            if window is not None:
                self.stored = {id(call[0]): (call[0], self.reference(*call)) for call in window[1:]}
            entry = self.stored.pop(id(inputs[0]), None)
            if entry is not None and entry[0] is inputs[0]:
                torch.cuda._sleep(SPIN_CYCLES)  # torch's own spin: a launch far cheaper than NVRTC's from Python
                return entry[1]
            if self.spin is None:
                self.spin = torch.cuda._compile_kernel(SPIN, "evo_window_ahead_spin")
            self.spin(grid=(1, 1, 1), block=(32, 1, 1), args=[SPIN_CYCLES])  # its own code, where it is profiled
            return self.reference(*inputs)

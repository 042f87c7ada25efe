"""Cheat: the work queued on the GPU the moment the inputs are ready, so that it runs while the
trusted flusher evicts the cache, between the input preparation's reply and the timed run. The
runner's reply that a window's inputs are made (its _write_frame, after the device was
synchronized) is wrapped: before it goes, the task's own Model is launched on a side stream for
every input set of the window. forward launches a no-op NVRTC kernel (so custom code runs),
makes the current stream wait for the stored answer, spins a little on the GPU (so the call is
not faster than the speed of light) and returns the answer.
Caught by: values. The window's inputs reach the input pool only after that reply, while the
subject is held and the parent's clock runs: the stored answers are to what the pool held
before. While the candidate's process made its own inputs, the answers' launches hid in the
input making's time and passed at about 2.4x once in four runs (session 20).
"""

import sys
import weakref

import torch
import torch.nn as nn

KERNELS = r"""
extern "C" __global__ void evo_flush_window_noop() {}
extern "C" __global__ void evo_flush_window_spin(int cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""
SPIN_CYCLES = 100_000  # about 0.05 ms at the H200's clock


class ModelNew(nn.Module):
    def __init__(self, *init_inputs):
        super().__init__()
        task, runner_module = sys.modules.get("evo_task"), sys.modules.get("__main__")
        if task is None or not hasattr(runner_module, "_write_frame"):
            raise RuntimeError("flush_window_kernels needs the runner's task and reply function: "
                               "the cheat no longer applies")
        self.reference = task.Model(*init_inputs)
        self.answers = {}  # data_ptrs of a call's inputs -> (weak reference to its first input, answer, its event)
        self.noop = self.spin = None
        side = torch.cuda.Stream()
        original = runner_module._write_frame

        def write_frame(fd, header, *rest):
            caller = sys._getframe(1)
            if caller.f_code.co_name == "op_prepare":
                self.answers.clear()
                for inputs in getattr(caller.f_locals.get("self"), "window", None) or []:
                    with torch.cuda.stream(side), torch.no_grad():
                        answer = self.reference(*inputs)
                        done = torch.cuda.Event()
                        done.record(side)
                    self.answers[tuple(t.data_ptr() for t in inputs)] = (weakref.ref(inputs[0]), answer, done)
            return original(fd, header, *rest)

        runner_module._write_frame = write_frame

    def forward(self, *inputs):
        if self.noop is None:
            self.noop = torch.cuda._compile_kernel(KERNELS, "evo_flush_window_noop")
            self.spin = torch.cuda._compile_kernel(KERNELS, "evo_flush_window_spin")
        self.noop(grid=(1, 1, 1), block=(32, 1, 1), args=[])
        entry = self.answers.pop(tuple(t.data_ptr() for t in inputs), None)
        if entry is not None and entry[0]() is inputs[0]:
            torch.cuda.current_stream().wait_event(entry[2])
            self.spin(grid=(1, 1, 1), block=(32, 1, 1), args=[SPIN_CYCLES])
            return entry[1]
        with torch.no_grad():
            return self.reference(*inputs)

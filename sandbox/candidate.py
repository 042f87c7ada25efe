"""The candidate runner: runs inside a fresh, isolated process, one candidate only.

It imports the candidate, is told where each call's inputs will be in the input pool (the
checker copies them there as the call's window is timed), times the call, and hands back the
outputs. It holds no expected output and no seed of its inputs; everything it reports is
checked by the parent.

    python candidate.py READ_FD,WRITE_FD

Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import exchange  # noqa: E402
import harness  # noqa: E402
import hooks  # noqa: E402
import isolate  # noqa: E402
import memory_guard  # noqa: E402
import pool  # noqa: E402
import start_gate  # noqa: E402
import wire  # noqa: E402

_tensor_type = torch.Tensor
_exact_type = type
_perf_counter = time.perf_counter
# On a CPU, the profiled call's time outside the candidate's extension functions: torch's operators
# and Python, the library's share (its name carries the library marker aten::).
OUTSIDE_EXTENSIONS = "aten:: and Python, outside the extensions"
_write_frame = wire.write_frame
_read_frame = wire.read_frame


class Runner:
    def __init__(self, read_fd: int, write_fd: int, exchange_fd: int | None, door_fd: int | None):
        self.read_fd, self.write_fd = read_fd, write_fd
        self.exchange = exchange.Exchange(exchange_fd, writable=True)
        self.door = socket.socket(fileno=door_fd) if door_fd is not None else None  # the input pool arrives here
        self.pool: pool.Pool | None = None
        self.model = None
        self.window: list = []  # input sets of the next window of calls
        self.ledger = hooks.ExtensionLedger()
        self.pinned_flags: dict = {}

    def serve(self) -> None:
        while True:
            try:
                header, _ = _read_frame(self.read_fd)
            except wire.ChannelClosed:
                return
            op = header["op"]
            if op == "exit":
                return
            try:
                getattr(self, "op_" + op)(header)
            except harness.UserCodeError as err:
                refused = {"refused_flags": self.ledger.refused_flags} if self.ledger.refused_flags else {}
                _write_frame(self.write_fd, {"error": str(err), **refused})
            except Exception as err:  # the candidate's code raised during this step
                _write_frame(self.write_fd, {"error": harness.describe_exception(err)})

    def op_ready(self, _msg: dict) -> None:
        """Answered once torch is imported and the device initialized."""
        _write_frame(self.write_fd, {"ready": True})

    def op_warm_profiler(self, _msg: dict) -> None:
        """Start the profiler once, before any candidate code is here: its first start takes
        seconds, later ones milliseconds. No kernel runs: this happens outside any turn on the
        device, and the start alone warms it (the first profiled call after it took 19-26 ms
        on an H200 either way)."""
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_available()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            if cuda:
                torch.cuda.synchronize()
            else:
                torch.ones(8, 8).sum().item()
        prof.events()
        _write_frame(self.write_fd, {"ready": True})

    def op_pool(self, msg: dict) -> None:
        """Map the input pool, whose descriptor evo sent on the door just before, before any
        candidate code is here."""
        _, fds, _, _ = socket.recv_fds(self.door, 1, 1)
        self.pool = pool.Pool(fds[0], msg["bytes"], msg["device"])
        os.close(fds[0])
        _write_frame(self.write_fd, {"ok": True})

    def op_load(self, msg: dict) -> None:
        self.set_up(msg)
        module = harness.import_file(msg["candidate"], "evo_candidate", "candidate")
        model_class = getattr(module, "ModelNew", None)
        if not isinstance(model_class, type):
            raise harness.UserCodeError("the candidate file does not define class ModelNew")
        init_inputs = harness.make_init_inputs(self.get_init_inputs)
        harness.seed_everything(msg["init_seed"])
        self.model = harness.call_user(lambda: model_class(*init_inputs), "ModelNew(*get_init_inputs())")
        if isinstance(self.model, torch.nn.Module):
            self.model = self.model.to(self.device)
        _write_frame(self.write_fd, {"ok": True, "flags_changed": self.changed_flags(),
                                     "extensions": self.ledger.extensions})

    def set_up(self, msg: dict) -> None:
        """The device, the pinned flags, the build hooks and the task: all but the candidate."""
        self.device = msg["device"]
        self.clock = harness.DeviceClock(self.device)
        self.clock_device = torch.device(self.device).type
        self.allow_reduced_precision = msg["allow_reduced_precision"]
        self.pinned_flags = harness.pin_numeric_flags(self.allow_reduced_precision)
        hooks.install(msg["extensions_cache"], msg["extensions_dir"], msg["allow_reduced_precision"], self.ledger,
                      msg.get("headers"))
        _, self.get_inputs, self.get_init_inputs = harness.load_task(msg["task"])
        self.generate_on_device = msg["generate_on_device"]
        self.poison_sizes = msg["poison_sizes"]

    def changed_flags(self) -> list[str]:
        now = harness.read_numeric_flags()
        changed = [f"{name} = {now[name]!r} (pinned to {pinned!r})"
                   for name, pinned in self.pinned_flags.items() if now.get(name) != pinned]
        if changed:  # re-assert, so one violation is reported once and not compounded
            harness.pin_numeric_flags(self.allow_reduced_precision)
        return changed

    def op_reserve(self, msg: dict) -> None:
        """Have the device's allocator take blocks of these sizes from the driver and keep them,
        before the evaluation's turn on the device: a window's first allocations would otherwise
        be the driver's, which took tens of milliseconds each on an H200 host where other
        processes were starting. It only allocates: no kernel runs beside another's timing."""
        blocks = [torch.empty(nbytes, dtype=torch.uint8, device=msg["device"]) for nbytes in msg["sizes"]]
        del blocks
        _write_frame(self.write_fd, {"reserved_bytes": torch.cuda.memory_reserved(msg["device"])})

    def op_prepare(self, msg: dict) -> None:
        """Take the inputs of the next window of calls where the checker will copy them in the
        pool ("inputs", their layout), or make them here (the profiled call's "seeds"); and leave
        NaN-filled blocks for its outputs."""
        self.window = None
        if "inputs" in msg:
            self.window = [[self.pool.tensor(spec) for spec in call] for call in msg["inputs"]]
        else:
            self.window = [harness.make_inputs(self.get_inputs, seed, self.device, self.generate_on_device)
                           for seed in msg["seeds"]]
        harness.poison_allocator(self.device, self.poison_sizes * len(self.window))
        self.clock.synchronize()
        _write_frame(self.write_fd, {"ready": True})

    def op_run(self, msg: dict) -> None:
        """Time the window's calls back to back. The trusted flusher emptied the cache just before,
        and each call reads inputs nothing has touched since. The first reply is sent the moment
        the window ends, with a checksum of all outputs as they are then; descriptions and bytes
        follow in a second frame. A checked call may have the memory no tensor owns watched
        across it (`memory_guard`)."""
        calls_before = self.ledger.calls
        guard = memory_guard.MemoryGuard() if msg.get("guard_memory") and self.clock.cuda else None
        if guard is not None:
            guard.arm()
        gc.disable()  # a collection inside the window would cost the candidate, not the reference
        try:
            raw, elapsed = self.clock.time_window(self.model, self.window)
        finally:
            gc.enable()
        results = [harness.as_output_list(result) for result in raw]
        everything = [out for outputs in results for out in outputs]
        # Read before anything of the harness allocates: what it allocated would count as the call's.
        memory = guard.findings(everything) if guard is not None else None
        plain = all(_exact_type(out) is _tensor_type and out.layout == torch.strided
                    and out.device.type == self.clock_device for out in everything)
        digest = harness.checksum(everything) if plain else None
        _write_frame(self.write_fd, {"elapsed_ms": elapsed, "checksum": digest, "plain": plain})
        details = {"structure": [self.describe_output(out, inputs) for outputs, inputs in zip(results, self.window)
                                 for out in outputs],
                   "flags_changed": self.changed_flags(), "extension_calls": self.ledger.calls - calls_before,
                   "outputs": len(results[0])}
        if memory is not None:
            details["memory"] = memory
        if msg.get("send_outputs") and plain:
            details["tensors"], details["exchanged"] = harness.tensors_to_exchange(everything, self.exchange,
                                                                                   msg["exchange_bytes"])
        _write_frame(self.write_fd, details)

    def describe_output(self, out, inputs: list) -> dict:
        item = {"type": f"{_exact_type(out).__module__}.{_exact_type(out).__qualname__}",
                "exact_tensor": _exact_type(out) is _tensor_type}
        if not isinstance(out, torch.Tensor):
            return item
        item.update(dtype=str(out.dtype).removeprefix("torch."), shape=list(out.shape), device=str(out.device),
                    layout=str(out.layout), shares_input_storage=self.shares_input_storage(out, inputs))
        return item

    def shares_input_storage(self, out: torch.Tensor, inputs: list) -> bool:
        try:
            start = out.untyped_storage().data_ptr()
            end = start + out.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return False
        for tensor in inputs:
            storage = tensor.untyped_storage()
            other = storage.data_ptr()
            if start < other + storage.nbytes() and other < end:
                return True
        return False

    def op_profile(self, msg: dict) -> None:
        """One call under the profiler, on the window's last input set after a call on each of the
        others: which kernels ran and how long each took (on a CPU: each of the candidate's extension
        functions, and the rest of the call)."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.clock.cuda else [])
        for inputs in self.window[:-1]:  # unprofiled, so that one-time costs fall outside the profile
            self.model(*inputs)
        self.clock.synchronize()
        calls_before = self.ledger.calls
        self.ledger.profiling, self.ledger.extension_us = True, {}
        try:
            with profile(activities=activities) as prof:
                started = _perf_counter()
                self.model(*self.window[-1])
                self.clock.synchronize()
                call_us = (_perf_counter() - started) * 1e6
        finally:
            self.ledger.profiling = False
        kernels, operators = {}, {}
        for event in prof.events():
            if self.clock.cuda and event.device_type.name == "CUDA":
                kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time
            elif event.name.startswith("aten::") and event.cpu_parent is None:
                operators[event.name] = operators.get(event.name, 0.0) + event.cpu_time_total
        if not self.clock.cuda:  # a CPU's kernels: its extension functions, and the rest of the call
            kernels = dict(self.ledger.extension_us)
            kernels[OUTSIDE_EXTENSIONS] = max(0.0, call_us - sum(kernels.values()))
        _write_frame(self.write_fd, {"kernels_us": kernels, "top_level_aten_us": operators,
                                     "extension_calls": self.ledger.calls - calls_before})


def main() -> None:
    read_fd, write_fd, given = harness.channel_from_argv()
    isolate.keep_process_group()  # before any candidate code: evo's hold of the group stops all it forks
    exchange_fd, door_fd = (given + [None, None])[:2]
    with start_gate.held():
        harness.start_device()
        if torch.cuda.is_initialized():
            memory_guard.MemoryGuard().warm()
    Runner(read_fd, write_fd, exchange_fd, door_fd).serve()


if __name__ == "__main__":
    main()

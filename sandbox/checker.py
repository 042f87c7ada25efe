"""The reference/checker process: runs the task's reference, holds the expected outputs,
makes the inputs a candidate is handed (through the input pool, as its clock starts) and
judges the outputs it hands back. No expected output is ever sent to a candidate.

    python checker.py READ_FD,WRITE_FD

Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import copy
import gc
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import audit  # noqa: E402
import ceilings  # noqa: E402
import exchange  # noqa: E402
import harness  # noqa: E402
import isolate  # noqa: E402
import numerics  # noqa: E402
import pool  # noqa: E402
import start_gate  # noqa: E402
import wire  # noqa: E402


class Checker:
    def __init__(self, read_fd: int, write_fd: int, exchange_fd: int | None, door_fd: int | None):
        self.read_fd, self.write_fd = read_fd, write_fd
        self.exchange = exchange.Exchange(exchange_fd, writable=False)
        self.door = socket.socket(fileno=door_fd) if door_fd is not None else None  # hands evo the pool
        self.pool: pool.Pool | None = None  # where candidates' inputs are handed over
        self.call_room = 0  # pool bytes a call's inputs may take, as the parent lays out its slots
        # The reference's own windows are copied here, as a candidate's are to the pool.
        self.twin: torch.Tensor | None = None
        self.staged: torch.Tensor | None = None  # the window's inputs laid out as they are handed over (pool.gather)
        self.staged_at = 0  # the pool's byte where they go
        self.specs: list = []  # where each of the window's inputs goes in the pool (pool.layout)
        self.trials: dict[int, dict] = {}  # seed -> inputs, reference outputs in fp32 and fp64
        self.expected: dict[int, list] = {}  # seed -> reference outputs of timed calls, on the device
        self.tolerance: dict | None = None  # widest tolerance the correctness trials used
        self.window: list = []  # (seed, inputs) of the next window: the reference's calls, or a candidate's

    def reply(self, header: dict, payload: bytes = b"") -> None:
        wire.write_frame(self.write_fd, header, payload)

    def serve(self) -> None:
        for header, payload in wire.requests(self.read_fd):
            try:
                getattr(self, "op_" + header["op"])(header, payload)
            except harness.UserCodeError as err:
                self.reply({"error": str(err), "user_error": True})
            except Exception as err:
                self.reply({"error": harness.describe_exception(err), "user_error": False})

    # ---- set-up ---------------------------------------------------------------------------

    def op_ready(self, _msg: dict, _payload) -> None:
        """Answered once torch is imported and the device is up: the parent loads the task next."""
        self.reply({"ready": True})

    def op_init(self, msg: dict, _payload) -> None:
        harness.forbid_tracing()
        self.device = msg["device"]
        self.policy = msg["policy"]
        self.clock = harness.DeviceClock(self.device)
        harness.pin_numeric_flags(self.policy["allow_reduced_precision"])
        model_class, self.get_inputs, get_init_inputs = harness.load_task(msg["task"])
        init_inputs = harness.make_init_inputs(get_init_inputs)
        self.init_seed = int.from_bytes(os.urandom(7), "big")
        harness.seed_everything(self.init_seed)
        model = harness.call_user(lambda: model_class(*init_inputs), "Model(*get_init_inputs())")
        self.models = {"eager": model.to(self.device)}
        if msg.get("compile_baseline"):
            self.models["compile"] = torch.compile(self.models["eager"])
        self.model64 = self.make_float64_model()
        self.generate_on_device = self.choose_generation()
        probe_seed = int.from_bytes(os.urandom(7), "big")
        inputs = harness.make_inputs(self.get_inputs, probe_seed, self.device, self.generate_on_device)
        outputs = self.call_reference(inputs)
        self.poison_sizes = [out.numel() * out.element_size() for out in outputs]
        self.call_room = pool.layout([inputs], 0)[1] + pool.ALIGNMENT
        self.output_shapes = [torch.empty(out.shape, dtype=out.dtype, device="meta") for out in outputs]
        for position, out in enumerate(outputs):
            if harness._exact_type(out) is not torch.Tensor:
                raise harness.UserCodeError(
                    f"the reference Model returned {type(out).__name__} at position {position}; outputs must be tensors")
        measured = ceilings.measure(self.device)
        gc.freeze()  # the task, its models and the ceilings' state live as long as the process
        self.reply({
            "init_seed": self.init_seed, "generate_on_device": self.generate_on_device,
            "outputs": [harness.tensor_meta(out) for out in outputs],
            "inputs": [harness.tensor_meta(tensor) for tensor in inputs],
            "pool_bytes_per_call": self.call_room,
            "flops": ceilings.count_flops(self.models["eager"], inputs),
            "float64_reference": self.model64 is not None,
            "ceilings": measured, "facts": harness.device_facts(self.device),
        })

    def make_float64_model(self):
        try:
            return copy.deepcopy(self.models["eager"]).double()
        except Exception:
            return None

    def choose_generation(self) -> bool:
        """Generate inputs on the device when the task allows it (fast), else on the host."""
        if not self.device.startswith("cuda"):
            return False
        try:
            harness.make_inputs(self.get_inputs, 1, self.device, True)
            return True
        except harness.UserCodeError:
            return False

    def call_reference(self, inputs: list, model: str = "eager") -> list:
        with torch.no_grad():
            result = harness.call_user(self.models[model], "the reference Model.forward", *inputs)
        return harness.as_output_list(result)

    def float64_reference(self, inputs: list) -> list | None:
        if self.model64 is None:
            return None
        wide = [t.double() if t.is_floating_point() else t for t in inputs]
        try:
            with torch.no_grad():
                return [out.double() for out in harness.as_output_list(self.model64(*wide))]
        except Exception:
            self.model64 = None
            return None

    def op_begin(self, _msg: dict, _payload) -> None:
        """A new candidate: nothing of the previous one's trials, timed outputs or tolerance stays."""
        self.trials, self.expected, self.tolerance, self.window = {}, {}, None, []
        if self.pool is not None:  # what the previous candidate was handed is not there for the next
            self.pool.bytes.zero_()
            self.clock.synchronize()
        # The allocator keeps its blocks: the next candidate needs the same ones, and a turn that
        # takes memory from the driver again waited tens of milliseconds per block (H200).
        gc.collect()
        self.reply({"ok": True})

    # ---- correctness trials ---------------------------------------------------------------

    def op_prepare_trials(self, msg: dict, _payload) -> None:
        for seed in msg["seeds"]:
            inputs = harness.make_inputs(self.get_inputs, seed, self.device, self.generate_on_device)
            pristine = [t.detach().cpu().clone() for t in inputs]
            reference = [out.detach().cpu() for out in self.call_reference(inputs)]
            wide = self.float64_reference(inputs)
            self.trials[seed] = {"inputs": pristine, "fp32": reference,
                                 "fp64": [out.cpu() for out in wide] if wide is not None else None}
        self.reply({"ok": True, "float64_reference": self.model64 is not None})

    def received(self, msg: dict) -> list | None:
        """Copies of the tensors a candidate's process left in the exchange buffer, on the device
        where they are compared (float64 arithmetic there takes milliseconds, where the host needs
        seconds); or None, and the failed check sent, when they did not fit the room made for
        the reference's."""
        if msg["exchanged"]:
            return self.exchange.read(msg["tensors"], msg["exchange_bytes"], self.device)
        described = [torch.empty(meta["shape"], dtype=exchange.dtype_of(meta), device="meta")
                     for meta in msg["tensors"][: msg["outputs"]]]
        check = numerics.check_output_meta(described, self.output_shapes)
        if check["passed"]:
            check = numerics.result("output_shape", False, "the candidate's outputs take more memory than the room "
                                    "made for them (twice a window of the reference's): something was resized")
        self.reply({"checks": [check]})
        return None

    def op_compare_trial(self, msg: dict, _payload) -> None:
        trial = self.trials.pop(msg["seed"])
        received = self.received(msg)
        if received is None:
            return
        trial = {key: [tensor.to(self.device) for tensor in value] if value is not None else None
                 for key, value in trial.items()}
        outputs = received[: msg["outputs"]]
        checks = [numerics.check_binding(outputs, msg["checksum"])]
        checks.append(numerics.check_output_meta(outputs, trial["fp32"]))
        if checks[-1]["passed"]:
            checks.append(numerics.check_written(outputs, trial["fp32"]))
            verdict, tolerance = numerics.check_values(outputs, trial["fp32"], trial["fp64"], self.policy)
            checks.append(verdict)
            self.widen_tolerance(tolerance)
        checks.append(self.inputs_unchanged(trial["inputs"]))
        self.reply({"checks": checks})

    def inputs_unchanged(self, pristine: list) -> dict:
        """The trial's inputs as the call left them in the pool, read here, and the bytes of its
        slot around them (left zero when the inputs were laid out), which no kernel may write."""
        check = numerics.check_inputs_unchanged([self.pool.tensor(spec) for spec in self.specs[0]], pristine)
        if check["passed"] and not self.slot_unchanged():
            return numerics.result("inputs_unchanged", False, "the call wrote into the input pool between or just "
                                                              "past its inputs; a kernel must not write there")
        return check

    def slot_unchanged(self) -> bool:
        """Whether the window's slot of the pool holds what was copied there, byte for byte."""
        return torch.equal(self.pool.bytes[self.staged_at: self.staged_at + self.staged.numel()], self.staged)

    def widen_tolerance(self, tolerance: dict | None) -> None:
        if tolerance is None:
            return
        if self.tolerance is None:
            self.tolerance = tolerance
        else:
            self.tolerance = {key: max(self.tolerance[key], tolerance[key]) for key in tolerance}

    # ---- inputs handed over --------------------------------------------------------------

    def op_pool(self, msg: dict, _payload) -> None:
        """A pool of at least `bytes`, made zeroed unless the current one is that large; its
        descriptor follows the reply on the door, for evo to hand to candidate processes."""
        if self.pool is None or self.pool.nbytes < msg["bytes"]:
            if self.pool is not None:
                os.close(self.pool.fd)
            self.pool = None
            self.pool = pool.Pool.create(msg["bytes"], self.device)
            self.pool.bytes.zero_()
            self.clock.synchronize()
        self.reply({"pool_bytes": self.pool.nbytes})
        socket.send_fds(self.door, [b"p"], [self.pool.fd])

    def make_window(self, seeds: list[int], start: int) -> list:
        """Make a window's inputs and lay them out from the pool's byte `start` on; their places."""
        self.window, self.staged = None, None
        self.window = [(seed, harness.make_inputs(self.get_inputs, seed, self.device, self.generate_on_device))
                       for seed in seeds]
        inputs = [inputs for _, inputs in self.window]
        self.specs, end = pool.layout(inputs, start)
        self.staged, self.staged_at = pool.gather(inputs, self.specs, start, end), start
        return self.specs

    def op_stage(self, msg: dict, _payload) -> None:
        """Make a candidate's window of inputs here, and say where each will be in the pool once
        published; the candidate's process learns the layout, not the bytes."""
        specs = self.make_window(msg["seeds"], msg["start"])
        self.window = []  # the staged bytes are all the handing over needs
        if self.staged.numel() > len(specs) * self.call_room:
            raise harness.UserCodeError(
                "get_inputs() made larger inputs for one seed than for another; a task's inputs must have the same "
                "shapes and dtypes for every seed")
        if self.pool is None or self.staged_at + self.staged.numel() > self.pool.nbytes:
            raise RuntimeError("the window's inputs reach beyond the input pool's end")
        self.clock.synchronize()
        self.reply({"inputs": specs})

    def op_publish(self, msg: dict, _payload) -> None:
        """Copy the window's inputs into the pool (a candidate's) or into the twin (the reference's
        own: the same copy while its clock runs), and wait for the copy to land."""
        nbytes = self.staged.numel()
        if msg["into"] == "pool":
            self.pool.bytes[self.staged_at: self.staged_at + nbytes].copy_(self.staged)
        else:
            self.twin[:nbytes].copy_(self.staged)
        self.clock.synchronize()
        self.reply({"ok": True})

    # ---- the reference as a timed subject -------------------------------------------------

    def op_prepare(self, msg: dict, _payload) -> None:
        self.make_window(msg["seeds"], 0)
        if self.twin is None or self.twin.numel() < self.staged.numel():
            self.twin = None
            self.twin = torch.empty(self.staged.numel(), dtype=torch.uint8, device=self.device)
        # The same work as the candidate's prepare.
        harness.poison_allocator(self.device, self.poison_sizes * len(self.window))
        self.clock.synchronize()
        self.reply({"ready": True})

    def op_run(self, msg: dict, _payload) -> None:
        """A window of reference calls under the same protocol as the candidate's."""
        model = self.models[msg.get("model", "eager")]
        gc.disable()
        try:
            with torch.no_grad():
                raw, elapsed = self.clock.time_window(model, [inputs for _, inputs in self.window])
        finally:
            gc.enable()
        results = [(seed, harness.as_output_list(result)) for (seed, _), result in zip(self.window, raw)]
        digest = harness.checksum([out for _, outputs in results for out in outputs])
        self.reply({"elapsed_ms": elapsed, "checksum": digest})
        if msg.get("keep_expected"):  # kept on the device, where the timed outputs are compared
            for seed, outputs in results:
                self.expected[seed] = [out.detach().clone() for out in outputs]

    # ---- outputs of the candidate's timed calls ------------------------------------------

    def op_compare_timed(self, msg: dict, _payload) -> None:
        """The outputs of a window of timed calls, one group per seed, in order."""
        received = self.received(msg)
        if received is None:
            return
        checks = [numerics.check_binding(received, msg["checksum"])]
        per_call = msg["outputs"]
        calls = [received[position * per_call: (position + 1) * per_call] for position in range(len(msg["seeds"]))]
        checks.append(numerics.check_timed_window(calls, [self.expected_outputs(seed) for seed in msg["seeds"]],
                                                  self.tolerance))
        if not self.slot_unchanged():
            checks.append(numerics.result("inputs_unchanged", False, (
                "a timed call wrote into its inputs, or next to them in the input pool; a kernel must not write there")))
        self.reply({"checks": checks})

    def expected_outputs(self, seed: int) -> list:
        """The reference's outputs of a timed call: kept when it was timed, else recomputed now,
        while nothing is timed (the memory budget did not allow keeping them)."""
        expected = self.expected.pop(seed, None)
        if expected is None:
            inputs = harness.make_inputs(self.get_inputs, seed, self.device, self.generate_on_device)
            expected = self.call_reference(inputs)
        return expected

    def op_audit(self, msg: dict, _payload) -> None:
        warnings = audit.audit_task(
            lambda seed: harness.make_inputs(self.get_inputs, seed, self.device, self.generate_on_device),
            self.call_reference, msg["seeds"])
        self.reply({"warnings": warnings})


def main() -> None:
    read_fd, write_fd, given = harness.channel_from_argv()
    isolate.keep_process_group()  # as a candidate's process is: the reference is timed under the same filter
    exchange_fd, door_fd = (given + [None, None])[:2]
    with start_gate.held():
        harness.start_device()
    ceilings.warm_flop_counter()
    gc.freeze()  # what is loaded by now lives as long as the process: the collections between candidates skip it
    Checker(read_fd, write_fd, exchange_fd, door_fd).serve()


if __name__ == "__main__":
    main()

"""The checks of one evaluation as they accumulate, and the checks the parent decides itself
from what it observed (timer consistency, speed of light, which kernels ran)."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from evo.timing import Calibration, Samples, timer_consistency
from evo.verdict import Check, Roofline, Timings

# Margins over the measured ceilings before a time counts as faster than the device allows:
# copies reach ~90% of the bandwidth a kernel can, and reduced-precision tensor cores may
# beat the measured bf16 product a little. A CPU's copy uses fewer cores than a kernel can.
SPEED_OF_LIGHT_MARGIN = {"cuda": 1.25, "cpu": 4.0}

# Kernel names that belong to PyTorch and the vendor libraries, not to the candidate.
LIBRARY_KERNEL_MARKERS = ("at::", "cublas", "cutlass", "cudnn", "xmma", "nvjet", "sm90_", "sm80_", "ampere_",
                          "volta_", "turing_", "Memcpy", "Memset", "cub::", "thrust::", "triton_poi_", "triton_red_",
                          "triton_per_", "triton_tem_", "gemv", "gemmSN", "splitKreduce", "elementwise_kernel",
                          "reduce_kernel", "CatArrayBatched", "cunn_", "cudnn_", "aten::")


class Rejected(Exception):
    """A check failed and the evaluation stops; the judgement holds the reason."""


class EvaluatorError(Exception):
    """The evaluation could not run (bad input, or the evaluator itself failed)."""


class OutputDescription(BaseModel):
    """One output of a call, as the candidate's process describes it."""

    type: str  # module-qualified name of the returned object's type
    exact_tensor: bool  # exactly torch.Tensor, no subclass
    device: str | None = None  # absent when it is not a tensor
    layout: str | None = None
    shares_input_storage: bool = False


class MemoryWatch(BaseModel):
    """What the memory guard saw across one checked call on a GPU (sandbox/memory_guard.py)."""

    watched_bytes: int  # bytes no tensor owned before the call and no allocation of the call covered
    changed_bytes: int  # of those, the ones that no longer held the guard's fill after it
    unwatched: str | None = None  # why nothing could be watched
    first_changed_output: int | None = None  # the output whose end lies nearest below the first change
    first_changed_past_end: int | None = None  # how far past that end the first change lies, in bytes


class CallDescription(BaseModel):
    """What the candidate's process says after each call. It comes from a process running the
    candidate's code, so it is validated before any of it is used."""

    structure: list[OutputDescription]
    flags_changed: list[str]  # global numeric settings found changed
    extension_calls: int  # calls into the candidate's compiled extensions during the call
    outputs: int  # outputs per call
    memory: MemoryWatch | None = None  # present for a checked call on a GPU


def describe_problem(err: ValidationError) -> str:
    first = err.errors()[0]
    return f"{'.'.join(str(part) for part in first['loc']) or 'the description'}: {first['msg']}"


class Judgement:
    def __init__(self) -> None:
        self.by_name: dict[str, Check] = {}
        self.roofline: Roofline | None = None
        self.watched_bytes = 0  # the most memory the guard watched across one checked call

    @property
    def checks(self) -> list[Check]:
        return list(self.by_name.values())

    def passed(self, name: str, detail: str) -> None:
        if name not in self.by_name:
            self.by_name[name] = Check(name=name, passed=True, detail=detail)

    def fail(self, name: str, detail: str) -> None:
        current = self.by_name.get(name)
        if current is None or current.passed:
            self.by_name[name] = Check(name=name, passed=False, detail=detail)

    def reject(self, name: str, detail: str) -> None:
        self.fail(name, detail)
        raise Rejected(name)

    def first_failure(self) -> Check | None:
        return next((check for check in self.by_name.values() if not check.passed), None)

    def record_all(self, checks: list[dict], where: str, stop: bool = True) -> None:
        failed = False
        for check in checks:
            if check["passed"]:
                self.passed(check["name"], check["detail"])
            else:
                self.fail(check["name"], f"{where}: {check['detail']}")
                failed = True
        if failed and stop:
            raise Rejected(where)

    # ---- what the candidate process reported about its outputs ---------------------------

    def described(self, details: dict, reply: dict, device: str, where: str) -> CallDescription:
        """What the candidate process said of its outputs and of the global flags after a call."""
        if "error" in details:
            self.reject("runs", f"{where}: describing the outputs raised {details['error']}")
        try:
            described = CallDescription.model_validate(details)
        except ValidationError as err:
            self.reject("runs", f"{where}: the candidate's process described its outputs wrongly "
                                f"({describe_problem(err)}): its harness was tampered with")
        self.structure([item.model_dump() for item in described.structure], reply, device, where)
        self.flags(described.flags_changed, f"in {where}")
        return described

    def structure(self, outputs: list[dict], reply: dict, device: str, where: str) -> None:
        checks = []
        for position, item in enumerate(outputs):
            if not item["exact_tensor"] or item.get("layout") != "torch.strided":
                checks.append(("output_type", False, f"output {position} is a {item['type']}"
                               + (f" with layout {item['layout']}" if item.get("layout") else "")
                               + "; outputs must be plain dense torch.Tensor objects (no subclass, no lazy or sparse tensor)"))
            elif item["device"] != device:
                checks.append(("output_device", False, f"output {position} is on {item['device']}, expected {device}"))
            elif item["shares_input_storage"]:
                checks.append(("output_aliasing", False, f"output {position} shares memory with an input; "
                               "outputs must be new tensors"))
        if not reply.get("plain") and not checks:
            checks.append(("output_type", False, "the call returned something other than plain tensors"))
        for name, detail in (("output_type", "every output is a plain dense torch.Tensor"),
                             ("output_device", f"every output is on {device}"),
                             ("output_aliasing", "no output shares memory with an input")):
            checks.append((name, True, detail))
        self.record_all([{"name": n, "passed": p, "detail": d} for n, p, d in checks], where)

    def flags(self, changed: list[str], where: str) -> None:
        if changed:
            self.reject("global_flags", f"{where} the candidate changed global numeric settings: {'; '.join(changed)}; "
                        "they are pinned by the evaluator (use --allow-reduced-precision for TF32)")
        self.passed("global_flags", "TF32, matmul precision and cuDNN settings stayed as pinned")

    def memory_bounds(self, watch: MemoryWatch | None, where: str) -> None:
        if watch is None:
            return
        if watch.changed_bytes:
            place = "" if watch.first_changed_output is None else \
                f", the first {watch.first_changed_past_end} bytes past the end of output {watch.first_changed_output}"
            self.reject("memory_bounds", f"{where}: {watch.changed_bytes} bytes of device memory that no tensor owned "
                        f"were written during the call{place}: a kernel wrote outside the memory it was given")
        self.watched_bytes = max(self.watched_bytes, watch.watched_bytes)
        detail = (f"no byte outside the tensors changed during the checked calls ({self.watched_bytes / 1e6:.1f} MB "
                  "watched around them)" if self.watched_bytes else
                  f"nothing could be watched: {watch.unwatched or 'the allocator held no free memory before the call'}")
        self.by_name["memory_bounds"] = Check(name="memory_bounds", passed=True, detail=detail)

    # ---- what the parent decides from the timings ----------------------------------------

    def timed(self, reference: Calibration, candidate: Samples, timings: Timings, facts: dict, device,
              allow_reduced_precision: bool) -> None:
        self.passed("runs", "every call completed")
        consistency, charged_ms = timer_consistency(reference, candidate, device.kind)
        timings.candidate = candidate.stats(charged_ms)
        self.by_name[consistency.name] = consistency
        self.roofline = roofline(facts, timings.candidate.median_ms, device, allow_reduced_precision)
        limit = self.roofline.speed_of_light_ms
        if timings.candidate.median_ms < limit:
            self.fail("speed_of_light", (
                f"the median call took {timings.candidate.median_ms:.4f} ms, faster than this device allows for the "
                f"task's work ({limit:.4f} ms: {self.roofline.min_bytes / 1e6:.1f} MB at the measured bandwidth, "
                f"{self.roofline.flops / 1e9:.2f} GFLOP at the measured peak rate): the work was not done in the call"))
        else:
            self.passed("speed_of_light", f"the median call is above the device's limit of {limit:.4f} ms for this work")

    def same_code_when_profiled(self, profiled_calls: int, checked_calls: int) -> None:
        """Which code ran is decided from one profiled call, in a process of its own: a candidate
        that calls its compiled extensions there and in none of its checked calls runs different
        code when it is profiled (torch says when it is), so the profile says nothing of the calls
        that were checked and timed. Each process counts its own calls, so a candidate that also
        forges the count in its checked calls is not caught here (tests/test_corpus_cuda.py)."""
        if profiled_calls and not checked_calls:
            times = "once" if profiled_calls == 1 else f"{profiled_calls} times"
            self.fail("custom_code", f"its compiled extensions were called {times} in the profiled call and never "
                      "in its checked calls: its own code runs only while it is profiled")

    def custom_code(self, kernels: dict, required: bool, on_gpu: bool) -> None:
        """On a GPU, only the profiler's kernel list counts: the candidate's own process keeps the
        count of extension calls, and could forge it. On a CPU that count is all there is."""
        ran = bool(kernels["own_kernels_us"]) if on_gpu else kernels["extension_calls"] > 0
        share = kernels.get("library_fraction")
        where = ("of GPU time in library kernels" if on_gpu
                 else "of the call's time in torch operators outside its extensions")
        share_text = f"; {share:.0%} {where}" if share is not None else ""
        if ran:
            self.passed("custom_code", f"the candidate's own compiled code ran{share_text}")
        elif required:
            evidence = "no kernel of its own ran in a profiled call" if on_gpu else \
                "no function of its compiled extensions was called during a call"
            self.fail("custom_code", f"none of the candidate's own compiled code ran: {evidence}{share_text}; "
                      "pass --allow-no-custom-code to audit pure-PyTorch rewrites")
        else:
            self.passed("custom_code", f"no custom code ran, allowed by --allow-no-custom-code{share_text}")


def roofline(facts: dict, median_ms: float, device, allow_reduced_precision: bool) -> Roofline:
    ceilings = facts["ceilings"]
    flops = facts["flops"]
    input_bytes = sum(meta["nbytes"] for meta in facts["inputs"])
    output_bytes = sum(meta["nbytes"] for meta in facts["outputs"])
    seconds = median_ms * 1e-3
    margin = SPEED_OF_LIGHT_MARGIN[device.kind]
    # Writes may still sit in the cache when a kernel ends; reads after a flush cannot.
    must_move = input_bytes + max(0, output_bytes - device.cache_bytes(facts["facts"]))
    light = max(must_move / (ceilings["bandwidth_bytes_per_s"] * margin),
                flops / (ceilings["peak_flops_per_s"] * margin)) * 1e3
    rate_ceiling = ceilings["peak_flops_per_s"] if allow_reduced_precision else ceilings["fp32_flops_per_s"]
    return Roofline(flops=flops, min_bytes=input_bytes + output_bytes,
                    achieved_flops_per_s=flops / seconds if seconds else None,
                    achieved_bytes_per_s=(input_bytes + output_bytes) / seconds if seconds else None,
                    fraction_of_peak_flops=flops / seconds / rate_ceiling if seconds else None,
                    fraction_of_bandwidth=(input_bytes + output_bytes) / seconds / ceilings["bandwidth_bytes_per_s"]
                    if seconds else None,
                    speed_of_light_ms=light, ceilings=ceilings)


def classify_kernels(profile: dict, extension_calls: int) -> dict:
    """Split the profiled kernels into the candidate's own and the libraries'."""
    own, library = {}, {}
    for name, micros in profile.get("kernels_us", {}).items():
        (library if any(marker in name for marker in LIBRARY_KERNEL_MARKERS) else own)[name] = micros
    total = sum(own.values()) + sum(library.values())
    return {"own_kernels_us": own, "library_kernels_us": library,
            "library_fraction": sum(library.values()) / total if total else None,
            "extension_calls": max(extension_calls, profile.get("extension_calls", 0)),
            "top_level_aten_us": profile.get("top_level_aten_us", {})}

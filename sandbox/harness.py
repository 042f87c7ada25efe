"""What the checker and the candidate runner share: loading files, making inputs,
handing tensors to the exchange buffer, checksums, the global numeric flags, timing one call.

Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import random
import sys
import time
import traceback
from pathlib import Path

import numpy
import torch

# Bound before any candidate code is imported, so that patching the module
# attributes later does not change what the harness calls.
_perf_counter = time.perf_counter
_tensor_type = torch.Tensor
_exact_type = type


class UserCodeError(Exception):
    """A task or candidate file could not be used; the message is one sentence for the user."""


def forbid_tracing() -> None:
    """Make this process unreadable through ptrace and /proc/PID/mem by other processes of the user."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_DUMPABLE = 4
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def import_file(path: str, module_name: str, what: str):
    """Import a Python file by path; raise UserCodeError with one line on any failure."""
    source_path = Path(path)
    if not source_path.is_file():
        raise UserCodeError(f"{what} file {path} does not exist")
    spec = importlib.util.spec_from_file_location(module_name, source_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise UserCodeError(
            f"{what} file {path} has a syntax error at line {err.lineno}: {err.msg}; fix the file and run again"
        ) from None
    except Exception as err:  # user code can raise anything at import
        raise UserCodeError(f"importing {what} file {path} raised {describe_exception(err)}") from None
    return module


def describe_exception(err: BaseException) -> str:
    """'ValueError: bad shape (model.py, line 12)' from the innermost frame in user code."""
    where = ""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if "site-packages" not in frame.filename and "/sandbox/" not in frame.filename:
            where = f" ({Path(frame.filename).name}, line {frame.lineno})"
            break
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first[:300]}{where}"


def load_task(path: str):
    """The task's (Model, get_inputs, get_init_inputs), checked for presence."""
    module = import_file(path, "evo_task", "task")
    missing = [name for name in ("Model", "get_inputs", "get_init_inputs") if not hasattr(module, name)]
    if missing:
        raise UserCodeError(
            f"task file {path} does not define {', '.join(missing)}; a task needs class Model, get_inputs() and get_init_inputs()"
        )
    if not (isinstance(module.Model, type) and issubclass(module.Model, torch.nn.Module)):
        raise UserCodeError(f"task file {path}: Model is not a subclass of torch.nn.Module")
    return module.Model, module.get_inputs, module.get_init_inputs


def seed_everything(seed: int) -> None:
    """Seed every generator a task's get_inputs may draw from, as torch.manual_seed does, but
    without its queueing of seeds for device kinds not in use, which formats the caller's stack
    each time: tens of microseconds per input set, more in a deeper stack such as a fork's, and
    paid while a timed window's inputs are made."""
    random.seed(seed)
    if torch.cuda.is_initialized() or not torch.cuda.is_available():
        torch.default_generator.manual_seed(seed)
        for generator in torch.cuda.default_generators:
            generator.manual_seed(seed)
    else:  # CUDA not started yet: torch seeds it once it starts
        torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass


def call_user(fn, what: str, *args):
    try:
        return fn(*args)
    except UserCodeError:
        raise
    except Exception as err:
        raise UserCodeError(f"{what} raised {describe_exception(err)}") from None


def make_inputs(get_inputs, seed: int, device: str, generate_on_device: bool) -> list:
    """The task's inputs for one seed, on the device; identical in every process for the same seed."""
    seed_everything(seed)
    if generate_on_device:
        with torch.device(device):
            inputs = call_user(get_inputs, "get_inputs()")
    else:
        inputs = call_user(get_inputs, "get_inputs()")
    if not isinstance(inputs, (list, tuple)):
        raise UserCodeError(f"get_inputs() returned {type(inputs).__name__}; it must return a list of tensors")
    for position, value in enumerate(inputs):
        if _exact_type(value) is not _tensor_type:
            raise UserCodeError(
                f"get_inputs() element {position} is {type(value).__name__}; every input must be a torch.Tensor"
            )
    return [value.to(device) for value in inputs]


def make_init_inputs(get_init_inputs) -> list:
    init = call_user(get_init_inputs, "get_init_inputs()")
    if not isinstance(init, (list, tuple)):
        raise UserCodeError(f"get_init_inputs() returned {type(init).__name__}; it must return a list")
    return list(init)


def as_output_list(result) -> list:
    """A forward's result as a list (a single tensor becomes a list of one)."""
    if isinstance(result, (list, tuple)):
        return list(result)
    return [result]


# ---- numeric flags -------------------------------------------------------------------------

def pin_numeric_flags(allow_reduced_precision: bool) -> dict:
    """Set the global flags that decide precision; return them as pinned."""
    torch.backends.cuda.matmul.allow_tf32 = allow_reduced_precision
    torch.backends.cudnn.allow_tf32 = allow_reduced_precision
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = allow_reduced_precision
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = allow_reduced_precision
    torch.set_float32_matmul_precision("high" if allow_reduced_precision else "highest")
    torch.backends.cudnn.benchmark = False
    torch.set_flush_denormal(False)
    return read_numeric_flags()


def read_numeric_flags() -> dict:
    flags = {
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "torch.backends.cudnn.benchmark": torch.backends.cudnn.benchmark,
        # Denormals flushed to zero show in arithmetic, not in any getter.
        "torch.set_flush_denormal": bool((torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0),
    }
    readers = {"torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision}
    for backend in ("mkldnn.matmul", "mkldnn.conv", "cuda.matmul", "cudnn.conv", "cudnn.rnn"):
        namespace = torch.backends
        for part in backend.split("."):
            namespace = getattr(namespace, part, None)
        if namespace is not None and hasattr(namespace, "fp32_precision"):
            readers[f"torch.backends.{backend}.fp32_precision"] = lambda ns=namespace: ns.fp32_precision
    for name, read in readers.items():
        try:
            flags[name] = read()
        except Exception as err:  # some combinations of settings make the getters refuse
            flags[name] = f"unreadable ({type(err).__name__})"
    return flags


# ---- tensors as bytes ----------------------------------------------------------------------

def tensor_meta(tensor: torch.Tensor) -> dict:
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
            "nbytes": tensor.numel() * tensor.element_size()}


def tensors_to_exchange(tensors: list, exchange, size: int) -> tuple[list, bool]:
    """Metadata of the tensors, and whether their bytes were written to the exchange buffer
    (they are not when they would overflow its `size` bytes)."""
    metas = [tensor_meta(tensor) for tensor in tensors]
    return metas, exchange.write(tensors, size, metas)


def checksum(tensors: list) -> int:
    """Order-independent exact sum of the tensors' bytes, as 32-bit words, modulo 2**63.

    Computed where the tensors live, so that a value reported at the end of a timed call
    binds the bytes delivered afterwards. On the host it runs single-threaded (numpy), so its
    cost does not depend on the state a subject left torch's thread pool in. On a GPU the
    per-tensor sums come back in one transfer, so a window's checksum costs one synchronize
    however many outputs it has; and a tensor that is already whole words in memory is summed
    in place, with as few host calls as it takes, since the checksum is inside the parent's
    clock and a window of 32 outputs would otherwise spend more host time on it than on its calls.
    """
    total = 0
    device_sums = []
    for tensor in tensors:
        if tensor.device.type == "cpu":
            raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            whole = raw.size // 4 * 4
            total += int(raw[:whole].view(numpy.int32).sum(dtype=numpy.int64)) if whole else 0
            total += int(raw[whole:].sum(dtype=numpy.int64))
            continue
        words = _as_words(tensor)
        if words is not None:
            device_sums.append(words.sum(dtype=torch.int64))
            continue
        # A fresh copy starts on a word boundary, wherever the view it copies started.
        flat = tensor.detach().clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)
        whole = flat.numel() // 4 * 4
        if whole:
            device_sums.append(flat[:whole].view(torch.int32).sum(dtype=torch.int64))
        if whole < flat.numel():
            device_sums.append(flat[whole:].sum(dtype=torch.int64))
    if device_sums:
        total += sum(torch.stack(device_sums).tolist())
    return total % (2**63)


def _as_words(tensor):
    """The tensor's bytes as one flat run of 32-bit words without copying, where they are a
    contiguous run of whole, aligned words; else None."""
    size = tensor.element_size()
    if (not tensor.is_contiguous() or tensor.nbytes % 4 or size not in (1, 2, 4, 8)
            or tensor.storage_offset() * size % 4 or tensor.is_complex()):
        return None
    return tensor.detach().view(-1).view(torch.int32)


def start_device() -> None:
    """Create the CUDA context and cuBLAS's handle while the process waits for its first
    message, so that they are not paid inside an evaluation's turn on the device. Call it with
    `start_gate.held()`."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") and torch.cuda.is_available():
        square = torch.ones(8, 8, device="cuda")
        (square @ square).sum().item()


# ---- devices -------------------------------------------------------------------------------

class DeviceClock:
    """Timing of a window of calls: CUDA events on one stream, back to back, with the whole
    device synchronized before the first call and after the last; or the host clock on a CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            # The C functions themselves, bound now: torch.cuda.synchronize and Event.record look
            # theirs up on every call, where a candidate could have replaced them.
            self._synchronize = torch._C._cuda_synchronize
            self._event = torch.cuda.Event
            self._elapsed = torch._C._CudaEventBase.elapsed_time
            self._record = torch._C._CudaEventBase.record
            self._stream = torch.cuda.default_stream()

    def synchronize(self) -> None:
        if self.cuda:
            self._synchronize()

    def time_window(self, fn, windows: list) -> tuple[list, list[float]]:
        """(results, milliseconds of each call). Work a call leaves running on another stream is
        not in its event time, but the final synchronize holds the window open until it ends,
        so the parent's clock sees it."""
        results, elapsed = [], []
        if not self.cuda:
            for inputs in windows:
                start = _perf_counter()
                results.append(fn(*inputs))
                elapsed.append((_perf_counter() - start) * 1e3)
            return results, elapsed
        stream = self._stream
        marks = [(self._event(enable_timing=True), self._event(enable_timing=True)) for _ in windows]
        self._synchronize()
        for (begin, end), inputs in zip(marks, windows):
            self._record(begin, stream)
            results.append(fn(*inputs))
            self._record(end, stream)
        self._synchronize()
        return results, [self._elapsed(begin, end) for begin, end in marks]

    def time_call(self, fn, *args):
        """One call as a window of one: (result, milliseconds)."""
        results, elapsed = self.time_window(fn, [args])
        return results[0], elapsed[0]


class CacheFlusher:
    """Evicts the last-level cache (GPU L2, or CPU LLC) by writing a buffer larger than it."""

    def __init__(self, device: str, nbytes: int):
        self.buffer = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
        self.clock = DeviceClock(device)
        self.counter = 0

    def flush(self) -> None:
        self.counter += 1
        self.buffer.fill_(self.counter)
        self.clock.synchronize()


def poison_allocator(device: str, sizes: list[int]) -> None:
    """Leave freed blocks of exactly the given sizes, filled with NaN, in the allocator's cache.

    The next allocations of those sizes (a candidate's torch.empty outputs) then start as NaN,
    so unwritten memory shows instead of holding whatever was there.
    """
    blocks = []
    for nbytes in sizes:
        for _ in range(2):
            block = torch.empty(nbytes, dtype=torch.uint8, device=device)
            words = nbytes // 4
            if block.device.type == "cpu":  # single-threaded: the cost must not depend on thread-pool state
                raw = block.numpy()
                raw[: words * 4].view(numpy.float32).fill(numpy.nan)
                raw[words * 4:].fill(0xFF)
            else:
                if words:
                    block[: words * 4].view(torch.float32).fill_(float("nan"))
                block[words * 4:].fill_(0xFF)
            blocks.append(block)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    del blocks


def device_facts(device: str) -> dict:
    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
             "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        facts.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                     sm_count=props.multi_processor_count, memory_bytes=props.total_memory,
                     l2_bytes=getattr(props, "L2_cache_size", None))
    facts["cpu"] = cpu_name()
    return facts


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def channel_from_argv() -> tuple[int, int, list[int]]:
    """The (read, write) file descriptors of the message channel, named in argv[1], and those
    evo handed over beside it: the exchange buffer's and the input pool's socket (checker and
    timed candidate process), or the fork server's socket."""
    fds = [int(part) for part in sys.argv[1].split(",")]
    return fds[0], fds[1], fds[2:]

"""The device's measured ceilings (memory bandwidth, arithmetic rate) and the work a
task must do (FLOPs from torch's counter), for the roofline and the speed-of-light check.

Imports only the standard library and torch. Never imports evo.
"""

from __future__ import annotations

import torch

import harness


def _median_ms(device: str, fn, repeats: int = 5) -> float:
    clock = harness.DeviceClock(device)
    fn()
    times = sorted(clock.time_call(fn)[1] for _ in range(repeats))
    return times[len(times) // 2]


def _copy_bandwidth(device: str, elements: int) -> float:
    source = torch.rand(elements, device=device)
    target = torch.empty_like(source)
    copy_ms = _median_ms(device, lambda: target.copy_(source))
    return 2 * source.numel() * 4 / (copy_ms * 1e-3)


def measure(device: str) -> dict:
    """Bandwidth from a large copy (bytes read plus written); rates from large matrix products."""
    cuda = device.startswith("cuda")
    bandwidth = _copy_bandwidth(device, (1 << 28) if cuda else (1 << 25))
    size = 4096 if cuda else 1024
    a = torch.rand(size, size, device=device)
    b = torch.rand(size, size, device=device)
    fp32_ms = _median_ms(device, lambda: a @ b)
    fp32 = 2 * size**3 / (fp32_ms * 1e-3)
    peak = fp32
    if cuda:
        big = 8192
        x = torch.rand(big, big, device=device, dtype=torch.bfloat16)
        y = torch.rand(big, big, device=device, dtype=torch.bfloat16)
        peak = max(fp32, 2 * big**3 / (_median_ms(device, lambda: x @ y) * 1e-3))
    return {"bandwidth_bytes_per_s": bandwidth, "fp32_flops_per_s": fp32, "peak_flops_per_s": peak}


def count_flops(model, inputs: list) -> int:
    """FLOPs of one reference call, as torch's flop counter sees them (matrix products, convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(*inputs)
    except Exception:
        return 0
    return int(counter.get_total_flops())


def warm_flop_counter() -> None:
    """Count a trivial call once, while the process waits for its first request: the counter's
    first use imports much of torch (seconds), which would otherwise delay the task's start."""
    count_flops(torch.nn.Linear(2, 2), [torch.ones(1, 2)])

"""Measuring an op three ways: fused, eager reference, ``torch.compile`` of the reference.

Used by the pytest-benchmark suites in ``bench/`` and by ``slsdeep bench``, so the two never
drift apart. Each way is timed for ``forward`` (no autograd), ``backward`` (the forward runs
untimed before each round) and ``both``. On a GPU every call is synchronised and the kernels'
time is taken with CUDA events.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

WAYS = ("fused", "eager", "compile")
PASSES = ("forward", "backward", "both")

# Roofs used for "share of the roof" figures: (memory bandwidth B/s, dense bf16 FLOP/s).
KNOWN_ROOFS = {
    "H100": (3.35e12, 989e12),
    "H200": (4.8e12, 989e12),
    "A100": (2.0e12, 312e12),
}


def device_name(device: torch.device | str) -> str:
    """Human-readable device name, e.g. ``NVIDIA H100 80GB HBM3`` or ``cpu (2 threads)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def roofs(device: torch.device | str) -> tuple[float, float] | None:
    """(bandwidth B/s, peak FLOP/s) of a known GPU, else None."""
    name = device_name(device)
    return next((roof for key, roof in KNOWN_ROOFS.items() if key in name), None)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Pass:
    """One timed step: ``setup()`` (untimed) returns the argument that ``run(arg)`` consumes."""

    setup: Callable[[], object]
    run: Callable[[object], object]


def _requires_grad(inputs: Sequence[object]) -> list[torch.Tensor]:
    return [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]


def _outputs(result) -> list[torch.Tensor]:
    result = result if isinstance(result, (tuple, list)) else (result,)
    return [r for r in result if isinstance(r, torch.Tensor) and r.requires_grad]


def make_pass(fn: Callable, inputs: Sequence[object], which: str) -> Pass:
    """The ``forward``, ``backward`` or ``both`` step of ``fn(*inputs)``.

    Backward seeds every differentiable output with a fixed random cotangent; gradients of the
    inputs are dropped between rounds so no step pays for accumulation.
    """
    leaves = _requires_grad(inputs)

    def clear():
        for x in leaves:
            x.grad = None

    def forward_outputs():
        outputs = _outputs(fn(*inputs))
        return outputs, [torch.randn_like(o) for o in outputs]

    def backward(prepared):
        outputs, cotangents = prepared
        torch.autograd.backward(outputs, cotangents)

    if which == "forward":

        def run_forward(_):
            with torch.no_grad():
                return fn(*inputs)

        return Pass(setup=lambda: None, run=run_forward)
    if which == "backward":

        def setup_backward():
            clear()
            return forward_outputs()

        return Pass(setup=setup_backward, run=backward)
    if which == "both":

        def run_both(_):
            backward(forward_outputs())

        return Pass(setup=clear, run=run_both)
    raise ValueError(f"which must be one of {PASSES}; got {which!r}")


def three_ways(fused: Callable, reference: Callable) -> dict[str, Callable]:
    """The fused op, its eager reference and ``torch.compile`` of the reference."""
    return {"fused": fused, "eager": reference, "compile": torch.compile(reference, dynamic=False)}


def time_pass(step: Pass, device: torch.device | str, *, warmup: int = 2, repeat: int = 10) -> list[float]:
    """Seconds per run of ``step`` (one figure per repeat; setup untimed)."""
    device = torch.device(device)
    for _ in range(warmup):
        step.run(step.setup())
    synchronize(device)
    times = []
    for _ in range(repeat):
        arg = step.setup()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step.run(arg)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            step.run(arg)
            times.append(time.perf_counter() - begin)
    return times


def peak_memory(step: Pass, device: torch.device | str) -> int:
    """Peak bytes allocated by one run of ``step`` above what was allocated before it.

    CUDA: the caching allocator's statistics. CPU: the profiler's allocation events, summed in
    order (tensor allocations only, which is what "extra memory" means for a kernel).
    """
    device = torch.device(device)
    arg = step.setup()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step.run(arg)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step.run(arg)
    events = sorted(
        (e for e in prof.events() if e.name == "[memory]"), key=lambda e: e.time_range.start
    )
    current = peak = 0
    for event in events:
        current += event.cpu_memory_usage
        peak = max(peak, current)
    return peak


def summary(times: Sequence[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times)}

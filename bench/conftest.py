"""pytest-benchmark harness: every op timed three ways (fused / eager / torch.compile) per pass.

Run: ``pytest bench/ --benchmark-json=bench/results/<name>.json`` (``gpu_validate.sh`` does this on
a GPU). Each benchmark records the device name, dtype, shape, bytes moved, peak memory and, on a
known GPU, achieved GB/s and the share of the bandwidth roof in ``extra_info``; ratios between
the three ways come from the same run (same group).
"""

import os

import pytest
import torch

from slsdeep_kernels import benchmark as measure

BENCH_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# SLSDEEP_BENCH_QUICK=1: only the forward+backward ("both") pass of each case, fewer rounds.
QUICK = os.environ.get("SLSDEEP_BENCH_QUICK", "0") == "1"


def pytest_collection_modifyitems(config, items):
    if not QUICK:
        return
    keep, drop = [], []
    for item in items:
        which = getattr(item, "callspec", None) and item.callspec.params.get("which")
        (drop if which not in (None, "both") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def device():
    return BENCH_DEVICE


@pytest.fixture
def run_op(benchmark):
    """``run_op(op=..., way=..., which=..., fn=..., inputs=..., shape=..., bytes_moved=..., flops=...)``."""

    def run(*, op, way, which, fn, inputs, shape, bytes_moved=None, flops=None, rounds=None):
        dtype = next(x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point())
        step = measure.make_pass(fn, inputs, which)
        for _ in range(2):  # warm up (and compile) outside the timed rounds
            step.run(step.setup())
        measure.synchronize(BENCH_DEVICE)
        peak = measure.peak_memory(step, BENCH_DEVICE)

        def timed(arg):
            step.run(arg)
            measure.synchronize(BENCH_DEVICE)

        benchmark.group = f"{op} {tuple(shape)} {str(dtype).removeprefix('torch.')} {which}"
        benchmark.extra_info.update(
            op=op,
            way=way,
            which=which,
            device=measure.device_name(BENCH_DEVICE),
            dtype=str(dtype).removeprefix("torch."),
            shape=list(shape),
            bytes_moved=bytes_moved,
            flops=flops,
            peak_memory_bytes=peak,
        )
        rounds = rounds or (20 if BENCH_DEVICE.type == "cuda" else 5) // (2 if QUICK else 1)
        benchmark.pedantic(timed, setup=lambda: ((step.setup(),), {}), rounds=rounds, iterations=1, warmup_rounds=1)
        median = benchmark.stats.stats.median
        roof = measure.roofs(BENCH_DEVICE)
        if bytes_moved:
            benchmark.extra_info["gbytes_per_s"] = bytes_moved / median / 1e9
            if roof:
                benchmark.extra_info["bandwidth_roof_share"] = bytes_moved / median / roof[0]
        if flops:
            benchmark.extra_info["tflops_per_s"] = flops / median / 1e12
            if roof:
                benchmark.extra_info["flops_roof_share"] = flops / median / roof[1]

    return run

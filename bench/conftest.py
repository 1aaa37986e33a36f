"""pytest-benchmark harness: every op timed three ways (fused / eager / torch.compile) per pass.

Run: ``pytest bench/ --benchmark-json=bench/results/<name>.json`` (``gpu_validate.sh`` does this on
a GPU). Each benchmark records the device name, dtype, shape, bytes moved, peak memory, images/s
(the whole model's cases), the mode of a compile way not in the default one and, on a known GPU,
achieved GB/s and the share of the bandwidth roof in ``extra_info``; ratios between the three ways
come from the same run (same group).

The device, the ``SLSDEEP_BENCH_QUICK`` / ``SLSDEEP_BENCH_WAYS`` settings and the parameters of the
suites are in :mod:`slsdeep_kernels.testing`; this file holds the pytest hooks and fixtures, and the
``SLSDEEP_BENCH_COMPILE_MODE`` setting, which only :func:`selected` reads.
"""

import os

import pytest
import torch

from slsdeep_kernels import benchmark as measure
from slsdeep_kernels.backend import ENV_POISON
from slsdeep_kernels.testing import BENCH_DEVICE, QUICK, WAYS, keep_way

# SLSDEEP_BENCH_COMPILE_MODE=default or max-autotune: only the ``compile`` ways of that torch.compile
# mode (a case's ``compile_mode``; the whole model's max-autotune compiles on a GPU take minutes each,
# so gpu_validate.sh gives them a stage of their own). Unset or empty: every compile way.
COMPILE_MODE = os.environ.get("SLSDEEP_BENCH_COMPILE_MODE", "")


def selected(params: dict) -> bool:
    """Whether a benchmark with these pytest parameters runs. Quick mode: only each case's last pass
    (forward+backward, or forward for inference cases). SLSDEEP_BENCH_WAYS: only the ways it names.
    SLSDEEP_BENCH_COMPILE_MODE: only the compile ways of that mode."""
    case = params.get("case")
    last = case.passes[-1] if case else "both"
    quick_ok = not QUICK or params.get("which", last) == last
    way_ok = "way" not in params or keep_way(params["way"], WAYS)
    mode = (case.compile_mode if case else None) or "default"
    mode_ok = not COMPILE_MODE or params.get("way") != "compile" or mode == COMPILE_MODE
    return quick_ok and way_ok and mode_ok


def pytest_collection_modifyitems(config, items):
    """Deselects what :func:`selected` drops."""
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params or {}
        (keep if selected(params) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _pytorch_defaults(monkeypatch):
    """Time under PyTorch's defaults, also when ``pytest tests bench`` runs both in one process:
    no output poisoning and TF32 as PyTorch has it (tests/conftest.py sets both for the tests)."""
    monkeypatch.setenv(ENV_POISON, "0")
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture
def device():
    return BENCH_DEVICE


@pytest.fixture
def run_op(benchmark):
    """``run_op(op=..., way=..., which=..., fn=..., inputs=..., shape=..., bytes_moved=..., flops=..., images=...)``
    (``images``: images per call, for ``images_per_s``; ``compile_mode``: that of a compile way, recorded)."""

    def run(*, op, way, which, fn, inputs, shape, bytes_moved=None, flops=None, images=None, compile_mode=None, rounds=None):
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
            **({"compile_mode": compile_mode} if compile_mode else {}),
        )
        rounds = rounds or (20 if BENCH_DEVICE.type == "cuda" else 5) // (2 if QUICK else 1)
        benchmark.pedantic(timed, setup=lambda: ((step.setup(),), {}), rounds=rounds, iterations=1, warmup_rounds=1)
        median = benchmark.stats.stats.median
        case = measure.Case(op, tuple(shape), dtype, None, None, None, bytes_moved={which: bytes_moved} if bytes_moved else {},
                            flops={which: flops} if flops else {}, images=images)
        benchmark.extra_info.update(measure.floors(case, which, median, BENCH_DEVICE))

    return run


@pytest.fixture
def run_case(run_op):
    """``run_case(case, way, which)``: one way and pass of a :class:`slsdeep_kernels.benchmark.Case`.

    A ``torch.compile`` of the reference that fails to compile is skipped with the error, not failed.
    """

    def run(case, way, which, rounds=None):
        try:
            run_op(op=case.op, way=way, which=which, fn=case.way(way), inputs=case.make_inputs(BENCH_DEVICE),
                   shape=case.shape, bytes_moved=case.bytes_moved.get(which), flops=case.flops.get(which), images=case.images,
                   compile_mode=case.compile_mode if way == "compile" else None, rounds=rounds)
        except Exception as error:
            if way != "compile":
                raise
            pytest.skip(f"torch.compile of the reference failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")

    return run


"""The C++ CPU kernels under every instruction-set variant this machine runs (``csrc/cpu/variant.h``),
beside the copy bandwidth measured in the same run: ``clone`` of the same bytes (a fresh output, as
the kernels' own outputs are: its page faults included) and ``copy`` (``copy_`` into a tensor
already written: the memory's bandwidth alone), and beside ``read``, a ``sum`` over as many bytes
of a tensor read again each round, as the kernels' inputs are: the ceiling of the kernels that only
read (upsample_concat's backward; the BN statistics and backward sums read the convolution's fresh
output instead, docs/performance.md §4.3).

* Memory-bound kernels (pyramid pool in both layouts and upsample_concat, forward and backward; the conv_bn_relu
  BatchNorm passes): their GB/s against clone's, copy's and read's. Target (issue 14): within 15% of clone.
* Compute-bound kernels (the pyramid conv's taps, forward and backward): each variant against
  DEFAULT, the baseline x86-64 code every kernel ran before the variants. Target: >= 1.5x.
* The BatchNorm passes run inside ``conv_bn_relu_train_kernel`` and its backward, around oneDNN's
  convolution: each is a profiler scope (``bn_statistics``, ``bn_apply``, ``bn_backward_sums``,
  ``bn_backward_apply``), timed from a profile of the whole kernel.

Allocation: PyTorch's CPU allocator takes large blocks from glibc, which maps fresh pages for each (a
first touch per 4 KiB page; in this VM that cost alone varied from 3 to 45 ms for one 19 MB output).
The module has glibc keep freed memory in its heap instead (``mallopt``: no mmap, no trim; restored
after), and first writes 768 MB that it frees again, so that the heap holds that much memory already
touched, which the ways reuse, as under a caching allocator. (Without it a freed output was often not
reused: PyTorch asks for 64-byte aligned blocks, glibc's aligned allocation asks for a little more
than the block freed before it, and a fresh 19 MB output faulted its 4,608 pages on about two calls
in three. upsample_concat's 56 MB output still faults on some rounds: the records' max.) Once set,
glibc keeps a fixed mmap threshold for the rest of the process (mallopt(3)): run this module in a
process of its own, not before other benchmarks.

Shapes: the CPU-sized decoder of ``benchmark.op_cases`` (4, 512, 48, 48), branches of 256 channels,
128 conv outputs; the BatchNorm layer is layer3's 1×1 (8, 1024→256, 48²). fp32. Skipped on CUDA.
"""

import ctypes
import statistics
import time

import pytest
import torch

from slsdeep_kernels import PYRAMID_BINS
from slsdeep_kernels import backend as backends
from slsdeep_kernels.testing import BENCH_DEVICE, cpu_variant_override

pytestmark = pytest.mark.skipif(
    BENCH_DEVICE.type != "cpu" or backends.cpu_extension_error() is not None, reason="the C++ CPU kernels only"
)
KERNELS = torch.ops.slsdeep_kernels
N, C, H, W, CB, CO = 4, 512, 48, 48, 256, 128
CELLS = sum(b * b for b in PYRAMID_BINS)
SIZE = 4  # fp32 bytes


def _inputs(names):
    """The inputs ``names`` of one case, seeded, built right before it is timed (as the references' are:
    none of them evicted from the caches by the other cases' inputs)."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=generator)

    builders = {
        "x": lambda: rand(N, C, H, W),
        "x_channels_last": lambda: rand(N, C, H, W).contiguous(memory_format=torch.channels_last),
        "branches": lambda: [rand(N, CB, b, b) for b in PYRAMID_BINS],
        "cells": lambda: rand(N, C, CELLS),
        "grad_concat": lambda: rand(N, C + len(PYRAMID_BINS) * CB, H, W),
        "out": lambda: rand(N, CO, H, W),
        "taps": lambda: [rand(N, CO, 3, 3, b, b) for b in PYRAMID_BINS],
        "grad_out": lambda: rand(N, CO, H, W),
    }
    return {name: builders[name]() for name in names}


_BRANCH_SIZES = [v for b in PYRAMID_BINS for v in (CB, b, b)]
_TAP_SIZES = [v for b in PYRAMID_BINS for v in (b, b)]
_IMAGE, _CONCAT, _SMALL = N * C * H * W, N * (C + len(PYRAMID_BINS) * CB) * H * W, N * (C + CB) * CELLS
# name: (kernel on the inputs, the inputs it reads, bytes moved: one read of every input and one write of every
# output, bound)
CASES = {
    "pyramid_pool": (
        lambda t: KERNELS.pyramid_pool_kernel(t["x"], PYRAMID_BINS), ("x",), (_IMAGE + N * C * CELLS) * SIZE, "memory",
    ),
    "pyramid_pool_backward": (
        lambda t: KERNELS.pyramid_pool_backward_kernel(t["cells"], PYRAMID_BINS, H, W, False), ("cells",),
        (N * C * CELLS + _IMAGE) * SIZE, "memory",
    ),
    "pyramid_pool_channels_last": (
        lambda t: KERNELS.pyramid_pool_kernel(t["x_channels_last"], PYRAMID_BINS), ("x_channels_last",),
        (_IMAGE + N * C * CELLS) * SIZE, "memory",
    ),
    "pyramid_pool_backward_channels_last": (
        lambda t: KERNELS.pyramid_pool_backward_kernel(t["cells"], PYRAMID_BINS, H, W, True), ("cells",),
        (N * C * CELLS + _IMAGE) * SIZE, "memory",
    ),
    "upsample_concat": (
        lambda t: KERNELS.upsample_concat_kernel(t["x"], t["branches"], False, False), ("x", "branches"),
        (_IMAGE + _CONCAT + _SMALL) * SIZE, "memory",
    ),
    "upsample_concat_backward": (
        lambda t: KERNELS.upsample_concat_backward_kernel(t["grad_concat"], C, _BRANCH_SIZES, False), ("grad_concat",),
        (_CONCAT - _IMAGE + _SMALL) * SIZE, "memory",
    ),
    "pyramid_taps_add": (
        lambda t: KERNELS.pyramid_taps_add_kernel(t["out"], t["taps"], False), ("out", "taps"),
        2 * N * CO * H * W * SIZE, "compute",
    ),
    "pyramid_taps_backward": (
        lambda t: KERNELS.pyramid_taps_backward_kernel(t["grad_out"], _TAP_SIZES, 3, False), ("grad_out",),
        N * CO * H * W * SIZE, "compute",
    ),
}  # fmt: skip
VARIANTS = backends.cpu_variants()
# glibc's mallopt parameters and their defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}
PRE_TOUCHED_BYTES = 768 << 20


@pytest.fixture(scope="module", autouse=True)
def _heap_keeps_freed_memory():
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):  # not glibc: timed as the allocator does it
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    touched = torch.ones(PRE_TOUCHED_BYTES // SIZE)  # the heap keeps it once freed (below the trim threshold)
    del touched
    yield
    for parameter, value in DEFAULTS.items():
        libc.mallopt(parameter, value)


def _record(benchmark, op, way, which, bytes_moved=None, kind=None):
    """The record's fields (docs/performance.md §3); GB/s where the bytes moved are known."""
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(op=op, way=way, which=which, device=f"cpu ({backends.cpu_variant()} automatic)",
                                dtype="float32", bytes_moved=bytes_moved, bound=kind)  # fmt: skip
    if bytes_moved:
        benchmark.extra_info["gbytes_per_s"] = bytes_moved / median / 1e9


REFERENCES = ("clone", "copy", "read")


def _reference(way, bytes_moved):
    """The reference ``way`` as a call: clone or copy moves ``bytes_moved`` (half read, half written),
    read sums ``bytes_moved``."""
    if way == "read":
        return torch.randn(bytes_moved // SIZE).sum
    source = torch.randn(bytes_moved // (2 * SIZE))
    if way == "clone":
        return source.clone
    target = torch.empty_like(source).fill_(1.0)
    return lambda: target.copy_(source)


@pytest.mark.parametrize("way", [*VARIANTS, *REFERENCES])
@pytest.mark.parametrize("op", CASES)
def test_kernel(benchmark, op, way):
    kernel, names, bytes_moved, kind = CASES[op]
    benchmark.group = f"cpu kernel {op}"
    if way in REFERENCES:
        benchmark.pedantic(_reference(way, bytes_moved), rounds=7, iterations=1, warmup_rounds=2)
    else:
        with cpu_variant_override(way):
            benchmark.pedantic(kernel, args=(_inputs(names),), rounds=7, iterations=1, warmup_rounds=2)
    _record(benchmark, op, way, "backward" if "backward" in op else "forward", bytes_moved, kind)


# ---------------------------------------------------------------- the BatchNorm passes

BN_SHAPE = (8, 1024, 256, 48)  # batch, C_in, C_out, side
PROFILED_STEPS = 15  # a pass's median over 5 steps moved by up to 1.8x between runs on the Xeon VM
BN_PASSES = {"bn_statistics": 1, "bn_apply": 2, "bn_backward_sums": 2, "bn_backward_apply": 3}  # reads + writes of y's size


def _bn_step():
    batch, c_in, c_out, side = BN_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, side, side, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c_out, c_in, 1, 1, generator=generator) / c_in**0.5).contiguous(memory_format=torch.channels_last)
    gamma, beta = torch.rand(c_out, generator=generator) + 0.5, torch.randn(c_out, generator=generator)
    geometry = ([1, 1], [0, 0], [1, 1], 1)
    grad = torch.randn(batch, c_out, side, side, generator=generator).contiguous(memory_format=torch.channels_last)

    def step():
        out, y, mean, var = KERNELS.conv_bn_relu_train_kernel(x, weight, None, gamma, beta, *geometry, 1e-5, True)
        KERNELS.conv_bn_relu_train_backward_kernel(
            grad, x, weight, None, y, mean, var, gamma, beta, *geometry, 1e-5, True, [True, True, False]
        )

    return step, batch * c_out * side * side * SIZE


@pytest.mark.parametrize("way", VARIANTS)
def test_bn_passes(benchmark, way):
    """conv_bn_relu training forward + backward at layer3's 1×1, timed whole; ``extra_info`` holds each
    BN pass's median from a profile of PROFILED_STEPS steps, its GB/s, and clone's, copy's and read's GB/s."""
    step, y_bytes = _bn_step()
    benchmark.group = "cpu conv_bn_relu train 1x1 passes"
    with cpu_variant_override(way):
        benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            for _ in range(PROFILED_STEPS):
                step()
    _record(benchmark, "conv_bn_relu train passes", way, "both")
    for way_name in REFERENCES:  # each moves 2 y-sizes
        reference = _reference(way_name, 2 * y_bytes)
        seconds = []
        for _ in range(7):
            start = time.perf_counter()
            reference()
            seconds.append(time.perf_counter() - start)
        benchmark.extra_info[f"{way_name}_gbytes_per_s"] = 2 * y_bytes / statistics.median(seconds) / 1e9
    for name, sizes in BN_PASSES.items():
        times = [e.cpu_time_total / 1e6 for e in profile.events() if e.name == name]
        assert len(times) == PROFILED_STEPS, f"{name}: {len(times)} profiled calls (is the profiler scope in the kernel?)"
        benchmark.extra_info[f"{name}_gbytes_per_s"] = sizes * y_bytes / statistics.median(times) / 1e9

"""Measuring an op three ways: fused, eager reference, ``torch.compile`` of the reference.

Used by the pytest-benchmark suites in ``bench/`` and by ``slsdeep bench``, so the two never
drift apart. Each way is timed for ``forward`` (no autograd), ``backward`` (the forward runs
untimed before each round) and ``both``. On a GPU every call is synchronised and the kernels'
time is taken with CUDA events. The memory-bound op cases on a GPU move at least 100 MB in every
pass they time, so that launch latency does not hide the bandwidth.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from slsdeep_kernels.ops.pyramid import PYRAMID_BINS

WAYS = ("fused", "eager", "compile")
PASSES = ("forward", "backward", "both")

# Roofs used for "share of the roof" figures: (memory bandwidth B/s, dense bf16 FLOP/s), NVIDIA's
# datasheet figures per form factor. Keyed by what torch.cuda.get_device_name() reports, matched in
# order (an H100 "80GB HBM3" is the SXM part); a GPU matching none gets no shares rather than
# another part's roof.
KNOWN_ROOFS = (
    (r"H100.*NVL", "H100 NVL", (3.9e12, 835e12)),
    (r"H100.*PCIe", "H100 PCIe", (2.0e12, 756e12)),
    (r"H100.*(SXM|HBM3)", "H100 SXM", (3.35e12, 989e12)),
    (r"H200.*NVL", "H200 NVL", (4.8e12, 835e12)),
    (r"H200", "H200 SXM", (4.8e12, 989e12)),
    (r"A100.*80GB.*PCIe", "A100 80GB PCIe", (1.935e12, 312e12)),
    (r"A100-SXM4-80GB", "A100 80GB SXM", (2.039e12, 312e12)),
    (r"A100.*40GB", "A100 40GB", (1.555e12, 312e12)),
)


def device_name(device: torch.device | str) -> str:
    """Human-readable device name, e.g. ``NVIDIA H100 80GB HBM3`` or ``cpu (2 threads)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def roof_of(name: str) -> tuple[str, tuple[float, float]] | None:
    """(the part, (bandwidth B/s, peak FLOP/s)) of a GPU by its device name, else None."""
    return next(((part, roof) for pattern, part, roof in KNOWN_ROOFS if re.search(pattern, name, re.IGNORECASE)), None)


def roofs(device: torch.device | str) -> tuple[float, float] | None:
    """(bandwidth B/s, peak FLOP/s) of a known GPU, else None."""
    known = roof_of(device_name(device)) if torch.device(device).type == "cuda" else None
    return None if known is None else known[1]


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

    Backward seeds every differentiable output with a fixed random cotangent, drawn on the first
    (untimed, warm-up) call for each output shape: drawing it is no part of the step (``randn_like``
    of a (8, 256, 48, 48) output took 110 ms on a 2-core CPU, half a conv_bn_relu step). Gradients of
    the inputs are dropped between rounds so no step pays for accumulation.
    """
    leaves = _requires_grad(inputs)
    cotangents: dict[tuple, torch.Tensor] = {}

    def clear():
        for x in leaves:
            x.grad = None

    def cotangent(output):
        key = (tuple(output.shape), output.stride(), output.dtype, output.device)
        if key not in cotangents:
            cotangents[key] = torch.randn_like(output)
        return cotangents[key]

    def forward_outputs():
        outputs = _outputs(fn(*inputs))
        return outputs, [cotangent(o) for o in outputs]

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


def three_ways(fused: Callable, reference: Callable, compile_mode: str | None = None) -> dict[str, Callable]:
    """The fused op, its eager reference and ``torch.compile`` of the reference (in ``compile_mode``,
    e.g. ``"max-autotune"``; None: the default mode)."""
    return {"fused": fused, "eager": reference, "compile": torch.compile(reference, dynamic=False, mode=compile_mode)}


class Lazy:
    """A case's callable that ``build()`` makes when the case is first measured (:meth:`Case.way`):
    a case can name a whole model without building it, or touching its device, when the cases are
    only listed (pytest's collection, a CPU test of the CUDA cases). ``torch.compile`` gets what was
    built, the model itself."""

    def __init__(self, build: Callable[[], Callable]):
        self.build, self._built = build, None

    def resolve(self) -> Callable:
        if self._built is None:
            self._built = self.build()
        return self._built


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

    CUDA: the caching allocator's statistics. CPU: the profiler's allocation and free events,
    summed in time order (tensor allocations only, which is what "extra memory" means for a kernel).
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
    # Each op event carries the bytes it allocated itself; frees come as "[memory]" events. Their
    # running sum in time order is the allocation curve.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@dataclass
class Case:
    """One benchmark case: an op at one shape and dtype, timed three ways.

    ``make_inputs(device)`` returns fresh inputs (differentiable ones with ``requires_grad``).
    ``fused`` / ``reference``: callables, or :class:`Lazy` ones built when the case is first measured.
    ``bytes_moved`` / ``flops`` map a pass to the fused op's floors: the bytes its kernels must move
    in that pass (one read of every tensor they take, one write of every tensor they make) and the
    arithmetic it must do. ``images``: images per call (the whole model's cases), which gives
    records an ``images_per_s``. ``compile_mode``: the ``torch.compile`` mode of the ``compile`` way
    (None: the default mode).
    """

    op: str
    shape: tuple
    dtype: torch.dtype
    make_inputs: Callable[[torch.device], list]
    fused: Callable | Lazy
    reference: Callable | Lazy
    bytes_moved: dict[str, int] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    passes: tuple = PASSES
    extra_ways: dict[str, Callable] = field(default_factory=dict)
    images: int | None = None
    compile_mode: str | None = None
    _ways: dict | None = None

    @property
    def name(self) -> str:
        return f"{self.op} {'x'.join(map(str, self.shape))} {str(self.dtype).removeprefix('torch.')}"

    @property
    def ways(self) -> tuple[str, ...]:
        return WAYS + tuple(self.extra_ways)

    def way(self, name: str) -> Callable:
        """The callable of way ``name`` (the three ways, then ``extra_ways`` such as a hand-folded conv)."""
        if self._ways is None:
            fused, reference = (f.resolve() if isinstance(f, Lazy) else f for f in (self.fused, self.reference))
            self._ways = {**three_ways(fused, reference, self.compile_mode), **self.extra_ways}
        return self._ways[name]


def floors(case: Case, which: str, seconds: float, device: torch.device | str) -> dict:
    """Achieved GB/s and TFLOP/s of ``case`` at ``seconds`` per pass, their share of the roofs, and
    images/s where the case counts images."""
    record = {"bytes_moved": case.bytes_moved.get(which), "flops": case.flops.get(which)}
    if case.images:
        record["images_per_s"] = case.images / seconds
    roof = roofs(device)
    if record["bytes_moved"]:
        record["gbytes_per_s"] = record["bytes_moved"] / seconds / 1e9
        if roof:
            record["bandwidth_roof_share"] = record["bytes_moved"] / seconds / roof[0]
    if record["flops"]:
        record["tflops_per_s"] = record["flops"] / seconds / 1e12
        if roof:
            record["flops_roof_share"] = record["flops"] / seconds / roof[1]
    return record


def measure(case: Case, way: str, which: str, device: torch.device | str, *, repeat: int = 10) -> dict:
    """Median time, peak memory and roof shares of one way and pass of ``case`` (no pytest).

    A ``torch.compile`` of the reference that fails to compile is recorded with its error rather
    than aborting the whole run (inductor has gaps, e.g. some CPU backward of bilinear upsampling).
    """
    device = torch.device(device)
    record = {"op": case.op, "shape": list(case.shape), "dtype": str(case.dtype).removeprefix("torch."),
              "way": way, "which": which, "device": device_name(device)}
    if way == "compile" and case.compile_mode:
        record["compile_mode"] = case.compile_mode
    step = make_pass(case.way(way), case.make_inputs(device), which)
    try:
        times = time_pass(step, device, repeat=repeat)
    except Exception as error:
        if way != "compile":
            raise
        return {**record, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    median = statistics.median(times)
    record.update(median_s=median, min_s=min(times), peak_memory_bytes=peak_memory(step, device))
    return {**record, **floors(case, which, median, device)}


# ---------------------------------------------------------------------------------------------
# The op cases: the shapes each op's issue sets its targets at.
# ---------------------------------------------------------------------------------------------



def _nll_epe_cases(device: torch.device) -> list[Case]:
    """The loss on CPU at 16 x 384² (the model's training batch on a GPU) and 8 x 256²; on a GPU at
    two shapes that move >= 100 MB in every pass, fp32 logits (what the model's training step feeds
    it) and bf16 logits (what a bf16 model would).

    Bytes per pass, L = the logits' bytes, T = the uint8 target's: forward (no grad) reads both,
    L + T; the forward with grad also writes the gradient, 2L + T; backward scales that gradient in
    place by the (random, so not 1) upstream gradient, 2L; both = 4L + T. At (64, 2, 512, 512) fp32
    and (128, 2, 512, 512) bf16, L = 134 MB: forward 151 / 168 MB, backward 268 MB, both 554 / 570 MB.
    """
    from slsdeep_kernels.ops.nll_epe_loss import nll_epe_loss, nll_epe_loss_reference

    if device.type == "cuda":
        shapes = [((64, 2, 512, 512), torch.float32), ((128, 2, 512, 512), torch.bfloat16)]
    else:
        shapes = [((16, 2, 384, 384), torch.float32), ((8, 2, 256, 256), torch.float32)]
    cases = []
    for shape, dtype in shapes:
        n, c, h, w = shape

        def make_inputs(device, shape=shape, dtype=dtype):
            generator = torch.Generator().manual_seed(0)
            logits = (3 * torch.randn(shape, generator=generator)).to(device, dtype).requires_grad_()
            target = (torch.rand((shape[0], *shape[2:]), generator=generator) < 0.3).to(device, torch.uint8)
            return [logits, target]

        logits_bytes, target_bytes = n * c * h * w * dtype.itemsize, n * h * w
        cases.append(Case(
            "nll_epe_loss", shape, dtype, make_inputs,
            lambda logits, target: nll_epe_loss(logits, target, check_target=False), nll_epe_loss_reference,
            bytes_moved={"forward": logits_bytes + target_bytes, "backward": 2 * logits_bytes,
                         "both": 4 * logits_bytes + target_bytes},
        ))
    return cases


def _pyramid_cases(device: torch.device) -> list[Case]:
    from slsdeep_kernels.ops import pyramid

    gpu = device.type == "cuda"
    # (N, C, H, W, branch channels, conv out channels): SLSDeep's decoder on GPU, a CPU-sized one.
    # pool_upsample_concat on GPU moves 609 MB in bf16 forward (x 151 MB, the concat 453 MB, the pooled
    # cells and branches 5 MB) and as much in backward; fp32 twice that.
    n, c, h, w, cb, out = (16, 2048, 48, 48, 1024, 512) if gpu else (4, 512, 48, 48, 256, 128)
    cells = sum(b * b for b in PYRAMID_BINS)
    cases = []
    for dtype in [torch.bfloat16, torch.float32] if gpu else [torch.float32]:
        size = torch.finfo(dtype).bits // 8

        def tensors(device, dtype=dtype):
            generator = torch.Generator().manual_seed(0)
            x = torch.randn((n, c, h, w), generator=generator).to(device, dtype).requires_grad_()
            branches = [torch.randn((n, cb, b, b), generator=generator).to(device, dtype).requires_grad_() for b in PYRAMID_BINS]
            weight = torch.randn((out, c + len(PYRAMID_BINS) * cb, 3, 3), generator=generator) / (3 * (c + 4 * cb) ** 0.5)
            return x, branches, weight.to(device, dtype).requires_grad_()

        image, concat, small = n * c * h * w, n * (c + len(PYRAMID_BINS) * cb) * h * w, n * (c + cb) * cells
        pool_bytes = {"forward": (image + concat + small) * size, "backward": (concat + image + small) * size}
        pool_bytes["both"] = pool_bytes["forward"] + pool_bytes["backward"]
        def pool_inputs(device, tensors=tensors):
            x, branches, _ = tensors(device)
            return [x, *branches]

        def conv_inputs(device, tensors=tensors):
            x, branches, weight = tensors(device)
            return [x, weight, *branches]

        cases.append(Case(
            "pool_upsample_concat", (n, c, h, w, cb), dtype, pool_inputs,
            lambda x, *branches: (pyramid.pyramid_pool(x, PYRAMID_BINS), pyramid.upsample_concat(x, list(branches))),
            lambda x, *branches: (pyramid.pyramid_pool_reference(x, PYRAMID_BINS),
                                  pyramid.upsample_concat_reference(x, list(branches))),
            bytes_moved=pool_bytes,
        ))
        forward = 2 * n * h * w * out * 9 * c + 2 * 9 * out * cb * n * cells + 2 * n * out * h * w * 9 * cells
        cases.append(Case(
            "pyramid_conv3x3", (n, c, h, w, cb, out), dtype, conv_inputs,
            lambda x, weight, *branches: pyramid.pyramid_conv3x3(x, list(branches), weight),
            lambda x, weight, *branches: pyramid.pyramid_conv3x3_reference(x, list(branches), weight),
            flops={"forward": forward, "backward": 2 * forward, "both": 3 * forward},
        ))
    return cases


def _conv_bn_relu_cases(device: torch.device) -> list[Case]:
    import torch.nn.functional as F

    from slsdeep_kernels.ops.conv_bn_relu import conv_bn_relu

    gpu = device.type == "cuda"
    # GPU: batch 64 (the model's large inference batch), so that the smallest pass, the 3×3's bf16 eval
    # forward (x and out 75 MB each, weight 1 MB), moves 152 MB; the 1×1's bf16 eval forward moves 378 MB.
    batch, side = (64 if gpu else 8), 48
    cases = []
    # layer3 of the dilated ResNet-50 at 384 px: 1024→256 1×1 and 256→256 3×3 dilation 2, channels_last.
    for c_in, c_out, k, d in [(1024, 256, 1, 1), (256, 256, 3, 2)]:
        for dtype in [torch.bfloat16, torch.float32] if gpu else [torch.float32]:
            for training in (False, True):

                def make_inputs(device, c_in=c_in, c_out=c_out, k=k, dtype=dtype, training=training):
                    generator = torch.Generator().manual_seed(0)

                    def rand(*shape, scale=1.0, shift=0.0):
                        return (torch.randn(shape, generator=generator) * scale + shift).to(device, dtype)

                    x = rand(batch, c_in, side, side).contiguous(memory_format=torch.channels_last).requires_grad_(training)
                    weight = rand(c_out, c_in, k, k, scale=(c_in * k * k) ** -0.5).contiguous(memory_format=torch.channels_last)
                    gamma, beta = rand(c_out, scale=0.1, shift=1.0), rand(c_out, scale=0.1)
                    for t in (weight, gamma, beta):
                        t.requires_grad_(training)
                    mean = (torch.randn(c_out, generator=generator) * 0.1).to(device)
                    var = (torch.rand(c_out, generator=generator) + 0.5).to(device)
                    return [x, weight, gamma, beta, mean, var]

                def fused(x, weight, gamma, beta, mean, var, d=d, k=k, training=training):
                    return conv_bn_relu(x, weight, None, gamma, beta, mean, var, padding=d * (k // 2), dilation=d, training=training)

                def eager(x, weight, gamma, beta, mean, var, d=d, k=k, training=training):
                    y = F.conv2d(x, weight, None, 1, d * (k // 2), d)
                    return F.relu(F.batch_norm(y, mean, var, gamma, beta, training, 0.1, 1e-5))

                def memory_efficient(x, weight, gamma, beta, mean, var, d=d, k=k):
                    return conv_bn_relu(x, weight, None, gamma, beta, mean, var, padding=d * (k // 2), dilation=d,
                                        training=True, memory_efficient=True)

                def folded(x, weight, gamma, beta, mean, var, d=d, k=k):
                    """What cuDNN users do by hand in eval: fold BN into the conv, then ReLU in place."""
                    scale = gamma.float() * torch.rsqrt(var + 1e-5)
                    folded_weight = (weight.float() * scale[:, None, None, None]).to(weight.dtype)
                    return F.conv2d(x, folded_weight, (beta - mean * scale).to(x.dtype), 1, d * (k // 2), d).relu_()

                size = torch.finfo(dtype).bits // 8
                x, w, out = batch * c_in * side * side, c_out * c_in * k * k, batch * c_out * side * side
                flops = 2 * out * c_in * k * k
                forward_bytes = (x + w + out * (2 if training else 1)) * size
                backward_bytes = (2 * out + 2 * x + 2 * w) * size
                cases.append(Case(
                    f"conv_bn_relu {'train' if training else 'eval'}", (batch, c_in, c_out, k, d, side), dtype,
                    make_inputs, fused, eager,
                    bytes_moved={"forward": forward_bytes, "backward": backward_bytes, "both": forward_bytes + backward_bytes},
                    flops={"forward": flops, "backward": 2 * flops, "both": 3 * flops},
                    passes=PASSES if training else ("forward",),
                    extra_ways={"fused-memory-efficient": memory_efficient} if training else {"folded": folded},
                ))
    return cases


def op_cases(device: torch.device | str, quick: bool = False) -> list[Case]:
    """Every op's benchmark cases on ``device`` (``quick``: the first case of each op)."""
    device = torch.device(device)
    cases = _nll_epe_cases(device) + _pyramid_cases(device) + _conv_bn_relu_cases(device)
    if quick:
        firsts: dict[str, Case] = {}
        for case in cases:
            firsts.setdefault(case.op, case)
        cases = list(firsts.values())
    return cases

"""pyramid_pool, upsample_concat, pyramid_conv3x3 and the modules against PyTorch's own
adaptive_avg_pool2d / interpolate / conv2d over the concatenation (the references), every backend."""

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import slsdeep_kernels
from slsdeep_kernels import backend as backends
from slsdeep_kernels.ops import pyramid as P
from slsdeep_kernels.testing import TOLERANCE, assert_matches_reference, backends_to_test, relative_error

AVAILABLE = backends.available_backends()
# Backends on CPU tensors (Triton only under the interpreter, in fp32 at small shapes).
CPU_BACKENDS = backends_to_test("pyramid")
COMPILED = backends_to_test("pyramid", fused=True)
GPU_BACKENDS = backends_to_test("pyramid", "cuda", fused=True)
needs_cpu = pytest.mark.skipif("cpu" not in AVAILABLE, reason="the C++ CPU extension is not built")

BINS = slsdeep_kernels.PYRAMID_BINS
STREAM_HEADER = Path(__file__).resolve().parents[1] / "csrc" / "cpu" / "stream.h"
# (N, C, H, W): odd sizes, image smaller than the largest bin, batch 1 and > 1.
SHAPES = [(1, 3, 5, 7), (2, 4, 13, 9), (2, 3, 2, 2)]


def dtypes_for(backend):
    if backend == "triton":
        return [torch.float32]
    return [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def cases(shapes=SHAPES, backends_=CPU_BACKENDS):
    return [
        pytest.param(b, s, d, id=f"{p.id}-{'x'.join(map(str, s))}-{str(d).removeprefix('torch.')}", marks=p.marks)
        for p in backends_
        for b in p.values
        for s in shapes
        for d in dtypes_for(b)
    ]


def image(shape, dtype=torch.float32, channels_last=False, device="cpu"):
    x = torch.randn(shape, dtype=dtype, device=device)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def make_branches(n, channels=(2, 3, 1, 2), sizes=((1, 1), (2, 2), (3, 3), (6, 6)), dtype=torch.float32, device="cpu"):
    return [torch.randn(n, c, h, w, dtype=dtype, device=device, requires_grad=True) for c, (h, w) in zip(channels, sizes)]


# ---------------------------------------------------------------- pyramid_pool


def test_pool_layout_is_bins_in_order_row_major():
    x = image((2, 3, 11, 7))
    out = slsdeep_kernels.pyramid_pool(x, bins=(3, 1, 2), backend="reference")
    assert out.shape == (2, 3, 9 + 1 + 4)
    torch.testing.assert_close(out[:, :, :9].view(2, 3, 3, 3), F.adaptive_avg_pool2d(x, 3))
    torch.testing.assert_close(out[:, :, 9:10].view(2, 3, 1, 1), F.adaptive_avg_pool2d(x, 1))
    torch.testing.assert_close(out[:, :, 10:].view(2, 3, 2, 2), F.adaptive_avg_pool2d(x, 2))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend,shape,dtype", cases())
def test_pyramid_pool(backend, shape, dtype, channels_last):
    x = image(shape, dtype, channels_last).requires_grad_()
    assert_matches_reference(
        lambda x: slsdeep_kernels.pyramid_pool(x, BINS, backend=backend),
        lambda x: P.pyramid_pool_reference(x, BINS),
        [x],
        names=["x"],
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pyramid_pool_other_bins(backend):
    x = image((2, 3, 9, 16)).requires_grad_()
    bins = (4, 1, 5, 10)  # 10 > 9 rows: overlapping windows
    assert_matches_reference(
        lambda x: slsdeep_kernels.pyramid_pool(x, bins, backend=backend), lambda x: P.pyramid_pool_reference(x, bins), [x]
    )


CPU_KERNELS = [p for p in CPU_BACKENDS if p.values[0] == "cpu"]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_pyramid_pool_at_the_segment_tables_limit(backend, channels_last):
    # one bin of MAX_BIN_SUM over 1001 rows: 127 row segments, the most the compiled kernels' tables
    # hold; over 67 columns every window overlaps its neighbours
    x = image((1, 2, 1001, 67), channels_last=channels_last).requires_grad_()
    bins = (P.MAX_BIN_SUM,)
    assert_matches_reference(
        lambda x: slsdeep_kernels.pyramid_pool(x, bins, backend=backend), lambda x: P.pyramid_pool_reference(x, bins), [x]
    )


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "shape", [(2, 65, 7, 5), (1, 130, 3, 4), (2, 1, 6, 6), (2, 3, 1, 9), (2, 3, 9, 1)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_pyramid_pool_channel_chunks_and_thin_maps(backend, shape, channels_last):
    # channels past one 64-channel chunk of the channel walk (a partial last chunk), C == 1, H or W == 1
    x = image(shape, channels_last=channels_last).requires_grad_()
    assert_matches_reference(
        lambda x: slsdeep_kernels.pyramid_pool(x, BINS, backend=backend), lambda x: P.pyramid_pool_reference(x, BINS), [x]
    )


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_pyramid_pool_of_an_empty_batch(backend, channels_last):
    x = image((0, 20, 5, 7), channels_last=channels_last).requires_grad_()
    out = slsdeep_kernels.pyramid_pool(x, BINS, backend=backend)
    assert out.shape == (0, 20, sum(b * b for b in BINS))
    out.sum().backward()
    assert x.grad.shape == x.shape


STREAMING_BYTES = 8 << 20  # csrc/cpu/stream.h's kStreamingBytes: outputs this large are written streaming


@pytest.mark.skipif(not STREAM_HEADER.exists(), reason="the source tree's csrc/ (the wheel's tests run without it)")
def test_the_streaming_threshold_is_the_kernels():
    defined = re.search(r"kStreamingBytes = int64_t\{(\d+)\} << 20;", STREAM_HEADER.read_text())
    assert defined is not None and int(defined[1]) << 20 == STREAMING_BYTES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_streamed_outputs(backend, channels_last, dtype):
    """The pool's gradient and upsample_concat past the streaming threshold. The pool's gradient streams
    its rows (NCHW) or pixels (channels_last), upsample_concat its NCHW rows (a channels_last output is
    written plainly: checked at the same size); odd byte lengths, so the streamed copies start and end
    off 16-byte boundaries."""
    side = 61 if dtype == torch.float32 else 87
    x = image((2, 301, side, side - 2), dtype, channels_last).requires_grad_()
    assert x.numel() * x.element_size() >= STREAMING_BYTES  # the pool's gradient has x's size
    assert_matches_reference(
        lambda x: slsdeep_kernels.pyramid_pool(x, BINS, backend=backend), lambda x: P.pyramid_pool_reference(x, BINS), [x]
    )
    x = image((2, 31, side, side - 2), dtype, channels_last).requires_grad_()
    branches = [y.detach().to(dtype).requires_grad_() for y in make_branches(2, channels=(67, 67, 67, 67))]
    with torch.no_grad():
        out = slsdeep_kernels.upsample_concat(x, branches, backend=backend)
    assert out.numel() * out.element_size() >= STREAMING_BYTES
    assert torch.equal(out[:, :31], x)  # x's channels are copied: the same bits
    fused, reference = upsample_case(backend, align_corners=False)
    assert_matches_reference(fused, reference, [x, *branches])


@pytest.mark.parametrize("view", ["channel slice of NHWC", "row-strided NHWC", "column-strided NCHW", "expanded"])
@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_pyramid_pool_of_views(backend, view):
    # inputs whose strides are no memory format: each walk reads through the strides
    base = image((2, 80, 10, 12), channels_last=view != "column-strided NCHW")
    x = {
        "channel slice of NHWC": lambda: base[:, 8:72],
        "row-strided NHWC": lambda: base[:, :, ::2],
        "column-strided NCHW": lambda: base[:, :, :, ::3],
        "expanded": lambda: base[:, :, :1].expand(2, 80, 10, 12),
    }[view]().detach().requires_grad_()
    assert_matches_reference(
        lambda x: slsdeep_kernels.pyramid_pool(x, BINS, backend=backend), lambda x: P.pyramid_pool_reference(x, BINS), [x]
    )


@needs_cpu
def test_bins_past_the_compiled_tables_run_the_reference_or_raise_when_asked():
    x = image((1, 2, 5, 5))
    bins = (P.MAX_BIN_SUM, 1)
    torch.testing.assert_close(slsdeep_kernels.pyramid_pool(x, bins), P.pyramid_pool_reference(x, bins))
    with pytest.raises(ValueError, match="bins"):
        slsdeep_kernels.pyramid_pool(x, (1,) * (P.MAX_BINS + 1), backend="cpu")
    # the Python limits and the C++ ones (pyramid::kMaxBins, kMaxAxisCells) agree
    with pytest.raises(RuntimeError, match=f"sum to at most {P.MAX_BIN_SUM}"):
        backends.COMPILED.pyramid_pool_kernel(x, list(bins))
    with pytest.raises(RuntimeError, match=f"between 1 and {P.MAX_BINS} bins"):
        backends.COMPILED.pyramid_pool_kernel(x, [1] * (P.MAX_BINS + 1))
    backends.COMPILED.pyramid_pool_kernel(x, [4] * P.MAX_BINS)  # exactly at both limits


# ---------------------------------------------------------------- upsample_concat


def fused_and_reference(name, backend, arguments):
    """(fused, reference) of the pyramid op ``name`` over a test's flat inputs; ``arguments(*inputs)``:
    the op's positional arguments."""
    op, reference = getattr(slsdeep_kernels, name), getattr(P, f"{name}_reference")
    return (lambda *inputs: op(*arguments(*inputs), backend=backend)), (lambda *inputs: reference(*arguments(*inputs)))


def upsample_case(backend, align_corners):
    return fused_and_reference("upsample_concat", backend, lambda x, *branches: (x, list(branches), align_corners))


@pytest.mark.parametrize("align_corners", [False, True], ids=["half_pixel", "align_corners"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend,shape,dtype", cases())
def test_upsample_concat(backend, shape, dtype, channels_last, align_corners):
    x = image(shape, dtype, channels_last).requires_grad_()
    branches = [y.detach().to(dtype).requires_grad_() for y in make_branches(shape[0])]
    fused, reference = upsample_case(backend, align_corners)
    assert_matches_reference(fused, reference, [x, *branches], names=["x"] + [f"branches[{i}]" for i in range(4)])


@pytest.mark.parametrize("align_corners", [False, True], ids=["half_pixel", "align_corners"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_upsample_concat_any_branch_size(backend, align_corners):
    """Non-square branches, a branch as large as the image and one larger than it (downsampling)."""
    x = image((2, 3, 7, 5)).requires_grad_()
    branches = make_branches(2, channels=(2, 1, 3), sizes=((2, 3), (7, 5), (9, 11)))
    fused, reference = upsample_case(backend, align_corners)
    assert_matches_reference(fused, reference, [x, *branches])


@pytest.mark.parametrize("backend", COMPILED)
def test_output_follows_memory_format(backend):
    for channels_last in (False, True):
        x = image((2, 4, 5, 7), channels_last=channels_last)
        branches = [y.detach() for y in make_branches(2)]
        weight = torch.randn(3, 4 + 8, 3, 3)
        for out in (
            slsdeep_kernels.upsample_concat(x, branches, backend=backend),
            slsdeep_kernels.pyramid_conv3x3(x, branches, weight, backend=backend),
        ):
            assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ---------------------------------------------------------------- pyramid_conv3x3


def conv_case(backend, align_corners, with_bias):
    def arguments(x, weight, bias, *branches):
        return x, list(branches), weight, bias if with_bias else None, align_corners

    return fused_and_reference("pyramid_conv3x3", backend, arguments)


@pytest.mark.parametrize("align_corners", [False, True], ids=["half_pixel", "align_corners"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend,shape,dtype", cases())
def test_pyramid_conv3x3(backend, shape, dtype, channels_last, align_corners):
    x = image(shape, dtype, channels_last).requires_grad_()
    branches = [y.detach().to(dtype).requires_grad_() for y in make_branches(shape[0])]
    weight = (torch.randn(5, shape[1] + 8, 3, 3, dtype=dtype) / 4).requires_grad_()
    bias = torch.randn(5, dtype=dtype, requires_grad=True)
    fused, reference = conv_case(backend, align_corners, with_bias=True)
    names = ["x", "weight", "bias"] + [f"branches[{i}]" for i in range(4)]
    assert_matches_reference(fused, reference, [x, weight, bias, *branches], names=names)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pyramid_conv3x3_without_bias_some_grads(backend):
    """No bias, x frozen, one frozen branch, odd branch sizes: only the needed gradients flow."""
    x = image((2, 3, 9, 8))
    branches = make_branches(2, channels=(2, 3), sizes=((2, 5), (9, 8)))
    branches[0].requires_grad_(False)
    weight = (torch.randn(4, 8, 3, 3) / 4).requires_grad_()
    fused, reference = conv_case(backend, False, with_bias=False)
    assert_matches_reference(fused, reference, [x, weight, None, *branches])


@pytest.mark.parametrize("width", [16, 37, 100])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pyramid_conv3x3_wide_rows(backend, width):
    """Output rows of whole 16-column chunks, and of chunks plus a tail (the CPU taps sum each chunk
    of a row in registers, and their backward up to three chunks at a time)."""
    x = image((1, 3, 5, width)).requires_grad_()
    branches = make_branches(1)
    weight = (torch.randn(5, 3 + 8, 3, 3) / 4).requires_grad_()
    bias = torch.randn(5, requires_grad=True)
    fused, reference = conv_case(backend, False, with_bias=True)
    assert_matches_reference(fused, reference, [x, weight, bias, *branches])


def test_pyramid_conv3x3_is_exact_to_fp32_rounding():
    """Norm-wise error against fp64 below 1e-5 in fp32 (TF32 off), at a decoder-like channel ratio."""
    x = image((2, 64, 24, 24))
    branches = [y.detach() for y in make_branches(2, channels=(32, 32, 32, 32))]
    weight = torch.randn(16, 64 + 128, 3, 3) / 30
    exact = P.pyramid_conv3x3_reference(x.double(), [y.double() for y in branches], weight.double())
    for backend in dict.fromkeys(p.values[0] for p in COMPILED if not p.marks):  # the cpu variants are one backend
        assert relative_error(slsdeep_kernels.pyramid_conv3x3(x, branches, weight, backend=backend), exact) < 1e-5


# ---------------------------------------------------------------- pyramid_conv: 1×1 and 3×3, parts in any order

# (kernel, part order): the concatenations of the peers' heads. "x" the input, "y<i>" the branches,
# "f" a second full-resolution part (ASPP's parallel convs).
LAYOUTS = [
    (1, ("y1", "y2", "y0", "x")),  # segmentation_models_pytorch's PSPDecoder: branches first, 1×1
    (1, ("x", "f", "y0", "f2")),  # torchvision's ASPP: full-resolution parts around a bin-1 branch
    (3, ("x", "y0", "y1", "y2")),  # CSAIL's PPM / mmsegmentation's PSPHead
    (3, ("y0", "x", "f", "y2")),
]


def layout_id(kernel, order):
    return f"{kernel}x{kernel}-" + "-".join(order)


def conv_parts(order, n=2, size=(7, 9), dtype=torch.float32, channels_last=False):
    """The parts named in ``order``: x (3 channels) and f, f2 at ``size``, y0, y1, y2 at 1×1, 2×3 and 3×3."""
    branch_shapes = {"y0": (2, (1, 1)), "y1": (1, (2, 3)), "y2": (3, (3, 3))}
    parts = []
    for name in order:
        if name in branch_shapes:
            c, hw = branch_shapes[name]
            parts.append(torch.randn(n, c, *hw, dtype=dtype, requires_grad=True))
        else:
            parts.append(image((n, {"x": 3, "f": 2, "f2": 1}[name], *size), dtype, channels_last).requires_grad_())
    return parts


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("align_corners", [False, True], ids=["half_pixel", "align_corners"])
@pytest.mark.parametrize("kernel,order", LAYOUTS, ids=[layout_id(*layout) for layout in LAYOUTS])
@pytest.mark.parametrize("backend,shape,dtype", cases(shapes=[(2, 3, 7, 9)]))
def test_pyramid_conv(backend, shape, dtype, kernel, order, align_corners, relu):
    if relu and dtype in (torch.float16, torch.bfloat16):
        # In 16 bits the op rounds twice (the conv's output, then with the taps added), the
        # reference once: outputs within a rounding of 0 take the other side of the ReLU, and at this
        # size one such element moves the weight's gradient by ~1e-2. The mask is checked in fp32/fp64.
        pytest.skip("ReLU mask flips at 16-bit rounding; the ReLU is tested in fp32 and fp64")
    parts = conv_parts(order, dtype=dtype, channels_last=relu)  # channels_last x with the ReLU cases
    channels = sum(p.shape[1] for p in parts)
    weight = (torch.randn(5, channels, kernel, kernel, dtype=dtype) / 3).requires_grad_()
    bias = torch.randn(5, dtype=dtype, requires_grad=True)
    assert_matches_reference(
        lambda w, b, *ps: slsdeep_kernels.pyramid_conv(list(ps), w, b, (7, 9), align_corners, relu, backend=backend),
        lambda w, b, *ps: P.pyramid_conv_reference(list(ps), w, b, (7, 9), align_corners, relu),
        [weight, bias, *parts],
        names=["weight", "bias"] + list(order),
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pyramid_conv_batch_1_with_two_full_resolution_parts(backend):
    """Batch 1: the channel slices of one gradient are contiguous, yet the parts' gradients must not alias."""
    parts = conv_parts(("x", "y1", "f"), n=1)
    weight = (torch.randn(3, 6, 3, 3) / 3).requires_grad_()
    assert_matches_reference(
        lambda w, *ps: slsdeep_kernels.pyramid_conv(list(ps), w, backend=backend),
        lambda w, *ps: P.pyramid_conv_reference(list(ps), w),
        [weight, *parts],
    )


@needs_cpu
@pytest.mark.parametrize("kernel,order", LAYOUTS, ids=[layout_id(*layout) for layout in LAYOUTS])
def test_pyramid_conv_with_the_cuda_backends_tap_layout(kernel, order, monkeypatch):
    """The CUDA kernels take z, and give its gradient, channels innermost ((N, h, w, k, k, C_out)
    storage): the op's matmuls for that layout, forward and every gradient, through the CPU kernels
    (which read and write any strides), so that CI checks the algebra the GPU runs."""
    monkeypatch.setattr(P, "_taps_channels_innermost", lambda backend: backend == "cpu")
    seen = []
    real_add = backends.COMPILED.pyramid_taps_add_kernel

    def add(out, taps, align_corners):
        seen.extend(z.stride() for z in taps)
        return real_add(out, taps, align_corners)

    monkeypatch.setattr(backends.COMPILED, "pyramid_taps_add_kernel", add)
    parts = conv_parts(order, channels_last=True)
    weight = (torch.randn(5, sum(p.shape[1] for p in parts), kernel, kernel) / 3).requires_grad_()
    bias = torch.randn(5, requires_grad=True)
    assert_matches_reference(
        lambda w, b, *ps: slsdeep_kernels.pyramid_conv(list(ps), w, b, (7, 9), False, True, backend="cpu"),
        lambda w, b, *ps: P.pyramid_conv_reference(list(ps), w, b, (7, 9), False, True),
        [weight, bias, *parts],
        names=["weight", "bias"] + list(order),
    )
    assert seen and all(stride[1] == 1 and stride[3] == 5 for stride in seen), seen  # (N, h, w, k, k, C_out)


@pytest.mark.parametrize("backend", backends_to_test("pyramid", dtype=torch.float64))
def test_pyramid_conv_gradcheck_fp64(backend):
    for kernel, order in LAYOUTS[:2]:
        parts = [p.detach().double().requires_grad_() for p in conv_parts(order, size=(4, 5))]
        weight = torch.randn(2, sum(p.shape[1] for p in parts), kernel, kernel, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda w, b, *ps: slsdeep_kernels.pyramid_conv(list(ps), w, b, (4, 5), True, True, backend=backend),
            (weight, bias, *parts),
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pyramid_conv_size_defaults_to_the_first_part(backend):
    parts = [p.detach() for p in conv_parts(("x", "y1"))]
    weight = torch.randn(2, 4, 1, 1)
    expected = P.pyramid_conv_reference(parts, weight, size=(7, 9))
    torch.testing.assert_close(slsdeep_kernels.pyramid_conv(parts, weight, backend=backend), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pyramid_conv_modules_matches_the_modules(backend):
    """relu(bn(conv(cat))) through pyramid_conv_modules: BN folded in eval, a BatchNorm after the op in
    training (same output, same gradients, same running statistics)."""
    torch.manual_seed(3)
    parts = conv_parts(("y0", "x", "y2"))
    conv = torch.nn.Conv2d(8, 4, 3, padding=1)
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    unfused_bn = copy.deepcopy(bn)
    for training in (False, True):
        bn.train(training), unfused_bn.train(training)
        params = [conv.weight, conv.bias, bn.weight, bn.bias]
        unfused_params = [conv.weight, conv.bias, unfused_bn.weight, unfused_bn.bias]
        out = slsdeep_kernels.pyramid_conv_modules(parts, conv, bn, relu=True, size=(7, 9), backend=backend)
        cat = torch.cat([p if p.shape[2:] == (7, 9) else F.interpolate(p, (7, 9), mode="bilinear") for p in parts], 1)
        expected = F.relu(unfused_bn(conv(cat)))
        assert relative_error(out, expected) < TOLERANCE[torch.float32]
        grad = torch.randn_like(out)
        actual = torch.autograd.grad(out, params + parts, grad)
        wanted = torch.autograd.grad(expected, unfused_params + parts, grad)
        # the conv bias before a training-mode BN has an exact gradient of 0: compare against the largest
        largest = max(g.norm().item() for g in wanted)
        for a, e in zip(actual, wanted):
            assert (a - e).norm().item() < TOLERANCE[torch.float32] * largest
        torch.testing.assert_close(bn.running_mean, unfused_bn.running_mean)
        torch.testing.assert_close(bn.running_var, unfused_bn.running_var)


# ---------------------------------------------------------------- fp64 gradcheck, opcheck, compile, determinism


@pytest.mark.parametrize("backend", backends_to_test("pyramid", dtype=torch.float64))
def test_gradcheck_fp64(backend):
    x = image((2, 2, 5, 4), torch.float64).requires_grad_()
    branches = make_branches(2, channels=(1, 2), sizes=((2, 2), (3, 1)), dtype=torch.float64)
    weight = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: slsdeep_kernels.pyramid_pool(x, (1, 2, 3), backend=backend), (x,))
    for align_corners in (False, True):
        assert torch.autograd.gradcheck(
            lambda x, a, b: slsdeep_kernels.upsample_concat(x, [a, b], align_corners, backend=backend), (x, *branches)
        )
        assert torch.autograd.gradcheck(
            lambda x, w, c, a, b: slsdeep_kernels.pyramid_conv3x3(x, [a, b], w, c, align_corners, backend=backend),
            (x, weight, bias, *branches),
        )


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck(backend):
    x = image((2, 3, 5, 7)).requires_grad_()
    branches = make_branches(2)
    weight = torch.randn(4, 11, 3, 3, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    ops = torch.ops.slsdeep_kernels
    torch.library.opcheck(ops.pyramid_pool, (x, [1, 2, 3, 6], backend))
    torch.library.opcheck(ops.pyramid_pool_backward, (torch.randn(2, 3, 50), [1, 2, 3, 6], 5, 7, True, backend))
    torch.library.opcheck(ops.upsample_concat, (x, branches, False, backend))
    torch.library.opcheck(ops.upsample_concat_backward, (torch.randn(2, 11, 5, 7), 3, [2, 1, 1, 3, 2, 2, 1, 3, 3, 2, 6, 6], True, backend))
    def split(weight, parts):  # the op's weight inputs, as leaves
        pieces = P._split_weight(weight.detach(), parts, P._full_resolution(parts, [5, 7]))
        return pieces[0].requires_grad_(), [w.requires_grad_() for w in pieces[1]]

    def full(parts):
        return P._full_resolution(parts, [5, 7])

    parts = [x, *branches]
    torch.library.opcheck(ops.pyramid_conv, (parts, *split(weight, parts), bias, full(parts), True, False, backend))
    torch.library.opcheck(ops.pyramid_conv, (parts, *split(weight, parts), None, full(parts), False, True, backend))
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(ops.pyramid_pool, (x_cl, [2, 5], backend))
    torch.library.opcheck(ops.upsample_concat, (x_cl, branches, True, backend))
    parts = [x_cl, *branches]
    torch.library.opcheck(ops.pyramid_conv, (parts, *split(weight, parts), bias, full(parts), False, False, backend))
    # 1×1, branches first, two full-resolution parts, ReLU
    other = image((2, 2, 5, 7)).requires_grad_()
    parts = [branches[1], x, branches[0], other]
    weight_1x1 = torch.randn(4, sum(p.shape[1] for p in parts), 1, 1)
    torch.library.opcheck(ops.pyramid_conv, (parts, *split(weight_1x1, parts), bias, full(parts), True, True, backend))
    grad = torch.randn(2, 4, 5, 7)
    for layout in (torch.contiguous_format, torch.channels_last):  # oneDNN's weight gradient follows the layout
        detached = [p.detach().contiguous(memory_format=layout) for p in parts]
        weight_x, branch_weights = split(weight_1x1, detached)
        torch.library.opcheck(
            ops.pyramid_conv_backward,
            (grad.contiguous(memory_format=layout), detached, weight_x.detach(), [w.detach() for w in branch_weights],
             full(detached), False, [True, True, True, True, True], backend),
        )  # fmt: skip
    detached = [p.detach() for p in parts]
    weight_x, branch_weights = split(weight_1x1, detached)
    weight_x, branch_weights = weight_x.detach(), [w.detach() for w in branch_weights]
    torch.library.opcheck(
        ops.pyramid_conv_backward,
        (grad, detached, weight_x, branch_weights, full(detached), False, [True, True, True, True, False], backend),
    )


@needs_cpu
def test_torch_compile_fullgraph():
    def decoder(x, weight, *branches):
        pooled = slsdeep_kernels.pyramid_pool(x, BINS, backend="cpu")
        mixed = [y + pooled.mean() for y in branches]
        cat = slsdeep_kernels.upsample_concat(x, mixed, backend="cpu")
        return cat.sum() + slsdeep_kernels.pyramid_conv3x3(x, mixed, weight, backend="cpu").square().sum()

    x = image((2, 3, 7, 5)).requires_grad_()
    branches = make_branches(2)
    weight = torch.randn(4, 11, 3, 3, requires_grad=True)
    inputs = [x, weight, *branches]
    compiled = torch.compile(decoder, fullgraph=True)
    expected = decoder(*inputs)
    expected_grads = torch.autograd.grad(expected, inputs)
    actual = compiled(*inputs)
    actual_grads = torch.autograd.grad(actual, inputs)
    # Inductor computes the upstream gradients its own way (the mean's and the square's backward), so
    # the kernels' gradients differ by fp32 rounding: compared norm-wise, as every op test (docs/design.md §7).
    torch.testing.assert_close(actual, expected)
    for a, e in zip(actual_grads, expected_grads):
        assert relative_error(a, e) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", COMPILED)
def test_backward_is_deterministic(backend):
    x = image((2, 4, 9, 7), channels_last=True).requires_grad_()
    branches = make_branches(2)
    weight = torch.randn(3, 12, 3, 3, requires_grad=True)

    def grads():
        out = slsdeep_kernels.upsample_concat(x, branches, backend=backend).sum()
        out = out + slsdeep_kernels.pyramid_conv3x3(x, branches, weight, backend=backend).square().sum()
        out = out + slsdeep_kernels.pyramid_pool(x, backend=backend).square().sum()
        return torch.autograd.grad(out, [x, weight, *branches])

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", COMPILED)
def test_double_backward_raises(backend):
    x = image((1, 2, 4, 4)).requires_grad_()
    branches = make_branches(1, channels=(1,), sizes=((2, 2),))
    weight = torch.randn(2, 3, 3, 3, requires_grad=True)
    outputs = {
        "pyramid_pool": lambda: slsdeep_kernels.pyramid_pool(x, backend=backend),
        "upsample_concat": lambda: slsdeep_kernels.upsample_concat(x, branches, backend=backend),
        "pyramid_conv": lambda: slsdeep_kernels.pyramid_conv([x, *branches], weight, backend=backend),
    }
    for op, run in outputs.items():
        inputs = [x] if op == "pyramid_pool" else [x, *branches]
        grads = torch.autograd.grad(run().square().sum(), inputs, create_graph=True)
        with pytest.raises(RuntimeError, match=f"{op}: double backward is not supported"):
            sum(g.sum() for g in grads).backward()


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_value_error_naming_the_argument():
    x = image((2, 3, 5, 5))
    good = [y.detach() for y in make_branches(2)]
    weight = torch.randn(4, 11, 3, 3)
    cases = [
        (lambda: slsdeep_kernels.pyramid_pool(x, bins=()), "bins"),
        (lambda: slsdeep_kernels.pyramid_pool(x, bins=(1, 0)), "bin"),
        (lambda: slsdeep_kernels.pyramid_pool(x, bins=(2, -1)), "bin"),
        (lambda: slsdeep_kernels.pyramid_pool(x, bins=3), "bins"),
        (lambda: slsdeep_kernels.pyramid_pool(x[0]), "x"),
        (lambda: slsdeep_kernels.pyramid_pool(x.long()), "x"),
        (lambda: slsdeep_kernels.upsample_concat(x, [good[0], torch.randn(3, 2, 2, 2)]), r"branches\[1\]"),
        (lambda: slsdeep_kernels.upsample_concat(x, [good[0].double()]), r"branches\[0\]"),
        (lambda: slsdeep_kernels.upsample_concat(x, [torch.randn(2, 3, 4)]), r"branches\[0\]"),
        (lambda: slsdeep_kernels.upsample_concat(x, [good[0], good[1].to("meta")]), r"branches\[1\]"),
        (lambda: slsdeep_kernels.upsample_concat(x, good[0]), "branches"),
        (lambda: slsdeep_kernels.pyramid_conv3x3(x, good, torch.randn(4, 10, 3, 3)), "weight"),
        (lambda: slsdeep_kernels.pyramid_conv3x3(x, good, torch.randn(4, 11, 1, 1)), "weight"),
        (lambda: slsdeep_kernels.pyramid_conv3x3(x, good, weight.double()), "weight"),
        (lambda: slsdeep_kernels.pyramid_conv3x3(x, good, weight, torch.randn(3)), "bias"),
        (lambda: slsdeep_kernels.pyramid_conv3x3(x, [good[0][:1]] + good[1:], weight), r"branches\[0\]"),
        (lambda: slsdeep_kernels.PyramidPooling(8, 2, bins=()), "bins"),
        (lambda: slsdeep_kernels.pyramid_conv([], weight), "parts"),
        (lambda: slsdeep_kernels.pyramid_conv(x, weight), "parts"),
        (lambda: slsdeep_kernels.pyramid_conv([x, *good], torch.randn(4, 11, 5, 5)), "weight"),
        (lambda: slsdeep_kernels.pyramid_conv([x, *good], torch.randn(4, 11, 3, 1)), "weight"),
        (lambda: slsdeep_kernels.pyramid_conv([x, *good], torch.randn(4, 12, 1, 1)), "weight"),
        (lambda: slsdeep_kernels.pyramid_conv([x, good[0].double()], torch.randn(4, 5, 1, 1)), r"parts\[1\]"),
        (lambda: slsdeep_kernels.pyramid_conv(good, torch.randn(4, 8, 1, 1), size=(5, 5)), "no part has the output size"),
        (lambda: slsdeep_kernels.pyramid_conv([x, *good], weight, size=(5, 0)), "size"),
        (lambda: slsdeep_kernels.pyramid_conv([x, *good], weight, size=5), "size"),
        (lambda: slsdeep_kernels.pyramid_conv_modules([x, *good], torch.nn.Conv2d(11, 4, 3, stride=2, padding=1)), "conv"),
    ]
    for run, name in cases:
        with pytest.raises(ValueError, match=name):
            run()


# ---------------------------------------------------------------- modules


def assert_module_matches(out, expected, inputs, module, plain):
    """A fused module against its plain twin: the output, then after one cotangent the input's and every
    parameter's gradient, and every buffer (BatchNorm's running statistics)."""
    assert relative_error(out, expected) < TOLERANCE[torch.float32]
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    x, x_plain = inputs
    assert relative_error(x.grad, x_plain.grad) < TOLERANCE[torch.float32]
    for (name, p), q in zip(module.named_parameters(), plain.parameters()):
        assert relative_error(p.grad, q.grad) < TOLERANCE[torch.float32], name
    for (name, a), b in zip(module.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def pspnet_reference(module: slsdeep_kernels.PyramidPooling, x):
    """PSPNet's pyramid pooling from plain layers, sharing the module's conv and BN."""
    size = x.shape[2:]
    branches = [
        F.interpolate(stage(F.adaptive_avg_pool2d(x, b)), size=size, mode="bilinear", align_corners=module.align_corners)
        for b, stage in zip(module.bins, module.stages)
    ]
    return torch.cat([x, *branches], dim=1)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pyramid_pooling_module_matches_pspnet(backend, training):
    torch.manual_seed(1)
    module = slsdeep_kernels.PyramidPooling(6, 4, align_corners=True, backend=backend).train(training)
    plain = slsdeep_kernels.PyramidPooling(6, 4, align_corners=True).train(training)
    plain.load_state_dict(module.state_dict())
    x = image((3, 6, 9, 11), channels_last=True)
    x_fused, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = module(x_fused), pspnet_reference(plain, x_plain)
    assert out.shape == (3, 6 + 16, 9, 11)
    assert_module_matches(out, expected, (x_fused, x_plain), module, plain)
    assert "stages.3.conv.weight" in module.state_dict() and "stages.0.bn.running_mean" in module.state_dict()


def test_pyramid_pooling_batch_one_in_training_raises_like_batchnorm():
    module = slsdeep_kernels.PyramidPooling(4, 2)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        module(image((1, 4, 6, 6)))
    module.eval()(image((1, 4, 6, 6)))  # eval is fine


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decoder_block_matches_conv_over_concatenation(backend):
    torch.manual_seed(2)
    block = slsdeep_kernels.PyramidDecoderBlock(6, 4, 5, backend=backend)
    expected_block = slsdeep_kernels.PyramidDecoderBlock(6, 4, 5)
    expected_block.load_state_dict(block.state_dict())
    assert block.conv.in_channels == block.pyramid.out_channels == 6 + 4 * 4
    x = image((2, 6, 10, 9)).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    out = block(x)
    expected = expected_block.relu(expected_block.bn(expected_block.conv(pspnet_reference(expected_block.pyramid, x2))))
    assert_module_matches(out, expected, (x, x2), block, expected_block)
    assert {"conv.weight", "bn.weight", "pyramid.stages.0.conv.weight"} <= set(block.state_dict())


# ---------------------------------------------------------------- GPU (realistic shapes, compiled kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_ops(backend, channels_last, dtype):
    x = image((4, 256, 48, 48), dtype, channels_last, "cuda").requires_grad_()
    branches = [torch.randn(4, 128, b, b, dtype=dtype, device="cuda", requires_grad=True) for b in BINS]
    weight = (torch.randn(64, 256 + 512, 3, 3, dtype=dtype, device="cuda") / 40).requires_grad_()
    bias = torch.randn(64, dtype=dtype, device="cuda", requires_grad=True)
    assert_matches_reference(lambda x: slsdeep_kernels.pyramid_pool(x, backend=backend), P.pyramid_pool_reference, [x])
    for align_corners in (False, True):
        fused, reference = upsample_case(backend, align_corners)
        assert_matches_reference(fused, reference, [x, *branches])
        fused, reference = conv_case(backend, align_corners, with_bias=True)
        assert_matches_reference(fused, reference, [x, weight, bias, *branches])
        weight_1x1 = (torch.randn(64, 256 + 512, 1, 1, dtype=dtype, device="cuda") / 20).requires_grad_()
        assert_matches_reference(
            lambda w, *ps: slsdeep_kernels.pyramid_conv(list(ps), w, None, (48, 48), align_corners, backend=backend),
            lambda w, *ps: P.pyramid_conv_reference(list(ps), w, None, (48, 48), align_corners),
            [weight_1x1, *branches, x],
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_taps_and_upsample_at_odd_sizes(backend, channels_last, dtype):
    """The taps kernels' tiles at their edges (the backward's k = 1 case is the upsample backward):
    out channels and columns not multiples of the tile (13, 37), a height whose stencil table
    overflows shared memory (300 rows: the forward's row strip splits), a branch larger than the
    output (resized down: the stencils jump), out channels a 16-byte multiple (24) and not (13), branch
    channel slices off the 16-byte grid (offsets 8, 11, 16: one element at a time; test_gpu_ops has the
    packed slices)."""
    for out_channels, size in ((13, (300, 37)), (24, (41, 64))):
        x = image((2, 8, *size), dtype, channels_last, "cuda").requires_grad_()
        branches = [torch.randn(2, c, h, w, dtype=dtype, device="cuda", requires_grad=True)
                    for c, (h, w) in ((3, (1, 1)), (5, (6, 5)), (4, (size[0] + 11, size[1] + 7)))]  # fmt: skip
        for align_corners in (False, True):
            fused, reference = upsample_case(backend, align_corners)
            assert_matches_reference(fused, reference, [x, *branches])
        for kernel in (1, 3):
            weight = (torch.randn(out_channels, 8 + 12, kernel, kernel, dtype=dtype, device="cuda") / 8).requires_grad_()
            for align_corners in (False, True):
                assert_matches_reference(
                    lambda w, *ps: slsdeep_kernels.pyramid_conv(list(ps), w, None, size, align_corners, backend=backend),
                    lambda w, *ps: P.pyramid_conv_reference(list(ps), w, None, size, align_corners),
                    [weight, x, *branches],
                )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_conv_never_allocates_the_concatenation(backend):
    x = torch.randn(4, 512, 48, 48, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    branches = [torch.randn(4, 256, b, b, device="cuda", dtype=torch.bfloat16, requires_grad=True) for b in BINS]
    weight = torch.randn(128, 512 + 1024, 3, 3, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    concat_bytes = 4 * (512 + 1024) * 48 * 48 * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    slsdeep_kernels.pyramid_conv3x3(x, branches, weight, backend=backend).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < concat_bytes


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in slsdeep_kernels.available_backends()])
def test_pyramid_conv_prepares_its_weights_once_per_step(backend, monkeypatch):
    # Forward slices and reshapes the weight once and saves the pieces: backward must not redo it.
    calls = []
    split = P._split_weight
    monkeypatch.setattr(P, "_split_weight", lambda *args: calls.append(1) or split(*args))
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    branches = [torch.randn(2, 2, b, b, requires_grad=True) for b in (1, 3)]
    weight = torch.randn(4, 7, 3, 3, requires_grad=True)
    slsdeep_kernels.pyramid_conv3x3(x, branches, weight, backend=backend).square().sum().backward()
    assert len(calls) == 1
    assert x.grad is not None and weight.grad is not None and all(y.grad is not None for y in branches)

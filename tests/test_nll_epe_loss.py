"""NLL + EPE loss: the reference against the spec, every backend against the reference, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import slsdeep_kernels
import slsdeep_kernels.functional
import slsdeep_kernels.nn
from slsdeep_kernels.ops import nll_epe_loss as op
from slsdeep_kernels.testing import ERROR_FACTOR, assert_matches_reference, backends_to_test, relative_error

TARGET_DTYPES = [torch.bool, torch.uint8, torch.int64, torch.float32]
SHAPES = [(1, 1, 1), (2, 7, 13), (1, 37, 53), (3, 1, 9), (2, 11, 1)]  # (N, H, W)


def make_inputs(n, c, h, w, dtype=torch.float32, target_dtype=torch.uint8, scale=3.0):
    logits = (scale * torch.randn(n, c, h, w, dtype=torch.float64)).to(dtype).requires_grad_()
    target = (torch.rand(n, h, w) < 0.4).to(target_dtype)
    return logits, target


def spec_loss(logits, target, alpha, reduction):
    """docs/design.md §4.3 written out with explicit loops (tiny shapes only): an oracle independent of `reference`."""
    logits, target = logits.double(), target.double()
    n_, c_, h_, w_ = logits.shape
    p = torch.softmax(logits, 1)[:, 1] if c_ == 2 else torch.sigmoid(logits[:, 0])
    kx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]

    def derivative(image, n, i, j, transpose):
        total = 0.0
        for a in (-1, 0, 1):
            for b in (-1, 0, 1):
                weight = kx[b + 1][a + 1] if transpose else kx[a + 1][b + 1]
                total += weight * image[n, min(max(i + a, 0), h_ - 1), min(max(j + b, 0), w_ - 1)].item()
        return total / 8

    out = torch.empty(n_, h_, w_, dtype=torch.float64)
    for n in range(n_):
        for i in range(h_):
            for j in range(w_):
                v, q = target[n, i, j].item(), p[n, i, j].item()
                nll = -(v * math.log(q) + (1 - v) * math.log(1 - q))
                ex = derivative(p, n, i, j, False) - derivative(target, n, i, j, False)
                ey = derivative(p, n, i, j, True) - derivative(target, n, i, j, True)
                out[n, i, j] = nll + alpha * math.hypot(ex, ey)
    return {"none": out, "mean": out.mean(), "sum": out.sum()}[reduction]


# ------------------------------------------------------------------------------------------------
# The reference is the spec.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 4, 5), (1, 1, 6), (1, 5, 1)])
def test_reference_matches_the_written_out_definition(c, reduction, shape):
    logits, target = make_inputs(shape[0], c, *shape[1:], dtype=torch.float64)
    expected = spec_loss(logits.detach(), target, 0.7, reduction)
    torch.testing.assert_close(op.nll_epe_loss_reference(logits, target, 0.7, reduction), expected, rtol=1e-12, atol=1e-12)


def test_reference_nll_is_the_cross_entropy_of_the_logits():
    logits, target = make_inputs(2, 2, 6, 7, dtype=torch.float64)
    expected = F.cross_entropy(logits, target.long())
    torch.testing.assert_close(op.nll_epe_loss_reference(logits, target, alpha=0.0), expected)
    single = logits[:, 1:] - logits[:, :1]  # sigmoid of the margin = softmax of the pair
    torch.testing.assert_close(op.nll_epe_loss_reference(single, target, alpha=0.3), op.nll_epe_loss_reference(logits, target, alpha=0.3))


def test_reference_is_stable_for_huge_logits():
    logits = torch.tensor([[[[-200.0, 200.0], [150.0, -90.0]]]], requires_grad=True)
    target = torch.tensor([[[1, 0], [1, 1]]], dtype=torch.uint8)
    loss = op.nll_epe_loss_reference(logits, target, reduction="none")
    assert torch.isfinite(loss).all()
    assert loss[0, 0, 0] > 199  # -log sigmoid(-200), never a clamped probability
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reference_gradcheck(c, reduction):
    logits, target = make_inputs(2, c, 5, 6, dtype=torch.float64, scale=1.0)
    assert torch.autograd.gradcheck(lambda x: op.nll_epe_loss_reference(x, target, 0.5, reduction), (logits,))


@pytest.mark.parametrize("backend", backends_to_test("nll_epe_loss"))
def test_gradient_is_zero_not_nan_where_the_epe_root_is_zero(backend):
    # A constant probability over a constant mask: every Sobel derivative, hence every EPE, is 0.
    dtype = torch.float32
    logits = torch.full((1, 2, 4, 5), 0.25, dtype=dtype)
    logits[:, 0] = -0.5
    logits.requires_grad_()
    target = torch.ones(1, 4, 5, dtype=torch.uint8)
    loss = slsdeep_kernels.nll_epe_loss(logits, target, reduction="sum", backend=backend)
    loss.backward()
    p = torch.sigmoid(torch.tensor(0.75))
    expected = torch.empty_like(logits)
    expected[:, 1], expected[:, 0] = p - 1, 1 - p  # the NLL gradient only
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad, expected)


# ------------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------------


def test_module_and_function_are_exported():
    assert slsdeep_kernels.nll_epe_loss is op.nll_epe_loss
    assert slsdeep_kernels.functional.nll_epe_loss is op.nll_epe_loss
    assert slsdeep_kernels.nn.NLLEPELoss is slsdeep_kernels.NLLEPELoss
    assert {"nll_epe_loss", "NLLEPELoss"} <= set(slsdeep_kernels.__all__)


def test_module_matches_the_function():
    logits, target = make_inputs(2, 2, 7, 13)
    module = slsdeep_kernels.NLLEPELoss(alpha=0.3, reduction="sum")
    assert "alpha=0.3" in repr(module)
    torch.testing.assert_close(module(logits, target), op.nll_epe_loss_reference(logits, target, 0.3, "sum"))


def test_autocast_runs_the_loss_in_fp32():
    logits, target = make_inputs(2, 2, 7, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = slsdeep_kernels.nll_epe_loss(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, op.nll_epe_loss_reference(logits.bfloat16().float(), target))


BAD_INPUTS = [
    (lambda l, t: (l[:, :1].expand(2, 3, 7, 13), t), r"logits must have shape \(N, C, H, W\) with C = 1 .* got shape \(2, 3, 7, 13\)"),
    (lambda l, t: (l[0], t), r"logits must have shape \(N, C, H, W\)"),
    (lambda l, t: (l, t[:, :6]), r"target must have shape \(N, H, W\) = \(2, 7, 13\) .* got \(2, 6, 13\)"),
    (lambda l, t: (l, t.unsqueeze(1)), r"target must have shape"),
    (lambda l, t: (l, t.int()), r"target must be bool, uint8, int64 or floating point .* got dtype torch.int32"),
    (lambda l, t: (l, t.float() * 2), r"target values must be 0 or 1; found 2.0"),
    (lambda l, t: (l, t.long() - 1), r"target values must be 0 or 1; found -1"),
    (lambda l, t: (l.long(), t), r"logits must be a floating-point tensor; got dtype torch.int64"),
    (lambda l, t: (l.to(torch.complex64), t), r"logits must be a floating-point tensor; got dtype torch.complex64"),
    (lambda l, t: (l[:0], t[:0]), r"logits must not be empty"),
    (lambda l, t: (l, t.to("meta")), r"all tensors must be on one device; got logits on cpu, target on meta"),
]


@pytest.mark.parametrize("bad, message", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(bad, message):
    logits, target = make_inputs(2, 2, 7, 13)
    logits, target = bad(logits.detach(), target)
    with pytest.raises(ValueError, match=message):
        slsdeep_kernels.nll_epe_loss(logits, target)


def test_bad_options_raise():
    logits, target = make_inputs(1, 1, 3, 3)
    with pytest.raises(ValueError, match="reduction must be one of none, mean, sum; got 'max'"):
        slsdeep_kernels.nll_epe_loss(logits, target, reduction="max")
    with pytest.raises(ValueError, match="alpha must be a real number"):
        slsdeep_kernels.nll_epe_loss(logits, target, alpha="0.5")
    with pytest.raises(ValueError, match="backend must be one of"):
        slsdeep_kernels.nll_epe_loss(logits, target, backend="fast")


def test_target_check_can_be_switched_off():
    logits, target = make_inputs(1, 1, 3, 3)
    slsdeep_kernels.nll_epe_loss(logits, target.float() * 2, check_target=False)  # no sync, no error


# ------------------------------------------------------------------------------------------------
# Every fused backend against the reference, forward and gradient.
# ------------------------------------------------------------------------------------------------

FUSED = backends_to_test("nll_epe_loss", fused=True)  # on CPU tensors (triton: the interpreter)


def dtypes_of(backend):
    # the triton backend's 16-bit logits run its 8-column lanes, fp32 its 4-column ones
    return [torch.float64, torch.float32, torch.float16, torch.bfloat16] if backend == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def check(backend, logits, target, alpha=0.5, reduction="mean"):
    assert_matches_reference(
        lambda x, t: slsdeep_kernels.nll_epe_loss(x, t, alpha, reduction, backend=backend),
        lambda x, t: op.nll_epe_loss_reference(x, t, alpha, reduction),
        [logits, target],
        names=["logits"],
    )


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("index, shape", list(enumerate(SHAPES)))
def test_matches_reference(backend, c, reduction, index, shape):
    target_dtype = TARGET_DTYPES[(index + c) % len(TARGET_DTYPES)]
    check(backend, *make_inputs(shape[0], c, *shape[1:], target_dtype=target_dtype), alpha=0.6, reduction=reduction)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("target_dtype", TARGET_DTYPES + [torch.float64, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_every_target_dtype(backend, target_dtype, reduction):
    check(backend, *make_inputs(2, 2, 6, 9, target_dtype=target_dtype), reduction=reduction)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_every_dtype(backend, reduction):
    # 19 x 37: several of the interpreter's row tiles and strips (16 or 8 columns), in both layouts
    for dtype in dtypes_of(backend):
        logits, target = make_inputs(2, 2, 19, 37, dtype=dtype)
        check(backend, logits, target, reduction=reduction)
        check(backend, logits.detach().to(memory_format=torch.channels_last).requires_grad_(), target, reduction=reduction)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_channels_last_and_strided_inputs(backend, c, reduction):
    logits, target = make_inputs(2, c, 9, 11)
    check(backend, logits.detach().to(memory_format=torch.channels_last).requires_grad_(), target, reduction=reduction)
    wide = torch.randn(2, c + 1, 9, 22)[:, 1:, :, ::2].requires_grad_()  # no dense layout at all
    check(backend, wide, target, reduction=reduction)
    check(backend, logits, torch.rand(2, 11, 9).lt(0.5).transpose(1, 2), reduction=reduction)  # strided target


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("c", [1, 2])
def test_saturated_logits_stay_finite_and_exact(backend, c):
    logits = torch.tensor([[-200.0, 200.0, 150.0, -90.0, 30.0, -30.0, 0.0, 1e-3]]).repeat(3, 1).reshape(1, 1, 3, 8)
    logits = torch.cat([torch.zeros_like(logits), logits], 1) if c == 2 else logits
    target = torch.tensor([1, 0, 1, 1, 1, 0, 1, 0], dtype=torch.uint8).repeat(3, 1).unsqueeze(0)
    for reduction in ("none", "sum"):
        x = logits.clone().requires_grad_()
        loss = slsdeep_kernels.nll_epe_loss(x, target, reduction=reduction, backend=backend)
        loss.sum().backward()
        y = logits.clone().requires_grad_()
        expected = op.nll_epe_loss_reference(y, target, reduction=reduction)
        expected.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("backend", FUSED)
def test_gradient_layout_follows_the_logits(backend):
    logits, target = make_inputs(2, 2, 5, 6)
    logits = logits.detach().to(memory_format=torch.channels_last).requires_grad_()
    for reduction in ("mean", "none"):
        logits.grad = None
        slsdeep_kernels.nll_epe_loss(logits, target, reduction=reduction, backend=backend).sum().backward()
        assert logits.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cpu_gradcheck(c, reduction):
    logits, target = make_inputs(2, c, 5, 6, dtype=torch.float64, scale=1.0)
    assert torch.autograd.gradcheck(
        lambda x: slsdeep_kernels.nll_epe_loss(x, target, 0.5, reduction, backend="cpu"), (logits,)
    )


def test_cpu_loss_is_deterministic_for_any_thread_count():
    logits, target = make_inputs(3, 2, 70, 41)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = slsdeep_kernels.nll_epe_loss(logits, target, backend="cpu")
        one.backward()
        one_grad, logits.grad = logits.grad, None
        torch.set_num_threads(2)
        two = slsdeep_kernels.nll_epe_loss(logits, target, backend="cpu")
        two.backward()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one_grad, logits.grad)


@pytest.mark.parametrize("backend", FUSED)
def test_no_gradient_computed_when_none_is_needed(backend):
    logits, target = make_inputs(2, 2, 5, 6)
    with torch.no_grad():
        loss = slsdeep_kernels.nll_epe_loss(logits, target, backend=backend)
    torch.testing.assert_close(loss, op.nll_epe_loss_reference(logits.detach(), target))
    _, gradient = op._loss_op(logits.detach(), target, 0.5, "mean", False, backend)
    assert gradient.numel() == 0


@pytest.mark.parametrize("backend", FUSED)
def test_backward_through_a_retained_graph_twice(backend):
    logits, target = make_inputs(2, 2, 5, 6)
    expected = torch.autograd.grad(op.nll_epe_loss_reference(logits, target), logits)[0]
    loss = slsdeep_kernels.nll_epe_loss(logits, target, backend=backend)
    (first,) = torch.autograd.grad(3 * loss, logits, retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(-2 * loss, logits, retain_graph=True)
    (third,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(first, 3 * expected)
    torch.testing.assert_close(second, -2 * expected)
    torch.testing.assert_close(third, expected)
    assert torch.equal(first, kept)  # the gradient handed out first is never written again


def test_retained_graph_after_a_zero_upstream_gradient_raises():
    logits, target = make_inputs(1, 2, 4, 4)
    loss = slsdeep_kernels.nll_epe_loss(logits, target, backend="cpu")
    torch.autograd.grad(0 * loss, logits, retain_graph=True)
    with pytest.raises(RuntimeError, match="scaled in place by grad_output = 0"):
        torch.autograd.grad(loss, logits)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_double_backward_raises(backend, reduction):
    logits, target = make_inputs(1, 2, 4, 5)
    loss = slsdeep_kernels.nll_epe_loss(logits, target, reduction=reduction, backend=backend).sum()
    with pytest.raises(RuntimeError, match="nll_epe_loss: double backward is not supported"):
        (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
        grad.sum().backward()


def test_backward_op_refuses_its_own_backward():
    logits, target = make_inputs(1, 2, 4, 5)
    grad_map = torch.randn(1, 4, 5, requires_grad=True)
    gradient = op._backward_op(grad_map, logits, target, 0.5, "cpu")
    with pytest.raises(RuntimeError, match="nll_epe_loss: double backward is not supported"):
        gradient.sum().backward()


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    logits, target = make_inputs(2, 2, 5, 7)
    for reduction in ("none", "mean", "sum"):
        for compute_grad in (True, False):
            x = logits if compute_grad else logits.detach()  # compute_grad=False: no gradient wanted
            torch.library.opcheck(op._loss_op, (x, target, 0.5, reduction, compute_grad, backend))
    grad_map = torch.randn(2, 5, 7)
    torch.library.opcheck(op._backward_op, (grad_map, logits.detach(), target, 0.5, backend))
    gradient = torch.randn(2, 2, 5, 7)
    torch.library.opcheck(op._scale_op, (gradient, torch.tensor(0.5), backend))
    torch.library.opcheck(op._scale_op, (gradient, torch.tensor(1.0), backend))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_torch_compile_fullgraph(reduction):
    torch._dynamo.reset()
    logits, target = make_inputs(2, 2, 7, 13)

    def loss_of(x, t):
        return slsdeep_kernels.nll_epe_loss(2 * x, t, 0.4, reduction, backend="cpu").sum()

    compiled = torch.compile(loss_of, fullgraph=True)  # a graph break raises
    loss = compiled(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = op.nll_epe_loss_reference(2 * logits, target, 0.4, reduction).sum()
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_the_scale_op_skips_a_unit_factor_and_scales_otherwise():
    gradient = torch.randn(2, 2, 3, 4)
    before = gradient.clone()
    op._scale_op(gradient, torch.tensor(1.0), "cpu")
    assert torch.equal(gradient, before)
    op._scale_op(gradient, torch.tensor(-2.5, dtype=torch.float64), "cpu")
    torch.testing.assert_close(gradient, -2.5 * before)


# ------------------------------------------------------------------------------------------------
# fp16: the mean's 1/(N·H·W) must not push the saved gradient into subnormals (a loss scale then
# multiplies it: mixed-precision training). Compared against the fp64 gradient, each backend must be
# within ERROR_FACTOR of eager fp16 (the reference on fp16 logits), at shapes where 1/(N·H·W) < 2^-14.
# ------------------------------------------------------------------------------------------------

FP16_SMALLEST_NORMAL = 2.0**-14


def fp16_gradient_errors(backend, shape, loss_scale=1024.0):
    """(backend, eager fp16) pairs of the relative error of loss_scale·∂mean/∂logits against fp64 and
    of the share of exact zeros where the fp64 gradient is not zero."""
    logits, target = make_inputs(shape[0], 2, *shape[1:], dtype=torch.float64)
    logits = logits.detach()

    def gradient(fn, x):
        x = x.detach().requires_grad_()
        (fn(x, target) * loss_scale).backward()
        return x.grad.double()

    exact = gradient(lambda x, t: op.nll_epe_loss_reference(x, t), logits)
    eager = gradient(lambda x, t: op.nll_epe_loss_reference(x, t), logits.half())
    ours = gradient(lambda x, t: slsdeep_kernels.nll_epe_loss(x, t, backend=backend), logits.half())
    def flushed(g):
        return ((g == 0) & (exact != 0)).double().mean().item()

    return (relative_error(ours, exact), relative_error(eager, exact)), (flushed(ours), flushed(eager))


# cpu: the paper's training batch; triton: a shape the interpreter runs in time.
FP16_SHAPES = {"cpu": ("paper-shape", (16, 384, 384)), "triton": ("interpreter", (1, 97, 181))}


@pytest.mark.parametrize(
    "backend, shape",
    [pytest.param(b, FP16_SHAPES[b][1], id=f"{p.id}-{FP16_SHAPES[b][0]}", marks=p.marks) for p in FUSED for b in p.values],
)
def test_fp16_gradient_keeps_its_precision_under_a_loss_scale(backend, shape):
    pixels = shape[0] * shape[1] * shape[2]
    assert 1.0 / pixels < FP16_SMALLEST_NORMAL  # the shape reaches the range where pre-scaling underflowed
    (ours, eager), (ours_flushed, eager_flushed) = fp16_gradient_errors(backend, shape)
    assert ours <= ERROR_FACTOR * eager, f"{backend}: fp16 gradient error {ours:.2e} > {ERROR_FACTOR} × eager's {eager:.2e}"
    # saturated pixels' tiny gradients flush in fp16 anyway; the op must not flush more than eager does
    assert ours_flushed <= eager_flushed + 1e-3, f"{backend}: {ours_flushed:.2%} flushed to zero, eager {eager_flushed:.2%}"


@pytest.mark.parametrize("backend", FUSED)
def test_fp16_saves_the_gradient_of_the_sum_and_scales_in_backward(backend):
    logits, target = make_inputs(2, 2, 9, 14, dtype=torch.float16)
    _, saved_mean = op._loss_op(logits.detach(), target, 0.5, "mean", True, backend)
    _, saved_sum = op._loss_op(logits.detach(), target, 0.5, "sum", True, backend)
    assert torch.equal(saved_mean, saved_sum)
    check(backend, logits.float().detach().requires_grad_(), target)  # fp32 keeps pre-scaling (and is exact)
    grad_output = torch.tensor(3.0, dtype=torch.float16)
    (grad,) = torch.autograd.grad(slsdeep_kernels.nll_epe_loss(logits, target, backend=backend), logits, grad_output)
    expected = (saved_sum.float() * (3.0 / saved_sum[:, 0].numel())).half()
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# GPU: the compiled Triton kernels and the CUDA kernels on CUDA tensors at realistic shapes.
# ------------------------------------------------------------------------------------------------

GPU_BACKENDS = backends_to_test("nll_epe_loss", "cuda", fused=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("c", [1, 2])
def test_gpu_matches_reference(backend, dtype, reduction, c):
    for shape, target_dtype in [((4, 384, 384), torch.uint8), ((3, 37, 53), torch.int64), ((2, 1, 257), torch.bool)]:
        logits, target = make_inputs(shape[0], c, *shape[1:], dtype=dtype, target_dtype=target_dtype)
        logits = logits.detach().cuda().requires_grad_()
        check(backend, logits, target.cuda(), reduction=reduction)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [p for p in GPU_BACKENDS if p.values == ("cuda",)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gpu_loss_tiles_at_their_edges(backend, dtype, channels_last):
    """The CUDA tile kernel (16 rows x 128 columns, runs of 16 columns) at its edges, on its packed
    paths (W % 16 == 0: channel planes, or channels_last C = 2 as interleaved pairs) and its
    element-wise one: one run (W = 16), a column tile mostly beyond the image (W = 144), H not a
    multiple of 16, fewer columns than a run (W = 5), every mask dtype on the packed path, and a view
    off the 16-byte grid (the element path at the same sizes)."""
    cases = [((2, 16, 16), torch.uint8), ((1, 33, 144), torch.int64), ((2, 17, 272), torch.float32),
             ((1, 40, 5), torch.bool), ((3, 19, 128), torch.bfloat16)]  # fmt: skip
    for (n, h, w), target_dtype in cases:
        for c in (1, 2):
            logits, target = make_inputs(n, c, h, w + 1, dtype=dtype, target_dtype=target_dtype)
            logits, target = logits.detach().cuda(), target.cuda()
            layout = torch.channels_last if channels_last else torch.contiguous_format
            aligned = logits[..., :w].contiguous(memory_format=layout)
            for x, mask in ((aligned, target[..., :w].contiguous()), (logits[..., 1:], target[..., 1:])):
                for reduction in ("mean", "none"):
                    check(backend, x.detach().requires_grad_(), mask, alpha=0.7, reduction=reduction)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_channels_last_float_target_and_default_choice(backend):
    logits, target = make_inputs(2, 2, 130, 67, target_dtype=torch.float32)
    logits = logits.detach().cuda().to(memory_format=torch.channels_last).requires_grad_()
    check(backend, logits, target.cuda(), reduction="mean")
    check(backend, logits, target.cuda(), reduction="none")
    validated = slsdeep_kernels.backend.GPU_VALIDATED.get("nll_epe_loss", ())
    expected = validated[0] if validated else "reference"
    assert slsdeep_kernels.backend.resolve("nll_epe_loss", logits.device, torch.float32) == expected

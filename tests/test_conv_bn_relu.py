"""conv_bn_relu and ConvBNReLU2d against Conv2d → BatchNorm2d → ReLU (docs/design.md §4.1)."""

import itertools

import pytest
import torch
from torch import nn

import slsdeep_kernels
import slsdeep_kernels.ops.conv_bn_relu as op
from slsdeep_kernels import ConvBNReLU2d, conv_bn_relu
from slsdeep_kernels.testing import TOLERANCE, assert_matches_reference, backends_to_test, relative_error

AVAILABLE = slsdeep_kernels.available_backends()
CPU_BACKENDS = backends_to_test("conv_bn_relu", fused=True)  # on CPU tensors (triton: the interpreter)
GPU_BACKENDS = backends_to_test("conv_bn_relu", "cuda", fused=True)
NAMES = ["input", "weight", "bias", "bn_weight", "bn_bias"]


def make_inputs(dtype=torch.float64, c_in=5, c_out=7, kernel=3, bias=True, channels_last=False, n=2, size=(13, 11), groups=1, device="cpu"):
    """x, weight, bias, γ, β, running_mean, running_var (random, never zeros; γ away from 0)."""
    x = torch.randn(n, c_in, *size, dtype=dtype, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in // groups, kernel, kernel, dtype=dtype, device=device) / (c_in * kernel) ** 0.5
    b = torch.randn(c_out, dtype=dtype, device=device) if bias else None
    gamma = torch.rand(c_out, dtype=dtype, device=device) + 0.5
    beta = torch.randn(c_out, dtype=dtype, device=device)
    running_mean = torch.randn(c_out, dtype=dtype, device=device) * 0.1
    running_var = torch.rand(c_out, dtype=dtype, device=device) + 0.5
    return x, weight, b, gamma, beta, running_mean, running_var


def check(backend, inputs, *, training, stride=1, padding=0, dilation=1, groups=1, relu=True, memory_efficient=False):
    """Forward and every gradient against the reference; in training the conv bias (whose exact
    gradient is 0, as BN subtracts the batch mean) is checked by test_training_bias_gradient_is_zero."""
    x, weight, bias, gamma, beta, running_mean, running_var = inputs
    for t in (x, weight, gamma, beta):
        if t is not None:
            t.requires_grad_(True)
    if bias is not None:
        bias.requires_grad_(not training)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, training=training, relu=relu)

    def fused(*args):
        return conv_bn_relu(*args, **options, backend=backend, memory_efficient=memory_efficient)

    def reference(*args):
        return op.conv_bn_relu_reference(*args, **options)

    names = [n for n, t in zip(NAMES, inputs) if t is not None and t.requires_grad]
    assert_matches_reference(fused, reference, list(inputs), names=names)


GRID = list(itertools.product((1, 2, 4), (1, 2), (1, 3), (True, False), (False, True), (False, True)))


@pytest.mark.parametrize("dilation,stride,kernel,bias,channels_last,training", GRID)
def test_cpu_matches_reference_fp64(dilation, stride, kernel, bias, channels_last, training):
    if "cpu" not in AVAILABLE:
        pytest.skip("compiled CPU extension unavailable")
    inputs = make_inputs(kernel=kernel, bias=bias, channels_last=channels_last)
    check("cpu", inputs, training=training, stride=stride, padding=dilation * (kernel // 2), dilation=dilation)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dilation,stride,kernel,bias,channels_last,training", GRID)
def test_matches_reference_fp32(backend, dilation, stride, kernel, bias, channels_last, training):
    """Every backend (Triton under the interpreter takes no fp64) over the same grid in fp32."""
    inputs = make_inputs(torch.float32, kernel=kernel, bias=bias, channels_last=channels_last)
    check(backend, inputs, training=training, stride=stride, padding=dilation * (kernel // 2) + 1, dilation=dilation)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [False, True])
def test_kernel_1x1_with_bias_batch_1_fp32(backend, training):
    inputs = make_inputs(torch.float32, c_in=6, c_out=9, kernel=1, n=1, size=(7, 13))
    check(backend, inputs, training=training, stride=2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_groups_without_relu_fp32(backend, training, relu):
    inputs = make_inputs(torch.float32, c_in=6, c_out=4, groups=2, channels_last=True)
    check(backend, inputs, training=training, padding=2, dilation=2, groups=2, relu=relu)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [False, True])
def test_memory_efficient_fp32(backend, training):
    inputs = make_inputs(torch.float32, channels_last=True)
    check(backend, inputs, training=training, padding=2, dilation=2, memory_efficient=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_cpu_half_precision(dtype, channels_last, training):
    if "cpu" not in AVAILABLE:
        pytest.skip("compiled CPU extension unavailable")
    inputs = make_inputs(dtype, c_in=8, c_out=6, channels_last=channels_last)
    check("cpu", inputs, training=training, stride=2, padding=2, dilation=2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("has_gamma,has_beta", [(False, False), (True, False), (False, True)])
def test_bn_without_weight_or_bias(backend, has_gamma, has_beta):
    x, weight, bias, gamma, beta, running_mean, running_var = make_inputs(torch.float32)
    gamma, beta = gamma if has_gamma else None, beta if has_beta else None
    for training in (False, True):
        check(backend, (x, weight, bias, gamma, beta, running_mean, running_var), training=training, padding=1)


@pytest.mark.parametrize("backend", backends_to_test("conv_bn_relu"))
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_running_statistics_and_layout_follow_pytorch(backend, momentum, channels_last):
    dtype = torch.float64 if backend != "triton" else torch.float32
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=2, dilation=2, bias=True, dtype=dtype)
    bn = nn.BatchNorm2d(7, momentum=momentum, dtype=dtype)
    mine = ConvBNReLU2d(5, 7, 3, stride=2, padding=2, dilation=2, bias=True, momentum=momentum, dtype=dtype)
    mine.load_state_dict(nn.Sequential(conv, bn).state_dict())
    eager = nn.Sequential(conv, bn, nn.ReLU())
    for step in range(3):
        x = torch.randn(3, 5, 11, 9, dtype=dtype) + step
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        expected = eager(x)
        out = conv_bn_relu(x, mine.conv.weight, mine.conv.bias, mine.bn.weight, mine.bn.bias, mine.bn.running_mean,
                           mine.bn.running_var, 2, 2, 2, training=True, momentum=momentum, backend=backend,
                           num_batches_tracked=mine.bn.num_batches_tracked)  # fmt: skip
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert relative_error(out, expected) <= TOLERANCE[dtype] * 10
    assert mine.bn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 3
    assert relative_error(mine.bn.running_mean, bn.running_mean) <= TOLERANCE[dtype] * 10
    assert relative_error(mine.bn.running_var, bn.running_var) <= TOLERANCE[dtype] * 10


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_training_bias_gradient_is_zero(backend):
    """BN subtracts the batch mean, so the conv bias has no effect in training: its gradient is 0 up to rounding."""
    x, weight, bias, gamma, beta, rm, rv = make_inputs(torch.float32)
    bias.requires_grad_(True)
    beta.requires_grad_(True)
    out = conv_bn_relu(x, weight, bias, gamma, beta, rm, rv, padding=1, training=True, backend=backend)
    out.backward(torch.randn_like(out))
    assert bias.grad.norm() <= 1e-5 * beta.grad.norm()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels", [5, 70])
def test_batch_statistics_are_exact_under_a_large_mean(backend, channels_last, channels):
    """fp32 activations of mean ~1e3 and variance ~1 (a conv bias of 1e3): the batch variance matches
    fp64's to 1e-4, where Σy²/M − mean² cannot (its terms' fp32 rounding at 1e6 alone is ~3% of it).
    1×1 conv over 4 × 19 × 17 pixels: 1,292 NHWC rows, so several reduction parts, the last one short;
    70 channels are a full and a partial block of the CPU's NHWC statistics (64 channels at a time)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 19, 17, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 3, 1, 1, generator=generator)
    bias = torch.full((channels,), 1e3) + torch.randn(channels, generator=generator)
    gamma, beta = torch.rand(channels, generator=generator) + 0.5, torch.randn(channels, generator=generator)
    running_mean, running_var = torch.zeros(channels), torch.ones(channels)
    conv_bn_relu(x, weight, bias, gamma, beta, running_mean, running_var, training=True, momentum=1.0, backend=backend)
    y = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double())
    count = y.numel() // y.shape[1]
    expected_var = y.var(dim=(0, 2, 3), unbiased=True)
    assert relative_error(running_mean.double(), y.mean(dim=(0, 2, 3))) <= 1e-6
    assert ((running_var.double() - expected_var).abs() / expected_var).max() <= 1e-4
    y32 = y.float()
    sum_of_squares_var = ((y32 * y32).mean(dim=(0, 2, 3)) - y32.mean(dim=(0, 2, 3)) ** 2).double() * count / (count - 1)
    assert ((sum_of_squares_var - expected_var).abs() / expected_var).max() > 1e-2  # the case tells the formulas apart


CPU_ONLY = [p for p in CPU_BACKENDS if p.values[0] == "cpu"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_ONLY)
def test_cpu_channels_last_statistics_over_channel_blocks(backend, dtype):
    """The CPU's NHWC statistics take 64 channels at a time over a part's rows: 70 channels are a
    full block and a partial one; 2 × 23 × 29 = 1,334 rows make 21 parts, the last one short. Forward
    and every gradient against the reference (the large mean: test_batch_statistics_are_exact_under_a_large_mean)."""
    inputs = make_inputs(dtype, c_in=6, c_out=70, kernel=1, n=2, size=(23, 29), channels_last=True)
    check(backend, inputs, training=True)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("backend", backends_to_test("conv_bn_relu", dtype=torch.float64))
def test_gradcheck(training, relu, backend):
    x, weight, bias, gamma, beta, rm, rv = make_inputs(c_in=3, c_out=4, n=2, size=(7, 6))
    inputs = [t.requires_grad_(True) for t in (x, weight, bias, gamma, beta)]

    def fn(x, weight, bias, gamma, beta):
        return conv_bn_relu(x, weight, bias, gamma, beta, rm.clone(), rv.clone(), 2, 2, 2, training=training, relu=relu, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)


def _op_args(training, backend, memory_efficient=False):
    x, weight, bias, gamma, beta, rm, rv = make_inputs(torch.float32, c_in=4, c_out=5, n=2, size=(9, 7), channels_last=True)
    for t in (x, weight, bias, gamma, beta):
        t.requires_grad_(True)
    conv = ([2, 1], [2, 2], [2, 2], 1)
    if training:
        return (x, weight, bias, gamma, beta, *conv, 1e-5, True, memory_efficient, backend)
    return (x, weight, bias, gamma, beta, rm, rv, *conv, 1e-5, True, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training,memory_efficient", [(False, False), (True, False), (True, True)])
def test_opcheck_forward(backend, training, memory_efficient):
    custom = torch.ops.slsdeep_kernels.conv_bn_relu_train if training else torch.ops.slsdeep_kernels.conv_bn_relu_eval
    torch.library.opcheck(custom, _op_args(training, backend, memory_efficient))


def _detach(a):
    return a.detach() if isinstance(a, torch.Tensor) else a


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_opcheck_backward(backend, memory_efficient):
    """The backward ops on inputs that need no grad (their own autograd only raises: no double backward)."""
    x, weight, bias, gamma, beta, *conv = [_detach(a) for a in _op_args(True, backend, memory_efficient)[:9]]
    stride, padding, dilation, groups = conv
    with torch.no_grad():
        out, conv_out, mean, var = torch.ops.slsdeep_kernels.conv_bn_relu_train(
            x, weight, bias, gamma, beta, stride, padding, dilation, groups, 1e-5, True, False, backend
        )
    grad = torch.randn_like(out)
    saved = None if memory_efficient else conv_out
    torch.library.opcheck(
        torch.ops.slsdeep_kernels.conv_bn_relu_train_backward,
        (grad, x, weight, bias, saved, mean, var, gamma, beta, stride, padding, dilation, groups, 1e-5, True, [True, True, False, True, True], backend),
    )  # fmt: skip
    ex, ew, eb, eg, ebe, rm, rv, *rest = [_detach(a) for a in _op_args(False, backend)]
    eval_out = torch.ops.slsdeep_kernels.conv_bn_relu_eval(ex, ew, eb, eg, ebe, rm, rv, *rest).detach()
    torch.library.opcheck(
        torch.ops.slsdeep_kernels.conv_bn_relu_eval_backward,
        (torch.randn_like(eval_out), eval_out, ex, ew, eb, eg, ebe, rm, rv, *rest[:6], [True, False, True, True, False]),
    )  # fmt: skip


@pytest.mark.parametrize("training", [False, True])
def test_torch_compile_fullgraph(training):
    if "cpu" not in AVAILABLE:
        pytest.skip("compiled CPU extension unavailable")
    x, weight, bias, gamma, beta, rm, rv = make_inputs(torch.float32, channels_last=True)
    count = torch.tensor(0)
    expected_rm, expected_rv = rm.clone(), rv.clone()

    def fn(x, weight, bias, gamma, beta):
        return conv_bn_relu(x, weight, bias, gamma, beta, rm, rv, 1, 2, 2, training=training, momentum=None,
                            backend="cpu", num_batches_tracked=count)  # fmt: skip

    compiled = torch.compile(fn, fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, gamma, beta)]
    out = compiled(*leaves)
    out.sum().backward()
    expected_leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, gamma, beta)]
    expected = op.conv_bn_relu_reference(*expected_leaves, expected_rm, expected_rv, 1, 2, 2, training=training, momentum=1.0)
    expected.sum().backward()
    assert relative_error(out, expected) <= TOLERANCE[torch.float32] * 4
    for name, leaf, ref in zip(NAMES, leaves, expected_leaves):
        if training and name == "bias":
            continue
        assert relative_error(leaf.grad, ref.grad) <= TOLERANCE[torch.float32] * 4, name
    assert count.item() == (1 if training else 0)
    assert relative_error(rm, expected_rm) <= TOLERANCE[torch.float32] * 4
    assert relative_error(rv, expected_rv) <= TOLERANCE[torch.float32] * 4


@pytest.mark.parametrize("training", [False, True])
def test_double_backward_raises(training):
    x, weight, bias, gamma, beta, rm, rv = make_inputs()
    x.requires_grad_(True)
    out = conv_bn_relu(x, weight, bias, gamma, beta, rm, rv, padding=1, training=training, backend="cpu")
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        grad.sum().backward()


def test_memory_efficient_keeps_only_the_input():
    """Default: saves the conv input and output (as eager); memory_efficient: the input only."""
    x, weight, bias, gamma, beta, rm, rv = make_inputs(torch.float32, c_in=16, c_out=16, size=(24, 24))
    x.requires_grad_(True)

    def saved_activation_bytes(memory_efficient):
        storages = {}

        def pack(t):
            if t.numel() >= x.numel():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            conv_bn_relu(x, weight, bias, gamma, beta, rm, rv, padding=1, training=True, backend="cpu", memory_efficient=memory_efficient)
        return sum(storages.values())

    assert saved_activation_bytes(False) == 2 * x.numel() * 4
    assert saved_activation_bytes(True) == x.numel() * 4


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(x=torch.randn(5, 13, 11)), "input must be 4-D"),
        (dict(weight=torch.randn(7, 4, 3, 3)), "input channels"),
        (dict(bn_weight=torch.rand(6)), "bn_weight must have shape"),
        (dict(bn_bias=torch.rand(8)), "bn_bias must have shape"),
        (dict(running_mean=torch.rand(6)), "running_mean must have shape"),
        (dict(bias=torch.rand(3)), "bias must have shape"),
        (dict(running_mean=None, running_var=None), "required in eval mode"),
        (dict(dilation=0), "dilation must be"),
        (dict(dilation=(1, -1)), "dilation must be"),
        (dict(stride=0), "stride must be"),
        (dict(stride=(2, 0)), "stride must be"),
        (dict(padding=-1), "padding must be"),
        (dict(groups=3), "groups must be"),
        (dict(training=True, x=torch.randn(1, 5, 3, 3)), "more than 1 value per channel"),
    ],
)
def test_bad_input_raises_value_error(change, message):
    x, weight, bias, gamma, beta, rm, rv = make_inputs(torch.float32)
    args = dict(x=x, weight=weight, bias=bias, bn_weight=gamma, bn_bias=beta, running_mean=rm, running_var=rv, padding=0)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        conv_bn_relu(**args)


def test_module_state_dict_is_that_of_sequential():
    fused = ConvBNReLU2d(4, 6, 3, padding=2, dilation=2)
    eager = nn.Sequential(nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(6))
    assert list(fused.state_dict()) == list(eager.state_dict())
    eager[1].running_mean.normal_()
    fused.load_state_dict(eager.state_dict())
    eager.load_state_dict(fused.state_dict())
    assert torch.equal(fused.bn.running_mean, eager[1].running_mean)


@pytest.mark.parametrize("relu", [True, False])
def test_module_follows_train_and_eval(relu):
    fused = ConvBNReLU2d(4, 6, 3, stride=2, padding=1, bias=True, relu=relu, dtype=torch.float64)
    eager = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, dtype=torch.float64), nn.BatchNorm2d(6, dtype=torch.float64))
    if relu:
        eager.append(nn.ReLU())
    eager.load_state_dict(fused.state_dict(), strict=False)
    for mode in ("train", "eval", "train"):
        getattr(fused, mode)()
        getattr(eager, mode)()
        x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
        assert relative_error(fused(x), eager(x)) <= 1e-12
    for key, value in eager.state_dict().items():
        assert torch.allclose(fused.state_dict()[key], value, rtol=1e-12, atol=0), key


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_module_under_autocast_follows_lower_precision(param_dtype):
    fused = ConvBNReLU2d(8, 6, 3, padding=2, dilation=2).to(param_dtype)
    eager = nn.Sequential(fused.conv, fused.bn, nn.ReLU())
    x = torch.randn(2, 8, 10, 9)
    for mode in ("eval", "train"):
        getattr(fused, mode)()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fused(x)
            expected = eager(x)
        assert out.dtype == torch.bfloat16
        assert relative_error(out, expected) <= 2 * TOLERANCE[torch.bfloat16]


# --- GPU: compiled Triton and CUDA backends on realistic encoder shapes (TF32 off) ------------------
GPU_SHAPES = [(1024, 256, 1, 1), (256, 256, 3, 2), (512, 512, 3, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("c_in,c_out,kernel,dilation", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [False, True])
def test_gpu_backends(backend, c_in, c_out, kernel, dilation, dtype, training):
    inputs = make_inputs(dtype, c_in=c_in, c_out=c_out, kernel=kernel, channels_last=True, n=4, size=(48, 48), device="cuda")
    check(backend, inputs, training=training, padding=dilation * (kernel // 2), dilation=dilation)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_gpu_nchw_stride_and_memory_efficient(backend, memory_efficient):
    for training in (False, True):
        inputs = make_inputs(torch.float16, c_in=64, c_out=96, n=3, size=(37, 53), device="cuda")
        check(backend, inputs, training=training, stride=2, padding=1, memory_efficient=memory_efficient)


@pytest.mark.parametrize("backend", [p for p in CPU_BACKENDS if p.values[0] == "triton"])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_triton_passes_at_the_gpus_tile_sizes(monkeypatch, backend, channels_last, training):
    """The Triton BN passes with the tiles a GPU runs (1,024 elements: 64 channels × 16 rows in
    channels_last, 256 positions × 4 channels in NCHW), under the interpreter: 40 channels and 437
    positions leave partial tiles on both axes, and 32 reduction programs several tiles per part."""
    triton_op = slsdeep_kernels.backend.triton_kernels("conv_bn_relu")
    monkeypatch.setattr(triton_op, "_tile_sizes", lambda: (1024, 32))
    inputs = make_inputs(torch.float32, c_in=6, c_out=40, n=3, size=(19, 23), channels_last=channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    tiling = triton_op._tiling(torch.empty(3, 40, 19, 23).to(memory_format=layout))
    assert (tiling["block_r"], tiling["block_c"]) == ((16, 64) if channels_last else (256, 4))
    assert tiling["per_part"] > 1 and tiling["parts"] > 1
    check(backend, inputs, training=training, padding=2, dilation=2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [False, True])
def test_empty_batch(backend, training):
    """N = 0, as F.batch_norm has it: an empty output of the right shape, the running statistics
    untouched, and zero gradients of every parameter (no statistics to take, none to spread)."""
    x, weight, bias, gamma, beta, rm, rv = make_inputs(torch.float32, n=0)
    params = [t.requires_grad_(True) for t in (x, weight, bias, gamma, beta)]
    before = rm.clone(), rv.clone()
    out = conv_bn_relu(x, weight, bias, gamma, beta, rm, rv, padding=1, training=training, backend=backend)
    assert out.shape == (0, 7, 13, 11)
    out.sum().backward()
    torch.testing.assert_close((rm, rv), before, rtol=0, atol=0)
    for p in params:
        assert p.grad.shape == p.shape and not p.grad.isnan().any() and not p.grad.any(), p.shape

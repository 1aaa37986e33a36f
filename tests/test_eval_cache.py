"""The derived-weight cache (backend.derived): the BatchNorm folds of conv_bn_relu_modules and
pyramid_conv_modules are computed once in eager inference and never stale."""

import copy

import pytest
import torch
from torch import nn

import slsdeep_kernels
from slsdeep_kernels import backend as backends
from slsdeep_kernels.ops import conv_bn_relu as CBR
from slsdeep_kernels.ops import pyramid as P
from slsdeep_kernels.testing import TOLERANCE, relative_error

needs_cpu = pytest.mark.skipif("cpu" not in slsdeep_kernels.available_backends(), reason="the C++ CPU extension is not built")


def randomised(conv, bn):
    torch.manual_seed(0)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3), bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.5)
    return conv.eval(), bn.eval()


@pytest.fixture
def folds(monkeypatch):
    """The number of folds computed while the test runs."""
    calls = []
    original = CBR.fold_batch_norm
    monkeypatch.setattr(CBR, "fold_batch_norm", lambda *args: calls.append(1) or original(*args))
    monkeypatch.setattr(P, "fold_batch_norm", CBR.fold_batch_norm)
    return calls


def eager(x, conv, bn):
    return torch.relu(bn(conv(x)))


def assert_matches_eager(x, conv, bn):
    with torch.no_grad():
        fused = slsdeep_kernels.conv_bn_relu_modules(x, conv, bn, True)
        assert relative_error(fused, eager(x, conv, bn)) < TOLERANCE[x.dtype]


@needs_cpu
def test_the_fold_is_computed_once_in_inference(folds):
    conv, bn = randomised(nn.Conv2d(6, 5, 3, padding=2, dilation=2, bias=True), nn.BatchNorm2d(5))
    x = torch.randn(2, 6, 9, 8)
    for _ in range(3):
        assert_matches_eager(x, conv, bn)
    assert len(folds) == 1


@needs_cpu
@pytest.mark.parametrize("change", ["train step", "load_state_dict", ".to() and back", "p.data =", "in-place write", "eps"])
def test_the_fold_is_never_stale(change, folds):
    conv, bn = randomised(nn.Conv2d(6, 5, 1, bias=False), nn.BatchNorm2d(5))
    x = torch.randn(2, 6, 7, 5)
    assert_matches_eager(x, conv, bn)
    if change == "train step":  # the running statistics move
        bn.train(), conv.train()
        slsdeep_kernels.conv_bn_relu_modules(torch.randn(4, 6, 7, 5) * 3 + 1, conv, bn, True)
        bn.eval(), conv.eval()
    elif change == "load_state_dict":
        other_conv, other_bn = copy.deepcopy(conv), copy.deepcopy(bn)
        with torch.no_grad():
            other_conv.weight.normal_(), other_bn.running_var.uniform_(2, 3)
        conv.load_state_dict(other_conv.state_dict()), bn.load_state_dict(other_bn.state_dict())
    elif change == ".to() and back":  # new storages of the same dtype
        conv.double().float(), bn.double().float()
    elif change == "p.data =":
        conv.weight.data = torch.randn_like(conv.weight)
    elif change == "in-place write":
        with torch.no_grad():
            bn.weight.mul_(-1)
    else:
        bn.eps = 0.5
    assert_matches_eager(x, conv, bn)
    assert len(folds) == 2


@needs_cpu
def test_no_cache_in_inference_mode_or_for_dtypes_without_a_weight_fold(folds):
    conv, bn = randomised(nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
    with torch.inference_mode():
        assert_matches_eager(torch.randn(2, 4, 5, 5), conv, bn)
    assert_matches_eager(torch.randn(2, 4, 5, 5).double(), conv.double(), bn.double())  # fp64 scales after the conv
    assert len(folds) == 1 and conv not in backends._DERIVED  # folded in inference mode, nothing kept


@needs_cpu
def test_clear_derived_drops_the_cache(folds):
    conv, bn = randomised(nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
    x = torch.randn(2, 4, 5, 5)
    assert_matches_eager(x, conv, bn)
    conv.weight.data.mul_(2)  # through .data: a separate version counter, not seen by the cache
    backends.clear_derived(nn.Sequential(conv, bn))
    assert_matches_eager(x, conv, bn)
    assert len(folds) == 2


@needs_cpu
def test_no_cache_where_autograd_or_torch_compile_needs_the_fold(folds):
    conv, bn = randomised(nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3))
    x = torch.randn(2, 4, 6, 6)
    out = slsdeep_kernels.conv_bn_relu_modules(x, conv, bn, True)  # grad enabled, parameters require grad
    out.square().sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None
    compiled = torch.compile(lambda x: slsdeep_kernels.conv_bn_relu_modules(x, conv, bn, True), fullgraph=True)
    with torch.no_grad():
        compiled(x)
    assert conv not in backends._DERIVED
    assert len(folds) == 0  # neither path used the cached fold (both fold inside the custom op)


@needs_cpu
def test_the_pyramid_conv_fold_is_cached_and_refreshed(folds):
    conv, bn = randomised(nn.Conv2d(5, 4, 3, padding=1), nn.BatchNorm2d(4))
    parts = [torch.randn(2, 3, 7, 6), torch.randn(2, 2, 2, 2)]

    def check():
        with torch.no_grad():
            fused = slsdeep_kernels.pyramid_conv_modules(parts, conv, bn, relu=True)
            cat = torch.cat([parts[0], nn.functional.interpolate(parts[1], (7, 6), mode="bilinear")], 1)
            assert relative_error(fused, eager(cat, conv, bn)) < TOLERANCE[torch.float32]

    check(), check()
    assert len(folds) == 1
    with torch.no_grad():
        bn.running_mean.add_(1)
    check()
    assert len(folds) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)],
                         ids=["fp32-nchw", "bf16-channels_last", "fp16-channels_last"])
def test_cuda_eval_caches_the_fold_and_matches_eager(folds, monkeypatch, dtype, channels_last, relu):
    # the cuda backend's cached eval: cuDNN's fused conv + bias + ReLU, or the conv and one epilogue
    # pass where cuDNN refuses the configuration; both against the modules in fp32
    monkeypatch.setenv(backends.ENV_BACKEND, "cuda")
    conv, bn = randomised(nn.Conv2d(64, 32, 3, padding=2, dilation=2), nn.BatchNorm2d(32))
    conv, bn = conv.cuda(), bn.cuda()
    x = torch.randn(4, 64, 24, 24, device="cuda")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    low = copy.deepcopy(conv).to(dtype=dtype, memory_format=memory_format)
    with torch.no_grad():
        expected = bn(conv(x))
        expected = torch.relu(expected) if relu else expected
        for _ in range(2):
            fused = slsdeep_kernels.conv_bn_relu_modules(x.to(dtype=dtype, memory_format=memory_format), low, bn, relu)
            assert fused.dtype == dtype and fused.is_contiguous(memory_format=memory_format)
            assert relative_error(fused.float(), expected) < 4 * TOLERANCE[dtype]
    assert len(folds) == 1

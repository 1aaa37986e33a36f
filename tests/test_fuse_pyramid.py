"""fuse_pyramid_pooling and optimize on the peers' pyramid heads (tests/peer_heads.py) and SLSDeep's
own decoder built unfused: same numbers in eval and in a training step, the fused ops run, same
state dict; models without a pyramid head come back unchanged."""

import copy
import logging

import pytest
import torch
from torch import nn

import slsdeep_kernels
from slsdeep_kernels.ops import pyramid as P
from slsdeep_kernels.testing import TOLERANCE, relative_error

from peer_heads import build_heads, head_inputs

needs_cpu = pytest.mark.skipif("cpu" not in slsdeep_kernels.available_backends(), reason="the C++ CPU extension is not built")
HEADS = build_heads(in_channels=32, width=8, num_classes=3)
# Heads with two or more adaptive poolings of their input (one pyramid_pool pass when fused).
POOLED_IN_ONE_PASS = {"csail_ppm", "mmseg_psp_head", "smp_psp_decoder"}
PASSES = {
    "fuse_pyramid_pooling": slsdeep_kernels.fuse_pyramid_pooling,
    "optimize": slsdeep_kernels.optimize,
    "by hand, conv_bn_relu first": lambda m: slsdeep_kernels.fuse_pyramid_pooling(slsdeep_kernels.fuse_conv_bn_relu(m)),
}


def randomise(model):
    """Seeded random BatchNorm statistics and affine parameters (fresh ones are the identity)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.5)
    return model


@pytest.fixture
def counted(monkeypatch):
    """{op: calls} of the pyramid custom ops while the test runs."""
    calls = {"pyramid_conv": 0, "pyramid_pool": 0}
    for op, name in (("pyramid_conv", "_pyramid_conv_op"), ("pyramid_pool", "_pyramid_pool_op")):
        original = getattr(P, name)

        def counting(*args, _op=op, _original=original):
            calls[_op] += 1
            return _original(*args)

        monkeypatch.setattr(P, name, counting)
    return calls


def step(model, inputs, train, seed):
    """Output and every parameter's gradient of one step (dropout seeded alike)."""
    model.train(train)
    torch.manual_seed(seed)
    out = model(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)))
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return out, grads


def assert_same_step(model, fused, inputs, train):
    out, grads = step(model, inputs, train, seed=7)
    fused_out, fused_grads = step(fused, inputs, train, seed=7)
    tolerance = TOLERANCE[torch.float32]
    assert relative_error(fused_out, out) < tolerance
    assert fused_grads.keys() == grads.keys()
    # a conv bias before a training-mode BN has an exact gradient of 0: compare against the largest
    largest = max(g.norm().item() for g in grads.values())
    for name in grads:
        assert (fused_grads[name] - grads[name]).norm().item() <= tolerance * largest, name


def slsdeep_unfused():
    from slsdeep.model import SLSDeep

    return SLSDeep(preset="tiny", fused=False)


@needs_cpu
@pytest.mark.parametrize("fuse", PASSES.values(), ids=PASSES.keys())
@pytest.mark.parametrize("name", HEADS)
def test_peer_heads_fuse_and_match(name, fuse, counted, caplog):
    torch.manual_seed(0)
    head = randomise(HEADS[name]())
    reference = copy.deepcopy(head)  # the fused model shares head's modules; compare against a twin
    with caplog.at_level(logging.INFO, logger="slsdeep_kernels.fuse"):
        fused = fuse(head)
    assert "1 pyramid head(s)" in caplog.text
    assert list(fused.state_dict()) == list(head.state_dict())
    assert all(a is b for a, b in zip(fused.parameters(), head.parameters()))  # the modules own the parameters
    inputs = head_inputs(name, torch.randn(2, 32, 13, 15))
    for train in (False, True):
        calls_before = dict(counted)
        assert_same_step(reference, fused, inputs, train)
        assert counted["pyramid_conv"] == calls_before["pyramid_conv"] + 1
        assert counted["pyramid_pool"] == calls_before["pyramid_pool"] + (name in POOLED_IN_ONE_PASS)
    for (key, a), b in zip(reference.state_dict().items(), fused.state_dict().values()):
        assert relative_error(b.double(), a.double()) < TOLERANCE[torch.float32], key  # running statistics alike


@needs_cpu
def test_optimize_folds_the_bn_after_a_pyramid_conv_in_eval():
    head = randomise(HEADS["mmseg_psp_head"]())
    fused = slsdeep_kernels.optimize(head)
    calls = [n for n in fused.graph.nodes if n.op == "call_function" and n.target is slsdeep_kernels.pyramid_conv_modules]
    assert len(calls) == 1 and calls[0].kwargs["bn"].target == "bottleneck.bn" and calls[0].kwargs["relu"]
    # in eval the op runs once with the folded weight and the ReLU, no BatchNorm call
    bn_calls = []
    head.bottleneck.bn.register_forward_hook(lambda *args: bn_calls.append(1))
    fused.eval()([torch.randn(2, 32, 9, 8)])
    assert bn_calls == []
    fused.train()([torch.randn(2, 32, 9, 8)])
    assert bn_calls == [1]  # in training the BatchNorm stays a BatchNorm after the op


@needs_cpu
@pytest.mark.filterwarnings("ignore:fuse_conv_bn_relu. SLSDeep does not trace")
def test_slsdeep_decoder_built_unfused_fuses(counted, caplog):
    torch.manual_seed(0)
    model = randomise(slsdeep_unfused())
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="slsdeep_kernels.fuse"):
        fused = slsdeep_kernels.optimize(model)
    assert "decoder.head.conv" in caplog.text
    assert list(fused.state_dict()) == list(model.state_dict())
    # SLSDeep itself does not trace: its decoder and encoder do; the head's BN + ReLU join the pyramid conv
    (call,) = [n for n in fused.decoder.graph.nodes if n.target is slsdeep_kernels.pyramid_conv_modules]
    assert call.kwargs["bn"].target == "head.bn" and call.kwargs["relu"]
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        assert_same_step(reference, fused, (x,), train)
    assert counted["pyramid_conv"] == 2 and counted["pyramid_pool"] == 2


def test_models_without_a_pyramid_head_come_back_unchanged(caplog):
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))

    class ConcatNoResize(nn.Module):  # a concatenation of full-resolution tensors only
        def __init__(self):
            super().__init__()
            self.a, self.conv = nn.Conv2d(3, 3, 1), nn.Conv2d(6, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.cat([x, self.a(x)], 1))

    class StridedAfterConcat(nn.Module):  # a conv the pyramid op does not take (stride 2)
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 2, 3, stride=2, padding=1)

        def forward(self, x):
            y = nn.functional.interpolate(nn.functional.adaptive_avg_pool2d(x, 2), size=x.shape[-2:], mode="bilinear")
            return self.conv(torch.cat([x, y], 1))

    with caplog.at_level(logging.INFO, logger="slsdeep_kernels.fuse"):
        for model in (plain, ConcatNoResize(), StridedAfterConcat()):
            assert slsdeep_kernels.fuse_pyramid_pooling(model) is model
    assert "no pyramid head found" in caplog.text


class SpellingsHead(nn.Module):
    """The other spellings: ``F.adaptive_avg_pool2d``, ``nn.Upsample`` with a size, ``F.interpolate``
    with ``align_corners`` left at None, a 1×1 conv with a bias and no BatchNorm after it."""

    def __init__(self, channels=6, size=(11, 10)):
        super().__init__()
        self.stages = nn.ModuleList(nn.Conv2d(channels, 2, 1) for _ in range(3))
        self.upsample = nn.Upsample(size=size, mode="bilinear")
        self.conv = nn.Conv2d(channels + 6, 4, 1)

    def forward(self, x):
        a, b, c = (stage(nn.functional.adaptive_avg_pool2d(x, bin_)) for stage, bin_ in zip(self.stages, (1, 2, 4)))
        size = x.shape[-2:]
        b = nn.functional.interpolate(b, size=size, mode="bilinear")
        return self.conv(torch.cat([self.upsample(a), x, b, self.upsample(c)], dim=1))


@needs_cpu
def test_other_spellings_fuse(counted):
    head = SpellingsHead()
    fused = slsdeep_kernels.fuse_pyramid_pooling(head)
    x = torch.randn(2, 6, 11, 10)
    for train in (False, True):
        assert_same_step(copy.deepcopy(head), fused, (x,), train)
    assert counted == {"pyramid_conv": 2, "pyramid_pool": 2}


class IntSizeHead(nn.Module):
    """``F.interpolate(size=<int>)`` to a square map, the same branch twice, a 1×1 conv with padding="valid"."""

    def __init__(self):
        super().__init__()
        self.stage, self.conv = nn.Conv2d(4, 2, 1), nn.Conv2d(4 + 4, 3, 1, padding="valid")

    def forward(self, x):
        y = nn.functional.interpolate(self.stage(nn.functional.adaptive_avg_pool2d(x, 3)), size=9, mode="bilinear")
        return self.conv(torch.cat([x, y, y], dim=1))


@needs_cpu
def test_int_sizes_repeated_branches_and_valid_padding_fuse(counted):
    head = IntSizeHead()
    fused = slsdeep_kernels.fuse_pyramid_pooling(head)
    for train in (False, True):
        assert_same_step(copy.deepcopy(head), fused, (torch.randn(2, 4, 9, 9),), train)
    assert counted["pyramid_conv"] == 2


@needs_cpu
def test_fused_slsdeep_runs_in_inference_mode():
    from slsdeep.model import SLSDeep

    model = SLSDeep(preset="tiny", fused=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        assert relative_error(model(x), expected) < TOLERANCE[torch.float32]


@needs_cpu
def test_a_head_pooled_past_the_compiled_tables_fuses_and_runs():
    # bins summing past MAX_BIN_SUM: the one pyramid_pool pass runs the reference, the model still works
    from peer_heads import PSPHead

    torch.manual_seed(0)
    scales = (1, 2, 3, 6, 20, 40)
    assert sum(scales) > P.MAX_BIN_SUM
    head = randomise(PSPHead(scales, in_channels=32, channels=8, num_classes=3, norm_cfg={"type": "BN"}))
    reference = copy.deepcopy(head)
    fused = slsdeep_kernels.fuse_pyramid_pooling(head)
    inputs = head_inputs("mmseg_psp_head", torch.randn(2, 32, 41, 43))
    for train in (False, True):
        assert_same_step(reference, fused, inputs, train)

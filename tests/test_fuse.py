"""fuse_conv_bn_relu: data-flow fusion of Conv2d → BatchNorm2d (→ ReLU) in any model."""

import copy

import pytest
import torch
from torch import nn

from slsdeep_kernels import ConvBNReLU2d, fuse_conv_bn_relu
from slsdeep_kernels.ops.conv_bn_relu import conv_bn_relu_modules
from slsdeep_kernels.testing import relative_error


@pytest.fixture(autouse=True)
def _float64():
    """Fused and eager models are compared in fp64 (exact up to rounding)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: ``relu`` is registered after ``bn3`` but applied after the residual add."""

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyDilatedResNet(nn.Module):
    """A 7×7-stem ResNet with output stride 8: layer2 strided, layer3 and layer4 dilated 2 and 4."""

    def __init__(self, width=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, inplanes = [], width
        for i, (stride, dilation) in enumerate([(1, 1), (2, 1), (1, 2), (1, 4)]):
            planes = width * 2**i
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
            blocks = [Bottleneck(inplanes, planes, stride, max(dilation // 2, 1), downsample), Bottleneck(planes * 4, planes, 1, dilation)]
            layers.append(nn.Sequential(*blocks))
            inplanes = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.head = nn.Conv2d(inplanes, 2, 1)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.head(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


def randomise_statistics(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()


def fused_chains(model):
    """{BatchNorm name: whether its ReLU was fused} for every chain fused in a GraphModule."""
    chains = {}
    for node in model.graph.nodes:
        if node.op == "call_function" and node.target is conv_bn_relu_modules:
            chains[node.args[2].target] = node.kwargs["relu"]
    return chains


def run(model, x, train, cotangent_seed):
    """Output, input gradient and parameter gradients of one step."""
    model.train(train)
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(cotangent_seed)))
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return out, x.grad, grads


def assert_same(model, fused, x, train):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    out, grad_x, grads = run(model, x, train, seed)
    fused_out, fused_grad_x, fused_grads = run(fused, x, train, seed)
    assert relative_error(fused_out, out) <= 1e-12
    assert relative_error(fused_grad_x, grad_x) <= 1e-12
    assert fused_grads.keys() == grads.keys()
    # A conv bias before a training-mode BN has an exact gradient of 0 (BN subtracts the batch mean):
    # both sides hold rounding noise there, so gradients are compared against the largest one.
    largest = max(g.norm().item() for g in grads.values())
    for name in grads:
        assert (fused_grads[name] - grads[name]).norm().item() <= 1e-12 * largest, name
    for (name, a), (_, b) in zip(model.state_dict().items(), fused.state_dict().items()):
        assert relative_error(b, a) <= 1e-12, name


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_resnet_follows_data_flow_and_matches_in_train_and_eval(memory_efficient):
    model = TinyDilatedResNet()
    randomise_statistics(model)
    fused = fuse_conv_bn_relu(copy.deepcopy(model), memory_efficient=memory_efficient)
    chains = fused_chains(fused)
    assert chains["bn1"] is True
    assert chains["layer3.1.bn1"] is True and chains["layer3.1.bn2"] is True
    assert chains["layer3.1.bn3"] is False  # its ReLU comes after the residual add
    assert chains["layer2.0.downsample.1"] is False
    assert len(chains) == 1 + 4 * (2 * 3 + 1)
    x = torch.randn(2, 3, 37, 45)
    for train in (False, True, True, False):
        assert_same(model, fused, x, train)


def test_state_dict_keys_unchanged_and_checkpoints_load_both_ways():
    model = TinyDilatedResNet()
    fused = fuse_conv_bn_relu(model)
    assert list(fused.state_dict()) == list(model.state_dict())
    other = TinyDilatedResNet()
    randomise_statistics(other)
    fused.load_state_dict(other.state_dict())
    fresh = TinyDilatedResNet()
    fresh.load_state_dict(fused.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert relative_error(fused.eval()(x), other.eval()(x)) <= 1e-12
    assert relative_error(fresh.eval()(x), other(x)) <= 1e-12


def test_original_model_is_left_unfused_and_shares_parameters():
    model = TinyDilatedResNet()
    fused = fuse_conv_bn_relu(model)
    assert type(model) is TinyDilatedResNet and fused is not model
    assert fused.layer3[1].conv2 is model.layer3[1].conv2
    assert fused.layer3[1].bn2.running_var is model.layer3[1].bn2.running_var


class Branching(nn.Module):
    """A conv output used twice, a BN output used twice, and a functional ReLU."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.BatchNorm2d(4)
        self.conv_c, self.bn_c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv_a(x)
        a = self.bn_a(y) + y  # conv output needed elsewhere: not fusable
        b = self.bn_b(self.conv_b(a))
        c = torch.relu(self.bn_c(self.conv_c(b)))
        return torch.relu(b) + b + c  # bn_b's output used twice: fused without the ReLU


def test_only_chains_whose_intermediates_have_no_other_consumer_fuse():
    model = Branching()
    randomise_statistics(model)
    fused = fuse_conv_bn_relu(copy.deepcopy(model))
    assert fused_chains(fused) == {"bn_b": False, "bn_c": True}
    x = torch.randn(2, 3, 11, 13)
    for train in (False, True):
        assert_same(model, fused, x, train)


class DataDependent(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 6, 1), nn.BatchNorm2d(6))
        self.extra_conv, self.extra_bn = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:
            x = x * 2
        return self.extra_bn(self.extra_conv(x))


class DataDependentBlock(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_untraceable_model_fuses_its_traceable_submodules():
    model = DataDependent()
    randomise_statistics(model)
    with pytest.warns(RuntimeWarning, match="does not trace"):
        fused = fuse_conv_bn_relu(copy.deepcopy(model))
    assert fused_chains(fused.features) == {"1": True, "4": False}  # features traces: fused by data flow
    assert fused.extra_conv is not None and type(fused) is DataDependent  # the root's own chain cannot fuse
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 9, 8)
    for train in (False, True):
        assert_same(model, fused, x, train)


def test_untraceable_sequential_fuses_consecutive_chains():
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), DataDependentBlock(),
                          nn.Conv2d(5, 6, 1), nn.BatchNorm2d(6))  # fmt: skip
    randomise_statistics(model)
    with pytest.warns(RuntimeWarning, match="does not trace"):
        fused = fuse_conv_bn_relu(copy.deepcopy(model))
    assert fused.steps == [("0", "1", "2"), ("3",), ("4", "5", None)]
    assert list(fused.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 9, 8)
    for train in (False, True):
        assert_same(model, fused, x, train)


def test_models_holding_fused_modules_still_trace():
    model = nn.Sequential(ConvBNReLU2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    fused = fuse_conv_bn_relu(copy.deepcopy(model))
    assert fused_chains(fused) == {"2": True}
    x = torch.randn(2, 3, 6, 7)
    for train in (False, True):
        assert_same(model, fused, x, train)

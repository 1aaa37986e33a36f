"""Deployment: every fused op and the whole SLSDeep through ONNX (run by onnxruntime) and torch.export,
``slsdeep export``, and ``.onnx`` models served by ``predict`` and ``evaluate``."""

import contextlib
import importlib
import io
import json
import math
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.export import Dim

import slsdeep_kernels
import slsdeep_kernels.onnx as kernels_onnx
from slsdeep import checkpoint
from slsdeep import export as deploy
from slsdeep.cli import main
from slsdeep.data import ISICDataset, synthesize
from slsdeep.model import Bottleneck, SLSDeep, model_summary
from slsdeep.predict import foreground_probability
from slsdeep_kernels.ops import pyramid as P
from slsdeep_kernels.testing import ERROR_FACTOR, TOLERANCE, relative_error

SIZE = 64
BATCH = Dim("batch", min=1)


def onnx_program(module, inputs, dynamic_shapes=None):
    """``module`` (or its torch.export program) exported with the translation table, parameter subgraphs
    folded (the one optimisation pass): (the ONNX IR model, an onnxruntime CPU session of it)."""
    module = module.eval() if isinstance(module, nn.Module) else module
    program = torch.onnx.export(module, tuple(inputs), dynamo=True, verbose=False, optimize=False,
                                dynamic_shapes=dynamic_shapes, custom_translation_table=slsdeep_kernels.onnx_translations())
    kernels_onnx.fold_constants(program)
    return program.model, ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def run(session, *inputs):
    """Every output of ``session`` on ``inputs``, as tensors."""
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(out) for out in session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})]


def op_types(model) -> set[str]:
    assert all(node.domain in ("", "ai.onnx") for node in model.graph), "a non-standard ONNX op is left"
    return {node.op_type for node in model.graph}


def conv_macs(model) -> int:
    """Multiply-adds of the graph's Conv nodes from their (inferred) shapes, per image: the batch counts 1."""
    return sum(math.prod(list(node.outputs[0].shape)[1:]) * math.prod(list(node.inputs[1].shape)[1:])
               for node in model.graph if node.op_type == "Conv")


def assert_exact(actual, exact, fp32):
    """``actual`` (onnxruntime) against the fp64 answer, as the op tests judge a kernel: within the fp32
    tolerance, or ERROR_FACTOR times what the fp32 PyTorch result itself loses."""
    allowed = max(TOLERANCE[torch.float32], ERROR_FACTOR * relative_error(fp32, exact))
    assert actual.shape == exact.shape
    assert relative_error(actual, exact) <= allowed, f"relative error {relative_error(actual, exact):.3e} > {allowed:.3e}"


def randomize_batch_norm(model, generator):
    """Trained-looking BatchNorm statistics and affine parameters (fresh ones fold to the identity)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.2 * torch.randn(c, generator=generator))
    return model


# --- each op alone ------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    def __init__(self, conv, relu):
        super().__init__()
        self.conv, self.bn, self.relu = conv, nn.BatchNorm2d(conv.out_channels), relu

    def forward(self, x):
        return slsdeep_kernels.conv_bn_relu_modules(x, self.conv, self.bn, self.relu)

    def reference(self, x):
        bn = self.bn
        y = F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return F.relu(y) if self.relu else y


@pytest.mark.parametrize(
    "conv, relu, shape, channels_last",
    [
        (dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1, bias=False), True, (2, 6, 13, 11), False),
        (dict(in_channels=6, out_channels=8, kernel_size=3, padding=2, dilation=2, groups=2), False, (2, 6, 9, 10), False),
        (dict(in_channels=6, out_channels=4, kernel_size=1, stride=2, bias=False), True, (2, 6, 7, 9), True),
    ],
    ids=["strided", "dilated-grouped-bias-no-relu", "1x1-channels-last"],
)
def test_conv_bn_relu_exports_as_a_folded_conv_and_relu(conv, relu, shape, channels_last):
    module = randomize_batch_norm(ConvBNReLU(nn.Conv2d(**conv), relu), torch.Generator().manual_seed(1)).eval()
    x = torch.randn(shape)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    model, session = onnx_program(module, [x])
    assert op_types(model) == ({"Conv", "Relu"} if relu else {"Conv"})  # BN folded into the weight
    with torch.no_grad():
        fp32 = module(x)
        assert_exact(run(session, x)[0], module.double().reference(x.double()), fp32)


@pytest.mark.parametrize(
    "shape, bins, channels_last",
    [((2, 5, 13, 9), (1, 2, 3, 6), False), ((2, 3, 5, 11), (1, 2, 3, 6, 7), False), ((2, 4, 7, 10), (1, 2, 3, 6), True)],
    ids=["not-divisible", "bins-larger-than-the-map", "channels-last"],
)
def test_pyramid_pool_exports_as_the_exact_adaptive_windows(shape, bins, channels_last):
    class Pool(nn.Module):
        def forward(self, x):
            return slsdeep_kernels.pyramid_pool(x, bins)

    x = torch.randn(shape)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    model, session = onnx_program(Pool(), [x])
    assert "AveragePool" not in op_types(model)
    assert_exact(run(session, x)[0], P.pyramid_pool_reference(x.double(), bins), Pool()(x))


# x's H×W and the branches' sizes; an output side of 1 is where half_pixel and pytorch_half_pixel part.
UPSAMPLE_SHAPES = [((11, 7), [(3, 2), (6, 6)]), ((1, 5), [(3, 2), (1, 1)])]


def _upsample_inputs(hw, sizes, channels_last):
    x = torch.randn(2, 3, *hw)
    branches = [torch.randn(2, 2 + i, *size) for i, size in enumerate(sizes)]
    return [x.contiguous(memory_format=torch.channels_last) if channels_last else x, *branches]


@pytest.mark.parametrize("hw, sizes, channels_last", [(*UPSAMPLE_SHAPES[0], True), (*UPSAMPLE_SHAPES[1], False)],
                         ids=["odd-channels-last", "side-1"])
def test_upsample_concat_exports_as_resize_and_concat(hw, sizes, channels_last):
    class UpsampleConcat(nn.Module):  # both align_corners in one graph
        def forward(self, x, *branches):
            return tuple(slsdeep_kernels.upsample_concat(x, list(branches), corners) for corners in (False, True))

    inputs = _upsample_inputs(hw, sizes, channels_last)
    model, session = onnx_program(UpsampleConcat(), inputs)
    assert {"Resize", "Concat"} <= op_types(model)
    for corners, actual, fp32 in zip((False, True), run(session, *inputs), UpsampleConcat()(*inputs)):
        exact = P.upsample_concat_reference(inputs[0].double(), [y.double() for y in inputs[1:]], corners)
        assert_exact(actual, exact, fp32)


class PyramidConv(nn.Module):
    """``pyramid_conv3x3`` with both align_corners in one graph, each with its own weight."""

    def __init__(self, channels, out_channels, bias):
        super().__init__()
        self.weights = nn.ParameterList(torch.randn(out_channels, channels, 3, 3) / math.sqrt(9 * channels) for _ in range(2))
        self.bias = nn.Parameter(torch.randn(out_channels)) if bias else None

    def forward(self, x, *branches):
        return tuple(slsdeep_kernels.pyramid_conv3x3(x, list(branches), w, self.bias, corners)
                     for w, corners in zip(self.weights, (False, True)))


@pytest.mark.parametrize("hw, sizes, channels_last, bias",
                         [(*UPSAMPLE_SHAPES[0], True, True), (*UPSAMPLE_SHAPES[1], False, False)],
                         ids=["odd-channels-last-bias", "side-1"])
def test_pyramid_conv3x3_exports_in_the_low_resolution_form(hw, sizes, channels_last, bias):
    inputs = _upsample_inputs(hw, sizes, channels_last)
    module = PyramidConv(sum(t.shape[1] for t in inputs), 6, bias)
    model, session = onnx_program(module, inputs)
    # Per op: one 3×3 conv over x's 3 channels at H×W, a 1×1 conv per branch at its own size; never the concatenation's.
    (h, w), cb = hw, [y.shape[1] for y in inputs[1:]]
    assert conv_macs(model) == 2 * (6 * 3 * 9 * h * w + sum(9 * 6 * c * sh * sw for c, (sh, sw) in zip(cb, sizes)))
    assert len(model.graph.outputs) == 2  # x's weight slice and the branch weights are dropped unused
    with torch.no_grad():
        for weight, corners, actual, fp32 in zip(module.weights, (False, True), run(session, *inputs), module(*inputs)):
            exact = P.pyramid_conv3x3_reference(inputs[0].double(), [y.double() for y in inputs[1:]], weight.double(),
                                                None if module.bias is None else module.bias.double(), corners)
            assert_exact(actual, exact, fp32)


class PyramidConv1x1(nn.Module):
    """``pyramid_conv`` 1×1 as segmentation_models_pytorch and ASPP use it: branches around two
    full-resolution parts, a bias, the ReLU in the op."""

    def __init__(self, channels, out_channels):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, channels, 1, 1) / math.sqrt(channels))
        self.bias = nn.Parameter(torch.randn(out_channels))

    def forward(self, x, *branches):
        parts = [branches[0], x, *branches[1:], x.flip(1)]
        return slsdeep_kernels.pyramid_conv(parts, self.weight, self.bias, x.shape[-2:], relu=True)


def test_pyramid_conv_1x1_exports_with_parts_in_any_order():
    inputs = _upsample_inputs(*UPSAMPLE_SHAPES[0], True)
    x, branches = inputs[0], inputs[1:]
    module = PyramidConv1x1(2 * x.shape[1] + sum(y.shape[1] for y in branches), 5)
    model, session = onnx_program(module, inputs)
    (h, w), sizes = x.shape[2:], [y.shape[2:] for y in branches]
    # one 1×1 conv over both full-resolution parts at H×W, a 1×1 conv per branch at its own size
    assert conv_macs(model) == 5 * 2 * x.shape[1] * h * w + sum(5 * y.shape[1] * sh * sw for y, (sh, sw) in zip(branches, sizes))
    with torch.no_grad():
        (actual,) = run(session, *inputs)
        parts = [branches[0], x, *branches[1:], x.flip(1)]
        exact = P.pyramid_conv_reference([p.double() for p in parts], module.weight.double(), module.bias.double(), relu=True,
                                         size=(h, w))  # fmt: skip
        assert_exact(actual, exact, module(*inputs))


def test_the_table_refuses_an_opset_below_18_and_a_training_mode_conv():
    with pytest.raises(ValueError, match="opset must be an int >= 18"):
        slsdeep_kernels.onnx_translations(17)
    module = ConvBNReLU(nn.Conv2d(3, 4, 3, padding=1), True).train()
    with pytest.raises(Exception, match=r"no ONNX form; export the model in eval mode"):
        torch.onnx.export(module, (torch.randn(2, 3, 8, 8),), dynamo=True, verbose=False,
                          custom_translation_table=slsdeep_kernels.onnx_translations())


def test_importing_the_library_needs_no_onnxscript(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    module = importlib.reload(kernels_onnx)  # the module itself imports without onnxscript
    with pytest.raises(ModuleNotFoundError, match="pip install onnx onnxscript"):
        module.onnx_translations()


# --- the whole SLSDeep --------------------------------------------------------------------------


def fx_conv_macs(program) -> int:
    """Per-image multiply-adds of a torch.export graph's convolutions, counted as the fused ops run them:
    conv_bn_relu and plain convs from their shapes; the pyramid conv as its conv over x plus the 1×1 taps."""
    total = 0
    for node in program.graph.nodes:
        name = str(node.target)
        if "conv_bn_relu_eval" in name or name.startswith(("aten.conv2d", "aten.convolution")):
            out, weight = node.meta["val"], node.args[1].meta["val"]
            total += math.prod(out.shape[1:]) * math.prod(weight.shape[1:])
        elif "pyramid_conv" in name:
            out, taps = node.meta["val"], node.args[1].meta["val"].shape[-1] ** 2
            for part in (p.meta["val"] for p in node.args[0]):
                if part.shape[2:] == out.shape[2:]:  # full resolution: the conv over it
                    total += math.prod(out.shape[1:]) * part.shape[1] * taps
                else:  # a branch: its 1×1 tap matmul at its own size
                    total += taps * out.shape[1] * math.prod(part.shape[1:])
    return total


def seeded_model(seed, **config):
    """An SLSDeep that looks trained: random BatchNorm affine parameters, each residual branch's last BN
    scaled down (γ 0.1–0.3, as trained ResNets have and ``zero_init_residual`` starts them), and running
    statistics measured on random images. A freshly initialised deep BN network is chaotic (it multiplies
    rounding by orders of magnitude with depth: PyTorch's own fp32 paper model is ~1e-4 off its fp64
    self), which says nothing of an export; this one keeps activations at scale and masks two-class.
    Everything random comes from ``seed`` (module fixtures run before the per-test seeding)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(), torch.no_grad():  # the weights' initialisation and the calibration's dropout
        torch.manual_seed(seed)
        model = randomize_batch_norm(SLSDeep(**config), generator)
        for block in model.modules():
            if isinstance(block, Bottleneck):
                block.bn3.weight.mul_(0.2)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # the batch's statistics become the running ones
        model.train()(torch.randn(2, 3, SIZE, SIZE, generator=generator))
    return model.eval()


@pytest.mark.parametrize("preset, variant",
                         [("tiny", "slsdeep"), ("tiny", "slsdeep-epe"), ("tiny", "slsdeep+asc"), ("paper", "slsdeep")])
def test_slsdeep_exports_with_pytorchs_probabilities_and_the_fused_flops(preset, variant):
    model = seeded_model(7, preset=preset, variant=variant)
    generator = torch.Generator().manual_seed(8)
    example = torch.randn(2, 3, SIZE, SIZE, generator=generator)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: BATCH},))
    exported, session = onnx_program(program, [example])
    assert not {"BatchNormalization", "Mul"} & op_types(exported)  # every BN folded (the head's into the pyramid conv)
    assert not {"Split", "Transpose"} & op_types(exported)  # the pyramid conv's weight pieces folded into constants
    expected, actual = [], []
    for batch in (1, 3):  # the dynamic batch; the export's example had 2
        x = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
        with torch.no_grad():
            expected.append(foreground_probability(model(x)))
        actual.append(foreground_probability(run(session, x)[0]))
        assert (actual[-1] - expected[-1]).abs().max() <= deploy.TOLERANCE
    # As accurate as PyTorch itself: both against the fp64 unfused model on the last batch.
    exact = SLSDeep(**{**model.config, "fused": False})
    exact.load_state_dict(model.state_dict())
    with torch.no_grad():
        exact = foreground_probability(exact.double().eval()(x.double()))
    assert (actual[-1] - exact).abs().max() <= ERROR_FACTOR * (expected[-1] - exact).abs().max()
    masks, onnx_masks = torch.cat(expected).flatten() > 0.5, torch.cat(actual).flatten() > 0.5  # 16,384 pixels
    assert 0.01 < masks.float().mean() < 0.99, "a test model should predict both classes"
    assert (onnx_masks == masks).float().mean() >= 0.9999
    fused, macs = fx_conv_macs(program), conv_macs(exported)
    concatenation = model_summary(model, SIZE)["flops"] // 2  # the unfused (concatenation) model's convs
    assert abs(macs - fused) <= 0.01 * fused
    assert macs < 0.95 * concatenation


@pytest.fixture(scope="module")
def pt2(tmp_path_factory):
    """A .pt2 of a tiny fused model, and what a fresh process makes of it: loading it before ``import
    slsdeep_kernels``, then loading and running it after."""
    model = seeded_model(3, preset="tiny", variant="slsdeep+asc")
    generator = torch.Generator().manual_seed(4)
    program = torch.export.export(model, (torch.randn(2, 3, SIZE, SIZE, generator=generator),), dynamic_shapes=({0: BATCH},))
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    torch.export.save(program, path)
    script = f"""
import torch
try:
    torch.export.load({str(path)!r})
    print("loaded without slsdeep_kernels")
except RuntimeError:
    print("refused")
import slsdeep_kernels
try:
    print(tuple(torch.export.load({str(path)!r}).module()(torch.randn(1, 3, {SIZE}, {SIZE})).shape))
except Exception as error:
    print("failed:", type(error).__name__, str(error).splitlines()[-1])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return model, path, done


def test_a_pt2_program_saves_loads_and_matches(pt2):
    model, path, _ = pt2
    loaded = torch.export.load(path).module()
    generator = torch.Generator().manual_seed(4)
    for batch in (1, 3):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_loading_a_pt2_program_without_slsdeep_kernels_says_which_ops_are_missing(pt2):
    *_, done = pt2
    assert done.stdout.splitlines()[0] == "refused"
    assert "slsdeep_kernels.conv_bn_relu_eval" in done.stderr and "import the custom op" in done.stderr


def test_a_fresh_process_that_imports_slsdeep_kernels_runs_a_loaded_program(pt2):
    *_, done = pt2
    assert done.stdout.splitlines()[1] == f"(1, 2, {SIZE}, {SIZE})", done.stdout


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """A tiny checkpoint (trained-looking BN statistics) saved as training saves one, at SIZE."""
    model = seeded_model(11, preset="tiny")
    path = tmp_path_factory.mktemp("checkpoint") / "best.pt"
    checkpoint.save(path, {"config": model.config, "model": model.state_dict(), "image_size": SIZE})
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("data"), n=12, size=SIZE, seed=5)


@pytest.fixture(scope="module")
def exported(ck, tmp_path_factory):
    """``slsdeep export`` of ``ck`` to a fixed-size and a dynamic-size ONNX file and a .pt2 (at 48 px),
    and what each printed."""
    out = tmp_path_factory.mktemp("exported")
    files = {"onnx": out / "model.onnx", "dynamic": out / "dynamic.onnx", "pt2": out / "model.pt2"}
    printed = {}
    for key, argv in (("onnx", ["--format", "onnx"]), ("dynamic", ["--format", "onnx", "--dynamic-size", "--opset", "20"]),
                      ("pt2", ["--format", "pt2", "--image-size", "48"])):
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            assert main(["export", "--checkpoint", str(ck), "--out", str(files[key]), *argv]) == 0
        printed[key] = stdout.getvalue()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files.values())  # no temporary files left
    return files, printed


def test_export_prints_the_difference_and_writes_the_metadata(exported):
    exported, printed = exported
    for text in printed.values():
        assert float(text.rsplit(":", 1)[1]) <= deploy.TOLERANCE
    model = onnx.load(exported["onnx"])
    meta = {p.key: p.value for p in model.metadata_props}
    assert {k: meta[k] for k in ("slsdeep.variant", "slsdeep.image_size", "slsdeep.num_classes", "slsdeep.head",
                                  "slsdeep.dynamic_size")} == {
        "slsdeep.variant": "slsdeep", "slsdeep.image_size": str(SIZE), "slsdeep.num_classes": "2",
        "slsdeep.head": "softmax", "slsdeep.dynamic_size": "false"}
    assert json.loads(meta["slsdeep.normalization"])["mean"] == [0.485, 0.456, 0.406]
    assert json.loads(meta["slsdeep.config"])["preset"] == "tiny"
    assert model.opset_import[0].version == 18
    assert onnx.load(exported["dynamic"]).opset_import[0].version == 20
    program, pt2_meta = deploy.load_program(exported["pt2"])
    assert pt2_meta["slsdeep.image_size"] == "48" and pt2_meta["slsdeep.variant"] == "slsdeep"
    assert tuple(program.module()(torch.randn(1, 3, 48, 48)).shape) == (1, 2, 48, 48)


def _images(tmp_path, count=3):
    rng = np.random.default_rng(4)
    paths = []
    for i in range(count):
        path = tmp_path / f"lesion{i}.png"
        Image.fromarray((rng.random((37 + 9 * i, 53, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _masks(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*_segmentation.png"))}


def _agreement(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    return same / sum(a[k].size for k in a)


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_predict_with_an_onnx_model_gives_the_checkpoints_masks(ck, exported, tmp_path, tta):
    exported, _ = exported
    images = _images(tmp_path, 1 if tta else 3)
    onnx_file = exported["dynamic" if tta else "onnx"]
    flags = ["--tta"] if tta else []
    assert main(["predict", "--checkpoint", str(ck), *images, "--out", str(tmp_path / "torch"), *flags]) == 0
    assert main(["predict", "--checkpoint", str(onnx_file), *images, "--out", str(tmp_path / "onnx"), *flags]) == 0
    expected = _masks(tmp_path / "torch")
    assert len(expected) == len(images) and 0 < np.mean([m.mean() / 255 for m in expected.values()]) < 1
    assert _agreement(_masks(tmp_path / "onnx"), expected) >= 0.9999


def test_evaluate_with_an_onnx_model_gives_the_checkpoints_scores(ck, exported, data, tmp_path):
    exported, _ = exported
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(ck), "--out", str(tmp_path / "torch")]) == 0
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(exported["onnx"]), "--out", str(tmp_path / "onnx")]) == 0
    assert _agreement(_masks(tmp_path / "onnx" / "masks"), _masks(tmp_path / "torch" / "masks")) >= 0.9999
    expected = json.loads((tmp_path / "torch" / "scores.json").read_text())
    actual = json.loads((tmp_path / "onnx" / "scores.json").read_text())
    assert actual.keys() == expected.keys() and actual["n_images"] == len(ISICDataset(data, "test").ids)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-3), key


# --- bad input: one line naming the file, exit 2, nothing written ----------------------------------


def _one_line(capsys, *needles):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_fixed_size_onnx_model_refuses_tta_and_another_size(exported, tmp_path, capsys):
    exported, _ = exported
    images = _images(tmp_path, 1)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(exported["onnx"]), *images, "--out", str(out), "--tta"]) == 2
    _one_line(capsys, "model.onnx", "--dynamic-size")
    assert main(["predict", "--checkpoint", str(exported["onnx"]), *images, "--out", str(out), "--image-size", "96"]) == 2
    _one_line(capsys, "model.onnx", "96")
    assert not out.exists()


def test_bad_onnx_files_are_one_line_errors(tmp_path, capsys, data):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all \x00\x01")
    bare = tmp_path / "bare.onnx"  # a valid ONNX model without slsdeep's metadata
    node = onnx.helper.make_node("Identity", ["image"], ["logits"])
    values = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 3, SIZE, SIZE]) for n in ("image", "logits")]
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "bare", values[:1], values[1:])), bare)
    images = _images(tmp_path, 1)
    cases = ((garbage, "not a loadable ONNX model"), (bare, "no slsdeep metadata"), (tmp_path / "missing.onnx", "missing.onnx"))
    for path, needle in cases:
        assert main(["predict", "--checkpoint", str(path), *images, "--out", str(tmp_path / "out")]) == 2
        _one_line(capsys, path.name, needle)
        assert main(["evaluate", "--data", str(data), "--checkpoint", str(path), "--out", str(tmp_path / "scores")]) == 2
        _one_line(capsys, path.name)
    assert not (tmp_path / "out").exists() and not (tmp_path / "scores").exists()


@pytest.mark.parametrize(
    "argv, suffix, needles",
    [
        (["--format", "onnx", "--image-size", "16"], ".onnx", ["--image-size 16", "32"]),
        (["--format", "onnx", "--opset", "17"], ".onnx", ["--opset 17", "18"]),
        (["--format", "pt2"], ".onnx", ["must end in .pt2"]),
        (["--format", "pt2", "--opset", "18"], ".pt2", ["--opset applies to --format onnx only"]),
    ],
    ids=["image-size-below-32", "opset-below-18", "suffix", "opset-for-pt2"],
)
def test_bad_export_arguments_are_one_line_errors(ck, tmp_path, capsys, argv, suffix, needles):
    assert main(["export", "--checkpoint", str(ck), "--out", str(tmp_path / f"model{suffix}"), *argv]) == 2
    _one_line(capsys, *needles)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_format_and_a_checkpoint_that_is_not_one_are_one_line_errors(ck, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--checkpoint", str(ck), "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert exit_.value.code == 2
    _one_line(capsys, "--format", "tflite")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["export", "--checkpoint", str(bad), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    _one_line(capsys, "bad.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pt"]


def test_export_without_the_onnx_packages_says_what_to_install(ck, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main(["export", "--checkpoint", str(ck), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    _one_line(capsys, "pip install", "onnxscript")
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_does_not_match_pytorch_exits_non_zero_and_writes_nothing(ck, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(deploy, "TOLERANCE", -1.0)  # no difference passes: the check's failing branch (both formats')
    out = tmp_path / "model.pt2"
    assert main(["export", "--checkpoint", str(ck), "--format", "pt2", "--out", str(out)]) == 1
    _one_line(capsys, "nothing written", str(out), "from its fp64 ones")
    assert list(tmp_path.iterdir()) == []

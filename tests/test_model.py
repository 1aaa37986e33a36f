"""The SLSDeep model: shapes, the dilated encoder's layout, ImageNet checkpoint loading, parameter
counts, the fused path against the unfused one, gradients, channels_last and autocast."""

import pytest
import torch
import torch.nn.functional as F

from slsdeep.model import (
    BINS,
    STEMS,
    VARIANTS,
    SLSDeep,
    load_imagenet_weights,
    model_summary,
)

TV_RESNET50_PARAMETERS = 23_508_032  # torchvision resnet50 (25,557,032) minus fc (2,049,000)


def tiny(variant="slsdeep", stem="deep", **kwargs):
    return SLSDeep(variant, stem, **{"preset": "tiny", "fused": False, **kwargs})


def paper_on_meta(**kwargs):
    with torch.device("meta"):
        return SLSDeep(fused=False, **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("stem", STEMS)
def test_logits_at_input_size(variant, stem):
    model = tiny(variant, stem, num_classes=3)
    model.train()  # batch 2: the 1×1 pyramid bin's BatchNorm needs more than one value per channel
    for size in [(97, 131), (64, 64), (5, 3)]:
        out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 3, *size)
        assert torch.isfinite(out).all()
    model.eval()
    assert model(torch.randn(1, 3, 33, 47)).shape == (1, 3, 33, 47)


def test_logits_are_not_rectified():
    """No ReLU on the logits: some come out negative (the published code clamped them)."""
    model = tiny().eval()
    assert (model(torch.randn(1, 3, 40, 40)) < 0).any()


@pytest.mark.parametrize("stem", STEMS)
def test_encoder_stage_strides_and_channels(stem):
    model = tiny(stem=stem)
    stages = model.encoder(torch.randn(1, 3, 64, 96))
    assert [tuple(s.shape[-2:]) for s in stages] == [(16, 24), (8, 12), (8, 12), (8, 12)]
    assert [s.shape[1] for s in stages] == model.encoder.channels == [32, 64, 128, 256]
    assert paper_on_meta(stem=stem).encoder.channels == [256, 512, 1024, 2048]


def _torchvision_dilation_rule(blocks):
    """(layer, block) -> (stride, dilation) of conv2 under replace_stride_with_dilation=[F, T, T]."""
    expected, dilation = {}, 1
    for layer, (count, stride, dilate) in enumerate(zip(blocks, (1, 2, 2, 2), (False, False, True, True)), 1):
        previous = dilation
        if dilate:
            dilation, stride = dilation * stride, 1
        expected[layer, 0] = (stride, previous)
        expected.update({(layer, b): (1, dilation) for b in range(1, count)})
    return expected


@pytest.mark.parametrize("stem", STEMS)
def test_dilation_layout_matches_torchvision(stem):
    encoder = paper_on_meta(stem=stem).encoder
    expected = _torchvision_dilation_rule((3, 4, 6, 3))
    # the rule as stated in docs/design.md §5, to make sure the helper above says what we think
    assert [expected[3, b][1] for b in range(6)] == [1, 2, 2, 2, 2, 2]
    assert [expected[4, b][1] for b in range(3)] == [2, 4, 4]
    for (layer, b), (stride, dilation) in expected.items():
        block = getattr(encoder, f"layer{layer}")[b]
        assert block.conv2.stride == (stride, stride), (layer, b)
        assert block.conv2.dilation == (dilation, dilation), (layer, b)
        assert block.conv2.padding == (dilation, dilation), (layer, b)
        assert block.conv1.stride == block.conv3.stride == (1, 1)
        if b == 0:
            assert block.downsample[0].stride == (stride, stride)
        else:
            assert block.downsample is None


def test_resnet50_key_names_and_sizes():
    encoder = paper_on_meta(stem="torchvision").encoder
    keys = encoder.state_dict().keys()
    assert len(keys) == 318  # torchvision resnet50's 320 minus fc.weight, fc.bias
    for key in ["conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
                "layer3.5.conv2.weight", "layer4.2.bn3.num_batches_tracked"]:
        assert key in keys
    assert sum(p.numel() for p in encoder.parameters()) == TV_RESNET50_PARAMETERS
    assert encoder.conv1.kernel_size == (7, 7) and encoder.layer1[0].conv1.in_channels == 64

    deep = paper_on_meta(stem="deep").encoder
    assert [deep.conv1.out_channels, deep.conv2.out_channels, deep.conv3.out_channels] == [64, 64, 128]
    assert deep.conv1.stride == (2, 2) and deep.conv1.kernel_size == (3, 3)
    assert deep.layer1[0].conv1.in_channels == 128  # CSAIL: inplanes=128
    assert {"relu1", "relu2", "relu3", "bn3"} <= dict(deep.named_children()).keys()


def test_paper_parameter_count():
    """The paper's layout (deep stem, 1024-channel branches) is about 60M parameters."""
    count = sum(p.numel() for p in paper_on_meta().parameters())
    assert 59e6 < count < 62e6
    published = sum(p.numel() for p in paper_on_meta(branch_channels=512).parameters())
    assert count - published == 4 * 2048 * 512 + 4 * 512 * 512 * 9 + 4 * 2 * 512  # branches, head conv, BNs


def _fake_checkpoint(model, path, transform=lambda sd: sd):
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v.clone() for k, v in model.encoder.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(10, 256), torch.randn(10)
    torch.save(transform(state), path)
    return state


@pytest.mark.parametrize("stem", STEMS)
def test_imagenet_checkpoint_round_trip(stem, tmp_path):
    path = tmp_path / "resnet50.pth"
    state = _fake_checkpoint(tiny(stem=stem), path)
    model = tiny(stem=stem)
    load_imagenet_weights(model, path)
    loaded = model.encoder.state_dict()
    assert loaded.keys() == {k for k in state if not k.startswith("fc.")}
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_old_checkpoint_without_batch_counters_and_wrapped(tmp_path):
    """Pre-2018 checkpoints have no num_batches_tracked; DataParallel prefixes and a state_dict wrapper."""
    path = tmp_path / "csail.pth"

    def old_style(sd):
        return {"state_dict": {"module." + k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}}

    state = _fake_checkpoint(tiny(), path, old_style)
    model = tiny()
    load_imagenet_weights(model, path)
    torch.testing.assert_close(model.encoder.conv3.weight.detach(), state["conv3.weight"], rtol=0, atol=0)


def test_checkpoint_problems_are_named(tmp_path):
    path = tmp_path / "bad.pth"
    model = tiny()
    _fake_checkpoint(model, path, lambda sd: {k: v for k, v in sd.items() if k != "layer2.0.bn2.running_mean"})
    with pytest.raises(ValueError, match=r"missing keys: layer2\.0\.bn2\.running_mean"):
        load_imagenet_weights(model, path)
    _fake_checkpoint(model, path, lambda sd: {**sd, "layer4.0.conv2.weight": torch.randn(3, 3, 3, 3)})
    with pytest.raises(ValueError, match=r"shape mismatches: layer4\.0\.conv2\.weight"):
        load_imagenet_weights(model, path)
    _fake_checkpoint(model, path, lambda sd: {**sd, "layer5.0.conv1.weight": torch.randn(1)})
    with pytest.raises(ValueError, match=r"unexpected keys: layer5\.0\.conv1\.weight"):
        load_imagenet_weights(model, path)
    before = model.encoder.conv1.weight.detach().clone()
    _fake_checkpoint(tiny(stem="torchvision"), path)  # a 7×7-stem checkpoint into the deep stem
    with pytest.raises(ValueError, match=r"torchvision \(7×7\)-stem.*missing keys: conv2\.weight"):
        load_imagenet_weights(model, path)
    assert torch.equal(model.encoder.conv1.weight, before)  # nothing copied on failure


def test_config_rebuilds_model_and_loss_alpha():
    model = tiny("slsdeep+asc", "torchvision", branch_channels=16, num_classes=1)
    assert model.config == dict(variant="slsdeep+asc", stem="torchvision", branch_channels=16, num_classes=1,
                                fused=False, preset="tiny", align_corners=False)
    twin = SLSDeep(**model.config)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 45, 38)
    torch.testing.assert_close(twin.eval()(x), model.eval()(x))
    assert [tiny(v).loss_alpha for v in VARIANTS] == [0.5, 0.0, 0.5]
    assert tiny().config["branch_channels"] == 32 and paper_on_meta().config["branch_channels"] == 1024


def test_asc_decoder_widths():
    """ASC: layer2 + layer3 join the 1/8 concatenation, layer1 joins before the last conv."""
    plain, asc = tiny().decoder, tiny("slsdeep+asc").decoder
    assert asc.head.conv.in_channels - plain.head.conv.in_channels == 64 + 128
    assert asc.classifier.conv.in_channels - plain.classifier.conv.in_channels == 32
    assert plain.head.conv.in_channels == 256 + len(BINS) * 32


@pytest.mark.parametrize("name, value", [("variant", "slsdeep+epe"), ("stem", "resnet"), ("preset", "huge"),
                                         ("branch_channels", 0), ("num_classes", 2.0)])
def test_bad_arguments(name, value):
    with pytest.raises(ValueError, match=name):
        tiny(**{name: value})
    with pytest.raises(ValueError, match="x must be"):
        tiny().eval()(torch.randn(1, 1, 16, 16))


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
    model = tiny(variant).train()
    logits = model(torch.randn(2, 3, 48, 40))
    F.cross_entropy(logits, torch.randint(0, 2, (2, 48, 40))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_channels_last_and_bf16_autocast():
    model = tiny("slsdeep+asc").eval()
    x = torch.randn(2, 3, 50, 43)
    expected = model(x)
    last = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(last(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = last(x.to(memory_format=torch.channels_last))
    assert low.shape == expected.shape and torch.isfinite(low).all()
    assert (low.float() - expected).norm() / expected.norm() < 0.1


def test_model_summary():
    model = tiny()
    summary = model_summary(model, image_size=64)
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert summary["flops"] > 0 and "parameters" in summary["text"]
    # FLOPs scale with the image area (every layer is convolutional)
    assert 3.5 < model_summary(model, image_size=128)["flops"] / summary["flops"] < 4.5
    paper = model_summary(paper_on_meta(), image_size=384)
    head = 2 * 48 * 48 * 9 * (2048 + 4 * 1024) * 512  # the 3×3 conv over the 6144-channel concatenation
    assert head < paper["flops"] < 3 * head


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("stem", STEMS)
def test_fused_matches_unfused(variant, stem):
    reference = tiny(variant, stem)
    fused = tiny(variant, stem, fused=True)
    assert fused.state_dict().keys() == reference.state_dict().keys()
    fused.load_state_dict(reference.state_dict())
    reference.eval(), fused.eval()
    x = torch.randn(2, 3, 45, 61)
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-4)


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("variant", ["slsdeep", "slsdeep+asc"])
def test_fused_training_step_matches_unfused(variant):
    """Train mode: same logits, same gradient of every parameter, same running statistics."""
    reference, fused = tiny(variant), tiny(variant, fused=True)
    fused.load_state_dict(reference.state_dict())
    x, target = torch.randn(3, 3, 37, 50), torch.randint(0, 2, (3, 37, 50))
    outputs = []
    for model in (reference, fused):
        torch.manual_seed(0)  # the same Dropout2d mask
        logits = model.train()(x)
        F.cross_entropy(logits, target).backward()
        outputs.append(logits)
    assert _relative(outputs[1], outputs[0]) < 1e-4
    fused_parameters = dict(fused.named_parameters())
    for name, p in reference.named_parameters():
        assert _relative(fused_parameters[name].grad, p.grad) < 1e-3, name
    fused_buffers = dict(fused.named_buffers())
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(fused_buffers[name], buffer, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_channels_last_and_bf16_autocast():
    reference, fused = tiny("slsdeep+asc"), tiny("slsdeep+asc", fused=True)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 41, 36)
    expected = reference.eval()(x)
    fused = fused.eval().to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    assert _relative(fused(x), expected) < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fused(x)
    assert low.shape == expected.shape and _relative(low, expected) < 0.1


def _ellipses(n, size, generator):
    """Dark noisy ellipses (lesions) on a lighter noisy background, with their masks."""
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    centre = (torch.rand(n, 2, 1, 1, generator=generator) - 0.5) * 0.8
    radius = 0.2 + 0.35 * torch.rand(n, 2, 1, 1, generator=generator)
    distance = ((xx - centre[:, 0]) / radius[:, 0]) ** 2 + ((yy - centre[:, 1]) / radius[:, 1]) ** 2
    lesion = torch.sigmoid((1 - distance) * 6)[:, None]
    skin = torch.tensor([0.8, 0.6, 0.5]).view(1, 3, 1, 1) + 0.1 * torch.randn(n, 3, 1, 1, generator=generator)
    dark = torch.tensor([0.35, 0.2, 0.15]).view(1, 3, 1, 1) + 0.1 * torch.randn(n, 3, 1, 1, generator=generator)
    image = skin * (1 - lesion) + dark * lesion + 0.08 * torch.randn(n, 3, size, size, generator=generator)
    return (image - 0.5) / 0.25, (distance < 1).long()


@pytest.mark.slow
def test_tiny_preset_learns_to_segment():
    """preset="tiny" reaches Dice >= 0.85 on 128×128 synthetic lesions in seconds on CPU."""
    generator = torch.Generator().manual_seed(1)
    images, masks = _ellipses(256, 128, generator)
    test_images, test_masks = _ellipses(64, 128, generator)
    model = tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        model.train()
        for batch in torch.randperm(len(images)).split(16):
            optimizer.zero_grad()
            F.cross_entropy(model(images[batch]), masks[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        predicted = model.eval()(test_images).argmax(1)
    dice = 2 * (predicted * test_masks).sum((1, 2)) / (predicted.sum((1, 2)) + test_masks.sum((1, 2)))
    assert dice.mean() >= 0.85


@pytest.mark.slow
@pytest.mark.parametrize("stem", STEMS)
def test_fused_matches_unfused_paper_preset(stem):
    reference = SLSDeep(stem=stem, fused=False).eval()
    fused = SLSDeep(stem=stem).eval()
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 65, 71)
    with torch.no_grad():
        assert _relative(fused(x), reference(x)) < 1e-4

"""The SLSDeep network (Sarker et al., MICCAI 2018): a dilated ResNet-50 encoder and a pyramid
pooling decoder; see docs/design.md §5.

* Encoder: ResNet-50 (Bottleneck [3, 4, 6, 3]) at output stride 8, dilated exactly as
  torchvision's ``replace_stride_with_dilation=[False, True, True]``, with torchvision's module
  names so ImageNet checkpoints load (:func:`load_imagenet_weights`): the 7×7 ``torchvision`` stem
  or the 3×3 ``deep`` stem of the CSAIL ResNet-50 (conv1/conv2/conv3 64, 64, 128).
* Decoder: pyramid pooling (bins 1, 2, 3, 6; 1×1 conv + BN + ReLU per bin) concatenated with the
  encoder output, 3×3 conv → 512 + BN + ReLU at 1/8, bilinear up to the 1/4 grid, Dropout2d(0.5)
  (as the published code), 3×3 conv → ``num_classes`` + BN, bilinear up to the input size.
  Logits come out: no ReLU on them (the published code had one), no softmax.
* ``fused=False`` is plain PyTorch; ``fused=True`` runs the same parameters through
  ``slsdeep_kernels`` (same state-dict keys, same outputs): the two load each other's weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import slsdeep_kernels

VARIANTS = ("slsdeep", "slsdeep-epe", "slsdeep+asc")
STEMS = ("deep", "torchvision")
PRECISIONS = ("fp32", "bf16")  # inference precisions (slsdeep.predict.predict_probability)
BINS = slsdeep_kernels.PYRAMID_BINS  # the paper's (PSPNet's) bins
# EPE weight of each variant's loss: SLSDeep-EPE is the same network trained with NLL only.
LOSS_ALPHA = {"slsdeep": 0.5, "slsdeep-epe": 0.0, "slsdeep+asc": 0.5}


# width: the ResNet base width (64 in ResNet-50); blocks per stage; decoder: the 3×3 conv's width;
# branch_channels: the default width of each pyramid branch.
PRESETS = {
    "paper": {"width": 64, "blocks": (3, 4, 6, 3), "decoder": 512, "branch_channels": 1024},
    "tiny": {"width": 8, "blocks": (1, 1, 1, 1), "decoder": 32, "branch_channels": 32},
}

def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool, fused: bool) -> torch.Tensor:
    """``relu(bn(conv(x)))`` (or without the ReLU); one fused op when ``fused``, which uses and
    updates BatchNorm's parameters and running statistics exactly as the modules would."""
    if fused:
        return slsdeep_kernels.conv_bn_relu_modules(x, conv, bn, relu)
    y = bn(conv(x))
    return F.relu(y) if relu else y


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3×3 conv), with its module names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = conv_bn(x, self.conv1, self.bn1, True, self.fused)
        out = conv_bn(out, self.conv2, self.bn2, True, self.fused)
        out = conv_bn(out, self.conv3, self.bn3, False, self.fused)
        identity = x if self.downsample is None else conv_bn(x, self.downsample[0], self.downsample[1], False, self.fused)
        out += identity  # in place, as torchvision's: no new block output to allocate and first-touch
        return self.relu(out)


class DilatedResNet(nn.Module):
    """ResNet with output stride 8; ``forward`` returns the outputs of layer1..layer4.

    Dilation follows torchvision's ``replace_stride_with_dilation=[False, True, True]``: layer3
    and layer4 lose their stride and dilate by 2 and 4, each layer's first block keeping the
    previous dilation (layer3[0].conv2 dilation 1, layer4[0].conv2 dilation 2).
    """

    def __init__(self, stem: str = "deep", width: int = 64, blocks: Sequence[int] = (3, 4, 6, 3)):
        super().__init__()
        self.stem = stem
        if stem == "torchvision":
            self.inplanes = width
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
        else:  # CSAIL deep stem
            self.inplanes = 2 * width
            self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(2 * width)
            self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.dilation = 1
        self.layer1 = self._make_layer(width, blocks[0])
        self.layer2 = self._make_layer(2 * width, blocks[1], stride=2)
        self.layer3 = self._make_layer(4 * width, blocks[2], stride=2, dilate=True)
        self.layer4 = self._make_layer(8 * width, blocks[3], stride=2, dilate=True)
        self.channels = [width * 4 * 2**i for i in range(4)]
        self.fused = False

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, previous_dilation, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = conv_bn(x, self.conv1, self.bn1, True, self.fused)
        if self.stem == "deep":
            x = conv_bn(x, self.conv2, self.bn2, True, self.fused)
            x = conv_bn(x, self.conv3, self.bn3, True, self.fused)
        x = self.maxpool(x)
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(x)
        return stages


class ConvBN(nn.Module):
    """A conv and its BatchNorm as two plain modules (``conv``, ``bn``); applied by the decoder."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)


class Decoder(nn.Module):
    """Pyramid pooling + 3×3 conv at 1/8, ×2 up, dropout, 3×3 conv to the logits, up to input size.

    Concatenation order at 1/8: [layer4, (layer2, layer3 for ASC), pyramid branches 1, 2, 3, 6]
    (the dense encoder channels first, then the upsampled low-resolution branches). Fused, the
    pyramid's part of the concatenation is never built (``slsdeep_kernels.pyramid_conv_modules``, the
    head's BN folded into it in eval); the ASC dense part (layer4, layer2, layer3) is, being the conv's
    ordinary input.
    """

    def __init__(self, encoder_channels: Sequence[int], branch_channels: int, decoder_channels: int,
                 num_classes: int, asc: bool, align_corners: bool):
        super().__init__()
        self.asc, self.align_corners, self.fused = asc, align_corners, False
        top = encoder_channels[3]
        self.branches = nn.ModuleList(ConvBN(top, branch_channels, 1) for _ in BINS)
        dense = top + (encoder_channels[1] + encoder_channels[2] if asc else 0)
        self.head = ConvBN(dense + len(BINS) * branch_channels, decoder_channels, 3)
        self.dropout = nn.Dropout2d(0.5)
        self.classifier = ConvBN(decoder_channels + (encoder_channels[0] if asc else 0), num_classes, 3)

    def _upsample(self, x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, stages: list[torch.Tensor], size) -> torch.Tensor:
        layer1, layer2, layer3, top = stages
        dense = torch.cat([top, layer2, layer3], 1) if self.asc else top
        if self.fused:
            x = self._fused_head(top, dense)
        else:
            pooled = [F.adaptive_avg_pool2d(top, b) for b in BINS]
            branches = [conv_bn(p, s.conv, s.bn, True, False) for p, s in zip(pooled, self.branches)]
            x = torch.cat([dense] + [self._upsample(y, top.shape[-2:]) for y in branches], 1)
            x = conv_bn(x, self.head.conv, self.head.bn, True, False)
        # "×2": up to the 1/4 grid of layer1 (exactly ×2 when the input size divides by 8).
        x = self.dropout(self._upsample(x, layer1.shape[-2:]))
        if self.asc:
            x = torch.cat([x, layer1], 1)
        x = conv_bn(x, self.classifier.conv, self.classifier.bn, False, self.fused)
        return self._upsample(x, size)

    def _fused_head(self, top: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Pyramid pooling + head conv + BN + ReLU without the concatenation: every bin pooled in one
        read of ``top``, the branches' 1×1 conv+BN+ReLU fused at b×b, and the head's 3×3 conv (+ BN +
        ReLU) split into a conv over ``dense`` plus low-resolution taps of the branches."""
        pooled = slsdeep_kernels.pyramid_pool(top, BINS)
        branches, offset = [], 0
        for b, stage in zip(BINS, self.branches):
            cells = pooled[:, :, offset : offset + b * b].unflatten(2, (b, b))
            branches.append(conv_bn(cells, stage.conv, stage.bn, True, True).to(dense.dtype))
            offset += b * b
        return slsdeep_kernels.pyramid_conv_modules([dense, *branches], self.head.conv, self.head.bn, relu=True,
                                                    size=dense.shape[-2:], align_corners=self.align_corners)  # fmt: skip


class SLSDeep(nn.Module):
    """SLSDeep segmentation network; ``forward(x)`` returns logits ``(N, num_classes, H, W)``.

    Args:
        variant: ``"slsdeep"``, ``"slsdeep-epe"`` (same network, ``loss_alpha`` 0) or
            ``"slsdeep+asc"`` (layer2/layer3 join the concatenation at 1/8, layer1 joins before
            the last conv).
        stem: ``"deep"`` (CSAIL 3×3 stem, the paper's) or ``"torchvision"`` (7×7).
        branch_channels: width of each pyramid branch (1024 paper, 512 published code);
            None takes the preset's (1024 paper, 32 tiny).
        num_classes: output channels (2: softmax over two channels; 1: a sigmoid head).
        fused: run through ``slsdeep_kernels``' fused ops (same parameters and keys).
        preset: ``"paper"`` (ResNet-50) or ``"tiny"`` (base width 8, one block per stage,
            decoder 32: the same structure, trainable on CPU in minutes).
        align_corners: of every bilinear resize (False as CSAIL/mmsegmentation).

    ``model.config`` holds these arguments (resolved) so a checkpoint can rebuild the model with
    ``SLSDeep(**config)``; ``model.loss_alpha`` is the variant's EPE weight.
    """

    def __init__(self, variant: str = "slsdeep", stem: str = "deep", branch_channels: int | None = None,
                 num_classes: int = 2, fused: bool = True, preset: str = "paper", align_corners: bool = False):
        super().__init__()
        _check_choice("variant", variant, VARIANTS)
        _check_choice("stem", stem, STEMS)
        _check_choice("preset", preset, tuple(PRESETS))
        spec = PRESETS[preset]
        branch_channels = spec["branch_channels"] if branch_channels is None else branch_channels
        for name, value in (("branch_channels", branch_channels), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SLSDeep: {name} must be a positive int, got {value!r}")
        self.config = dict(variant=variant, stem=stem, branch_channels=branch_channels, num_classes=num_classes,
                           fused=bool(fused), preset=preset, align_corners=bool(align_corners))
        self.loss_alpha = LOSS_ALPHA[variant]
        self.encoder = DilatedResNet(stem, spec["width"], spec["blocks"])
        self.decoder = Decoder(self.encoder.channels, branch_channels, spec["decoder"], num_classes,
                               asc=variant == "slsdeep+asc", align_corners=bool(align_corners))
        _init_weights(self)
        for module in self.modules():
            if hasattr(module, "fused"):
                module.fused = bool(fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"SLSDeep: x must be (N, 3, H, W), got shape {tuple(x.shape)}")
        return self.decoder(self.encoder(x), x.shape[-2:])


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"SLSDeep: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _init_weights(model: nn.Module) -> None:
    """torchvision's ResNet initialisation: Kaiming-normal (fan_out) convs, BN γ=1 β=0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def load_imagenet_weights(model: SLSDeep | DilatedResNet, path) -> None:
    """Load an ImageNet ResNet-50 checkpoint from a local file into ``model``'s encoder.

    ``stem="torchvision"`` takes torchvision's ``resnet50`` state dict, ``stem="deep"`` the CSAIL
    deep-stem ``resnet50-imagenet.pth``. ``fc.*`` is ignored; every other key must match the
    encoder by name and shape (a ValueError lists the missing and unexpected keys and the shape
    mismatches). Checkpoints saved before BatchNorm counted batches lack ``num_batches_tracked``:
    those counters keep the model's value. A ``{"state_dict": ...}`` wrapper and a ``module.``
    (DataParallel) prefix are accepted. Nothing is downloaded.
    """
    encoder = model.encoder if isinstance(model, SLSDeep) else model
    if not isinstance(encoder, DilatedResNet):
        raise TypeError(f"load_imagenet_weights: model must be an SLSDeep or DilatedResNet, got {type(model).__name__}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"load_imagenet_weights: {path} does not hold a state dict")
    checkpoint = {k.removeprefix("module."): v for k, v in checkpoint.items() if not k.removeprefix("module.").startswith("fc.")}
    own = encoder.state_dict()
    missing = [k for k in own if k not in checkpoint and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in checkpoint if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in checkpoint.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        problems = [f"{label}: {', '.join(items)}" for label, items in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if items]
        hint = ""
        if "conv2.weight" in missing or "conv2.weight" in unexpected:
            other = "deep (CSAIL)" if "conv2.weight" in unexpected else "torchvision (7×7)"
            hint = f" (the checkpoint looks like a {other}-stem ResNet-50; the model has stem={encoder.stem!r})"
        raise ValueError(f"load_imagenet_weights: {path} does not fit the encoder{hint}; " + "; ".join(problems))
    with torch.no_grad():
        for key, value in checkpoint.items():
            own[key].copy_(value)


def model_summary(model: SLSDeep, image_size: int = 384) -> dict:
    """Parameter count and forward FLOPs of ``model`` on one ``image_size``² image.

    FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on an unfused twin built on
    the meta device (no memory, no compute): the dense architecture's FLOPs (2 per multiply-add).
    Returns ``{"parameters", "flops", "image_size", "config", "text"}``; ``text`` prints nicely.
    """
    from torch.utils.flop_counter import FlopCounterMode

    config = dict(getattr(model, "config", {}), fused=False)
    with torch.device("meta"):
        twin = SLSDeep(**config).eval()
        image = torch.empty(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        twin(image)
    parameters = sum(p.numel() for p in model.parameters())
    by_part = {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
    flops = counter.get_total_flops()
    text = (f"SLSDeep {config}\n  parameters: {parameters / 1e6:.2f} M ("
            + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in by_part.items())
            + f")\n  forward FLOPs at {image_size}x{image_size}: {flops / 1e9:.1f} GFLOP per image")
    return {"parameters": parameters, "parameters_by_part": by_part, "flops": flops,
            "image_size": image_size, "config": config, "text": text}

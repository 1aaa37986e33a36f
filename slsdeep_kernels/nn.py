"""Drop-in ``nn.Module`` wrappers of the fused ops, for any PyTorch model.

Modules made of plain ``Conv2d`` / ``BatchNorm2d`` / ``ReLU`` children (the pyramid modules, named
conv/bn/relu) keep state dicts that read like PSPNet's, and a Conv-BN-ReLU fusion pass can find them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from slsdeep_kernels.ops.conv_bn_relu import conv_bn_relu_modules
from slsdeep_kernels.ops.nll_epe_loss import nll_epe_loss
from slsdeep_kernels.ops.pyramid import PYRAMID_BINS, _check_bins, pyramid_conv3x3, pyramid_pool, upsample_concat


class NLLEPELoss(nn.Module):
    """NLL + ``alpha``·EPE loss of binary segmentation logits (see :func:`slsdeep_kernels.nll_epe_loss`)."""

    def __init__(self, alpha: float = 0.5, reduction: str = "mean", check_target: bool = True, backend: str | None = None):
        super().__init__()
        self.alpha, self.reduction, self.check_target, self.backend = alpha, reduction, check_target, backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nll_epe_loss(logits, target, self.alpha, self.reduction, self.backend, self.check_target)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reduction={self.reduction!r}"


class ConvBNReLU2d(nn.Module):
    """``Conv2d → BatchNorm2d (→ ReLU)`` as one fused op (see :func:`slsdeep_kernels.conv_bn_relu`).

    Holds a real ``Conv2d`` (``.conv``) and ``BatchNorm2d`` (``.bn``, with ``num_batches_tracked``)
    registered as ``"0"`` and ``"1"``: its state dict is that of ``Sequential(Conv2d, BatchNorm2d)``,
    so checkpoints load both ways. Follows ``train()``/``eval()`` as BatchNorm does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        relu: bool = True,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        memory_efficient: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.add_module("0", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, **factory))
        self.add_module("1", nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory))
        self.relu, self.memory_efficient = relu, memory_efficient

    @property
    def conv(self) -> nn.Conv2d:
        return self._modules["0"]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self._modules["1"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_relu_modules(x, self.conv, self.bn, self.relu, self.memory_efficient)

    def extra_repr(self) -> str:
        return f"relu={self.relu}, memory_efficient={self.memory_efficient}"


class PyramidStage(nn.Module):
    """One pyramid branch: 1×1 conv (no bias) + BatchNorm + ReLU on a pooled b×b map."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: ``cat([x] + [up(relu(bn(conv1x1(adaptive_pool(x, b)))))])``.

    All bins are pooled in one pass (:func:`pyramid_pool`) and the branches are upsampled straight
    into the concatenation (:func:`upsample_concat`). Output: ``in_channels + len(bins)·branch_channels``
    channels at x's size. In training, batch 1 raises (BatchNorm of the 1×1 bin has one value per channel).
    """

    def __init__(
        self,
        in_channels: int,
        branch_channels: int,
        bins: Sequence[int] = PYRAMID_BINS,
        align_corners: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        self.bins = _check_bins("PyramidPooling", bins)
        self.in_channels, self.branch_channels = in_channels, branch_channels
        self.align_corners, self.backend = align_corners, backend
        self.stages = nn.ModuleList(PyramidStage(in_channels, branch_channels) for _ in self.bins)

    @property
    def out_channels(self) -> int:
        return self.in_channels + len(self.bins) * self.branch_channels

    def branches(self, x: Tensor) -> list[Tensor]:
        """The projected b×b maps of every bin, before upsampling."""
        pooled = pyramid_pool(x, self.bins, self.backend)
        branches, offset = [], 0
        for b, stage in zip(self.bins, self.stages):
            branches.append(stage(pooled[:, :, offset : offset + b * b].unflatten(2, (b, b))).to(x.dtype))
            offset += b * b
        return branches

    def forward(self, x: Tensor) -> Tensor:
        return upsample_concat(x, self.branches(x), self.align_corners, self.backend)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, align_corners={self.align_corners}"


class PyramidDecoderBlock(nn.Module):
    """Pyramid pooling followed by 3×3 conv (no bias) + BatchNorm + ReLU over its concatenation.

    Same numbers as ``relu(bn(conv(PyramidPooling(x))))`` but through :func:`pyramid_conv3x3`: the
    ``in_channels + len(bins)·branch_channels``-channel concatenation is never built.
    """

    def __init__(
        self,
        in_channels: int,
        branch_channels: int,
        out_channels: int,
        bins: Sequence[int] = PYRAMID_BINS,
        align_corners: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        self.pyramid = PyramidPooling(in_channels, branch_channels, bins, align_corners, backend)
        self.conv = nn.Conv2d(self.pyramid.out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        pyramid = self.pyramid
        y = pyramid_conv3x3(x, pyramid.branches(x), self.conv.weight, self.conv.bias, pyramid.align_corners, pyramid.backend)
        return self.relu(self.bn(y))

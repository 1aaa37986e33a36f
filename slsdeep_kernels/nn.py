"""Drop-in ``nn.Module`` wrappers of the fused ops, for any PyTorch model."""

from __future__ import annotations

import torch
from torch import nn

from slsdeep_kernels.ops.conv_bn_relu import conv_bn_relu_modules
from slsdeep_kernels.ops.nll_epe_loss import nll_epe_loss
from slsdeep_kernels.ops.pyramid import PyramidDecoderBlock, PyramidPooling, PyramidStage  # noqa: F401


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

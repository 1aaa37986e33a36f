"""Drop-in ``nn.Module`` wrappers of the fused ops, for any PyTorch model."""

from __future__ import annotations

import torch
from torch import nn

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

"""NLL + EPE loss: fused vs eager reference vs torch.compile(reference), forward / backward / both.

Shapes: the paper's batch (16, 2, 384, 384) and (8, 2, 256, 256); on a GPU also (64, 2, 512, 512), where
launch overhead no longer hides the kernel. fp32 logits, uint8 mask, mean reduction. The fused way skips
the target check (check_target=False: on a GPU it is a sync, not kernel time).

Floor bytes: forward = one read of logits and target; backward = one write of the gradient; both = the
two together (one read of logits and target, one write of the gradient).
"""

import pytest
import torch

from slsdeep_kernels import benchmark as measure
from slsdeep_kernels import nll_epe_loss
from slsdeep_kernels.ops.nll_epe_loss import reference

SHAPES = [(16, 2, 384, 384), (8, 2, 256, 256)]
GPU_SHAPES = SHAPES + [(64, 2, 512, 512)]


def fused(logits, target):
    return nll_epe_loss(logits, target, check_target=False)


WAYS = measure.three_ways(fused, reference)


def shapes():
    return GPU_SHAPES if torch.cuda.is_available() else SHAPES


@pytest.mark.parametrize("way", measure.WAYS)
@pytest.mark.parametrize("which", measure.PASSES)
@pytest.mark.parametrize("shape", shapes(), ids=lambda s: "x".join(map(str, s)))
def test_nll_epe_loss(run_op, device, way, which, shape):
    n, c, h, w = shape
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(shape, generator=generator)).to(device).requires_grad_()
    target = (torch.rand((n, h, w), generator=generator) < 0.3).to(device=device, dtype=torch.uint8)
    logits_bytes, target_bytes = logits.numel() * logits.element_size(), target.numel()
    floor = {"forward": logits_bytes + target_bytes, "backward": logits_bytes, "both": 2 * logits_bytes + target_bytes}
    run_op(
        op="nll_epe_loss",
        way=way,
        which=which,
        fn=WAYS[way],
        inputs=[logits, target],
        shape=shape,
        bytes_moved=floor[which],
    )

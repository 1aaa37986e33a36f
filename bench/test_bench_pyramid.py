"""Pyramid pooling: fused vs eager reference vs torch.compile(reference), forward / backward / both.

Shapes (N, C, H, W, branch channels, conv out channels): SLSDeep's decoder (16, 2048, 48, 48, 1024, 512)
on a GPU (bf16 and fp32), a smaller CPU shape (4, 512, 48, 48, 256, 128) in fp32. Branches at bins
1, 2, 3, 6.

* ``pool_upsample_concat``: ``pyramid_pool(x)`` and ``upsample_concat(x, branches)`` (the pair around
  the 1×1 projections). Floor bytes: forward = one read of x and of the branches, one write of the
  pooled cells and of the concatenation; backward = one read of both output gradients and one write of
  the gradients of x and of the branches.
* ``pyramid_conv3x3``: against the eager conv over the concatenation. FLOPs: what the fused op needs
  (conv over x's channels, z_t = W_t·y, dense tap reads); backward twice that (input and weight grads).
"""

import pytest
import torch

from slsdeep_kernels import benchmark as measure
from slsdeep_kernels import pyramid_conv3x3, pyramid_pool, upsample_concat
from slsdeep_kernels.ops.pyramid import pyramid_conv3x3_reference, pyramid_pool_reference, upsample_concat_reference

BINS = (1, 2, 3, 6)
GPU = torch.cuda.is_available()
CASES = [(16, 2048, 48, 48, 1024, 512)] if GPU else [(4, 512, 48, 48, 256, 128)]
DTYPES = [torch.bfloat16, torch.float32] if GPU else [torch.float32]


def pool_pair(x, *branches):
    return pyramid_pool(x, BINS), upsample_concat(x, list(branches))


def pool_pair_reference(x, *branches):
    return pyramid_pool_reference(x, BINS), upsample_concat_reference(x, list(branches))


def conv(x, weight, *branches):
    return pyramid_conv3x3(x, list(branches), weight)


def conv_reference(x, weight, *branches):
    return pyramid_conv3x3_reference(x, list(branches), weight)


POOL_WAYS = measure.three_ways(pool_pair, pool_pair_reference)
CONV_WAYS = measure.three_ways(conv, conv_reference)


def run_or_skip(run_op, way, **kwargs):
    """Run one benchmark; a torch.compile failure on the reference skips it (e.g. torch 2.13's inductor
    fails on the CPU backward of upsample_bilinear2d from a 1×1 map) instead of failing the suite."""
    try:
        run_op(way=way, **kwargs)
    except Exception as error:
        if way != "compile":
            raise
        pytest.skip(f"torch.compile of the reference failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")


def inputs(case, dtype, device):
    n, c, h, w, cb, _ = case
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((n, c, h, w), generator=generator).to(device, dtype).requires_grad_()
    branches = [torch.randn((n, cb, b, b), generator=generator).to(device, dtype).requires_grad_() for b in BINS]
    return x, branches


def case_id(case):
    return "x".join(map(str, case))


@pytest.mark.parametrize("way", measure.WAYS)
@pytest.mark.parametrize("which", measure.PASSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pool_upsample_concat(run_op, device, way, which, case, dtype):
    n, c, h, w, cb, _ = case
    x, branches = inputs(case, dtype, device)
    size = x.element_size()
    cells = sum(b * b for b in BINS)
    image, concat = n * c * h * w, n * (c + len(BINS) * cb) * h * w
    small = n * c * cells + n * cb * cells  # pooled cells and branch values
    floor = {"forward": (image + concat + small) * size, "backward": (concat + image + small) * size}
    floor["both"] = floor["forward"] + floor["backward"]
    run_or_skip(
        run_op,
        way,
        op="pool_upsample_concat",
        which=which,
        fn=POOL_WAYS[way],
        inputs=[x, *branches],
        shape=case,
        bytes_moved=floor[which],
    )


@pytest.mark.parametrize("way", measure.WAYS)
@pytest.mark.parametrize("which", measure.PASSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pyramid_conv3x3(run_op, device, way, which, case, dtype):
    n, c, h, w, cb, out = case
    x, branches = inputs(case, dtype, device)
    total = c + len(BINS) * cb
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn((out, total, 3, 3), generator=generator) / (3 * total**0.5)).to(device, dtype).requires_grad_()
    cells = sum(b * b for b in BINS)
    forward = 2 * n * h * w * out * 9 * c + 2 * 9 * out * cb * n * cells + 2 * n * out * h * w * 9 * cells
    flops = {"forward": forward, "backward": 2 * forward, "both": 3 * forward}
    run_or_skip(
        run_op,
        way,
        op="pyramid_conv3x3",
        which=which,
        fn=CONV_WAYS[way],
        inputs=[x, weight, *branches],
        shape=case,
        flops=flops[which],
    )

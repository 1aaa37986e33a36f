"""Triton kernels of the NLL + EPE loss and their launchers (the maths: :mod:`slsdeep_kernels.ops.nll_epe_loss`,
docs/design.md §4.3). Imported only when the ``triton`` backend runs (``backend.triton_kernels``).

Launchers, called by the op's custom ops: :func:`forward`, :func:`backward` (the per-pixel map's
gradient) and :func:`scale` (the saved gradient times the upstream gradient, in place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slsdeep_kernels import backend as backends
from slsdeep_kernels.ops.nll_epe_loss import _new_gradient, _saved_gradient_scale

# One program is one warp streaming down ROWS rows of a strip of one image. Its LANES lanes each own a
# run of VEC consecutive columns (16 bytes of logits: 8 for 16-bit, 4 for fp32), so every access of
# the logits, the upstream gradient, the loss map and the saved gradient is a 16-byte pack where the
# rows are aligned (W a multiple of VEC). A column's neighbours are in the lane's own registers or, at
# a run's edge, one shuffle away in the next lane (_from_left / _from_right); the strip's first and
# last lanes only feed their neighbours (a halo of VEC columns each side), so strips step by
# (LANES - 2) · VEC columns. Each pixel's exponential, logarithm and divisions are computed once (the
# halo's twice). The last two rows of d = p - v and of the EPE direction are carried in registers: the
# Sobel derivatives at row t-1 and the gradient at row t-2 are formed when row t arrives. The loss is
# reduced per program into one partial; the partials are summed in a fixed order.
#
# Floors at the model's loss, (16, 2, 384, 384) bf16, training (the gradient saved): 9.4 MB of logits
# and 2.4 MB of mask read, 9.4 MB of gradient written, 21 MB: 4.4 µs at an H200's 4.8 TB/s. The row
# loop compiles (sm_90, bf16, NCHW, C = 2) to 914 SASS instructions for a lane's 8 pixels, 114 a
# pixel. With the masked and halo lanes (a 384-wide row is 2 strips of 240 columns: 512 lanes' worth) and
# the halo rows (20 loaded for 16), that is 450 M instructions, ~14 µs at 4 warp instructions a clock
# on 132 SMs at 1.83 GHz: the kernel is bound by instruction issue, its estimate ~30% of the HBM roof
# for bf16 (fp32 logits, 8.4 µs of DRAM: ~60%). The cuda backend's tile kernel keeps its windows in
# shared memory instead (docs/design.md §4.3).


@triton.jit
def _from_left(x, LANES: tl.constexpr, VEC: tl.constexpr):
    """[LANES, VEC] runs of consecutive columns: each column's left neighbour (lane 0's first column
    gets its own run's last). Even columns take the odd ones shifted by a run, odd columns the even
    ones: splits and joins within a thread cost no instruction, the one-column runs one shuffle."""
    if VEC == 1:
        lane = tl.arange(0, LANES)[:, None]
        return tl.gather(x, tl.maximum(lane - 1, 0), 0)
    else:
        even, odd = tl.split(tl.reshape(x, [LANES, VEC // 2, 2]))
        return tl.reshape(tl.join(_from_left(odd, LANES, VEC // 2), even), [LANES, VEC])


@triton.jit
def _from_right(x, LANES: tl.constexpr, VEC: tl.constexpr):
    """Each column's right neighbour (the last lane's last column gets its own run's first)."""
    if VEC == 1:
        lane = tl.arange(0, LANES)[:, None]
        return tl.gather(x, tl.minimum(lane + 1, LANES - 1), 0)
    else:
        even, odd = tl.split(tl.reshape(x, [LANES, VEC // 2, 2]))
        return tl.reshape(tl.join(odd, _from_right(even, LANES, VEC // 2)), [LANES, VEC])


@triton.jit
def _neighbours(x, left, right, LANES: tl.constexpr, VEC: tl.constexpr):
    """x at columns j - 1 and j + 1, replicate padding at the image's edges."""
    return tl.where(left, x, _from_left(x, LANES, VEC)), tl.where(right, x, _from_right(x, LANES, VEC))


@triton.jit
def _pairs(first, LANES: tl.constexpr, VEC: tl.constexpr):
    """channels_last with C = 2: the offsets of the (column, channel) elements of each lane's run, 2 VEC
    consecutive elements from the strip's first column `first` (written out, so that the compiler
    sees them contiguous)."""
    return 2 * first + tl.arange(0, LANES)[:, None] * (2 * VEC) + tl.arange(0, 2 * VEC)[None, :]


@triton.jit
def _margin(row_ptr, cols, in_image, first, stride_lc, stride_lw, W, C: tl.constexpr, PAIRED: tl.constexpr):
    """The foreground margin z on one row (C = 1: the logit; C = 2: l1 - l0). PAIRED: channels_last
    with C = 2, a pixel's two logits adjacent."""
    if PAIRED:
        pairs = _pairs(first, cols.shape[0], cols.shape[1])
        values = tl.load(row_ptr + pairs, mask=(pairs >= 0) & (pairs < 2 * W), other=0.0).to(tl.float32)
        background, foreground = tl.split(tl.reshape(values, [cols.shape[0], cols.shape[1], 2]))
        return foreground - background
    else:
        z = tl.load(row_ptr + (C - 1) * stride_lc + cols * stride_lw, mask=in_image, other=0.0).to(tl.float32)
        if C == 2:
            z = z - tl.load(row_ptr + cols * stride_lw, mask=in_image, other=0.0).to(tl.float32)
        return z


@triton.jit
def _direction(ex, ey):
    """EPE and its direction (ex, ey)/EPE, 0 where EPE = 0."""
    epe = tl.sqrt(ex * ex + ey * ey)
    inverse = tl.where(epe > 0, 1.0 / tl.where(epe > 0, epe, 1.0), 0.0)
    return epe, ex * inverse, ey * inverse


@triton.jit
def _nll_epe_kernel(
    logits_ptr, target_ptr, grad_map_ptr, loss_map_ptr, partial_ptr, gradient_ptr,
    H, W, stride_ln, stride_lc, stride_lh, stride_lw, stride_tn, stride_th, stride_tw,
    stride_gn, stride_gh, stride_gw, stride_on, stride_oc, stride_oh, stride_ow,
    alpha, gradient_scale,
    C: tl.constexpr, ROWS: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
    PAIRED: tl.constexpr, PAIRED_OUT: tl.constexpr,
    WRITE_MAP: tl.constexpr, SUM_LOSS: tl.constexpr, WRITE_GRADIENT: tl.constexpr, HAS_GRAD_MAP: tl.constexpr,
):
    # Grid (N · row tiles, strips): the batch shares axis 0 (axes 1 and 2 stop at 65,535).
    pid_w = tl.program_id(1)
    row_tiles = tl.cdiv(H, ROWS)
    n = tl.program_id(0) // row_tiles
    pid_h = tl.program_id(0) % row_tiles
    lane = tl.arange(0, LANES)[:, None]
    first = pid_w * ((LANES - 2) * VEC) - VEC  # the strip's first column (its halo lane's)
    cols = pid_w * ((LANES - 2) * VEC) + (lane - 1) * VEC + tl.arange(0, VEC)[None, :]
    in_image = (cols >= 0) & (cols < W)
    lane_ok = (lane >= 1) & (lane < LANES - 1)  # the lanes whose columns this program writes (not the halo)
    col_ok = lane_ok & (cols < W)
    left, right = cols == 0, cols == W - 1
    r0 = pid_h * ROWS
    r_end = tl.minimum(r0 + ROWS, H)
    logits_image = logits_ptr + n.to(tl.int64) * stride_ln
    target_image = target_ptr + n.to(tl.int64) * stride_tn
    zeros = tl.zeros([LANES, VEC], dtype=tl.float32)
    # d at rows t-2 (a) and t-1 (b); the NLL at t-1; p(1-p) at t-2 and t-1; the upstream gradient at t-2
    a, b, nll_b, spread_a, spread_b, g_a = zeros, zeros, zeros, zeros, zeros, zeros
    # the weighted EPE directions of rows t-3 (o) and t-2 (p)
    ox, oy, px, py = zeros, zeros, zeros, zeros
    acc = zeros
    halo = 2 if WRITE_GRADIENT else 1
    for t in range(r0 - halo, r_end + halo):
        row = tl.minimum(tl.maximum(t, 0), H - 1)
        z = _margin(logits_image + row.to(tl.int64) * stride_lh, cols, in_image, first, stride_lc, stride_lw, W, C, PAIRED)
        v = tl.load(target_image + row.to(tl.int64) * stride_th + cols * stride_tw, mask=in_image, other=0).to(tl.float32)
        e = tl.exp(-tl.abs(z))
        u = 1.0 + e
        inverse = 1.0 / u
        p = tl.where(z >= 0, inverse, e * inverse)
        d = p - v
        # log1p(e) = log(u) - ((u - 1) - e) / u, exact to rounding also where u == 1
        nll = tl.log(u) - ((u - 1.0) - e) * inverse + tl.where(z > 0, (1.0 - v) * z, -v * z)
        # Sobel at row q = t - 1 from rows t-2 (a), t-1 (b), t (d): smooth / difference down the rows
        smooth, difference = a + 2.0 * b + d, d - a
        smooth_l, smooth_r = _neighbours(smooth, left, right, LANES, VEC)
        difference_l, difference_r = _neighbours(difference, left, right, LANES, VEC)
        epe, dx, dy = _direction((smooth_r - smooth_l) * 0.125, (difference_l + 2.0 * difference + difference_r) * 0.125)
        q = t - 1
        q_ok = (q >= r0) & (q < r_end) & col_ok
        if SUM_LOSS:
            acc += tl.where(q_ok, nll_b + alpha * epe, 0.0)
        if WRITE_MAP:
            map_row = loss_map_ptr + (n.to(tl.int64) * H + tl.maximum(q, 0)) * W
            tl.store(map_row + cols, (nll_b + alpha * epe).to(loss_map_ptr.dtype.element_ty), mask=q_ok)
        if WRITE_GRADIENT:
            g_q = zeros + 1.0
            if HAS_GRAD_MAP:
                # q runs from r0 - 3 to r_end: clamped to the image at both ends
                q_row = tl.minimum(tl.maximum(q, 0), H - 1)
                g_row = grad_map_ptr + n.to(tl.int64) * stride_gn + q_row.to(tl.int64) * stride_gh
                g_q = tl.load(g_row + cols * stride_gw, mask=in_image, other=0.0).to(tl.float32)
                dx *= g_q
                dy *= g_q
            # the gradient at row r = t - 2 from the directions of rows r-1 (o), r (p), r+1 (dx, dy): the
            # adjoint of the stencils, the padded value at a border the pixel's own (smoothing) or its negation
            r = t - 2
            top, bottom = r == 0, r == H - 1
            smooth_adjoint = tl.where(top, px, ox) + 2.0 * px + tl.where(bottom, px, dx)
            difference_adjoint = tl.where(top, -py, oy) - tl.where(bottom, -py, dy)
            smooth_adjoint_l = tl.where(left, -smooth_adjoint, _from_left(smooth_adjoint, LANES, VEC))
            smooth_adjoint_r = tl.where(right, -smooth_adjoint, _from_right(smooth_adjoint, LANES, VEC))
            difference_adjoint_l, difference_adjoint_r = _neighbours(difference_adjoint, left, right, LANES, VEC)
            through_epe = (
                smooth_adjoint_l - smooth_adjoint_r + difference_adjoint_l + 2.0 * difference_adjoint + difference_adjoint_r
            ) * 0.125
            weight = g_a if HAS_GRAD_MAP else 1.0
            grad = gradient_scale * (weight * a + alpha * spread_a * through_epe)
            r_ok = (r >= r0) & (r < r_end) & col_ok
            out_row = gradient_ptr + n.to(tl.int64) * stride_on + tl.maximum(r, 0).to(tl.int64) * stride_oh
            if PAIRED_OUT:
                pairs = _pairs(first, LANES, VEC)
                pair_ok = (r >= r0) & (r < r_end) & lane_ok & (pairs < 2 * W)
                values = tl.reshape(tl.join(-grad, grad), [LANES, 2 * VEC]).to(gradient_ptr.dtype.element_ty)
                tl.store(out_row + pairs, values, mask=pair_ok)
            else:
                tl.store(out_row + (C - 1) * stride_oc + cols * stride_ow, grad.to(gradient_ptr.dtype.element_ty), mask=r_ok)
                if C == 2:
                    tl.store(out_row + cols * stride_ow, (-grad).to(gradient_ptr.dtype.element_ty), mask=r_ok)
            ox, oy, px, py = px, py, dx, dy
            spread_a, spread_b, g_a = spread_b, p * (1.0 - p), g_q
        a, b, nll_b = b, d, nll
    if SUM_LOSS:
        tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + pid_w, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _scale_kernel(gradient_ptr, factor_ptr, numel, BLOCK: tl.constexpr):
    """gradient *= factor in place; nothing to read or write where factor == 1 (decided on the device)."""
    factor = tl.load(factor_ptr).to(tl.float32)
    if factor != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        values = tl.load(gradient_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(gradient_ptr + offsets, (values * factor).to(gradient_ptr.dtype.element_ty), mask=mask)


def _tiling(logits: torch.Tensor) -> tuple[int, int, int]:
    """(ROWS, LANES, VEC): VEC columns a lane (16 bytes of logits), one warp of 32 lanes a strip. The
    interpreter gets 4 lanes and 8 rows, so tests cross strip and row-tile borders with the GPU's VEC."""
    vec = 16 // logits.element_size()
    if backends.triton_interpreted():
        return 8, 4, vec
    return 16, 32, vec


def _strips(width: int, lanes: int, vec: int) -> int:
    return triton.cdiv(width, (lanes - 2) * vec)


def _pairs_adjacent(x: torch.Tensor) -> bool:
    """channels_last with C = 2: a pixel's two logits adjacent."""
    return x.shape[1] == 2 and x.stride(1) == 1 and x.stride(3) == 2


def _launch(logits, target, alpha, *, loss_map=None, partials=None, gradient=None, gradient_scale=1.0, grad_map=None):
    n, c, h, w = logits.shape
    rows, lanes, vec = _tiling(logits)
    target = target.view(torch.uint8) if target.dtype == torch.bool else target
    grad_strides = grad_map.stride() if grad_map is not None else (0, 0, 0)
    out_strides = gradient.stride() if gradient is not None else (0, 0, 0, 0)
    grid = (n * triton.cdiv(h, rows), _strips(w, lanes, vec))
    backends.launch(
        _nll_epe_kernel, grid, logits, target, grad_map if grad_map is not None else logits,
        loss_map if loss_map is not None else logits, partials if partials is not None else logits,
        gradient if gradient is not None else logits,
        h, w, *logits.stride(), *target.stride(), *grad_strides, *out_strides,
        alpha, gradient_scale,
        C=c, ROWS=rows, LANES=lanes, VEC=vec,
        PAIRED=_pairs_adjacent(logits), PAIRED_OUT=gradient is not None and _pairs_adjacent(gradient),
        WRITE_MAP=loss_map is not None, SUM_LOSS=partials is not None,
        WRITE_GRADIENT=gradient is not None, HAS_GRAD_MAP=grad_map is not None,
        num_warps=1,
    )


def forward(logits, target, alpha, reduction, compute_grad):
    n, _, h, w = logits.shape
    if reduction == "none":
        loss_map = backends.new_output((n, h, w), dtype=logits.dtype, device=logits.device)
        _launch(logits, target, alpha, loss_map=loss_map)
        return loss_map, logits.new_empty(0)
    rows, lanes, vec = _tiling(logits)
    partials = backends.new_output(
        (n * triton.cdiv(h, rows) * _strips(w, lanes, vec),), dtype=torch.float32, device=logits.device
    )
    gradient = _new_gradient(logits) if compute_grad else None
    gradient_scale = _saved_gradient_scale(logits.dtype, reduction, n * h * w)
    _launch(logits, target, alpha, partials=partials, gradient=gradient, gradient_scale=gradient_scale)
    loss = (partials.sum() * (1.0 / (n * h * w) if reduction == "mean" else 1.0)).to(logits.dtype)
    return loss, gradient if gradient is not None else logits.new_empty(0)


def backward(grad_loss, logits, target, alpha):
    gradient = _new_gradient(logits)
    _launch(logits, target, alpha, gradient=gradient, grad_map=grad_loss)
    return gradient


def scale(gradient, grad_loss):
    block = backends.ELEMENTWISE_BLOCK
    backends.launch(_scale_kernel, (triton.cdiv(gradient.numel(), block),), gradient, grad_loss, gradient.numel(), BLOCK=block)

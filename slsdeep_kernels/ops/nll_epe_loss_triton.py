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

# One program streams down ROWS rows of a strip of BLOCK_W columns of one image, carrying the last two
# rows of d = p - v and of the EPE direction in registers: the Sobel derivatives at row t-1 and the
# gradient at row t-2 are formed when row t arrives. Column neighbours come from loads at shifted
# (clamped) columns: d at columns j-2..j+2 (j-1..j+1 without gradient), so each program recomputes a
# few exponentials instead of exchanging registers. The loss is reduced per program into one partial;
# the partials are summed in a fixed order.


@triton.jit
def _difference_at(logits_row, target_row, cols, stride_lc, stride_lw, stride_tw, C: tl.constexpr):
    """(z, v, e, p) at the given (clamped) columns of one row: margin, mask, exp(-|z|), sigmoid(z)."""
    z = tl.load(logits_row + (C - 1) * stride_lc + cols * stride_lw).to(tl.float32)
    if C == 2:
        z = z - tl.load(logits_row + cols * stride_lw).to(tl.float32)
    v = tl.load(target_row + cols * stride_tw).to(tl.float32)
    e = tl.exp(-tl.abs(z))
    inverse = 1.0 / (1.0 + e)
    p = tl.where(z >= 0, inverse, e * inverse)
    return z, v, e, p


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
    C: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
    WRITE_MAP: tl.constexpr, SUM_LOSS: tl.constexpr, WRITE_GRADIENT: tl.constexpr, HAS_GRAD_MAP: tl.constexpr,
):
    # Grid (N · row tiles, column tiles): the batch shares axis 0 (axes 1 and 2 stop at 65,535).
    pid_w = tl.program_id(1)
    row_tiles = tl.cdiv(H, ROWS)
    n = tl.program_id(0) // row_tiles
    pid_h = tl.program_id(0) % row_tiles
    cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    col_ok = cols < W
    c_m2 = tl.minimum(tl.maximum(cols - 2, 0), W - 1)
    c_m1 = tl.minimum(tl.maximum(cols - 1, 0), W - 1)
    c_0 = tl.minimum(cols, W - 1)
    c_p1 = tl.minimum(cols + 1, W - 1)
    c_p2 = tl.minimum(cols + 2, W - 1)
    left, right = cols == 0, cols == W - 1
    r0 = pid_h * ROWS
    r_end = tl.minimum(r0 + ROWS, H)
    logits_image = logits_ptr + n.to(tl.int64) * stride_ln
    target_image = target_ptr + n.to(tl.int64) * stride_tn
    zeros = tl.zeros([BLOCK_W], dtype=tl.float32)
    # rows t-2 (a_*) and t-1 (b_*) of d at column shifts -2..2; NLL, p(1-p), upstream gradient (centre)
    a_m2, a_m1, a_0, a_p1, a_p2 = zeros, zeros, zeros, zeros, zeros
    b_m2, b_m1, b_0, b_p1, b_p2 = zeros, zeros, zeros, zeros, zeros
    nll_b, spread_a, spread_b, g_a = zeros, zeros, zeros, zeros
    # EPE directions of rows t-3 (older) and t-2 (old) at column shifts -1..1
    ox_m1, ox_0, ox_p1, oy_m1, oy_0, oy_p1 = zeros, zeros, zeros, zeros, zeros, zeros
    px_m1, px_0, px_p1, py_m1, py_0, py_p1 = zeros, zeros, zeros, zeros, zeros, zeros
    acc = zeros
    halo = 2 if WRITE_GRADIENT else 1
    for t in range(r0 - halo, r_end + halo):
        row = tl.minimum(tl.maximum(t, 0), H - 1)
        logits_row = logits_image + row.to(tl.int64) * stride_lh
        target_row = target_image + row.to(tl.int64) * stride_th
        z, v, e, p = _difference_at(logits_row, target_row, c_0, stride_lc, stride_lw, stride_tw, C)
        d_0 = p - v
        u = 1.0 + e  # log1p(e) = log(u) - ((u - 1) - e) / u, exact to rounding also where u == 1
        nll = tl.log(u) - ((u - 1.0) - e) / u + tl.where(z > 0, (1.0 - v) * z, -v * z)
        _, v_m1, _, p_m1 = _difference_at(logits_row, target_row, c_m1, stride_lc, stride_lw, stride_tw, C)
        _, v_p1, _, p_p1 = _difference_at(logits_row, target_row, c_p1, stride_lc, stride_lw, stride_tw, C)
        d_m1, d_p1 = p_m1 - v_m1, p_p1 - v_p1
        # Sobel at row q = t - 1 from rows t-2 (a), t-1 (b), t (d): smooth / difference down the rows
        s_m1, s_0, s_p1 = a_m1 + 2.0 * b_m1 + d_m1, a_0 + 2.0 * b_0 + d_0, a_p1 + 2.0 * b_p1 + d_p1
        v_dm1, v_d0, v_dp1 = d_m1 - a_m1, d_0 - a_0, d_p1 - a_p1
        epe, dx_0, dy_0 = _direction((s_p1 - s_m1) * 0.125, (v_dm1 + 2.0 * v_d0 + v_dp1) * 0.125)
        q = t - 1
        q_ok = (q >= r0) & (q < r_end) & col_ok
        if SUM_LOSS:
            acc += tl.where(q_ok, nll_b + alpha * epe, 0.0)
        if WRITE_MAP:
            tl.store(loss_map_ptr + (n.to(tl.int64) * H + q) * W + cols, nll_b + alpha * epe, mask=q_ok)
        if WRITE_GRADIENT:
            _, v_m2, _, p_m2 = _difference_at(logits_row, target_row, c_m2, stride_lc, stride_lw, stride_tw, C)
            _, v_p2, _, p_p2 = _difference_at(logits_row, target_row, c_p2, stride_lc, stride_lw, stride_tw, C)
            d_m2, d_p2 = p_m2 - v_m2, p_p2 - v_p2
            s_m2, s_p2 = a_m2 + 2.0 * b_m2 + d_m2, a_p2 + 2.0 * b_p2 + d_p2
            v_dm2, v_dp2 = d_m2 - a_m2, d_p2 - a_p2
            _, dx_m1, dy_m1 = _direction((s_0 - s_m2) * 0.125, (v_dm2 + 2.0 * v_dm1 + v_d0) * 0.125)
            _, dx_p1, dy_p1 = _direction((s_p2 - s_0) * 0.125, (v_d0 + 2.0 * v_dp1 + v_dp2) * 0.125)
            g_q = zeros + 1.0
            if HAS_GRAD_MAP:
                # q runs from r0 - 3 to r_end: clamped to the image at both ends (the loads are unmasked)
                q_row = tl.minimum(tl.maximum(q, 0), H - 1)
                g_row = grad_map_ptr + n.to(tl.int64) * stride_gn + q_row.to(tl.int64) * stride_gh
                g_q = tl.load(g_row + c_0 * stride_gw).to(tl.float32)
                dx_m1 *= tl.load(g_row + c_m1 * stride_gw).to(tl.float32)
                dy_m1 *= tl.load(g_row + c_m1 * stride_gw).to(tl.float32)
                dx_p1 *= tl.load(g_row + c_p1 * stride_gw).to(tl.float32)
                dy_p1 *= tl.load(g_row + c_p1 * stride_gw).to(tl.float32)
                dx_0 *= g_q
                dy_0 *= g_q
            # gradient at row r = t - 2 from the directions of rows r-1 (o), r (p), r+1 (dx/dy): the adjoint
            # of the stencils, the padded value at a border being the pixel's own (smoothing) or its negation
            r = t - 2
            top, bottom = r == 0, r == H - 1
            h_m1 = tl.where(top, px_m1, ox_m1) + 2.0 * px_m1 + tl.where(bottom, px_m1, dx_m1)
            h_0 = tl.where(top, px_0, ox_0) + 2.0 * px_0 + tl.where(bottom, px_0, dx_0)
            h_p1 = tl.where(top, px_p1, ox_p1) + 2.0 * px_p1 + tl.where(bottom, px_p1, dx_p1)
            k_m1 = tl.where(top, -py_m1, oy_m1) - tl.where(bottom, -py_m1, dy_m1)
            k_0 = tl.where(top, -py_0, oy_0) - tl.where(bottom, -py_0, dy_0)
            k_p1 = tl.where(top, -py_p1, oy_p1) - tl.where(bottom, -py_p1, dy_p1)
            through_epe = (
                tl.where(left, -h_0, h_m1) - tl.where(right, -h_0, h_p1)
                + tl.where(left, k_0, k_m1) + 2.0 * k_0 + tl.where(right, k_0, k_p1)
            ) * 0.125
            weight = g_a if HAS_GRAD_MAP else 1.0
            grad = gradient_scale * (weight * a_0 + alpha * spread_a * through_epe)
            r_ok = (r >= r0) & (r < r_end) & col_ok
            out = gradient_ptr + n.to(tl.int64) * stride_on + tl.maximum(r, 0).to(tl.int64) * stride_oh + cols * stride_ow
            tl.store(out + (C - 1) * stride_oc, grad.to(gradient_ptr.dtype.element_ty), mask=r_ok)
            if C == 2:
                tl.store(out, (-grad).to(gradient_ptr.dtype.element_ty), mask=r_ok)
            ox_m1, ox_0, ox_p1, oy_m1, oy_0, oy_p1 = px_m1, px_0, px_p1, py_m1, py_0, py_p1
            px_m1, px_0, px_p1, py_m1, py_0, py_p1 = dx_m1, dx_0, dx_p1, dy_m1, dy_0, dy_p1
            a_m2, b_m2, a_p2, b_p2 = b_m2, d_m2, b_p2, d_p2
            spread_a, spread_b, g_a = spread_b, p * (1.0 - p), g_q
        a_m1, a_0, a_p1 = b_m1, b_0, b_p1
        b_m1, b_0, b_p1 = d_m1, d_0, d_p1
        nll_b = nll
    if SUM_LOSS:
        tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + pid_w, tl.sum(acc, axis=0))


@triton.jit
def _scale_kernel(gradient_ptr, factor_ptr, numel, BLOCK: tl.constexpr):
    """gradient *= factor in place; nothing to read or write where factor == 1 (decided on the device)."""
    factor = tl.load(factor_ptr).to(tl.float32)
    if factor != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        values = tl.load(gradient_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(gradient_ptr + offsets, (values * factor).to(gradient_ptr.dtype.element_ty), mask=mask)


def _tiling(width: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_W, num_warps). The interpreter gets small tiles so tests cross tile borders."""
    if backends.triton_interpreted():
        return 8, 16, 1
    block_w = min(triton.next_power_of_2(width), 128)
    return 32, block_w, max(1, block_w // 32)


def _launch(logits, target, alpha, *, loss_map=None, partials=None, gradient=None, gradient_scale=1.0, grad_map=None):
    n, c, h, w = logits.shape
    rows, block_w, num_warps = _tiling(w)
    target = target.view(torch.uint8) if target.dtype == torch.bool else target
    grad_strides = grad_map.stride() if grad_map is not None else (0, 0, 0)
    out_strides = gradient.stride() if gradient is not None else (0, 0, 0, 0)
    grid = (n * triton.cdiv(h, rows), triton.cdiv(w, block_w))
    backends.launch(
        _nll_epe_kernel, grid, logits, target, grad_map if grad_map is not None else logits,
        loss_map if loss_map is not None else logits, partials if partials is not None else logits,
        gradient if gradient is not None else logits,
        h, w, *logits.stride(), *target.stride(), *grad_strides, *out_strides,
        alpha, gradient_scale,
        C=c, ROWS=rows, BLOCK_W=block_w,
        WRITE_MAP=loss_map is not None, SUM_LOSS=partials is not None,
        WRITE_GRADIENT=gradient is not None, HAS_GRAD_MAP=grad_map is not None,
        num_warps=num_warps,
    )


def forward(logits, target, alpha, reduction, compute_grad):
    n, _, h, w = logits.shape
    if reduction == "none":
        loss_map = backends.new_output((n, h, w), dtype=logits.dtype, device=logits.device)
        _launch(logits, target, alpha, loss_map=loss_map)
        return loss_map, logits.new_empty(0)
    rows, block_w, _ = _tiling(w)
    partials = backends.new_output(
        (n * triton.cdiv(h, rows) * triton.cdiv(w, block_w),), dtype=torch.float32, device=logits.device
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

"""Fused NLL + EPE loss (docs/design.md §4.3): binary negative log-likelihood from the logits plus
``alpha`` times the end-point error of the Sobel derivatives of the foreground probability against
those of the mask. Differentiable with respect to the logits; usable as a boundary-aware loss by any
binary segmentation model.

Maths, per pixel, with ``z`` the foreground logit margin (C = 1: the logit; C = 2: ``l1 - l0``, so
``softmax(l)[1] = sigmoid(z)``), ``p = sigmoid(z)`` and ``v`` the mask value::

    NLL = v·softplus(-z) + (1-v)·softplus(z)  (= -[v·log p + (1-v)·log(1-p)], never from a clamped p)
    d = p - v,  (Ex, Ey) = Sobel(d) = (Mx - Gx, My - Gy)   (the stencils are linear: one pass on d)
    EPE = sqrt(Ex² + Ey²)
    ∂loss_sum/∂z(r) = d(r) + alpha · p(1-p)(r) · Σ_q [Ex, Ey](q)/EPE(q) · ∂(Ex, Ey)(q)/∂d(r)

with the Sobel stencils ``Kx = 1/8·[[-1,0,1],[-2,0,2],[-1,0,1]]``, ``Ky = Kxᵀ`` (cross-correlation,
replicate padding) and the direction ``[Ex, Ey]/EPE`` taken as 0 where ``EPE = 0``. The sum over the
3×3 neighbours q of r is the adjoint of the stencils: along each axis the adjoint of the replicate-padded
smoothing [1, 2, 1] is the same smoothing, that of the difference [-1, 0, 1] is the difference with the
border value negated (see ``csrc/common/nll_epe_loss.h``). With C = 2 the gradient is ``∓∂/∂z`` on
channels 0 and 1.

Backward. mean/sum: the forward writes the gradient for a unit upstream gradient in the same pass
(when one is needed); backward scales it in place by the scalar ``grad_output`` (no work where it
is 1, decided on the device) and hands it out, so the loss allocates one logits-sized tensor in all.
(fp16 logits save the gradient of the sum instead, and backward's factor carries the mean's 1/(N·H·W):
pre-scaled it would be subnormal in fp16 at any realistic N·H·W; see ``_saved_gradient_scale``.)
none: a separate kernel gathers g(q)·∂EPE(q)/∂p(r) over the 3×3 neighbours q (a 2-pixel halo).

Floors, per pixel, for fp32 logits with C = 2 and a uint8 mask: bytes = one read of logits and mask
(9 B) plus one write of the gradient (8 B) = 17 B: 8.9 MB at (8, 2, 256, 256), ~0.6 ms at ~15 GB/s
(2 CPU cores); 285 MB at (64, 2, 512, 512), 85 µs at an H100's 3.35 TB/s. FLOPs ≈ 70 (one exp, one
log, three divisions, a square root, the stencils and their adjoints): 37 MFLOP at (8, 2, 256, 256),
far below either peak, so the op is memory-bound on a GPU and bound by the exp/log/division
throughput on a CPU. A ``grad_output`` other than 1 costs one more read and write of the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from slsdeep_kernels import backend as backends

OP = "nll_epe_loss"
REDUCTIONS = ("none", "mean", "sum")
TARGET_DTYPES = (torch.bool, torch.uint8, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _saved_gradient_scale(dtype: torch.dtype, reduction: str, pixels: int) -> float:
    """The factor the forward applies to the gradient it saves for mean/sum: the mean's 1/(N·H·W),
    except for fp16 logits, where that product lands in subnormals (below 2^-14 once N·H·W > 16384)
    before the upstream gradient (a loss scale) multiplies it; there the gradient of the sum is saved
    and backward's factor carries the 1/(N·H·W). Same rule as ``saved_gradient_scale`` in
    ``csrc/common/nll_epe_loss.h`` (the compiled kernels)."""
    return 1.0 / pixels if reduction == "mean" and dtype != torch.float16 else 1.0


def _new_gradient(logits: Tensor) -> Tensor:
    return backends.new_output(logits.shape, dtype=logits.dtype, device=logits.device, memory_format=backends.preserved_format(logits))

# ---------------------------------------------------------------------------------------------
# 1. Reference: plain differentiable PyTorch. This is the spec.
# ---------------------------------------------------------------------------------------------

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8


def _sobel(image: Tensor) -> Tensor:
    """(N, H, W) -> (N, 2, H, W): x (along the width) and y derivatives, replicate padding."""
    weight = torch.stack([_SOBEL_X, _SOBEL_X.T]).unsqueeze(1).to(image)
    return F.conv2d(F.pad(image.unsqueeze(1), (1, 1, 1, 1), mode="replicate"), weight)


def reference(logits: Tensor, target: Tensor, alpha: float = 0.5, reduction: str = "mean") -> Tensor:
    """NLL + alpha·EPE of ``logits (N, C, H, W)`` (C = 1 sigmoid, C = 2 softmax) against ``target (N, H, W)``.

    fp16/bf16 logits are computed in fp32 and the loss is returned in the logits' dtype.
    """
    compute = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    mask = target.to(compute.dtype)
    if compute.shape[1] == 2:
        log_probability = F.log_softmax(compute, dim=1)
        log_foreground, log_background = log_probability[:, 1], log_probability[:, 0]
    else:
        log_foreground, log_background = F.logsigmoid(compute[:, 0]), F.logsigmoid(-compute[:, 0])
    nll = -(mask * log_foreground + (1 - mask) * log_background)
    epe = torch.linalg.vector_norm(_sobel(log_foreground.exp()) - _sobel(mask), dim=1)
    per_pixel = nll + alpha * epe
    if reduction == "mean":
        per_pixel = per_pixel.mean()
    elif reduction == "sum":
        per_pixel = per_pixel.sum()
    return per_pixel.to(logits.dtype)


# ---------------------------------------------------------------------------------------------
# 2. Triton kernels and their launchers.
# ---------------------------------------------------------------------------------------------


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


def _triton_tiling(width: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_W, num_warps). The interpreter gets small tiles so tests cross tile borders."""
    if backends.triton_interpreted():
        return 8, 16, 1
    block_w = min(triton.next_power_of_2(width), 128)
    return 32, block_w, max(1, block_w // 32)


def _triton_launch(logits, target, alpha, *, loss_map=None, partials=None, gradient=None, gradient_scale=1.0, grad_map=None):
    n, c, h, w = logits.shape
    rows, block_w, num_warps = _triton_tiling(w)
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


def _triton_forward(logits, target, alpha, reduction, compute_grad):
    n, _, h, w = logits.shape
    if reduction == "none":
        loss_map = backends.new_output((n, h, w), dtype=logits.dtype, device=logits.device)
        _triton_launch(logits, target, alpha, loss_map=loss_map)
        return loss_map, logits.new_empty(0)
    rows, block_w, _ = _triton_tiling(w)
    partials = backends.new_output(
        (n * triton.cdiv(h, rows) * triton.cdiv(w, block_w),), dtype=torch.float32, device=logits.device
    )
    gradient = _new_gradient(logits) if compute_grad else None
    gradient_scale = _saved_gradient_scale(logits.dtype, reduction, n * h * w)
    _triton_launch(logits, target, alpha, partials=partials, gradient=gradient, gradient_scale=gradient_scale)
    loss = (partials.sum() * (1.0 / (n * h * w) if reduction == "mean" else 1.0)).to(logits.dtype)
    return loss, gradient if gradient is not None else logits.new_empty(0)


def _triton_backward(grad_loss, logits, target, alpha):
    gradient = _new_gradient(logits)
    _triton_launch(logits, target, alpha, gradient=gradient, grad_map=grad_loss)
    return gradient


def _triton_scale(gradient, grad_loss):
    block = 1024
    backends.launch(_scale_kernel, (triton.cdiv(gradient.numel(), block),), gradient, grad_loss, gradient.numel(), BLOCK=block)


# ---------------------------------------------------------------------------------------------
# 3. Custom ops: forward, backward of the per-pixel map, in-place scaling of the saved gradient.
# ---------------------------------------------------------------------------------------------


def _compiled():
    return torch.ops.slsdeep_kernels


@torch.library.custom_op("slsdeep_kernels::nll_epe_loss", mutates_args=())
def _loss_op(
    logits: Tensor, target: Tensor, alpha: float, reduction: str, compute_grad: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """(loss, gradient): for mean/sum with ``compute_grad`` the gradient of the loss w.r.t. the logits
    (for a unit upstream gradient), computed in the same pass; otherwise an empty tensor."""
    if backend == "triton":
        return _triton_forward(logits, target, alpha, reduction, compute_grad)
    return _compiled().nll_epe_loss_kernel(logits, target, alpha, REDUCTIONS.index(reduction), compute_grad)


@_loss_op.register_fake
def _(logits, target, alpha, reduction, compute_grad, backend):
    n, _, h, w = logits.shape
    loss = logits.new_empty((n, h, w) if reduction == "none" else ())
    if compute_grad and reduction != "none":
        return loss, torch.empty(logits.shape, dtype=logits.dtype, device=logits.device, memory_format=backends.preserved_format(logits))
    return loss, logits.new_empty(0)


@torch.library.custom_op("slsdeep_kernels::nll_epe_loss_backward", mutates_args=())
def _backward_op(grad_loss: Tensor, logits: Tensor, target: Tensor, alpha: float, backend: str) -> Tensor:
    """Gradient w.r.t. the logits of the per-pixel loss map (reduction none) for the upstream ``grad_loss``."""
    if backend == "triton":
        return _triton_backward(grad_loss, logits, target, alpha)
    return _compiled().nll_epe_loss_backward_kernel(grad_loss, logits, target, alpha)


@_backward_op.register_fake
def _(grad_loss, logits, target, alpha, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device, memory_format=backends.preserved_format(logits))


def _no_double_backward(ctx, grad):
    raise RuntimeError(f"{OP}: double backward is not supported")


_backward_op.register_autograd(_no_double_backward)


@torch.library.custom_op("slsdeep_kernels::nll_epe_loss_scale_", mutates_args=("gradient",))
def _scale_op(gradient: Tensor, grad_loss: Tensor, backend: str) -> None:
    """``gradient *= grad_loss`` (a scalar) in place; no work where ``grad_loss == 1`` (decided on the device)."""
    if backend == "triton":
        _triton_scale(gradient, grad_loss)
    else:
        _compiled().nll_epe_loss_scale_kernel(gradient, grad_loss)


@_scale_op.register_fake
def _(gradient, grad_loss, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, target, alpha, reduction, compute_grad, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no logits-sized zeros for the non-differentiable gradient output
    ctx.alpha, ctx.reduction, ctx.backend = alpha, reduction, backend
    # what backward's factor still carries of the mean's 1/(N·H·W) (see _saved_gradient_scale)
    n, _, h, w = logits.shape
    mean = 1.0 / (n * h * w) if reduction == "mean" else 1.0
    ctx.deferred_scale = mean / _saved_gradient_scale(logits.dtype, reduction, n * h * w)
    ctx.scaled_by = None  # the upstream gradient the saved gradient was scaled by in place
    if reduction == "none":
        ctx.save_for_backward(logits, target)
    else:
        ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_of_gradient):
    if torch.is_grad_enabled():  # backward(create_graph=True)
        raise RuntimeError(f"{OP}: double backward is not supported")
    if grad_loss is None:
        return None, None, None, None, None, None
    if ctx.reduction == "none":
        logits, target = ctx.saved_tensors
        return _backward_op(grad_loss, logits, target, ctx.alpha, ctx.backend), None, None, None, None, None
    (gradient,) = ctx.saved_tensors
    if gradient.numel() == 0:
        raise RuntimeError(f"{OP}: the forward ran with compute_grad=False; no gradient was computed")
    return _scaled_gradient(ctx, gradient, grad_loss), None, None, None, None, None


def _scaled_gradient(ctx, gradient: Tensor, grad_loss: Tensor) -> Tensor:
    """The saved gradient times the scalar upstream gradient.

    Eager, first backward: scaled in place and handed out, so the only logits-sized allocation of the
    loss is that gradient (``.data``: the saved tensor's version stays valid for a retained graph).
    Traced by the compiler (which plans buffers itself), or a second backward through a retained graph
    (the saved tensor now holds ``gradient · first grad_loss``): out of place.
    """
    if ctx.deferred_scale != 1.0:
        grad_loss = grad_loss.detach().float() * ctx.deferred_scale  # a scalar op on the device: no sync
    if type(gradient) is Tensor and ctx.scaled_by is None:
        _scale_op(gradient.data, grad_loss, ctx.backend)
        ctx.scaled_by = grad_loss.detach().clone()
        return gradient
    factor = grad_loss.double()
    if ctx.scaled_by is not None:  # rare: sync to refuse what cannot be undone
        if bool(ctx.scaled_by == 0):
            raise RuntimeError(
                f"{OP}: a second backward through a retained graph needs the saved gradient, which the first "
                "backward scaled in place by grad_output = 0; recompute the loss instead"
            )
        factor = factor / ctx.scaled_by.double()
    compute = torch.promote_types(gradient.dtype, torch.float32)
    return (gradient.to(compute) * factor.to(compute)).to(gradient.dtype)


_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# 4. The public function.
# ---------------------------------------------------------------------------------------------


def _validate(logits: Tensor, target: Tensor, alpha: float, reduction: str) -> torch.device:
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise ValueError(f"{OP}: logits and target must be tensors; got {type(logits).__name__}, {type(target).__name__}")
    if logits.dim() != 4 or logits.shape[1] not in (1, 2):
        raise ValueError(
            f"{OP}: logits must have shape (N, C, H, W) with C = 1 (sigmoid) or C = 2 (softmax); "
            f"got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"{OP}: logits must be a floating-point tensor; got dtype {logits.dtype}")
    n, _, h, w = logits.shape
    if n * h * w == 0:
        raise ValueError(f"{OP}: logits must not be empty (N, H, W >= 1); got shape {tuple(logits.shape)}")
    if tuple(target.shape) != (n, h, w):
        raise ValueError(
            f"{OP}: target must have shape (N, H, W) = {(n, h, w)} to match logits {tuple(logits.shape)}; "
            f"got {tuple(target.shape)}"
        )
    if target.dtype not in TARGET_DTYPES:
        raise ValueError(f"{OP}: target must be bool, uint8, int64 or floating point (values 0/1); got dtype {target.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{OP}: alpha must be a real number; got {alpha!r}")
    return backends.common_device(OP, logits=logits, target=target)


def _check_target_values(target: Tensor) -> None:
    """The {0, 1} check of the target (syncs a GPU)."""
    if target.dtype == torch.bool:
        return
    outside = (target != 0) & (target != 1)
    if bool(outside.any()):
        raise ValueError(f"{OP}: target values must be 0 or 1; found {target[outside][0].item()!r}")


def nll_epe_loss(
    logits: Tensor,
    target: Tensor,
    alpha: float = 0.5,
    reduction: str = "mean",
    backend: str | None = None,
    check_target: bool = True,
) -> Tensor:
    """NLL + ``alpha``·EPE loss of binary segmentation ``logits (N, C, H, W)`` against ``target (N, H, W)``.

    C = 1: sigmoid of the logit; C = 2: softmax over the two channels (class 1 is the foreground).
    ``target``: bool, uint8, int64 or float with values in {0, 1} (checked when ``check_target``: the
    check syncs a GPU and is skipped under ``torch.compile``). ``reduction``: "mean" (over the N·H·W
    pixels), "sum" or "none" (the per-pixel map (N, H, W)). The gradient flows to the logits only.
    Under autocast the loss runs in fp32. ``backend``: see :mod:`slsdeep_kernels.backend`.
    """
    device = _validate(logits, target, alpha, reduction)
    if check_target and not torch.compiler.is_compiling():
        _check_target_values(target)
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        with torch.autocast(device.type, enabled=False):
            return _dispatch(logits.float(), target, float(alpha), reduction, backend)
    return _dispatch(logits, target, float(alpha), reduction, backend)


def _dispatch(logits: Tensor, target: Tensor, alpha: float, reduction: str, backend: str | None) -> Tensor:
    name = backends.resolve(OP, logits.device, logits.dtype, backend)
    if name == "reference":
        return reference(logits, target, alpha, reduction)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    return _loss_op(logits, target, alpha, reduction, compute_grad, name)[0]

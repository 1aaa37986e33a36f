"""Triton kernels of conv + BatchNorm (+ ReLU) and their launchers (the maths:
:mod:`slsdeep_kernels.ops.conv_bn_relu`, docs/design.md §4.1). Imported only when the ``triton``
backend runs (``backend.triton_kernels``).

* eval: an implicit-GEMM convolution with the folded BatchNorm and the ReLU in its epilogue;
* train: the convolution through ATen, one statistics pass (per-part partials merged in a fixed order)
  and one normalise + affine + ReLU pass; backward: one reduction and one elementwise pass with the
  ReLU mask fused, then the convolution's backward through ATen.

Launchers, called by the op's custom ops: :func:`eval_forward`, :func:`train_forward`, :func:`train_backward`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from slsdeep_kernels import backend as backends
from slsdeep_kernels.ops.conv_bn_relu import _conv_backward, _output_size

ENV_PIN_AUTOTUNE = "SLSDEEP_KERNELS_PIN_AUTOTUNE"


def _conv_configs(pinned: bool | None = None):
    """The conv's autotune configs (read at import). ``$SLSDEEP_KERNELS_PIN_AUTOTUNE=1`` pins the first:
    a GPU test run then compiles one config per shape instead of six (one test runs them all)."""
    if pinned is None:
        pinned = os.environ.get(ENV_PIN_AUTOTUNE, "0") == "1"
    if backends.triton_interpreted():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4)]
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in (
            (128, 128, 64, 8, 3),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
            (128, 128, 32, 4, 4),
        )  # (256, 128, 64, 8 warps, 3 stages) needed 294,912 B of shared memory in fp32: above sm_90's limit
    ]
    return configs[:1] if pinned else configs


# X_CHANNELS_LAST only keys the tuning (the best tiles differ between the layouts).
@triton.autotune(configs=_conv_configs(), key=["C_in", "C_out", "M", "KH", "KW", "X_CHANNELS_LAST"])
@triton.jit
def _conv_bn_act_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
    C_in, C_out, H, W, OH, OW, M,  # C_in, C_out: channels per group; M = N·OH·OW
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, son, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, eps,
    KH: tl.constexpr, KW: tl.constexpr, X_CHANNELS_LAST: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, RELU: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Implicit GEMM: rows = output pixels (n, oh, ow), columns = output channels of one group,
    reduction over (kh, kw, input channel). The epilogue folds eval BN and applies the ReLU."""
    # One grid axis (axes 1 and 2 stop at 65,535): m tiles fastest, then column tiles, then groups.
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    n_tiles = tl.cdiv(C_out, BLOCK_N)
    pid_m = pid % m_tiles
    pid_n = (pid // m_tiles) % n_tiles
    group = pid // (m_tiles * n_tiles)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < C_out
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    nb = (offs_m // (OW * OH)).to(tl.int64)
    co = (group * C_out + offs_n).to(tl.int64)
    ci0 = group * C_in
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        for kw in range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            valid = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_rows = x_ptr + nb * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            b_cols = w_ptr + co * swo + kh * swh + kw * sww
            for k0 in range(0, C_in, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < C_in
                a = tl.load(
                    a_rows[:, None] + (ci0 + offs_k).to(tl.int64)[None, :] * sxc,
                    mask=valid[:, None] & k_mask[None, :],
                    other=0.0,
                )
                b = tl.load(b_cols[None, :] + offs_k[:, None] * swi, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                if DOT_FP32:  # the interpreter's bf16 dot is wrong
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    # BN folded on the fly, in fp32: out = acc·scale + (b − μ)·scale + β.
    var = tl.load(var_ptr + co, mask=n_mask, other=1.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(var + eps)
    centre = -tl.load(mean_ptr + co, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        centre += tl.load(bias_ptr + co, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        scale *= tl.load(gamma_ptr + co, mask=n_mask, other=0.0).to(tl.float32)
    shift = centre * scale
    if HAS_BETA:
        shift += tl.load(beta_ptr + co, mask=n_mask, other=0.0).to(tl.float32)
    v = acc * scale[None, :] + shift[None, :]
    if RELU:
        v = tl.where(v < 0.0, 0.0, v)
    out_offsets = nb[:, None] * son + co[None, :] * soc + (oh.to(tl.int64) * soh + ow.to(tl.int64) * sow)[:, None]
    tl.store(out_ptr + out_offsets, v.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _tile(y_ptr, r0, end, cols, col_mask, S, s_n, s_c, s_s, BLOCK_R: tl.constexpr):
    """Offsets and mask of a [BLOCK_R, BLOCK_C] tile of an (N, C, S) activation: rows r = (n, s)."""
    rows = r0 + tl.arange(0, BLOCK_R)
    row_mask = rows < end
    n = (rows // S).to(tl.int64)
    s = (rows % S).to(tl.int64)
    offsets = (n * s_n + s * s_s)[:, None] + cols.to(tl.int64)[None, :] * s_c
    return offsets, row_mask[:, None] & col_mask[None, :]


@triton.jit
def _part_lanes(C, rows, rows_per_part, BLOCK_C: tl.constexpr):
    """A per-channel reduction program's lanes: (channels, their mask, its part of the rows, the part's
    first and end row); grid (channel blocks, parts)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    part = tl.program_id(1)
    start = part * rows_per_part
    return cols, cols < C, part, start, tl.minimum(start + rows_per_part, rows)


@triton.jit
def _stats_partial_kernel(
    y_ptr, mean_ptr, m2_ptr, C, S, rows, rows_per_part, s_n, s_c, s_s,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per channel, mean and Σ(y − mean)² of one part of the rows: exact two-pass per tile, tiles merged (Chan)."""
    cols, col_mask, part, start, end = _part_lanes(C, rows, rows_per_part, BLOCK_C)
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        offsets, mask = _tile(y_ptr, r0, end, cols, col_mask, S, s_n, s_c, s_s, BLOCK_R)
        v = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        n_tile = tl.minimum(end - r0, BLOCK_R).to(tl.float32)
        tile_mean = tl.sum(v, axis=0) / n_tile
        d = tl.where(mask, v - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        total = count + n_tile
        delta = tile_mean - mean
        mean += delta * (n_tile / total)
        m2 += tile_m2 + delta * delta * (count * n_tile / total)
        count = total
    tl.store(mean_ptr + part * C + cols, mean, mask=col_mask)
    tl.store(m2_ptr + part * C + cols, m2, mask=col_mask)


@triton.jit
def _bn_affine(mean, var, gamma_ptr, beta_ptr, cols, col_mask, eps, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """Training BN as an affine map per channel: y·scale + shift (shared by forward and backward)."""
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    shift = -mean * scale
    if HAS_BETA:
        shift += tl.load(beta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    return invstd, scale, shift


@triton.jit
def _stats_merge_kernel(
    pmean_ptr, pm2_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, gamma_ptr, beta_ptr,
    C, rows, rows_per_part, parts, eps, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Merge the parts in a fixed order (deterministic): batch mean, biased var, BN's affine map."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for part in range(parts):
        n_part = tl.minimum(rows - part * rows_per_part, rows_per_part).to(tl.float32)
        part_mean = tl.load(pmean_ptr + part * C + cols, mask=col_mask, other=0.0)
        part_m2 = tl.load(pm2_ptr + part * C + cols, mask=col_mask, other=0.0)
        total = count + n_part
        delta = part_mean - mean
        mean += delta * (n_part / total)
        m2 += part_m2 + delta * delta * (count * n_part / total)
        count = total
    var = m2 / count
    _, scale, shift = _bn_affine(mean, var, gamma_ptr, beta_ptr, cols, col_mask, eps, HAS_GAMMA, HAS_BETA)
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(var_ptr + cols, var, mask=col_mask)
    tl.store(scale_ptr + cols, scale, mask=col_mask)
    tl.store(shift_ptr + cols, shift, mask=col_mask)


@triton.jit
def _channel_of(offsets, C, S, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return offsets % C
    return (offsets // S) % C


@triton.jit
def _elementwise_lanes(y_ptr, total, C, S, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """An elementwise program's lanes over a dense activation: (offsets, mask, channel, y in fp32)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return offsets, mask, _channel_of(offsets, C, S, CHANNELS_LAST), y


@triton.jit
def _bn_act_kernel(
    y_ptr, out_ptr, scale_ptr, shift_ptr, total, C, S,
    CHANNELS_LAST: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out = relu(y·scale[c] + shift[c]) over a dense NCHW or NHWC activation."""
    offsets, mask, c, y = _elementwise_lanes(y_ptr, total, C, S, CHANNELS_LAST, BLOCK)
    v = y * tl.load(scale_ptr + c, mask=mask, other=0.0) + tl.load(shift_ptr + c, mask=mask, other=0.0)
    if RELU:
        v = tl.where(v < 0.0, 0.0, v)
    tl.store(out_ptr + offsets, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_grad(g, y, scale, shift, RELU: tl.constexpr):
    if RELU:
        return tl.where(y * scale + shift > 0.0, g, 0.0)
    return g


@triton.jit
def _backward_partial_kernel(
    g_ptr, y_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, sum_g_ptr, sum_gc_ptr,
    C, S, rows, rows_per_part, s_n, s_c, s_s, eps,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per channel and part: Σg and Σg·(y − mean), g the ReLU-masked gradient."""
    cols, col_mask, part, start, end = _part_lanes(C, rows, rows_per_part, BLOCK_C)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    var = tl.load(var_ptr + cols, mask=col_mask, other=1.0)
    _, scale, shift = _bn_affine(mean, var, gamma_ptr, beta_ptr, cols, col_mask, eps, HAS_GAMMA, HAS_BETA)
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        offsets, mask = _tile(y_ptr, r0, end, cols, col_mask, S, s_n, s_c, s_s, BLOCK_R)
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = _masked_grad(g, y, scale[None, :], shift[None, :], RELU)
        sum_g += tl.sum(g, axis=0)
        sum_gc += tl.sum(g * (y - mean[None, :]), axis=0)
    tl.store(sum_g_ptr + part * C + cols, sum_g, mask=col_mask)
    tl.store(sum_gc_ptr + part * C + cols, sum_gc, mask=col_mask)


@triton.jit
def _backward_merge_kernel(
    sum_g_ptr, sum_gc_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, grad_gamma_ptr, grad_beta_ptr, coef_ptr,
    C, rows, parts, eps, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """grad_γ, grad_β, and per channel (scale, shift, g_coef, c_coef, const) of
    grad_y = g_coef·g + c_coef·(y − mean) + const, g masked where y·scale + shift ≤ 0."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for part in range(parts):
        sum_g += tl.load(sum_g_ptr + part * C + cols, mask=col_mask, other=0.0)
        sum_gc += tl.load(sum_gc_ptr + part * C + cols, mask=col_mask, other=0.0)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    var = tl.load(var_ptr + cols, mask=col_mask, other=1.0)
    invstd, scale, shift = _bn_affine(mean, var, gamma_ptr, beta_ptr, cols, col_mask, eps, HAS_GAMMA, HAS_BETA)
    g_coef = invstd
    if HAS_GAMMA:
        g_coef *= tl.load(gamma_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    tl.store(grad_gamma_ptr + cols, sum_gc * invstd, mask=col_mask)
    tl.store(grad_beta_ptr + cols, sum_g, mask=col_mask)
    tl.store(coef_ptr + cols, scale, mask=col_mask)
    tl.store(coef_ptr + C + cols, shift, mask=col_mask)
    tl.store(coef_ptr + 2 * C + cols, g_coef, mask=col_mask)
    tl.store(coef_ptr + 3 * C + cols, -g_coef * invstd * invstd * sum_gc / rows, mask=col_mask)
    tl.store(coef_ptr + 4 * C + cols, -g_coef * sum_g / rows, mask=col_mask)


@triton.jit
def _backward_apply_kernel(
    g_ptr, y_ptr, out_ptr, mean_ptr, coef_ptr, total, C, S,
    CHANNELS_LAST: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """grad_y = g_coef·g + c_coef·(y − mean) + const with the ReLU mask fused (no mask tensor)."""
    offsets, mask, c, y = _elementwise_lanes(y_ptr, total, C, S, CHANNELS_LAST, BLOCK)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = _masked_grad(g, y, tl.load(coef_ptr + c, mask=mask), tl.load(coef_ptr + C + c, mask=mask), RELU)
    v = tl.load(coef_ptr + 2 * C + c, mask=mask) * g
    v += tl.load(coef_ptr + 3 * C + c, mask=mask) * (y - tl.load(mean_ptr + c, mask=mask))
    v += tl.load(coef_ptr + 4 * C + c, mask=mask)
    tl.store(out_ptr + offsets, v.to(out_ptr.dtype.element_ty), mask=mask)


_ELEMENTWISE_WARPS = 8  # 4 elements a thread: 4 warps (8) spill in fp16 NCHW on triton 3.6 (ptxas -v)


def _conv(x, weight, bias, options):
    """The convolution through ATen (oneDNN / cuDNN), dense in the input's memory format."""
    y = torch.ops.aten.convolution(x, weight, bias, options.stride, options.padding, options.dilation, False, [0, 0], options.groups)
    return y.contiguous(memory_format=backends.preserved_format(x))


def eval_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, options):
    N, C_in, H, W = x.shape
    C_out = weight.shape[0]
    OH, OW = _output_size(x, weight, options)
    out = backends.new_output((N, C_out, OH, OW), dtype=x.dtype, device=x.device, memory_format=backends.preserved_format(x))
    M = N * OH * OW
    (gamma, beta), affine_flags = _affine(bn_weight, bn_bias, running_mean)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(C_out // options.groups, meta["BLOCK_N"]) * options.groups,)

    backends.launch(
        _conv_bn_act_kernel, grid, x, weight, out,
        bias if bias is not None else running_mean, gamma, beta, running_mean, running_var,
        C_in // options.groups, C_out // options.groups, H, W, OH, OW, M,
        *x.stride(), *weight.stride(), *out.stride(),
        *options.stride, *options.padding, *options.dilation, options.eps,
        KH=weight.shape[2], KW=weight.shape[3], X_CHANNELS_LAST=backends.preserved_format(x) == torch.channels_last,
        HAS_BIAS=bias is not None, **affine_flags, RELU=options.relu,
        DOT_FP32=backends.triton_interpreted() or x.dtype == torch.float32,
        INPUT_PRECISION=backends.dot_precision(x.dtype, convolution=True),
    )  # fmt: skip
    return out


def _affine(bn_weight, bn_bias, placeholder):
    """γ and β for a kernel (``placeholder`` for an absent one: its flag is off, it is never read)."""
    pointers = [t if t is not None else placeholder for t in (bn_weight, bn_bias)]
    return pointers, dict(HAS_GAMMA=bn_weight is not None, HAS_BETA=bn_bias is not None)


def _reduction_split(y: torch.Tensor):
    """Tile sizes and the fixed split of the rows (n, s) into parts for the per-channel reductions."""
    N, C = y.shape[:2]
    S = y.shape[2] * y.shape[3]
    rows = N * S
    channels_last = backends.preserved_format(y) == torch.channels_last
    block_r, block_c = (32, 64) if channels_last else (128, 8)
    if backends.triton_interpreted():
        block_r, block_c = 16, 16
    c_blocks = triton.cdiv(C, block_c)
    parts = max(1, min(triton.cdiv(rows, block_r), 1024 // c_blocks))
    rows_per_part = triton.cdiv(triton.cdiv(rows, parts), block_r) * block_r
    parts = triton.cdiv(rows, rows_per_part)
    strides = (C * S, 1, C) if channels_last else (C * S, S, 1)
    return dict(C=C, S=S, rows=rows, rows_per_part=rows_per_part, parts=parts, strides=strides,
                block_r=block_r, block_c=block_c, c_blocks=c_blocks, channels_last=channels_last)  # fmt: skip


def train_forward(x, weight, bias, bn_weight, bn_bias, options):
    y = _conv(x, weight, bias, options)
    sp = _reduction_split(y)
    C, parts = sp["C"], sp["parts"]
    f32 = dict(dtype=torch.float32, device=y.device)
    part_mean, part_m2 = torch.empty((parts, C), **f32), torch.empty((parts, C), **f32)
    backends.launch(
        _stats_partial_kernel, (sp["c_blocks"], parts),
        y, part_mean, part_m2, C, sp["S"], sp["rows"], sp["rows_per_part"], *sp["strides"],
        BLOCK_R=sp["block_r"], BLOCK_C=sp["block_c"],
    )  # fmt: skip
    mean, var = backends.new_output((C,), **f32), backends.new_output((C,), **f32)
    scale, shift = torch.empty((C,), **f32), torch.empty((C,), **f32)
    (gamma, beta), affine_flags = _affine(bn_weight, bn_bias, mean)
    backends.launch(
        _stats_merge_kernel, (sp["c_blocks"],),
        part_mean, part_m2, mean, var, scale, shift, gamma, beta,
        C, sp["rows"], sp["rows_per_part"], parts, options.eps, **affine_flags, BLOCK_C=sp["block_c"],
    )  # fmt: skip
    out = backends.new_output(y.shape, dtype=y.dtype, device=y.device, memory_format=backends.preserved_format(y))
    total = y.numel()
    backends.launch(
        _bn_act_kernel, (triton.cdiv(total, backends.ELEMENTWISE_BLOCK),),
        y, out, scale, shift, total, C, sp["S"],
        CHANNELS_LAST=sp["channels_last"], RELU=options.relu, BLOCK=backends.ELEMENTWISE_BLOCK, num_warps=_ELEMENTWISE_WARPS,
    )  # fmt: skip
    return out, y, mean, var


def train_backward(grad_out, x, weight, bias, conv_out, mean, var, bn_weight, bn_bias, options, conv_mask):
    """Triton BN + ReLU backward (one reduction, one elementwise pass), then the conv backward through ATen."""
    y = conv_out if conv_out is not None else _conv(x, weight, bias, options)
    g = grad_out.contiguous(memory_format=backends.preserved_format(y))
    sp = _reduction_split(y)
    C, parts = sp["C"], sp["parts"]
    f32 = dict(dtype=torch.float32, device=y.device)
    sum_g, sum_gc = torch.empty((parts, C), **f32), torch.empty((parts, C), **f32)
    (gamma, beta), affine_flags = _affine(bn_weight, bn_bias, mean)
    backends.launch(
        _backward_partial_kernel, (sp["c_blocks"], parts),
        g, y, mean, var, gamma, beta, sum_g, sum_gc,
        C, sp["S"], sp["rows"], sp["rows_per_part"], *sp["strides"], options.eps,
        **affine_flags, RELU=options.relu, BLOCK_R=sp["block_r"], BLOCK_C=sp["block_c"],
    )  # fmt: skip
    grad_gamma, grad_beta = backends.new_output((C,), **f32), backends.new_output((C,), **f32)
    coefficients = torch.empty((5, C), **f32)
    backends.launch(
        _backward_merge_kernel, (sp["c_blocks"],),
        sum_g, sum_gc, mean, var, gamma, beta, grad_gamma, grad_beta, coefficients,
        C, sp["rows"], parts, options.eps, **affine_flags, BLOCK_C=sp["block_c"],
    )  # fmt: skip
    grad_y = backends.new_output(y.shape, dtype=y.dtype, device=y.device, memory_format=backends.preserved_format(y))
    total = y.numel()
    backends.launch(
        _backward_apply_kernel, (triton.cdiv(total, backends.ELEMENTWISE_BLOCK),),
        g, y, grad_y, mean, coefficients, total, C, sp["S"],
        CHANNELS_LAST=sp["channels_last"], RELU=options.relu, BLOCK=backends.ELEMENTWISE_BLOCK, num_warps=_ELEMENTWISE_WARPS,
    )  # fmt: skip
    grad_x, grad_w, grad_b = _conv_backward(grad_y, x, weight, options, conv_mask)
    return [
        grad_x,
        grad_w,
        grad_b,
        grad_gamma.to(bn_weight.dtype) if bn_weight is not None else grad_gamma,
        grad_beta.to(bn_bias.dtype) if bn_bias is not None else grad_beta,
    ]

"""Fused conv2d + BatchNorm2d (+ ReLU), dilated, strided, padded, in both BatchNorm modes (docs/design.md §4.1).

``conv_bn_relu(...) == relu(batch_norm(conv2d(x, W, b, stride, padding, dilation, groups), ...))``,
including the running-statistics update in training (unbiased variance in the running estimate,
``momentum=None`` = cumulative average over ``num_batches_tracked``).

* Eval: BatchNorm is an affine map per output channel, so it folds into the convolution
  (``scale = γ/√(σ²+ε)``, ``W' = W·scale``, ``b' = (b−μ)·scale + β``, in fp32) and the ReLU becomes
  the convolution's epilogue: one pass over the output instead of three. ``triton``: an implicit-GEMM
  convolution that applies the fold and the ReLU in its epilogue; ``cpu``: oneDNN conv with the ReLU
  as a post-op (C++ epilogue for fp64/fp16); ``cuda``: cuDNN conv + one epilogue kernel.
* Train: the convolution (ATen: oneDNN/cuDNN), then ONE pass for the per-channel statistics
  (exact two-pass on cache-sized tiles, or Welford, merged by Chan's formula; never Σx² − (Σx)²) and ONE for
  normalise + affine + ReLU. Backward: a reduction pass and an elementwise pass, both with the ReLU
  mask fused (no mask tensor), then ``aten.convolution_backward``. By default it saves the conv
  input and output (as eager; the input is the previous layer's output anyway);
  ``memory_efficient=True`` saves only the input and the statistics and recomputes the conv.
* Frozen BN (eval) is differentiable too: backward of the folded conv, chained to W, b, γ, β.

The running statistics are updated in the Python wrapper from the batch statistics the custom op
returns, so the custom ops mutate nothing (compile- and opcheck-friendly). ``torch.compile`` traces
the custom ops; eager calls run the same forward and backward through a ``torch.autograd.Function``,
skipping the custom-op dispatch (~0.3 ms per layer and step, which a 53-layer encoder would pay).

Floors, layer3 of the encoder at 384×384 (N=16, 48×48, eval, one pass over x and out):
  FLOPs  = 2·N·OH·OW·C_out·C_in·KH·KW: 1×1 1024→256: 19.3 GFLOP; 3×3 256→256 (dilation 2): 43.5 GFLOP.
  bytes  = x + out + W: 1×1: 151 + 38 + 1 MB (fp32); 3×3: 38 + 38 + 2.4 MB (fp32), half in bf16.
  H100 (bf16, 989 TFLOP/s, 3.35 TB/s): 3×3: 44 µs compute vs 12 µs memory -> compute bound;
  1×1: 20 µs compute vs 28 µs memory -> memory bound. CPU (2 Zen 4 cores, AVX-512, ~0.2 TFLOP/s
  fp32): 3×3: ~220 ms of compute next to ~8 ms of memory traffic -> compute bound, so the fusion
  can only save the BN and ReLU passes (~2 × 2 × 38 MB) around a conv that dominates.
  Training adds one statistics read and the backward's two passes over (grad, y) around the two
  backward convs (2× the forward FLOPs).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from slsdeep_kernels import backend as _backend

OP = "conv_bn_relu"
_COMPILED = torch.ops.slsdeep_kernels


# ---------------------------------------------------------------------------------------------
# 1. Reference (the spec)
# ---------------------------------------------------------------------------------------------
def reference(
    x,
    weight,
    bias,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    training=False,
    momentum=0.1,
    eps=1e-5,
    relu=True,
):
    """``relu(batch_norm(conv2d(...)))`` in plain PyTorch; updates the running statistics in training."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.relu(y) if relu else y


# ---------------------------------------------------------------------------------------------
# 2. Triton kernels
# ---------------------------------------------------------------------------------------------
ENV_PIN_AUTOTUNE = "SLSDEEP_KERNELS_PIN_AUTOTUNE"


def _conv_configs(pinned: bool | None = None):
    """The conv's autotune configs (read at import). ``$SLSDEEP_KERNELS_PIN_AUTOTUNE=1`` pins the first:
    a GPU test run then compiles one config per shape instead of six (one test runs them all)."""
    if pinned is None:
        pinned = os.environ.get(ENV_PIN_AUTOTUNE, "0") == "1"
    if _backend.triton_interpreted():
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
def _stats_partial_kernel(
    y_ptr, mean_ptr, m2_ptr, C, S, rows, rows_per_part, s_n, s_c, s_s,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per channel, mean and Σ(y − mean)² of one part of the rows: exact two-pass per tile, tiles merged (Chan)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    part = tl.program_id(1)
    start = part * rows_per_part
    end = tl.minimum(start + rows_per_part, rows)
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
def _bn_act_kernel(
    y_ptr, out_ptr, scale_ptr, shift_ptr, total, C, S,
    CHANNELS_LAST: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out = relu(y·scale[c] + shift[c]) over a dense NCHW or NHWC activation."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    c = _channel_of(offsets, C, S, CHANNELS_LAST)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
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
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    part = tl.program_id(1)
    start = part * rows_per_part
    end = tl.minimum(start + rows_per_part, rows)
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
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    c = _channel_of(offsets, C, S, CHANNELS_LAST)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = _masked_grad(g, y, tl.load(coef_ptr + c, mask=mask), tl.load(coef_ptr + C + c, mask=mask), RELU)
    v = tl.load(coef_ptr + 2 * C + c, mask=mask) * g
    v += tl.load(coef_ptr + 3 * C + c, mask=mask) * (y - tl.load(mean_ptr + c, mask=mask))
    v += tl.load(coef_ptr + 4 * C + c, mask=mask)
    tl.store(out_ptr + offsets, v.to(out_ptr.dtype.element_ty), mask=mask)


# ---- launchers -------------------------------------------------------------------------------
_ELEMENTWISE_BLOCK = 1024
_ELEMENTWISE_WARPS = 8  # 4 elements a thread: 4 warps (8) spill in fp16 NCHW on triton 3.6 (ptxas -v)


def _activation_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format an activation keeps through the op (as PyTorch's BatchNorm outputs)."""
    return _backend.preserved_format(t)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _output_size(x, weight, stride, padding, dilation):
    return [
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1 for i in range(2)
    ]


def _conv(x, weight, bias, stride, padding, dilation, groups):
    """The convolution through ATen (oneDNN / cuDNN), dense in the input's memory format."""
    y = torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)
    return y.contiguous(memory_format=_activation_format(x))


def _dot_precision(dtype: torch.dtype) -> str:
    """TF32 only where PyTorch's own convolutions may use it (``torch.backends.cudnn.allow_tf32``)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not _backend.triton_interpreted() else "ieee"


def _eval_triton(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups, eps, relu):
    N, C_in, H, W = x.shape
    C_out = weight.shape[0]
    OH, OW = _output_size(x, weight, stride, padding, dilation)
    out = _backend.new_output((N, C_out, OH, OW), dtype=x.dtype, device=x.device, memory_format=_activation_format(x))
    M = N * OH * OW
    (gamma, beta), affine_flags = _affine(bn_weight, bn_bias, running_mean)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(C_out // groups, meta["BLOCK_N"]) * groups,)

    _backend.launch(
        _conv_bn_act_kernel, grid, x, weight, out,
        bias if bias is not None else running_mean, gamma, beta, running_mean, running_var,
        C_in // groups, C_out // groups, H, W, OH, OW, M,
        *x.stride(), *weight.stride(), *out.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], eps,
        KH=weight.shape[2], KW=weight.shape[3], X_CHANNELS_LAST=_activation_format(x) == torch.channels_last,
        HAS_BIAS=bias is not None, **affine_flags, RELU=relu,
        DOT_FP32=_backend.triton_interpreted() or x.dtype == torch.float32,
        INPUT_PRECISION=_dot_precision(x.dtype),
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
    channels_last = _activation_format(y) == torch.channels_last
    block_r, block_c = (32, 64) if channels_last else (128, 8)
    if _backend.triton_interpreted():
        block_r, block_c = 16, 16
    c_blocks = triton.cdiv(C, block_c)
    parts = max(1, min(triton.cdiv(rows, block_r), 1024 // c_blocks))
    rows_per_part = triton.cdiv(triton.cdiv(rows, parts), block_r) * block_r
    parts = triton.cdiv(rows, rows_per_part)
    strides = (C * S, 1, C) if channels_last else (C * S, S, 1)
    return dict(C=C, S=S, rows=rows, rows_per_part=rows_per_part, parts=parts, strides=strides,
                block_r=block_r, block_c=block_c, c_blocks=c_blocks, channels_last=channels_last)  # fmt: skip


def _train_triton(x, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, eps, relu):
    y = _conv(x, weight, bias, stride, padding, dilation, groups)
    sp = _reduction_split(y)
    C, parts = sp["C"], sp["parts"]
    f32 = dict(dtype=torch.float32, device=y.device)
    part_mean, part_m2 = torch.empty((parts, C), **f32), torch.empty((parts, C), **f32)
    _backend.launch(
        _stats_partial_kernel, (sp["c_blocks"], parts),
        y, part_mean, part_m2, C, sp["S"], sp["rows"], sp["rows_per_part"], *sp["strides"],
        BLOCK_R=sp["block_r"], BLOCK_C=sp["block_c"],
    )  # fmt: skip
    mean, var = _backend.new_output((C,), **f32), _backend.new_output((C,), **f32)
    scale, shift = torch.empty((C,), **f32), torch.empty((C,), **f32)
    (gamma, beta), affine_flags = _affine(bn_weight, bn_bias, mean)
    _backend.launch(
        _stats_merge_kernel, (sp["c_blocks"],),
        part_mean, part_m2, mean, var, scale, shift, gamma, beta,
        C, sp["rows"], sp["rows_per_part"], parts, eps, **affine_flags, BLOCK_C=sp["block_c"],
    )  # fmt: skip
    out = _backend.new_output(y.shape, dtype=y.dtype, device=y.device, memory_format=_activation_format(y))
    total = y.numel()
    _backend.launch(
        _bn_act_kernel, (triton.cdiv(total, _ELEMENTWISE_BLOCK),),
        y, out, scale, shift, total, C, sp["S"],
        CHANNELS_LAST=sp["channels_last"], RELU=relu, BLOCK=_ELEMENTWISE_BLOCK, num_warps=_ELEMENTWISE_WARPS,
    )  # fmt: skip
    return out, y, mean, var


def _train_backward_triton(grad_out, x, weight, bias, conv_out, mean, var, bn_weight, bn_bias, stride, padding, dilation, groups, eps, relu, conv_mask):
    """Triton BN + ReLU backward (one reduction, one elementwise pass), then the conv backward through ATen."""
    y = conv_out if conv_out is not None else _conv(x, weight, bias, stride, padding, dilation, groups)
    g = grad_out.contiguous(memory_format=_activation_format(y))
    sp = _reduction_split(y)
    C, parts = sp["C"], sp["parts"]
    f32 = dict(dtype=torch.float32, device=y.device)
    sum_g, sum_gc = torch.empty((parts, C), **f32), torch.empty((parts, C), **f32)
    (gamma, beta), affine_flags = _affine(bn_weight, bn_bias, mean)
    _backend.launch(
        _backward_partial_kernel, (sp["c_blocks"], parts),
        g, y, mean, var, gamma, beta, sum_g, sum_gc,
        C, sp["S"], sp["rows"], sp["rows_per_part"], *sp["strides"], eps,
        **affine_flags, RELU=relu, BLOCK_R=sp["block_r"], BLOCK_C=sp["block_c"],
    )  # fmt: skip
    grad_gamma, grad_beta = _backend.new_output((C,), **f32), _backend.new_output((C,), **f32)
    coefficients = torch.empty((5, C), **f32)
    _backend.launch(
        _backward_merge_kernel, (sp["c_blocks"],),
        sum_g, sum_gc, mean, var, gamma, beta, grad_gamma, grad_beta, coefficients,
        C, sp["rows"], parts, eps, **affine_flags, BLOCK_C=sp["block_c"],
    )  # fmt: skip
    grad_y = _backend.new_output(y.shape, dtype=y.dtype, device=y.device, memory_format=_activation_format(y))
    total = y.numel()
    _backend.launch(
        _backward_apply_kernel, (triton.cdiv(total, _ELEMENTWISE_BLOCK),),
        g, y, grad_y, mean, coefficients, total, C, sp["S"],
        CHANNELS_LAST=sp["channels_last"], RELU=relu, BLOCK=_ELEMENTWISE_BLOCK, num_warps=_ELEMENTWISE_WARPS,
    )  # fmt: skip
    grad_x, grad_w, grad_b = _conv_backward(grad_y, x, weight, stride, padding, dilation, groups, conv_mask)
    return [
        grad_x,
        grad_w,
        grad_b,
        grad_gamma.to(bn_weight.dtype) if bn_weight is not None else grad_gamma,
        grad_beta.to(bn_bias.dtype) if bn_bias is not None else grad_beta,
    ]


def _conv_backward(grad_y, x, weight, stride, padding, dilation, groups, conv_mask):
    return torch.ops.aten.convolution_backward(
        grad_y, x, weight, [weight.shape[0]], stride, padding, dilation, False, [0, 0], groups, conv_mask
    )


def _eval_backward(grad_out, out, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups, eps, relu, output_mask):
    """Backward of frozen BN: backward of the folded conv (W' = W·scale), chained to W, b, γ, β (ATen, any
    backend). ``out`` (the forward's output, the ReLU's mask) is needed only with the ReLU."""
    acc = _accumulation_dtype(x.dtype)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    scale = invstd * bn_weight.to(acc) if bn_weight is not None else invstd
    per_channel = (-1, 1, 1, 1)
    g = torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out
    folded = (weight.to(acc) * scale.view(per_channel)).to(weight.dtype)
    grad_x, grad_folded_w, grad_shift = _conv_backward(
        g, x, folded, stride, padding, dilation, groups, [output_mask[0], output_mask[1] or output_mask[3], True]
    )
    grad_shift = grad_shift.to(acc)
    grads = [grad_x, None, None, None, None]
    if output_mask[1]:
        grads[1] = (grad_folded_w.to(acc) * scale.view(per_channel)).to(weight.dtype)
    if output_mask[2]:
        grads[2] = (grad_shift * scale).to(bias.dtype)
    if output_mask[3]:
        centre = -running_mean.to(acc) if bias is None else bias.to(acc) - running_mean.to(acc)
        grad_scale = (grad_folded_w.to(acc) * weight.to(acc)).sum((1, 2, 3)) + grad_shift * centre
        grads[3] = (grad_scale * invstd).to(bn_weight.dtype)
    if output_mask[4]:
        grads[4] = grad_shift.to(bn_bias.dtype)
    return grads


# ---------------------------------------------------------------------------------------------
# 3. Custom ops (forward and backward of each mode), fake kernels, autograd
# ---------------------------------------------------------------------------------------------
def _eval_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups, eps, relu, backend):
    args = (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups, eps, relu)
    if backend == "triton":
        return _eval_triton(*args)
    return _COMPILED.conv_bn_relu_eval_kernel(*args)


def _train_forward(x, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, eps, relu, backend):
    args = (x, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, eps, relu)
    if backend == "triton":
        return _train_triton(*args)
    return _COMPILED.conv_bn_relu_train_kernel(*args)


def _train_backward(grad_out, x, weight, bias, conv_out, mean, var, bn_weight, bn_bias, stride, padding, dilation, groups, eps, relu, output_mask, backend):
    args = (grad_out, x, weight, bias, conv_out, mean, var, bn_weight, bn_bias, stride, padding, dilation, groups, eps, relu)
    if backend == "triton":
        return _train_backward_triton(*args, output_mask[:3])
    return _COMPILED.conv_bn_relu_train_backward_kernel(*args, output_mask[:3])


def _as_gradients(grads, inputs, mask):
    """Each gradient laid out as its input (what the fake kernel promises); an empty tensor stands
    for a gradient nobody asked for (custom ops return tensors only)."""
    out = []
    for g, t, wanted in zip(grads, inputs, mask):
        if not wanted:
            out.append(inputs[0].new_empty(0))
        elif g.stride() != t.stride() or g.dtype != t.dtype:
            out.append(torch.empty_like(t).copy_(g))
        else:
            out.append(g)
    return out


@torch.library.custom_op("slsdeep_kernels::conv_bn_relu_eval", mutates_args=())
def _eval_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    eps: float,
    relu: bool,
    backend: str,
) -> torch.Tensor:
    return _eval_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups, eps, relu, backend)


@_eval_op.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups, eps, relu, backend):
    shape = (x.shape[0], weight.shape[0], *_output_size(x, weight, stride, padding, dilation))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_activation_format(x))


@torch.library.custom_op("slsdeep_kernels::conv_bn_relu_eval_backward", mutates_args=())
def _eval_backward_op(
    grad_out: torch.Tensor,
    out: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    eps: float,
    relu: bool,
    output_mask: list[bool],
) -> list[torch.Tensor]:
    args = (grad_out, out, x, weight, bias, bn_weight, bn_bias, running_mean, running_var)
    grads = _eval_backward(*args, stride, padding, dilation, groups, eps, relu, output_mask)
    return _as_gradients(grads, (x, weight, bias, bn_weight, bn_bias), output_mask)


def _fake_grads(x, weight, bias, bn_weight, bn_bias, output_mask):
    inputs = (x, weight, bias, bn_weight, bn_bias)
    return [torch.empty_like(t) if wanted else x.new_empty(0) for t, wanted in zip(inputs, output_mask)]


@_eval_backward_op.register_fake
def _(grad_out, out, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups, eps, relu, output_mask):
    return _fake_grads(x, weight, bias, bn_weight, bn_bias, output_mask)


@torch.library.custom_op("slsdeep_kernels::conv_bn_relu_train", mutates_args=())
def _train_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    eps: float,
    relu: bool,
    memory_efficient: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, conv output, batch mean, biased batch variance); the statistics in fp32 (fp64 for fp64)."""
    return _train_forward(x, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, eps, relu, backend)


@_train_op.register_fake
def _(x, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, eps, relu, memory_efficient, backend):
    shape = (x.shape[0], weight.shape[0], *_output_size(x, weight, stride, padding, dilation))
    fmt = _activation_format(x)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    conv_out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    stats = dict(dtype=_accumulation_dtype(x.dtype), device=x.device)
    return out, conv_out, torch.empty(shape[1], **stats), torch.empty(shape[1], **stats)


@torch.library.custom_op("slsdeep_kernels::conv_bn_relu_train_backward", mutates_args=())
def _train_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_out: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    eps: float,
    relu: bool,
    output_mask: list[bool],
    backend: str,
) -> list[torch.Tensor]:
    """Grads of (x, weight, bias, bn_weight, bn_bias); ``conv_out=None`` recomputes the conv."""
    args = (grad_out, x, weight, bias, conv_out, mean, var, bn_weight, bn_bias, stride, padding, dilation, groups, eps, relu)
    grads = _train_backward(*args, output_mask, backend)
    return _as_gradients(grads, (x, weight, bias, bn_weight, bn_bias), output_mask)


@_train_backward_op.register_fake
def _(grad_out, x, weight, bias, conv_out, mean, var, bn_weight, bn_bias, stride, padding, dilation, groups, eps, relu, output_mask, backend):
    return _fake_grads(x, weight, bias, bn_weight, bn_bias, output_mask)


def _eval_setup_context(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *rest = inputs
    ctx.options = rest[:-1]  # stride, padding, dilation, groups, eps, relu
    # The output is the ReLU's mask; without a ReLU it is not kept (callers may add to it in place).
    relu = ctx.options[-1]
    ctx.save_for_backward(output if relu else None, x, weight, bias, bn_weight, bn_bias, running_mean, running_var)


def _eval_grads(ctx, grad_out, backward):
    output_mask = list(ctx.needs_input_grad[:5])
    out, *saved = ctx.saved_tensors
    grads = backward(grad_out, out, *saved, *ctx.options, output_mask)
    return *(g if wanted else None for g, wanted in zip(grads, output_mask)), *([None] * 9)


def _eval_autograd_backward(ctx, grad_out):
    return _eval_grads(ctx, grad_out, _eval_backward_op)


def _train_setup_context(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, eps, relu, memory_efficient, backend = inputs
    out, conv_out, mean, var = output
    ctx.mark_non_differentiable(conv_out, mean, var)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, None if memory_efficient else conv_out, mean, var, bn_weight, bn_bias)
    ctx.options = (stride, padding, dilation, groups, eps, relu)
    ctx.backend = backend


def _train_grads(ctx, grad_out, backward):
    output_mask = list(ctx.needs_input_grad[:5])
    if grad_out is None:
        return (None,) * 13
    grads = backward(grad_out, *ctx.saved_tensors, *ctx.options, output_mask, ctx.backend)
    return *(g if wanted else None for g, wanted in zip(grads, output_mask)), *([None] * 8)


def _train_autograd_backward(ctx, grad_out, *unused):
    return _train_grads(ctx, grad_out, _train_backward_op)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(f"{OP}: double backward is not supported")


torch.library.register_autograd("slsdeep_kernels::conv_bn_relu_eval", _eval_autograd_backward, setup_context=_eval_setup_context)
torch.library.register_autograd("slsdeep_kernels::conv_bn_relu_train", _train_autograd_backward, setup_context=_train_setup_context)
for _name in ("conv_bn_relu_eval_backward", "conv_bn_relu_train_backward"):
    torch.library.register_autograd(f"slsdeep_kernels::{_name}", _no_double_backward, setup_context=lambda ctx, inputs, output: None)


class _EvalFunction(torch.autograd.Function):
    """The eval op for eager calls: the custom ops' forward, setup and backward without their
    dispatch, which costs ~0.15 ms a call (paid by every layer of a network at every step).
    ``torch.compile`` traces the custom ops instead (see :func:`conv_bn_relu`). Under
    ``create_graph`` the backward runs as the backward custom op, whose own backward raises."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _eval_forward(*inputs)
        _eval_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out):
        return _eval_grads(ctx, grad_out, _eval_backward_op if torch.is_grad_enabled() else _eval_backward)


class _TrainFunction(torch.autograd.Function):
    """The training op for eager calls (as :class:`_EvalFunction`)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _train_forward(*inputs[:-2], inputs[-1])  # all but memory_efficient, which only setup reads
        _train_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, *unused):
        return _train_grads(ctx, grad_out, _train_backward_op if torch.is_grad_enabled() else _train_backward)


# ---------------------------------------------------------------------------------------------
# 4. Public function
# ---------------------------------------------------------------------------------------------
def _pair(name, value, minimum):
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair) or min(pair) < minimum:
        raise ValueError(f"{OP}: {name} must be an int or a pair of ints, each >= {minimum}; got {value!r}")
    return list(pair)


def _validate(x, weight, per_channel, stride, padding, dilation, groups, training):
    if x.dim() != 4:
        raise ValueError(f"{OP}: input must be 4-D (N, C, H, W); got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{OP}: weight must be 4-D (C_out, C_in / groups, KH, KW); got shape {tuple(weight.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{OP}: input must be a floating-point tensor; got {x.dtype}")
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"{OP}: groups must be a positive int dividing C_out={weight.shape[0]}; got {groups!r}")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(
            f"{OP}: weight expects {weight.shape[1] * groups} input channels ({weight.shape[1]} per group × "
            f"{groups} groups); input has {x.shape[1]}"
        )
    for name, t in (("weight", weight), *per_channel.items()):
        if t is not None and t.dtype != x.dtype and name in ("weight", "bias"):
            raise ValueError(f"{OP}: {name} must have the input's dtype {x.dtype}; got {t.dtype}")
        if t is not None and name != "weight" and tuple(t.shape) != (weight.shape[0],):
            raise ValueError(
                f"{OP}: {name} must have shape ({weight.shape[0]},), one value per output channel of weight; "
                f"got {tuple(t.shape)}"
            )
    if (per_channel["running_mean"] is None) != (per_channel["running_var"] is None):
        raise ValueError(f"{OP}: running_mean and running_var must be given together")
    if not training and per_channel["running_mean"] is None:
        raise ValueError(f"{OP}: running_mean and running_var are required in eval mode (training=False)")
    out_size = _output_size(x, weight, stride, padding, dilation)
    if min(out_size) < 1:
        raise ValueError(
            f"{OP}: the output would be empty ({out_size[0]}×{out_size[1]}) for input {tuple(x.shape[2:])}, kernel "
            f"{tuple(weight.shape[2:])}, stride {stride}, padding {padding}, dilation {dilation}"
        )
    if training and x.shape[0] * out_size[0] * out_size[1] == 1:
        raise ValueError(
            f"{OP}: expected more than 1 value per channel when training, got conv output of size "
            f"{[x.shape[0], weight.shape[0], *out_size]}"
        )


def _autocast(device_type, *tensors):
    """Autocast's cast for the conv: floating tensors other than fp64 to the autocast dtype."""
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors]


def _update_running(running, batch, factor, correction=1.0):
    """running = (1 − factor)·running + factor·correction·batch, as PyTorch's BatchNorm."""
    running.mul_(1 - factor)
    if isinstance(factor, torch.Tensor):
        running.add_(batch * (factor * correction))
    else:
        running.add_(batch, alpha=factor * correction)


def conv_bn_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    relu: bool = True,
    backend: str | None = None,
    *,
    memory_efficient: bool = False,
    num_batches_tracked: torch.Tensor | None = None,
) -> torch.Tensor:
    """``relu(batch_norm(conv2d(x, weight, bias, stride, padding, dilation, groups), running_mean,
    running_var, bn_weight, bn_bias, training, momentum, eps))``, fused; ``relu=False`` drops the ReLU.

    In training the running statistics (when given) are updated as ``F.batch_norm`` does;
    ``num_batches_tracked`` (BatchNorm's buffer, optional) is incremented, and ``momentum=None`` (the
    cumulative average) uses it. ``memory_efficient=True`` keeps only the conv input and the batch
    statistics for backward and recomputes the conv there. Under autocast the conv follows autocast's
    lower precision (BN parameters and statistics stay as they are).
    """
    device = _backend.common_device(
        OP, input=x, weight=weight, bias=bias, bn_weight=bn_weight, bn_bias=bn_bias,
        running_mean=running_mean, running_var=running_var, num_batches_tracked=num_batches_tracked,
    )  # fmt: skip
    stride, padding, dilation = _pair("stride", stride, 1), _pair("padding", padding, 0), _pair("dilation", dilation, 1)
    if torch.is_autocast_enabled(device.type):
        x, weight, bias = _autocast(device.type, x, weight, bias)
    per_channel = dict(bias=bias, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean, running_var=running_var)
    _validate(x, weight, per_channel, stride, padding, dilation, groups, training)
    factor = momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if training and running_mean is not None and momentum is None:
        if num_batches_tracked is None:
            raise ValueError(f"{OP}: momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / num_batches_tracked.to(running_mean.dtype)
    chosen = _backend.resolve(OP, device, x.dtype, backend)
    if chosen == "reference":
        if isinstance(factor, torch.Tensor):
            factor = float(factor)
        return reference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                         groups, training, 0.0 if factor is None else factor, eps, relu)  # fmt: skip
    # torch.compile traces the custom ops; eager calls skip their dispatch cost (same kernels, same autograd).
    compiling = torch.compiler.is_compiling()
    if not training:
        eval_op = _eval_op if compiling else _EvalFunction.apply
        return eval_op(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation,
                       groups, eps, relu, chosen)  # fmt: skip
    train_op = _train_op if compiling else _TrainFunction.apply
    out, _, mean, var = train_op(x, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, eps, relu,
                                 memory_efficient, chosen)  # fmt: skip
    if running_mean is not None:
        count = out.numel() // out.shape[1]
        with torch.no_grad():
            _update_running(running_mean, mean, factor)
            _update_running(running_var, var, factor, correction=count / (count - 1))  # unbiased
    return out


def _conv_padding(conv: torch.nn.Conv2d):
    """A Conv2d's padding as a pair of ints ('valid', and 'same' where it is symmetric)."""
    if conv.padding == "valid":
        return [0, 0]
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError(f"{OP}: padding='same' of {conv} is asymmetric; use explicit padding")
        return [t // 2 for t in total]
    return list(conv.padding)


def conv_bn_relu_modules(x, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, relu: bool = True, memory_efficient: bool = False):
    """``relu(bn(conv(x)))`` (``bn(conv(x))`` with ``relu=False``), fused: the modules' parameters and
    BatchNorm's mode and state (running statistics, ``num_batches_tracked``, momentum) exactly as
    calling the modules in turn would use and update them."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"{OP}: only padding_mode='zeros' convolutions fuse; got {conv.padding_mode!r}")
    tracking = bn.training and bn.track_running_stats
    use_running = not bn.training or bn.track_running_stats
    return conv_bn_relu(
        x, conv.weight, conv.bias, bn.weight, bn.bias,
        bn.running_mean if use_running else None, bn.running_var if use_running else None,
        conv.stride, _conv_padding(conv), conv.dilation, conv.groups,
        training=bn.training or bn.running_mean is None, momentum=bn.momentum, eps=bn.eps, relu=relu,
        memory_efficient=memory_efficient, num_batches_tracked=bn.num_batches_tracked if tracking else None,
    )  # fmt: skip

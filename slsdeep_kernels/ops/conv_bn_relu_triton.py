"""Triton kernels of conv + BatchNorm (+ ReLU) and their launchers (the maths:
:mod:`slsdeep_kernels.ops.conv_bn_relu`, docs/design.md §4.1). Imported only when the ``triton``
backend runs (``backend.triton_kernels``). The convolution is always ATen's (cuDNN on a GPU); the
kernels here are the passes around it, each one read (and write) of the activation:

* eval: the conv with the raw weights, the fold (one small kernel: per-channel scale and shift in
  fp32 from b, γ, β and the running statistics), then one normalise + ReLU pass in place;
* train: the conv, one statistics pass (per-part partials merged in a fixed order) and one
  normalise + affine + ReLU pass; backward: one reduction and one elementwise pass with the ReLU
  mask fused, then the convolution's backward through ATen.

Every pass walks the dense (N, C, S) activation in [BLOCK_R, BLOCK_C] tiles, channels on axis 1
(:func:`_tile`): rows (n, s) at stride C in channels_last, positions of one sample at stride 1 in
NCHW. The channel of an element is its tile column (no division or modulo per element; one 32-bit
division per NCHW tile), the per-channel coefficients are loaded once per tile, and the contiguous
axis of the tile gives 16-byte accesses wherever C (channels_last) or S (NCHW) is a multiple of 16.

Floors (H200, 4.8 TB/s; model decoder (16, 512, 48, 48) bf16, 38 MB an activation): statistics one
read (8 µs), normalise + ReLU a read and a write (16 µs), backward sums two reads (16 µs), backward
apply three reads and a write (32 µs).

Launchers, called by the op's custom ops: :func:`eval_forward`, :func:`train_forward`, :func:`train_backward`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slsdeep_kernels import backend as backends
from slsdeep_kernels.ops.conv_bn_relu import _conv_backward


@triton.jit
def _tile(tile, cols, col_mask, C, S, rows, chunks, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr):
    """Offsets, mask and valid row count of tile ``tile`` (channels ``cols``) of a dense (N, C, S)
    activation. channels_last: rows tile·BLOCK_R … of the N·S rows (n, s), stride C; NCHW: the
    ``tile % chunks``-th run of BLOCK_R positions of sample ``tile // chunks``, stride 1."""
    if CHANNELS_LAST:
        first = tl.cast(tile, tl.int64) * BLOCK_R
        row = first + tl.arange(0, BLOCK_R)
        offsets = row[:, None] * C + cols[None, :]
        row_mask = row < rows
        count = tl.minimum(rows - first, BLOCK_R)
    else:
        n = tile // chunks
        first = (tile - n * chunks) * BLOCK_R
        s = first + tl.arange(0, BLOCK_R)
        offsets = tl.cast(n, tl.int64) * C * S + cols.to(tl.int64)[None, :] * S + s[:, None]
        row_mask = s < S
        count = tl.minimum(S - first, BLOCK_R)
    return offsets, row_mask[:, None] & col_mask[None, :], tl.cast(count, tl.float32)


@triton.jit
def _channels(C, AXIS: tl.constexpr, BLOCK_C: tl.constexpr):
    """A program's block of channels along grid axis ``AXIS``, and its mask."""
    cols = tl.program_id(AXIS) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def _stats_partial_kernel(
    y_ptr, partial_ptr, C, S, rows, chunks, tiles, tiles_per_part,
    CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per channel, the count, mean and Σ(y − mean)² of one part of the tiles: exact two-pass per tile,
    tiles merged in order (Chan). Grid (channel blocks, parts); ``partial``: (3, parts, C) fp32."""
    cols, col_mask = _channels(C, 0, BLOCK_C)
    part = tl.program_id(1)
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile in range(part * tiles_per_part, tl.minimum((part + 1) * tiles_per_part, tiles)):
        offsets, mask, n_tile = _tile(tile, cols, col_mask, C, S, rows, chunks, CHANNELS_LAST, BLOCK_R)
        v = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tile_mean = tl.sum(v, axis=0) / n_tile
        d = tl.where(mask, v - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        total = count + n_tile
        delta = tile_mean - mean
        mean += delta * (n_tile / total)
        m2 += tile_m2 + delta * delta * (count * n_tile / total)
        count = total
    at = partial_ptr + part * C + cols
    plane = tl.num_programs(1) * C
    tl.store(at, count, mask=col_mask)
    tl.store(at + plane, mean, mask=col_mask)
    tl.store(at + 2 * plane, m2, mask=col_mask)


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
    partial_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, gamma_ptr, beta_ptr,
    C, parts, eps, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Merge the parts in a fixed order (deterministic): batch mean, biased var, BN's affine map."""
    cols, col_mask = _channels(C, 0, BLOCK_C)
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for part in range(parts):
        at = partial_ptr + part * C + cols
        n_part = tl.load(at, mask=col_mask, other=1.0)
        part_mean = tl.load(at + parts * C, mask=col_mask, other=0.0)
        part_m2 = tl.load(at + 2 * parts * C, mask=col_mask, other=0.0)
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
def _eval_fold_kernel(
    bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, C, eps,
    HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Eval BN folded after a conv with bias b: scale = γ/σ, shift = (b − μ)·scale + β, i.e. the
    training map of :func:`_bn_affine` with the mean μ − b."""
    cols, col_mask = _channels(C, 0, BLOCK_C)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        mean -= tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + cols, mask=col_mask, other=1.0).to(tl.float32)
    _invstd, scale, shift = _bn_affine(mean, var, gamma_ptr, beta_ptr, cols, col_mask, eps, HAS_GAMMA, HAS_BETA)
    tl.store(scale_ptr + cols, scale, mask=col_mask)
    tl.store(shift_ptr + cols, shift, mask=col_mask)


@triton.jit
def _bn_act_kernel(
    y_ptr, out_ptr, scale_ptr, shift_ptr, C, S, rows, chunks,
    CHANNELS_LAST: tl.constexpr, RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out = relu(y·scale[c] + shift[c]) (in place when out is y). Grid (tiles, channel blocks)."""
    cols, col_mask = _channels(C, 1, BLOCK_C)
    offsets, mask, _ = _tile(tl.program_id(0), cols, col_mask, C, S, rows, chunks, CHANNELS_LAST, BLOCK_R)
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_mask, other=0.0)
    v = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
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
    g_ptr, y_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, partial_ptr,
    C, S, rows, chunks, tiles, tiles_per_part, eps,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, RELU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per channel and part: Σg and Σg·(y − mean), g the ReLU-masked gradient. Grid (channel blocks,
    parts); ``partial``: (2, parts, C) fp32."""
    cols, col_mask = _channels(C, 0, BLOCK_C)
    part = tl.program_id(1)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    var = tl.load(var_ptr + cols, mask=col_mask, other=1.0)
    _invstd, scale, shift = _bn_affine(mean, var, gamma_ptr, beta_ptr, cols, col_mask, eps, HAS_GAMMA, HAS_BETA)
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile in range(part * tiles_per_part, tl.minimum((part + 1) * tiles_per_part, tiles)):
        offsets, mask, _ = _tile(tile, cols, col_mask, C, S, rows, chunks, CHANNELS_LAST, BLOCK_R)
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = _masked_grad(g, y, scale[None, :], shift[None, :], RELU)
        sum_g += tl.sum(g, axis=0)
        sum_gc += tl.sum(g * (y - mean[None, :]), axis=0)
    at = partial_ptr + part * C + cols
    tl.store(at, sum_g, mask=col_mask)
    tl.store(at + tl.num_programs(1) * C, sum_gc, mask=col_mask)


@triton.jit
def _backward_merge_kernel(
    partial_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, grad_gamma_ptr, grad_beta_ptr, coef_ptr,
    C, rows, parts, eps, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """grad_γ, grad_β, and per channel (scale, shift, g_coef, c_coef, const) of
    grad_y = g_coef·g + c_coef·(y − mean) + const, g masked where y·scale + shift ≤ 0."""
    cols, col_mask = _channels(C, 0, BLOCK_C)
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for part in range(parts):
        sum_g += tl.load(partial_ptr + part * C + cols, mask=col_mask, other=0.0)
        sum_gc += tl.load(partial_ptr + (parts + part) * C + cols, mask=col_mask, other=0.0)
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
def _coefficient(ptr, row, C, cols, col_mask):
    """Row ``row`` of a (rows, C) table of per-channel fp32 coefficients, as a [1, BLOCK_C] tile row."""
    return tl.load(ptr + row * C + cols, mask=col_mask, other=0.0)[None, :]


@triton.jit
def _backward_apply_kernel(
    g_ptr, y_ptr, out_ptr, mean_ptr, coef_ptr, C, S, rows, chunks,
    CHANNELS_LAST: tl.constexpr, RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """grad_y = g_coef·g + c_coef·(y − mean) + const with the ReLU mask fused (no mask tensor). Grid
    (tiles, channel blocks)."""
    cols, col_mask = _channels(C, 1, BLOCK_C)
    offsets, mask, _ = _tile(tl.program_id(0), cols, col_mask, C, S, rows, chunks, CHANNELS_LAST, BLOCK_R)
    scale = _coefficient(coef_ptr, 0, C, cols, col_mask)
    shift = _coefficient(coef_ptr, 1, C, cols, col_mask)
    g_coef = _coefficient(coef_ptr, 2, C, cols, col_mask)
    c_coef = _coefficient(coef_ptr, 3, C, cols, col_mask)
    const = _coefficient(coef_ptr, 4, C, cols, col_mask)
    mean = _coefficient(mean_ptr, 0, C, cols, col_mask)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = _masked_grad(tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32), y, scale, shift, RELU)
    v = g_coef * g + c_coef * (y - mean) + const
    tl.store(out_ptr + offsets, v.to(out_ptr.dtype.element_ty), mask=mask)


def _conv(x, weight, bias, options):
    """The convolution through ATen (oneDNN / cuDNN), dense in the input's memory format."""
    y = torch.ops.aten.convolution(x, weight, bias, options.stride, options.padding, options.dilation, False, [0, 0], options.groups)
    return y.contiguous(memory_format=backends.preserved_format(x))


def _tile_sizes() -> tuple[int, int]:
    """(elements a tile, programs a reduction aims for): a GPU's, or small ones under the interpreter
    so that the tests' small shapes span several tiles, channel blocks, parts and tiles per part."""
    return (128, 8) if backends.triton_interpreted() else (1024, 1024)


def _tiling(y: torch.Tensor) -> dict:
    """The tiles of every pass over the dense activation ``y`` (:func:`_tile`) and the warps that give
    each thread 16 bytes per access. channels_last: up to elements/16 channels (64 on a GPU) × the
    rest in rows; NCHW: up to elements/4 positions (256: a warp reads 512 contiguous bytes of a bf16
    channel) × the rest in channels. The reductions split the tiles into parts, in a fixed order."""
    N, C = y.shape[:2]
    S = y.shape[2] * y.shape[3]
    channels_last = backends.preserved_format(y) == torch.channels_last
    elements, programs = _tile_sizes()
    if channels_last:
        block_c = min(triton.next_power_of_2(C), elements // 16)
        block_r = elements // block_c
        chunks, tiles = 1, triton.cdiv(N * S, block_r)
    else:
        block_r = min(triton.next_power_of_2(S), elements // 4)
        block_c = max(1, elements // block_r)
        chunks = triton.cdiv(S, block_r)
        tiles = N * chunks
    c_blocks = triton.cdiv(C, block_c)
    parts = max(1, min(tiles, programs // c_blocks))
    per_part = max(1, triton.cdiv(tiles, parts))  # an empty activation: no tile, no part (the merge: mean 0, var 0/0)
    return dict(C=C, S=S, rows=N * S, chunks=chunks, tiles=tiles, c_blocks=c_blocks, per_part=per_part,
                parts=triton.cdiv(tiles, per_part), channels_last=channels_last, block_r=block_r, block_c=block_c,
                warps=max(1, elements * y.element_size() // (32 * 16)))  # fmt: skip


def _tile_arguments(t: dict) -> tuple:
    return t["C"], t["S"], t["rows"], t["chunks"]


def _normalise(y, out, scale, shift, relu: bool) -> None:
    """out = relu(y·scale + shift) per channel, in one pass (``out`` may be ``y``)."""
    t = _tiling(y)
    backends.launch(
        _bn_act_kernel, (t["tiles"], t["c_blocks"]), y, out, scale, shift, *_tile_arguments(t),
        CHANNELS_LAST=t["channels_last"], RELU=relu, BLOCK_R=t["block_r"], BLOCK_C=t["block_c"], num_warps=t["warps"],
    )  # fmt: skip


def eval_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, options):
    """ATen's convolution with the raw weights, the fold, then the BatchNorm and the ReLU in one pass in place."""
    out = _conv(x, weight, None, options)
    C = out.shape[1]
    scale, shift = (torch.empty((C,), dtype=torch.float32, device=out.device) for _ in range(2))
    (gamma, beta), affine_flags = _affine(bn_weight, bn_bias, running_mean)
    block_c = min(1024, triton.next_power_of_2(C))
    backends.launch(
        _eval_fold_kernel, (triton.cdiv(C, block_c),), bias if bias is not None else running_mean, gamma, beta,
        running_mean, running_var, scale, shift, C, options.eps, HAS_BIAS=bias is not None, **affine_flags, BLOCK_C=block_c,
    )  # fmt: skip
    _normalise(out, out, scale, shift, options.relu)
    return out


def _affine(bn_weight, bn_bias, placeholder):
    """γ and β for a kernel (``placeholder`` for an absent one: its flag is off, it is never read)."""
    pointers = [t if t is not None else placeholder for t in (bn_weight, bn_bias)]
    return pointers, dict(HAS_GAMMA=bn_weight is not None, HAS_BETA=bn_bias is not None)


def train_forward(x, weight, bias, bn_weight, bn_bias, options):
    y = _conv(x, weight, bias, options)
    t = _tiling(y)
    C = t["C"]
    per_part, parts = t["per_part"], t["parts"]
    f32 = dict(dtype=torch.float32, device=y.device)
    partial = torch.empty((3, parts, C), **f32)
    backends.launch(
        _stats_partial_kernel, (t["c_blocks"], parts), y, partial, *_tile_arguments(t), t["tiles"], per_part,
        CHANNELS_LAST=t["channels_last"], BLOCK_R=t["block_r"], BLOCK_C=t["block_c"], num_warps=t["warps"],
    )  # fmt: skip
    mean, var = backends.new_output((C,), **f32), backends.new_output((C,), **f32)
    scale, shift = torch.empty((C,), **f32), torch.empty((C,), **f32)
    (gamma, beta), affine_flags = _affine(bn_weight, bn_bias, mean)
    backends.launch(
        _stats_merge_kernel, (t["c_blocks"],), partial, mean, var, scale, shift, gamma, beta,
        C, parts, options.eps, **affine_flags, BLOCK_C=t["block_c"],
    )  # fmt: skip
    out = backends.new_output(y.shape, dtype=y.dtype, device=y.device, memory_format=backends.preserved_format(y))
    _normalise(y, out, scale, shift, options.relu)
    return out, y, mean, var


def train_backward(grad_out, x, weight, bias, conv_out, mean, var, bn_weight, bn_bias, options, conv_mask):
    """Triton BN + ReLU backward (one reduction, one elementwise pass), then the conv backward through ATen."""
    y = conv_out if conv_out is not None else _conv(x, weight, bias, options)
    g = grad_out.contiguous(memory_format=backends.preserved_format(y))
    t = _tiling(y)
    C = t["C"]
    per_part, parts = t["per_part"], t["parts"]
    f32 = dict(dtype=torch.float32, device=y.device)
    partial = torch.empty((2, parts, C), **f32)
    (gamma, beta), affine_flags = _affine(bn_weight, bn_bias, mean)
    tiles = dict(CHANNELS_LAST=t["channels_last"], BLOCK_R=t["block_r"], BLOCK_C=t["block_c"], num_warps=t["warps"])
    backends.launch(
        _backward_partial_kernel, (t["c_blocks"], parts), g, y, mean, var, gamma, beta, partial,
        *_tile_arguments(t), t["tiles"], per_part, options.eps, **affine_flags, RELU=options.relu, **tiles,
    )  # fmt: skip
    grad_gamma, grad_beta = backends.new_output((C,), **f32), backends.new_output((C,), **f32)
    coefficients = torch.empty((5, C), **f32)
    backends.launch(
        _backward_merge_kernel, (t["c_blocks"],), partial, mean, var, gamma, beta, grad_gamma, grad_beta, coefficients,
        C, t["rows"], parts, options.eps, **affine_flags, BLOCK_C=t["block_c"],
    )  # fmt: skip
    grad_y = backends.new_output(y.shape, dtype=y.dtype, device=y.device, memory_format=backends.preserved_format(y))
    backends.launch(
        _backward_apply_kernel, (t["tiles"], t["c_blocks"]), g, y, grad_y, mean, coefficients, *_tile_arguments(t),
        RELU=options.relu, **tiles,
    )  # fmt: skip
    grad_x, grad_w, grad_b = _conv_backward(grad_y, x, weight, options, conv_mask)
    return [
        grad_x,
        grad_w,
        grad_b,
        grad_gamma.to(bn_weight.dtype) if bn_weight is not None else grad_gamma,
        grad_beta.to(bn_bias.dtype) if bn_bias is not None else grad_beta,
    ]

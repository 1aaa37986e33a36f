"""Triton kernels of the pyramid ops and their launchers (the maths: :mod:`slsdeep_kernels.ops.pyramid`,
docs/design.md §4.2). Imported only when the ``triton`` backend runs (``backend.triton_kernels``).

Every op here is a sum of separable per-cell weights, so two kernels do all::

    reduce: out[n, c, k] = scale[k] · Σ_p x[n, c, p] · rows[h(p), k] · cols[w(p), k]
    expand: out[n, c, p] (+)= Σ_k v[n, c, k] · scale[k] · rows[h(p), k] · cols[w(p), k]

with k a cell (pooling window, branch cell, or branch cell and kernel tap) and the per-axis weight
tables, (H, K) and (W, K) with the cells contiguous, built once per shape from PyTorch's own index
rules. Both are tl.dot GEMMs over channel tiles, fp32 accumulation: the reduce walks the image's
rows in runs of BLOCK_W columns (no division: a run's x loads are contiguous in NCHW, its channels
in channels_last), and every table load reads a run of cells in 16-byte packs, as does every load
of the expand's cell values (packed by :func:`_cell_values`).

Launchers, one per custom op the pyramid module dispatches: :func:`pool`, :func:`pool_backward`,
:func:`upsample_concat`, :func:`upsample_concat_backward`, :func:`taps_add`, :func:`taps_backward`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from slsdeep_kernels import backend as backends
from slsdeep_kernels.ops.pyramid import _cells, _format

_BLOCK_C, _BLOCK_P, _BLOCK_K = 64, 64, 32


def _reduce_tiles(dtype: torch.dtype, width: int) -> tuple[int, int]:
    """reduce (BLOCK_W, most cells per k-tile): every cell of a k-tile shares one read of x (all 50
    pooling cells of bins 1, 2, 3, 6 at once) up to 64 cells for 16-bit inputs, 32 for fp32 (tf32x3
    splits each operand in two): the largest tiles that do not spill on sm_90 and sm_80 with triton
    3.6 and 3.8 (ptxas -v: bench/compile/triton-sm90.json). Runs of 32 columns, or 16 where they
    waste fewer (48: three runs of 16, not 32 + 16 of 32)."""
    block_w = 32 if triton.cdiv(width, 32) * 32 <= triton.cdiv(width, 16) * 16 else 16
    return (block_w, 32) if dtype == torch.float32 else (block_w, 64)


@triton.jit
def _reduce_kernel(
    x_ptr, rows_ptr, cols_ptr, scale_ptr, out_ptr,
    C, K, KS, H, W,
    x_sn, x_sc, x_sh, x_sw,
    o_sn, o_sc, o_sk,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Grid (N · k tiles, channel tiles): the batch shares axis 0 (axes 1 and 2 stop at 65,535).
    k_tiles = tl.cdiv(K, BLOCK_K)
    n = (tl.program_id(0) // k_tiles).to(tl.int64)
    offs_k = (tl.program_id(0) % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_k = offs_k < K
    in_table = offs_k < KS  # the padding cells are zeros: a mask that keeps the table loads packed
    mask_c = offs_c < C
    channels = x_ptr + n * x_sn + offs_c[:, None] * x_sc
    acc = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
    for h in range(0, H):
        row_weight = tl.load(rows_ptr + h * KS + offs_k, mask=in_table, other=0.0)
        for w0 in range(0, W, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            mask_w = w < W
            x = tl.load(channels + h * x_sh + w[None, :] * x_sw, mask=mask_c[:, None] & mask_w[None, :], other=0.0)
            weight = tl.load(cols_ptr + w[:, None] * KS + offs_k[None, :], mask=mask_w[:, None] & in_table[None, :], other=0.0)
            weight *= row_weight[None, :]
            if DOT_FP32:
                acc += tl.dot(x.to(tl.float32), weight, input_precision=PRECISION)
            else:
                acc += tl.dot(x, weight.to(x.dtype))
    acc *= tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
    tl.store(
        out_ptr + n * o_sn + offs_c[:, None] * o_sc + offs_k[None, :] * o_sk,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_c[:, None] & mask_k[None, :],
    )


@triton.jit
def _expand_kernel(
    v_ptr, rows_ptr, cols_ptr, out_ptr,
    C, K, H, W,
    v_sn, v_sc,
    o_sn, o_sc, o_sh, o_sw,
    ACCUMULATE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Grid (N · pixel tiles, channel tiles): the batch shares axis 0 (axes 1 and 2 stop at 65,535).
    # v is _cell_values' (N, C, K): scaled, its cells contiguous and padded like the tables' rows,
    # so every load in the k loop is a 16-byte pack.
    p_tiles = tl.cdiv(H * W, BLOCK_P)
    n = (tl.program_id(0) // p_tiles).to(tl.int64)
    offs_p = (tl.program_id(0) % p_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_p = offs_p < H * W
    mask_c = offs_c < C
    h = offs_p // W
    w = offs_p % W
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        v = tl.load(v_ptr + n * v_sn + offs_c[:, None] * v_sc + offs_k[None, :], mask=mask_c[:, None] & mask_k[None, :], other=0.0)
        mask_w = mask_k[:, None] & mask_p[None, :]
        weight = tl.load(rows_ptr + h[None, :] * K + offs_k[:, None], mask=mask_w, other=0.0)
        weight *= tl.load(cols_ptr + w[None, :] * K + offs_k[:, None], mask=mask_w, other=0.0)
        if DOT_FP32:
            acc += tl.dot(v.to(tl.float32), weight, input_precision=PRECISION)
        else:
            acc += tl.dot(v, weight.to(v.dtype))
    offsets = n * o_sn + offs_c[:, None] * o_sc + h[None, :] * o_sh + w[None, :] * o_sw
    mask = mask_c[:, None] & mask_p[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _dot_mode(dtype: torch.dtype, convolution: bool) -> tuple[bool, str]:
    """(dot in fp32, input precision). fp32 runs on tensor cores: "tf32" for the taps (part of the
    conv) where PyTorch's convolutions may use it, else "tf32x3" (the FMA "ieee" dot of these tiles
    spills KBs of registers per thread): ``backend.dot_precision``. The interpreter's 16-bit dots are
    wrong: fp32 there."""
    dot_fp32 = dtype == torch.float32 or backends.triton_interpreted()
    return dot_fp32, backends.dot_precision(dtype, convolution=convolution, full="tf32x3")


def _warps(dtype: torch.dtype) -> int:
    """8 warps for fp32 (tf32x3 triples the operand registers: 4 spill), 4 for 16-bit inputs (8 get
    128 registers a thread on sm_80 and spill): ptxas -v, bench/compile/triton-sm90.json."""
    return 8 if dtype == torch.float32 else 4


def _reduce(x: Tensor, tables: tuple[Tensor, Tensor, Tensor], out: Tensor, convolution: bool = False) -> Tensor:
    """out (N, C, K) = the reduce kernel over x (N, C, H, W)."""
    rows, cols, scale = tables
    N, C, H, W = x.shape
    K = scale.shape[0]
    dot_fp32, precision = _dot_mode(x.dtype, convolution)
    block_w, max_k = _reduce_tiles(x.dtype, W)
    block_k = min(max_k, triton.next_power_of_2(max(K, 16)))
    grid = (N * triton.cdiv(K, block_k), triton.cdiv(C, _BLOCK_C))
    backends.launch(
        _reduce_kernel, grid, x, rows, cols, scale, out, C, K, rows.stride(0), H, W, *x.stride(), *out.stride(),
        DOT_FP32=dot_fp32, PRECISION=precision, BLOCK_C=_BLOCK_C, BLOCK_W=block_w, BLOCK_K=block_k,
        num_warps=_warps(x.dtype),
    )  # fmt: skip
    return out


def _cell_values(parts: list[Tensor], tables: tuple[Tensor, Tensor, Tensor], dtype: torch.dtype) -> Tensor:
    """The expand's v: the parts' (N, C, K_i) cells side by side in one (N, C, KS) tensor of
    ``dtype``, times the tables' scale (as the kernel did in fp32 before its 16-bit dot), the padding
    cells zero like the tables'. Its rows start 16-byte aligned, so the kernel loads them in packs
    whatever K is (50 pooling cells, 450 taps), once per pixel tile from L2. The copy reads and
    writes v once: for the pool backward at the model's shape (v 3.3 MB, the output 151 MB) 5% more
    bytes; the taps had the same copy before, as their concatenation."""
    rows, _, scale = tables
    N, C = parts[0].shape[:2]
    values = backends.new_output((N, C, rows.shape[1]), dtype=dtype, device=rows.device)
    offset = 0
    for part in parts:
        cells = part.shape[2]
        torch.mul(part, scale[offset : offset + cells], out=values[:, :, offset : offset + cells])
        offset += cells
    values[:, :, offset:].zero_()
    return values


def _expand(parts: list[Tensor], tables: tuple[Tensor, Tensor, Tensor], out: Tensor, accumulate: bool, convolution: bool = False) -> Tensor:
    """out (N, C, H, W) (+)= the expand kernel over the cells of ``parts``, each (N, C, K_i), in order."""
    rows, cols, _ = tables
    v = _cell_values(parts, tables, out.dtype)
    N, C, H, W = out.shape
    dot_fp32, precision = _dot_mode(out.dtype, convolution)
    grid = (N * triton.cdiv(H * W, _BLOCK_P), triton.cdiv(C, _BLOCK_C))
    backends.launch(
        _expand_kernel, grid, v, rows, cols, out, C, v.shape[2], H, W, v.stride(0), v.stride(1), *out.stride(),
        ACCUMULATE=accumulate, DOT_FP32=dot_fp32, PRECISION=precision,
        BLOCK_C=_BLOCK_C, BLOCK_P=_BLOCK_P, BLOCK_K=_BLOCK_K, num_warps=_warps(out.dtype),
    )  # fmt: skip
    return out


def _window_matrix(size: int, cells: int, device: torch.device) -> Tensor:
    """(cells, size) 0/1: row i marks the adaptive window [⌊i·size/cells⌋, ⌈(i+1)·size/cells⌉)."""
    i = torch.arange(cells, device=device)[:, None]
    p = torch.arange(size, device=device)[None, :]
    return ((p >= i * size // cells) & (p < ((i + 1) * size + cells - 1) // cells)).float()


def _linear_matrix(out_size: int, in_size: int, align_corners: bool, shift: int, device: torch.device) -> Tensor:
    """(in_size, out_size) fp32: column o = PyTorch's bilinear weights read at o + shift (0 outside).

    Built by resizing the identity, so it is PyTorch's index rule by construction.
    """
    eye = torch.eye(in_size, device=device).view(in_size, 1, in_size, 1)
    matrix = F.interpolate(eye, size=(out_size, 1), mode="bilinear", align_corners=align_corners)[:, 0, :, 0]
    shifted = torch.zeros_like(matrix)
    if shift >= 0:
        shifted[:, : out_size - shift] = matrix[:, shift:]
    else:
        shifted[:, -shift:] = matrix[:, :shift]
    return shifted


def _cells_contiguous(table: Tensor) -> Tensor:
    """A (cells, size) weight table as the kernels read it: (size, cells), the cells contiguous and
    each row padded with zeros to a multiple of 16 cells, so that every row starts 64-byte aligned
    (the kernels' table loads are 16-byte packs)."""
    cells, size = table.shape
    padded = table.new_zeros(size, triton.cdiv(cells, 16) * 16)
    padded[:, :cells] = table.t()
    return padded


@functools.lru_cache(maxsize=64)
def _pool_tables(height: int, width: int, bins: tuple[int, ...], device: torch.device):
    """Per-axis 0/1 windows of every cell (bins in order, b×b row-major), (H, K) and (W, K), and 1/area."""
    rows, cols = [], []
    for b in bins:
        rows.append(_window_matrix(height, b, device).repeat_interleave(b, dim=0))
        cols.append(_window_matrix(width, b, device).repeat(b, 1))
    rows, cols = torch.cat(rows), torch.cat(cols)
    return _cells_contiguous(rows), _cells_contiguous(cols), 1.0 / (rows.sum(1) * cols.sum(1))


@functools.lru_cache(maxsize=64)
def _upsample_tables(height: int, width: int, size: tuple[int, int], align_corners: bool, device: torch.device):
    """Per-axis bilinear weights of every cell (i, j) of an h×w branch resized to height×width."""
    h, w = size
    rows = _linear_matrix(height, h, align_corners, 0, device).repeat_interleave(w, dim=0)
    cols = _linear_matrix(width, w, align_corners, 0, device).repeat(h, 1)
    return _cells_contiguous(rows), _cells_contiguous(cols), torch.ones(h * w, device=device)


@functools.lru_cache(maxsize=64)
def _tap_tables(
    height: int, width: int, sizes: tuple[tuple[int, int], ...], kernel_size: int, align_corners: bool, device: torch.device
):
    """Per-axis weights of every (branch, ky, kx, i, j) of a k×k kernel: the bilinear stencil read at
    p + (ky, kx) - k//2."""
    rows, cols, half = [], [], kernel_size // 2
    for h, w in sizes:
        for ky in range(kernel_size):
            for kx in range(kernel_size):
                rows.append(_linear_matrix(height, h, align_corners, ky - half, device).repeat_interleave(w, dim=0))
                cols.append(_linear_matrix(width, w, align_corners, kx - half, device).repeat(h, 1))
    rows, cols = torch.cat(rows), torch.cat(cols)
    return _cells_contiguous(rows), _cells_contiguous(cols), torch.ones(rows.shape[0], device=device)


def pool(x: Tensor, bins: list[int]) -> Tensor:
    out = backends.new_output((x.shape[0], x.shape[1], _cells(bins)), dtype=x.dtype, device=x.device)
    return _reduce(x, _pool_tables(x.shape[2], x.shape[3], tuple(bins), x.device), out)


def pool_backward(grad: Tensor, bins: list[int], height: int, width: int, channels_last: bool) -> Tensor:
    out = backends.new_output(
        (grad.shape[0], grad.shape[1], height, width), dtype=grad.dtype, device=grad.device,
        memory_format=_format(channels_last),
    )  # fmt: skip
    return _expand([grad], _pool_tables(height, width, tuple(bins), grad.device), out, accumulate=False)


def upsample_concat(x: Tensor, branches: list[Tensor], align_corners: bool) -> Tensor:
    N, C, H, W = x.shape
    out = backends.new_output(
        (N, C + sum(y.shape[1] for y in branches), H, W), dtype=x.dtype, device=x.device,
        memory_format=backends.preserved_format(x),
    )  # fmt: skip
    out[:, :C].copy_(x)
    offset = C
    for y in branches:
        tables = _upsample_tables(H, W, tuple(y.shape[2:]), align_corners, x.device)
        _expand([y.reshape(N, y.shape[1], -1)], tables, out[:, offset : offset + y.shape[1]], accumulate=False)
        offset += y.shape[1]
    return out


def upsample_concat_backward(grad: Tensor, channels: int, sizes: list[int], align_corners: bool) -> list[Tensor]:
    N, _, H, W = grad.shape
    grads, offset = [], channels
    for cb, h, w in zip(sizes[0::3], sizes[1::3], sizes[2::3]):
        out = backends.new_output((N, cb, h * w), dtype=grad.dtype, device=grad.device)
        _reduce(grad[:, offset : offset + cb], _upsample_tables(H, W, (h, w), align_corners, grad.device), out)
        grads.append(out.view(N, cb, h, w))
        offset += cb
    return grads


def taps_add(out: Tensor, taps: list[Tensor], align_corners: bool) -> None:
    if not taps:
        return
    N, Co, H, W = out.shape
    sizes, kernel_size = tuple(tuple(z.shape[4:]) for z in taps), taps[0].shape[2]  # one k: the op's
    tables = _tap_tables(H, W, sizes, kernel_size, align_corners, out.device)
    _expand([z.reshape(N, Co, -1) for z in taps], tables, out, accumulate=True, convolution=True)


def taps_backward(grad: Tensor, sizes: list[int], kernel_size: int, align_corners: bool) -> list[Tensor]:
    N, Co, H, W = grad.shape
    pairs, k = tuple(zip(sizes[0::2], sizes[1::2])), kernel_size
    if not pairs:
        return []
    tables = _tap_tables(H, W, pairs, k, align_corners, grad.device)
    out = backends.new_output((N, Co, tables[2].shape[0]), dtype=grad.dtype, device=grad.device)
    _reduce(grad, tables, out, convolution=True)
    return [z.reshape(N, Co, k, k, h, w) for z, (h, w) in zip(out.split([k * k * h * w for h, w in pairs], dim=2), pairs)]

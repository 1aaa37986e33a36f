"""Pyramid pooling (docs/design.md §4.2): the decoder of PSPNet-style models without its memory traffic.

* ``pyramid_pool(x, bins)`` -> ``(N, C, Σ b²)``: the adaptive average cells of every bin from one read
  of ``x`` (PyTorch's windows ``[⌊i·H/b⌋, ⌈(i+1)·H/b⌉)``, so any H, W, also smaller than b).
* ``upsample_concat(x, branches)`` = ``cat([x] + [interpolate(y, (H, W), "bilinear")])`` written once;
  its backward gathers (no atomics).
* ``pyramid_conv(parts, weight, bias, size)`` = the k×k conv (k = 1 or 3, padding k//2) over
  ``cat(parts)`` with every part not at ``size`` resized bilinearly to it, without the concatenation
  (``pyramid_conv3x3(x, branches, ...)``: its 3×3 form with ``parts = [x, *branches]``). Resizing and
  the conv are linear, so for every branch y and tap t = (ky, kx):
  ``conv(up(y))(p) = Σ_t up(W_t·y)(p + t - k//2)`` (zero outside the image; for k = 1 simply
  ``up(W·y)``). The op runs the conv over the full-resolution parts only (ATen: oneDNN / cuDNN),
  forms ``z_t = W_t·y`` at the branch's size (one small matmul per branch), and one kernel adds the
  shifted bilinear reads of every z_t into the conv output. Backward: the conv's own backward for
  the full-resolution parts, the adjoint of the shifted reads (a gather), then matmuls for the
  branches and their weight slices.

Floors (N=16, C=2048, 48×48, branches 4×1024 at b = 1, 2, 3, 6, conv to 512; s = bytes per element):

* pool + upsample_concat forward: read x once, write the (N, C + 4096, H, W) output once:
  ``(N·C·H·W + N·6144·H·W)·s`` = 604 MB in bf16 -> 0.18 ms at 3.35 TB/s (H100). The eager pair reads x
  four times, writes every upsampled branch, then reads and writes everything again in ``cat``.
* ``pyramid_conv`` (3×3): the direct conv over the concatenation costs ``2·N·H·W·512·9·6144`` = 2.09 TFLOP;
  ours ``2·N·H·W·512·9·2048`` = 0.70 TFLOP for the x channels, plus ``2·9·512·1024·N·Σb²``
  = 7.5 GFLOP for the z_t and ``2·N·512·H·W·9·Σb²`` (dense tap reads; far less in the separable CPU
  kernel) = 17 GFLOP: 0.72 TFLOP, 2.9× less, -> 0.73 ms at 989 TFLOP/s bf16. ``relu=True`` adds an
  in-place pass over the output after the taps (not yet in the taps kernels' store):
  ``2·N·512·H·W·s`` = 75 MB -> 16 µs at 4.8 TB/s (H200), ~2% of the conv.

CPU shape (4, 512, 48, 48; branches 4×256; conv to 128) in fp32: pool+upsample_concat moves
``(4·512·2304 + 4·1536·2304)·4`` = 75 MB; the conv over x is 10.9 GFLOP against 32.6 for the direct one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from slsdeep_kernels import backend as backends
from slsdeep_kernels.ops.conv_bn_relu import fold_batch_norm

PYRAMID_BINS = (1, 2, 3, 6)  # PSPNet's bins, the default everywhere
MAX_BINS = 16  # csrc/common/pyramid.h kMaxBins: the compiled pool kernels' tables
MAX_BIN_SUM = 64  # csrc/common/pyramid.h kMaxAxisCells

# ---------------------------------------------------------------------------------------------
# 1. Reference: plain differentiable PyTorch, the spec.
# ---------------------------------------------------------------------------------------------


def pyramid_pool_reference(x: Tensor, bins: Sequence[int] = PYRAMID_BINS) -> Tensor:
    """(N, C, Σ b²): ``adaptive_avg_pool2d(x, b)`` of every bin, flattened row-major, in bin order."""
    return torch.cat([F.adaptive_avg_pool2d(x, b).flatten(2) for b in bins], dim=2)


def upsample_concat_reference(x: Tensor, branches: Sequence[Tensor], align_corners: bool = False) -> Tensor:
    """``cat([x] + [interpolate(y, x's H×W, bilinear)])`` along the channels."""
    size = tuple(x.shape[-2:])
    resized = [F.interpolate(y, size=size, mode="bilinear", align_corners=align_corners) for y in branches]
    return torch.cat([x, *resized], dim=1)


def pyramid_conv_reference(
    parts: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None = None,
    size: Sequence[int] | None = None,
    align_corners: bool = False,
    relu: bool = False,
) -> Tensor:
    """The k×k conv (padding k//2) over ``cat(parts)`` with every part not at ``size`` (default:
    ``parts[0]``'s H×W) resized to it bilinearly; then ReLU when ``relu``."""
    size = tuple(parts[0].shape[2:]) if size is None else tuple(size)
    resized = [
        p if tuple(p.shape[2:]) == size else F.interpolate(p, size=size, mode="bilinear", align_corners=align_corners)
        for p in parts
    ]
    out = F.conv2d(torch.cat(resized, dim=1), weight, bias, padding=weight.shape[-1] // 2)
    return F.relu(out) if relu else out


def pyramid_conv3x3_reference(
    x: Tensor, branches: Sequence[Tensor], weight: Tensor, bias: Tensor | None = None, align_corners: bool = False
) -> Tensor:
    """The 3×3 conv (padding 1) over ``upsample_concat(x, branches)``."""
    return F.conv2d(upsample_concat_reference(x, branches, align_corners), weight, bias, padding=1)


# ---------------------------------------------------------------------------------------------
# 2. Custom ops (torch.library): schema, fake kernel, autograd. They run the compiled kernels
#    ("cpu", "cuda") or the Triton launchers of ops/pyramid_triton.py ("triton", imported on first use).
# ---------------------------------------------------------------------------------------------


def _triton():
    return backends.triton_kernels("pyramid")


def _cells(bins: Sequence[int]) -> int:
    return sum(b * b for b in bins)


def _is_channels_last(x: Tensor) -> bool:
    return backends.preserved_format(x) == torch.channels_last


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _empty(shape, like: Tensor, memory_format=torch.contiguous_format) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


# --- pyramid_pool


@torch.library.custom_op("slsdeep_kernels::pyramid_pool", mutates_args=())
def _pyramid_pool_op(x: Tensor, bins: list[int], backend: str) -> Tensor:
    if backend == "triton":
        return _triton().pool(x, bins)
    return backends.COMPILED.pyramid_pool_kernel(x, bins)


@_pyramid_pool_op.register_fake
def _(x, bins, backend):
    return _empty((x.shape[0], x.shape[1], _cells(bins)), x)


@torch.library.custom_op("slsdeep_kernels::pyramid_pool_backward", mutates_args=())
def _pyramid_pool_backward_op(
    grad: Tensor, bins: list[int], height: int, width: int, channels_last: bool, backend: str
) -> Tensor:
    if backend == "triton":
        return _triton().pool_backward(grad, bins, height, width, channels_last)
    return backends.COMPILED.pyramid_pool_backward_kernel(grad, bins, height, width, channels_last)


@_pyramid_pool_backward_op.register_fake
def _(grad, bins, height, width, channels_last, backend):
    return _empty((grad.shape[0], grad.shape[1], height, width), grad, _format(channels_last))


def _pool_setup(ctx, inputs, output):
    x, bins, backend = inputs
    ctx.bins, ctx.backend = bins, backend
    ctx.size, ctx.channels_last = tuple(x.shape[2:]), _is_channels_last(x)


def _pool_backward(ctx, grad):
    height, width = ctx.size
    return _pyramid_pool_backward_op(grad, ctx.bins, height, width, ctx.channels_last, ctx.backend), None, None


torch.library.register_autograd("slsdeep_kernels::pyramid_pool", _pool_backward, setup_context=_pool_setup)
_pyramid_pool_backward_op.register_autograd(backends.no_double_backward("pyramid_pool"))

# --- upsample_concat


@torch.library.custom_op("slsdeep_kernels::upsample_concat", mutates_args=())
def _upsample_concat_op(x: Tensor, branches: list[Tensor], align_corners: bool, backend: str) -> Tensor:
    if backend == "triton":
        return _triton().upsample_concat(x, branches, align_corners)
    return backends.COMPILED.upsample_concat_kernel(x, branches, align_corners, _is_channels_last(x))


@_upsample_concat_op.register_fake
def _(x, branches, align_corners, backend):
    N, C, H, W = x.shape
    return _empty((N, C + sum(y.shape[1] for y in branches), H, W), x, backends.preserved_format(x))


@torch.library.custom_op("slsdeep_kernels::upsample_concat_backward", mutates_args=())
def _upsample_concat_backward_op(
    grad: Tensor, channels: int, branch_sizes: list[int], align_corners: bool, backend: str
) -> list[Tensor]:
    if backend == "triton":
        return _triton().upsample_concat_backward(grad, channels, branch_sizes, align_corners)
    return backends.COMPILED.upsample_concat_backward_kernel(grad, channels, branch_sizes, align_corners)


@_upsample_concat_backward_op.register_fake
def _(grad, channels, branch_sizes, align_corners, backend):
    sizes = zip(branch_sizes[0::3], branch_sizes[1::3], branch_sizes[2::3])
    return [_empty((grad.shape[0], cb, h, w), grad) for cb, h, w in sizes]


def _upsample_setup(ctx, inputs, output):
    x, branches, align_corners, backend = inputs
    ctx.channels, ctx.align_corners, ctx.backend = x.shape[1], align_corners, backend
    ctx.branch_sizes = [size for y in branches for size in y.shape[1:]]


def _upsample_backward(ctx, grad):
    grad_branches = _upsample_concat_backward_op(grad, ctx.channels, ctx.branch_sizes, ctx.align_corners, ctx.backend)
    return grad[:, : ctx.channels], grad_branches, None, None


torch.library.register_autograd("slsdeep_kernels::upsample_concat", _upsample_backward, setup_context=_upsample_setup)
_upsample_concat_backward_op.register_autograd(backends.no_double_backward("upsample_concat"))

# --- pyramid_conv


def _full_resolution(parts: list[Tensor], size: Sequence[int]) -> list[bool]:
    """Which parts are at the output size (the others are resized to it)."""
    return [tuple(p.shape[2:]) == tuple(size) for p in parts]


def _full_input(parts: list[Tensor], full: list[bool]) -> tuple[Tensor, torch.memory_format]:
    """The conv's full-resolution input (the one such part, or those parts concatenated in order) and
    the output's memory format: the first full-resolution part's."""
    chosen = [p for p, f in zip(parts, full) if f]
    return chosen[0] if len(chosen) == 1 else torch.cat(chosen, dim=1), backends.preserved_format(chosen[0])


def _split_weight(weight: Tensor, parts: list[Tensor], full: list[bool]) -> tuple[Tensor, list[Tensor]]:
    """The conv weight as the op takes it: the full-resolution parts' slices (C_out, C_full, k, k),
    dense, for the conv, and per resized part (a branch) its slice as (k·k·C_out, C_b), rows ordered
    (ky, kx, out channel), for the tap matmuls. Differentiable ATen: autograd turns the pieces'
    gradients into the weight's: one ``split``, whose backward concatenates the pieces' gradients
    (a slice per piece would zero-fill a weight-sized gradient for each). Under ``torch.export``:
    slices, which an ONNX export folds into constant weights (a split's several outputs it does not)."""
    widths = [p.shape[1] for p in parts]
    if torch.compiler.is_exporting():
        offsets = itertools.accumulate(widths[:-1], initial=0)
        pieces = [weight.narrow(1, offset, width) for offset, width in zip(offsets, widths)]
    else:
        pieces = weight.split(widths, dim=1)
    full_slices, branch_weights = [], []
    for p, is_full, piece in zip(parts, full, pieces):
        if is_full:
            full_slices.append(piece)
        else:
            branch_weights.append(piece.permute(2, 3, 0, 1).clone(memory_format=torch.contiguous_format).view(-1, p.shape[1]))
    if len(full_slices) == 1:
        return full_slices[0].clone(memory_format=torch.contiguous_format), branch_weights
    return torch.cat(full_slices, dim=1).contiguous(), branch_weights


def _by_channel(y: Tensor) -> Tensor:
    """(N, C_b, h, w) -> (C_b, N·h·w): a branch's cells as matmul columns."""
    return y.transpose(0, 1).reshape(y.shape[1], -1)


def _by_pixel(y: Tensor) -> Tensor:
    """(N, C_b, h, w) -> (N·h·w, C_b): a branch's cells as matmul rows."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _taps_channels_innermost(backend: str) -> bool:
    """Whether the backend's tap kernels take z (and give its gradient) in (N, h, w, k, k, C_out)
    storage: the CUDA kernels read 16-byte packs of out channels; the others read (k, k, C_out, N, h, w)
    storage, (n, out channel) planes."""
    return backend == "cuda"


def _taps(branch_weights: list[Tensor], branches: list[Tensor], kernel_size: int, backend: str) -> list[Tensor]:
    """z_t = W_t·y of every branch at its own size, one matmul each, as (N, C_out, k, k, h, w) views
    of the storage :func:`_taps_channels_innermost` names (the kernels read any strides)."""
    taps, k = [], kernel_size
    for y, weight in zip(branches, branch_weights):
        N, _, h, w = y.shape
        if _taps_channels_innermost(backend):
            z = _by_pixel(y) @ weight.t()  # (N·h·w, k·k·C_out)
            taps.append(z.view(N, h, w, k, k, -1).permute(0, 5, 3, 4, 1, 2))
        else:
            z = weight @ _by_channel(y)  # (k·k·C_out, N·h·w)
            taps.append(z.view(k, k, -1, N, h, w).permute(3, 2, 0, 1, 4, 5))
    return taps


def _tap_grads_to_branch(grad_z: Tensor, y: Tensor, weight: Tensor, need_branch: bool, need_weight: bool, backend: str):
    """The gradients of a branch y and its weight (k·k·C_out, C_b) from grad_z (N, C_out, k, k, h, w)
    in the storage the backend's kernels give (any other is copied); None where not asked for."""
    N, cb, h, w = y.shape
    grad_y = grad_weight = None
    if _taps_channels_innermost(backend):
        rows = grad_z.permute(0, 4, 5, 2, 3, 1).reshape(N * h * w, -1)  # (N·h·w, k·k·C_out)
        if need_branch:
            grad_y = (rows @ weight).view(N, h, w, cb).permute(0, 3, 1, 2).contiguous()
        if need_weight:
            grad_weight = rows.t() @ _by_pixel(y)
    else:
        columns = grad_z.permute(2, 3, 1, 0, 4, 5).reshape(-1, N * h * w)  # (k·k·C_out, N·h·w)
        if need_branch:
            grad_y = (weight.t() @ columns).view(cb, N, h, w).transpose(0, 1).contiguous()
        if need_weight:
            grad_weight = columns @ _by_channel(y).t()
    return grad_y, grad_weight


@torch.library.custom_op("slsdeep_kernels::pyramid_conv", mutates_args=())
def _pyramid_conv_op(
    parts: list[Tensor],
    weight_x: Tensor,
    branch_weights: list[Tensor],
    bias: Tensor | None,
    full: list[bool],
    align_corners: bool,
    relu: bool,
    backend: str,
) -> Tensor:
    """The pyramid conv on the weight as :func:`_split_weight` gives it: ``weight_x`` for the
    full-resolution parts (``full``: which parts are, decided when the call is traced, so an
    exported graph keeps it), one ``(k·k·C_out, C_b)`` matrix per branch (the split is ordinary
    differentiable ATen outside the op, so autograd assembles the weight's gradient)."""
    (x, memory_format), kernel_size = _full_input(parts, full), weight_x.shape[-1]
    out = F.conv2d(x, weight_x, bias, padding=kernel_size // 2).contiguous(memory_format=memory_format)
    taps = _taps(branch_weights, [p for p, f in zip(parts, full) if not f], kernel_size, backend)
    if backend == "triton":
        _triton().taps_add(out, taps, align_corners)
    else:
        backends.COMPILED.pyramid_taps_add_kernel(out, taps, align_corners)
    if relu:
        out.relu_()
    return out


@_pyramid_conv_op.register_fake
def _(parts, weight_x, branch_weights, bias, full, align_corners, relu, backend):
    x = next(p for p, f in zip(parts, full) if f)
    return _empty((x.shape[0], weight_x.shape[0], *x.shape[2:]), x, backends.preserved_format(x))


@torch.library.custom_op("slsdeep_kernels::pyramid_conv_backward", mutates_args=())
def _pyramid_conv_backward_op(
    grad: Tensor,
    parts: list[Tensor],
    weight_x: Tensor,
    branch_weights: list[Tensor],
    full: list[bool],
    align_corners: bool,
    output_mask: list[bool],
    backend: str,
) -> tuple[list[Tensor], Tensor, list[Tensor], Tensor]:
    """Grads of (every part, weight_x, every branch weight, bias). output_mask = (full-resolution
    parts, branches, weight_x, branch weights, bias); what is not asked for gets empty tensors."""
    need_full, need_branches, need_weight_x, need_branch_weights, need_bias = output_mask
    (x, _), kernel_size = _full_input(parts, full), weight_x.shape[-1]
    out_channels, padding = weight_x.shape[0], kernel_size // 2
    grad_x, grad_weight_x, grad_bias = torch.ops.aten.convolution_backward(
        grad, x, weight_x, [out_channels], [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
        [need_full, need_weight_x, need_bias],
    )  # fmt: skip
    full_index = [i for i, f in enumerate(full) if f]
    branch_index = [i for i, f in enumerate(full) if not f]
    grad_parts = [grad.new_empty(0) for _ in parts]  # one tensor per slot: outputs never alias
    grad_branch_weights = [grad.new_empty(0) for _ in branch_index]
    if need_full and len(full_index) == 1:
        grad_parts[full_index[0]] = grad_x.contiguous(memory_format=backends.preserved_format(parts[full_index[0]]))
    elif need_full:  # copies: the channel slices of one tensor would alias each other (always for N = 1)
        for i, piece in zip(full_index, grad_x.split([parts[i].shape[1] for i in full_index], 1)):
            grad_parts[i] = piece.clone(memory_format=backends.preserved_format(parts[i]))
    if branch_index and (need_branches or need_branch_weights):
        sizes = [s for i in branch_index for s in parts[i].shape[2:]]
        if backend == "triton":
            grad_taps = _triton().taps_backward(grad, sizes, kernel_size, align_corners)
        else:
            grad_taps = backends.COMPILED.pyramid_taps_backward_kernel(grad, sizes, kernel_size, align_corners)
        for b, (i, weight, grad_z) in enumerate(zip(branch_index, branch_weights, grad_taps)):
            grad_y, grad_weight = _tap_grads_to_branch(grad_z, parts[i], weight, need_branches, need_branch_weights, backend)
            if need_branches:
                grad_parts[i] = grad_y
            if need_branch_weights:
                grad_branch_weights[b] = grad_weight
    return (
        grad_parts,
        grad_weight_x.contiguous() if need_weight_x else grad.new_empty(0),  # oneDNN may give channels_last
        grad_branch_weights,
        grad_bias if need_bias else grad.new_empty(0),
    )


@_pyramid_conv_backward_op.register_fake
def _(grad, parts, weight_x, branch_weights, full, align_corners, output_mask, backend):
    need_full, need_branches, need_weight_x, need_branch_weights, need_bias = output_mask
    grad_parts = []
    for p, is_full in zip(parts, full):
        wanted = need_full if is_full else need_branches
        memory_format = backends.preserved_format(p) if is_full else torch.contiguous_format
        grad_parts.append(_empty(p.shape, p, memory_format) if wanted else _empty((0,), grad))
    return (
        grad_parts,
        _empty(weight_x.shape, weight_x) if need_weight_x else _empty((0,), grad),
        [_empty(w.shape, w) if need_branch_weights else _empty((0,), grad) for w in branch_weights],
        _empty((weight_x.shape[0],), weight_x) if need_bias else _empty((0,), grad),
    )


def _conv_setup(ctx, inputs, output):
    parts, weight_x, branch_weights, bias, full, align_corners, relu, backend = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output if relu else None, weight_x, *parts, *branch_weights)
    ctx.part_count, ctx.full, ctx.align_corners, ctx.relu, ctx.backend = len(parts), full, align_corners, relu, backend
    ctx.output_mask = [
        any(p.requires_grad for p, f in zip(parts, full) if f),
        any(p.requires_grad for p, f in zip(parts, full) if not f),
        weight_x.requires_grad,
        any(w.requires_grad for w in branch_weights),
        bias is not None and bias.requires_grad,
    ]


def _conv_backward(ctx, grad):
    out, weight_x, *rest = ctx.saved_tensors
    parts, branch_weights = rest[: ctx.part_count], rest[ctx.part_count :]
    if grad is None:
        return [None] * len(parts), None, [None] * len(branch_weights), None, None, None, None, None
    if ctx.relu:
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
    grad_parts, grad_weight_x, grad_branch_weights, grad_bias = _pyramid_conv_backward_op(
        grad, parts, weight_x, branch_weights, ctx.full, ctx.align_corners, ctx.output_mask, ctx.backend
    )
    need_full, need_branches, need_weight_x, need_branch_weights, need_bias = ctx.output_mask
    return (
        [g if (need_full if f else need_branches) else None for g, f in zip(grad_parts, ctx.full)],
        grad_weight_x if need_weight_x else None,
        grad_branch_weights if need_branch_weights else [None] * len(branch_weights),
        grad_bias if need_bias else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("slsdeep_kernels::pyramid_conv", _conv_backward, setup_context=_conv_setup)
_pyramid_conv_backward_op.register_autograd(backends.no_double_backward("pyramid_conv"))

# ---------------------------------------------------------------------------------------------
# 3. Public functions: validation, the backend, then the reference or the custom op.
# ---------------------------------------------------------------------------------------------


def _check_bins(op: str, bins) -> tuple[int, ...]:
    if isinstance(bins, int) or not isinstance(bins, Sequence):
        raise ValueError(f"{op}: bins must be a sequence of positive ints; got {bins!r}")
    if len(bins) == 0:
        raise ValueError(f"{op}: bins must not be empty")
    for b in bins:
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ValueError(f"{op}: every bin must be a positive int; got bins={tuple(bins)!r}")
    return tuple(bins)


def _compiled_kernels_take(bins: Sequence[int]) -> bool:
    """Whether the compiled pool kernels' segment tables hold these bins (``cpu`` and ``cuda``)."""
    return len(bins) <= MAX_BINS and sum(bins) <= MAX_BIN_SUM


def _check_image(op: str, x, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: {name} must be a 4-D tensor (N, C, H, W); got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: {name} must be floating point; got {x.dtype}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{op}: {name} must have a non-empty image; got shape {tuple(x.shape)}")


def _tensor_list(op: str, name: str, tensors) -> list[Tensor]:
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence):
        raise ValueError(f"{op}: {name} must be a list of 4-D tensors; got {type(tensors).__name__}")
    return list(tensors)


def _check_alike(op: str, named: dict[str, Tensor]) -> None:
    """Every tensor 4-D with a non-empty image, of the first one's batch size, dtype and device."""
    first_name, first = next(iter(named.items()))
    for name, y in named.items():
        if not isinstance(y, Tensor) or y.dim() != 4:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"{op}: {name} must be a 4-D tensor (N, C, h, w); got {shape}")
        if y.shape[0] != first.shape[0]:
            raise ValueError(f"{op}: {name} has batch size {y.shape[0]}, {first_name} has {first.shape[0]}")
        if y.dtype != first.dtype:
            raise ValueError(f"{op}: {name} has dtype {y.dtype}, {first_name} has {first.dtype}")
        if y.shape[2] == 0 or y.shape[3] == 0:
            raise ValueError(f"{op}: {name} must have a non-empty image; got shape {tuple(y.shape)}")
    backends.common_device(op, **named)


def _check_branches(op: str, x: Tensor, branches) -> list[Tensor]:
    branches = _tensor_list(op, "branches", branches)
    _check_alike(op, {"x": x, **{f"branches[{i}]": y for i, y in enumerate(branches)}})
    return branches


def pyramid_pool(x: Tensor, bins: Sequence[int] = PYRAMID_BINS, backend: str | None = None) -> Tensor:
    """Adaptive average pooling of ``x (N, C, H, W)`` at every bin, one read of ``x``.

    Returns ``(N, C, Σ b²)``: the bins in the given order, each b×b row-major (``[:, :, o:o+b*b]``
    viewed as ``(N, C, b, b)`` equals ``adaptive_avg_pool2d(x, b)``). The compiled kernels (``cpu``,
    ``cuda``) take at most ``MAX_BINS`` bins summing to at most ``MAX_BIN_SUM``: more runs the
    reference by default, and raises ``ValueError`` where one of them is asked for.
    """
    op = "pyramid_pool"
    bins = _check_bins(op, bins)
    _check_image(op, x)
    name = backends.resolve(op, x.device, x.dtype, backend)
    if name in ("cpu", "cuda") and not _compiled_kernels_take(bins):
        if backends.requested_backend(backend) is not None:
            raise ValueError(f"{op}: backend {name!r} takes at most {MAX_BINS} bins summing to at most {MAX_BIN_SUM} "
                             f"(its segment tables); got bins={tuple(bins)!r}")
        name = "reference"
    if name == "reference":
        return pyramid_pool_reference(x, bins)
    return _pyramid_pool_op(x, list(bins), name)


def upsample_concat(
    x: Tensor, branches: Sequence[Tensor], align_corners: bool = False, backend: str | None = None
) -> Tensor:
    """``cat([x] + [interpolate(y, x's H×W, mode="bilinear", align_corners)])``, written once.

    ``branches``: tensors ``(N, C_b, h, w)`` of x's batch, dtype and device (any h, w).
    Returns ``(N, C + Σ C_b, H, W)`` in x's memory format.
    """
    op = "upsample_concat"
    _check_image(op, x)
    branches = _check_branches(op, x, branches)
    name = backends.resolve(op, x.device, x.dtype, backend)
    if name == "reference":
        return upsample_concat_reference(x, branches, align_corners)
    return _upsample_concat_op(x, branches, bool(align_corners), name)


def _check_size(op: str, size, parts: list[Tensor]) -> tuple[int, int]:
    if size is None:
        return tuple(parts[0].shape[2:])
    if isinstance(size, (int, Tensor)) or not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"{op}: size must be None or (H, W); got {size!r}")
    for s in size:
        if isinstance(s, bool) or not isinstance(s, (int, torch.SymInt)) or s <= 0:
            raise ValueError(f"{op}: size must be two positive ints; got {tuple(size)!r}")
    return tuple(size)


def _pyramid_conv(op, parts, names, weight, bias, size, align_corners, relu, backend, cache_owner=None) -> Tensor:
    """pyramid_conv and its alias after their own argument checks: autocast, validation, the backend,
    the weight's split (cached on ``cache_owner``, a module, in eager inference)."""
    device_type = parts[0].device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [p.to(dtype) if isinstance(p, Tensor) and p.is_floating_point() and p.dtype != torch.float64 else p
                for p in (*parts, weight, bias)]  # fmt: skip
        parts, weight, bias = cast[: len(parts)], cast[-2], cast[-1]
    _check_alike(op, dict(zip(names, parts)))
    size = _check_size(op, size, parts)
    if not any(_full_resolution(parts, size)):
        raise ValueError(f"{op}: no part has the output size {size}; at least one must (the conv's full-resolution input)")
    channels = sum(p.shape[1] for p in parts)
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] not in (1, 3):
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{op}: weight must be a 1×1 or 3×3 conv weight (C_out, {channels}, k, k); got {shape}")
    if weight.shape[1] != channels:
        raise ValueError(f"{op}: weight has {weight.shape[1]} input channels; the parts have {' + '.join(names)} = {channels}")
    if weight.dtype != parts[0].dtype:
        raise ValueError(f"{op}: weight has dtype {weight.dtype}, {names[0]} has {parts[0].dtype}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{op}: bias must be None or of shape ({weight.shape[0]},); got {shape}")
    if bias is not None and bias.dtype != parts[0].dtype:
        raise ValueError(f"{op}: bias has dtype {bias.dtype}, {names[0]} has {parts[0].dtype}")
    device = backends.common_device(op, **{names[0]: parts[0]}, weight=weight, bias=bias)
    name = backends.resolve(op, device, parts[0].dtype, backend)
    if name == "reference":
        return pyramid_conv_reference(parts, weight, bias, size, align_corners, relu)
    full = _full_resolution(parts, size)
    if cache_owner is None:
        weight_x, branch_weights = _split_weight(weight, parts, full)
    else:  # eager inference through a module: the pieces cached on it (backend.derived)
        widths = tuple(p.shape[1] for p in parts)
        weight_x, branch_weights = backends.derived(
            cache_owner, "pyramid_conv weight split", (weight, widths, tuple(full)), lambda: _split_weight(weight, parts, full)
        )
    return _pyramid_conv_op(parts, weight_x, branch_weights, bias, full, bool(align_corners), bool(relu), name)


def pyramid_conv(
    parts: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None = None,
    size: Sequence[int] | None = None,
    align_corners: bool = False,
    relu: bool = False,
    backend: str | None = None,
) -> Tensor:
    """:func:`pyramid_conv_reference` — the k×k conv (k = 1 or 3, stride 1, padding k//2) over the
    concatenation of ``parts``, each resized bilinearly to ``size`` — without building it: the conv
    runs over the full-resolution parts, the resized ones' share at their own size (module docstring).

    ``parts``: ``(N, C_i, h_i, w_i)`` tensors of one batch size, dtype and device, in the
    concatenation's order; those at ``size`` (default: ``parts[0]``'s H×W; at least one) are the
    full-resolution input, every other one is a branch. ``weight``: ``(C_out, Σ C_i, k, k)``.
    ``relu=True`` applies a ReLU to the output inside the op. The output has the first full-resolution
    part's memory format. Under autocast it runs in the autocast dtype, as a conv does.
    """
    return _pyramid_conv_of_parts(parts, weight, bias, size, align_corners, relu, backend)


def _pyramid_conv_of_parts(parts, weight, bias, size, align_corners, relu, backend, cache_owner=None) -> Tensor:
    op = "pyramid_conv"
    parts = _tensor_list(op, "parts", parts)
    if not parts:
        raise ValueError(f"{op}: parts must not be empty")
    _check_image(op, parts[0], "parts[0]")
    names = [f"parts[{i}]" for i in range(len(parts))]
    return _pyramid_conv(op, parts, names, weight, bias, size, align_corners, relu, backend, cache_owner)


def pyramid_conv3x3(
    x: Tensor,
    branches: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None = None,
    align_corners: bool = False,
    backend: str | None = None,
) -> Tensor:
    """``conv2d(upsample_concat(x, branches, align_corners), weight, bias, padding=1)``: the 3×3 case
    of :func:`pyramid_conv` with ``parts = [x, *branches]`` at x's size (its first form, kept)."""
    op = "pyramid_conv3x3"
    _check_image(op, x)
    branches = _tensor_list(op, "branches", branches)
    if isinstance(weight, Tensor) and weight.dim() == 4 and tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"{op}: weight must be a 3×3 conv weight; got {tuple(weight.shape)} (pyramid_conv takes 1×1)")
    names = ["x"] + [f"branches[{i}]" for i in range(len(branches))]
    return _pyramid_conv(op, [x, *branches], names, weight, bias, tuple(x.shape[2:]), align_corners, False, backend)


def pyramid_conv_takes(conv: torch.nn.Conv2d) -> bool:
    """Whether ``conv`` is a convolution :func:`pyramid_conv` computes: 1×1 or 3×3, stride 1, zero
    padding k//2 (also as "same", or "valid" for 1×1), dilation 1 (any for 1×1), groups 1."""
    kernel = tuple(conv.kernel_size)
    if kernel not in ((1, 1), (3, 3)) or conv.padding_mode != "zeros" or conv.groups != 1 or tuple(conv.stride) != (1, 1):
        return False
    half = kernel[0] // 2
    padding = {"same": (half, half), "valid": (0, 0)}.get(conv.padding, conv.padding)
    return tuple(padding) == (half, half) and (half == 0 or tuple(conv.dilation) == (1, 1))


def pyramid_conv_modules(
    parts: Sequence[Tensor],
    conv: torch.nn.Conv2d,
    bn: torch.nn.BatchNorm2d | None = None,
    relu: bool = False,
    size: Sequence[int] | None = None,
    align_corners: bool = False,
    backend: str | None = None,
) -> Tensor:
    """``relu(bn(conv(cat(parts resized to size))))`` through :func:`pyramid_conv`, with the modules'
    parameters (what ``fuse_pyramid_pooling`` calls; ``bn`` and ``relu`` optional). A BatchNorm in eval
    mode folds into the conv's weight and bias (``fold_batch_norm``, cached on ``conv`` in eager
    inference) and the ReLU runs in the op; in training the BatchNorm runs after the op as itself
    (batch statistics, running averages), then the ReLU."""
    if not pyramid_conv_takes(conv):
        raise ValueError(f"pyramid_conv: conv must be a 1×1 or 3×3 Conv2d, stride 1, padding k//2 (zeros), dilation 1, groups 1; got {conv}")
    weight, bias = conv.weight, conv.bias
    folds = bn is not None and not bn.training and bn.running_mean is not None
    if folds:  # cached on conv for eager inference (backend.derived)
        sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
        weight, shift = backends.derived(conv, "pyramid_conv eval fold", sources, lambda: fold_batch_norm(conv, bn, conv.weight.dtype))
        bias = shift.to(weight.dtype)
    out = _pyramid_conv_of_parts(parts, weight, bias, size, align_corners, relu and (bn is None or folds), backend, conv)
    if bn is None or folds:
        return out
    out = bn(out)
    return F.relu(out) if relu else out


__getattr__ = backends.deprecated_aliases(  # until 0.2: the modules live in slsdeep_kernels.nn
    globals(), {name: f"slsdeep_kernels.nn.{name}" for name in ("PyramidStage", "PyramidPooling", "PyramidDecoderBlock")}
)

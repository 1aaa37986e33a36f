"""Pyramid pooling (docs/design.md §4.2): the decoder of PSPNet-style models without its memory traffic.

* ``pyramid_pool(x, bins)`` -> ``(N, C, Σ b²)``: the adaptive average cells of every bin from one read
  of ``x`` (PyTorch's windows ``[⌊i·H/b⌋, ⌈(i+1)·H/b⌉)``, so any H, W, also smaller than b).
* ``upsample_concat(x, branches)`` = ``cat([x] + [interpolate(y, (H, W), "bilinear")])`` written once;
  its backward gathers (no atomics).
* ``pyramid_conv3x3(x, branches, weight, bias)`` = ``conv2d(upsample_concat(x, branches), weight, bias,
  padding=1)`` without the concatenation. Resizing and the conv are linear, so for every branch y and
  tap t = (ky, kx): ``conv3x3(up(y))(p) = Σ_t up(W_t·y)(p + t - 1)`` (zero outside the image). The op
  runs the conv over the C channels of ``x`` only (ATen: oneDNN / cuDNN), forms ``z_t = W_t·y`` at the
  branch's b×b size (one small matmul per branch), and one kernel adds the shifted bilinear reads
  of every z_t into the conv output. Backward: the conv's own backward for ``x``, the adjoint of the
  shifted reads (a gather), then matmuls for the branches and their weight slices.

Floors (N=16, C=2048, 48×48, branches 4×1024 at b = 1, 2, 3, 6, conv to 512; s = bytes per element):

* pool + upsample_concat forward: read x once, write the (N, C + 4096, H, W) output once:
  ``(N·C·H·W + N·6144·H·W)·s`` = 604 MB in bf16 -> 0.18 ms at 3.35 TB/s (H100). The eager pair reads x
  four times, writes every upsampled branch, then reads and writes everything again in ``cat``.
* ``pyramid_conv3x3``: the direct conv over the concatenation costs ``2·N·H·W·512·9·6144`` = 2.09 TFLOP;
  ours ``2·N·H·W·512·9·2048`` = 0.70 TFLOP for the x channels, plus ``2·9·512·1024·N·Σb²``
  = 7.5 GFLOP for the z_t and ``2·N·512·H·W·9·Σb²`` (dense tap reads; far less in the separable CPU
  kernel) = 17 GFLOP: 0.72 TFLOP, 2.9× less, -> 0.73 ms at 989 TFLOP/s bf16.

CPU shape (4, 512, 48, 48; branches 4×256; conv to 128) in fp32: pool+upsample_concat moves
``(4·512·2304 + 4·1536·2304)·4`` = 75 MB; the conv over x is 10.9 GFLOP against 32.6 for the direct one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from slsdeep_kernels import backend as backends

PYRAMID_BINS = (1, 2, 3, 6)  # PSPNet's bins, the default everywhere

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

# --- pyramid_conv3x3


def _split_weight(weight: Tensor, branches: list[Tensor], channels: int) -> tuple[Tensor, list[Tensor]]:
    """The conv weight as the op uses it: x's slice (C_out, C, 3, 3), dense, for the conv over x, and
    per branch its slice as (C_out·9, C_b), rows ordered (out channel, ky, kx), for the tap matmuls.
    Computed once in forward and saved for backward; fresh tensors (custom-op outputs never alias inputs)."""
    weight_x = weight[:, :channels].clone(memory_format=torch.contiguous_format)
    slices, offset = [], channels
    for y in branches:
        cb = y.shape[1]
        slices.append(weight[:, offset : offset + cb].permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format).view(-1, cb))
        offset += cb
    return weight_x, slices


def _by_channel(y: Tensor) -> Tensor:
    """(N, C_b, h, w) -> (C_b, N·h·w): a branch's cells as matmul columns."""
    return y.transpose(0, 1).reshape(y.shape[1], -1)


def _taps(branch_weights: list[Tensor], branches: list[Tensor]) -> list[Tensor]:
    """z_t = W_t·y of every branch at its own size, one matmul each: (N, C_out, 3, 3, h, w) views
    of the (C_out, 3, 3, N, h, w) product (the kernels read any strides)."""
    taps = []
    for y, w9 in zip(branches, branch_weights):
        N, _, h, w = y.shape
        z = w9 @ _by_channel(y)  # (C_out·9, N·h·w)
        taps.append(z.view(-1, 3, 3, N, h, w).permute(3, 0, 1, 2, 4, 5))
    return taps


@torch.library.custom_op("slsdeep_kernels::pyramid_conv3x3", mutates_args=())
def _pyramid_conv3x3_op(
    x: Tensor, branches: list[Tensor], weight: Tensor, bias: Tensor | None, align_corners: bool, backend: str
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(out, x's weight slice, the branches' (C_out·9, C_b) weights): the last two are saved for backward."""
    weight_x, branch_weights = _split_weight(weight, branches, x.shape[1])
    out = F.conv2d(x, weight_x, bias, padding=1).contiguous(memory_format=backends.preserved_format(x))
    taps = _taps(branch_weights, branches)
    if backend == "triton":
        _triton().taps_add(out, taps, align_corners)
    else:
        backends.COMPILED.pyramid_taps_add_kernel(out, taps, align_corners)
    return out, weight_x, branch_weights


@_pyramid_conv3x3_op.register_fake
def _(x, branches, weight, bias, align_corners, backend):
    out_channels = weight.shape[0]
    return (
        _empty((x.shape[0], out_channels, x.shape[2], x.shape[3]), x, backends.preserved_format(x)),
        _empty((out_channels, x.shape[1], 3, 3), weight),
        [_empty((out_channels * 9, y.shape[1]), weight) for y in branches],
    )


@torch.library.custom_op("slsdeep_kernels::pyramid_conv3x3_backward", mutates_args=())
def _pyramid_conv3x3_backward_op(
    grad: Tensor,
    x: Tensor,
    branches: list[Tensor],
    weight_x: Tensor,
    branch_weights: list[Tensor],
    align_corners: bool,
    output_mask: list[bool],
    backend: str,
) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """Grads of (x, branches, weight, bias) where output_mask says so, else empty tensors / []."""
    need_x, need_branches, need_weight, need_bias = output_mask
    out_channels = weight_x.shape[0]
    grad_x, grad_weight_x, grad_bias = torch.ops.aten.convolution_backward(
        grad, x, weight_x, [out_channels], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [need_x, need_weight, need_bias],
    )  # fmt: skip
    grad_branches, grad_weights = [], [grad_weight_x]
    if need_branches or need_weight:
        sizes = [size for y in branches for size in y.shape[2:]]
        if backend == "triton":
            grad_taps = _triton().taps_backward(grad, sizes, align_corners)
        else:
            grad_taps = backends.COMPILED.pyramid_taps_backward_kernel(grad, sizes, align_corners)
        for y, w9, grad_z in zip(branches, branch_weights, grad_taps):
            N, cb, h, w = y.shape
            grad_z = grad_z.permute(1, 2, 3, 0, 4, 5).reshape(-1, N * h * w)  # (C_out·9, N·h·w)
            if need_branches:
                grad_branches.append((w9.t() @ grad_z).view(cb, N, h, w).transpose(0, 1).contiguous())
            if need_weight:
                grad_w9 = grad_z @ _by_channel(y).t()  # (C_out·9, C_b)
                grad_weights.append(grad_w9.view(out_channels, 3, 3, cb).permute(0, 3, 1, 2))
    empty = x.new_empty(0)
    return (
        grad_x.contiguous(memory_format=backends.preserved_format(x)) if need_x else empty,
        grad_branches,
        torch.cat(grad_weights, dim=1) if need_weight else empty.clone(),
        grad_bias if need_bias else empty.clone(),
    )


@_pyramid_conv3x3_backward_op.register_fake
def _(grad, x, branches, weight_x, branch_weights, align_corners, output_mask, backend):
    need_x, need_branches, need_weight, need_bias = output_mask
    out_channels, channels = weight_x.shape[0], x.shape[1] + sum(y.shape[1] for y in branches)
    return (
        _empty(x.shape, x, backends.preserved_format(x)) if need_x else _empty((0,), x),
        [_empty(y.shape, y) for y in branches] if need_branches else [],
        _empty((out_channels, channels, 3, 3), weight_x) if need_weight else _empty((0,), x),
        _empty((out_channels,), weight_x) if need_bias else _empty((0,), x),
    )


def _conv_setup(ctx, inputs, output):
    x, branches, weight, bias, align_corners, backend = inputs
    _, weight_x, branch_weights = output
    ctx.mark_non_differentiable(weight_x, *branch_weights)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight_x, *branches, *branch_weights)
    ctx.branch_count, ctx.align_corners, ctx.backend = len(branches), align_corners, backend
    ctx.output_mask = [
        x.requires_grad,
        any(y.requires_grad for y in branches),
        weight.requires_grad,
        bias is not None and bias.requires_grad,
    ]


def _conv_backward(ctx, grad, _grad_weight_x, _grad_branch_weights):
    x, weight_x, *rest = ctx.saved_tensors
    branches, branch_weights = rest[: ctx.branch_count], rest[ctx.branch_count :]
    none_for_branches = [None] * ctx.branch_count  # a list argument takes a list of gradients
    if grad is None:
        return None, none_for_branches, None, None, None, None
    grad_x, grad_branches, grad_weight, grad_bias = _pyramid_conv3x3_backward_op(
        grad, x, branches, weight_x, branch_weights, ctx.align_corners, ctx.output_mask, ctx.backend
    )
    need_x, need_branches, need_weight, need_bias = ctx.output_mask
    return (
        grad_x if need_x else None,
        grad_branches if need_branches else none_for_branches,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        None,
        None,
    )


torch.library.register_autograd("slsdeep_kernels::pyramid_conv3x3", _conv_backward, setup_context=_conv_setup)
_pyramid_conv3x3_backward_op.register_autograd(backends.no_double_backward("pyramid_conv3x3"))

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


def _check_image(op: str, x) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a 4-D tensor (N, C, H, W); got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be floating point; got {x.dtype}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{op}: x must have a non-empty image; got shape {tuple(x.shape)}")


def _check_branches(op: str, x: Tensor, branches) -> list[Tensor]:
    if isinstance(branches, Tensor) or not isinstance(branches, Sequence):
        raise ValueError(f"{op}: branches must be a list of 4-D tensors; got {type(branches).__name__}")
    branches = list(branches)
    for i, y in enumerate(branches):
        name = f"branches[{i}]"
        if not isinstance(y, Tensor) or y.dim() != 4:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"{op}: {name} must be a 4-D tensor (N, C_b, h, w); got {shape}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{op}: {name} has batch size {y.shape[0]}, x has {x.shape[0]}")
        if y.dtype != x.dtype:
            raise ValueError(f"{op}: {name} has dtype {y.dtype}, x has {x.dtype}")
        if y.shape[2] == 0 or y.shape[3] == 0:
            raise ValueError(f"{op}: {name} must have a non-empty image; got shape {tuple(y.shape)}")
    backends.common_device(op, x=x, **{f"branches[{i}]": y for i, y in enumerate(branches)})
    return branches


def pyramid_pool(x: Tensor, bins: Sequence[int] = PYRAMID_BINS, backend: str | None = None) -> Tensor:
    """Adaptive average pooling of ``x (N, C, H, W)`` at every bin, one read of ``x``.

    Returns ``(N, C, Σ b²)``: the bins in the given order, each b×b row-major (``[:, :, o:o+b*b]``
    viewed as ``(N, C, b, b)`` equals ``adaptive_avg_pool2d(x, b)``).
    """
    op = "pyramid_pool"
    bins = _check_bins(op, bins)
    _check_image(op, x)
    name = backends.resolve(op, x.device, x.dtype, backend)
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


def pyramid_conv3x3(
    x: Tensor,
    branches: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None = None,
    align_corners: bool = False,
    backend: str | None = None,
) -> Tensor:
    """``conv2d(upsample_concat(x, branches, align_corners), weight, bias, padding=1)``, never
    building the concatenation: the conv runs over x's channels, the branches' share at their own
    low resolution (see the module docstring). ``weight``: ``(C_out, C + Σ C_b, 3, 3)``.
    Under autocast it runs in the autocast dtype, as a conv does.
    """
    op = "pyramid_conv3x3"
    _check_image(op, x)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype) if isinstance(weight, Tensor) else weight
        branches = [y.to(dtype) if isinstance(y, Tensor) else y for y in branches]
        bias = bias.to(dtype) if isinstance(bias, Tensor) else bias
    branches = _check_branches(op, x, branches)
    channels = x.shape[1] + sum(y.shape[1] for y in branches)
    if not isinstance(weight, Tensor) or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{op}: weight must be a 3×3 conv weight (C_out, {channels}, 3, 3); got {shape}")
    if weight.shape[1] != channels:
        raise ValueError(
            f"{op}: weight has {weight.shape[1]} input channels; x and the branches have C + Σ C_b = {channels}"
        )
    if weight.dtype != x.dtype:
        raise ValueError(f"{op}: weight has dtype {weight.dtype}, x has {x.dtype}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{op}: bias must be None or of shape ({weight.shape[0]},); got {shape}")
    if bias is not None and bias.dtype != x.dtype:
        raise ValueError(f"{op}: bias has dtype {bias.dtype}, x has {x.dtype}")
    backends.common_device(op, x=x, weight=weight, bias=bias)
    name = backends.resolve(op, x.device, x.dtype, backend)
    if name == "reference":
        return pyramid_conv3x3_reference(x, branches, weight, bias, align_corners)
    return _pyramid_conv3x3_op(x, branches, weight, bias, bool(align_corners), name)[0]


__getattr__ = backends.deprecated_aliases(  # until 0.2: the modules live in slsdeep_kernels.nn
    globals(), {name: f"slsdeep_kernels.nn.{name}" for name in ("PyramidStage", "PyramidPooling", "PyramidDecoderBlock")}
)

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
# 1. Reference: plain differentiable PyTorch, the spec.
# ---------------------------------------------------------------------------------------------

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8


def _sobel(image: Tensor) -> Tensor:
    """(N, H, W) -> (N, 2, H, W): x (along the width) and y derivatives, replicate padding."""
    weight = torch.stack([_SOBEL_X, _SOBEL_X.T]).unsqueeze(1).to(image)
    return F.conv2d(F.pad(image.unsqueeze(1), (1, 1, 1, 1), mode="replicate"), weight)


def nll_epe_loss_reference(logits: Tensor, target: Tensor, alpha: float = 0.5, reduction: str = "mean") -> Tensor:
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
# 2. Custom ops (torch.library): schema, fake kernel, autograd. They run the compiled kernels
#    ("cpu", "cuda") or the Triton launchers of ops/nll_epe_loss_triton.py ("triton", imported on first use).
# ---------------------------------------------------------------------------------------------


def _triton():
    return backends.triton_kernels(OP)


@torch.library.custom_op("slsdeep_kernels::nll_epe_loss", mutates_args=())
def _loss_op(
    logits: Tensor, target: Tensor, alpha: float, reduction: str, compute_grad: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """(loss, gradient): for mean/sum with ``compute_grad`` the gradient of the loss w.r.t. the logits
    (for a unit upstream gradient), computed in the same pass; otherwise an empty tensor."""
    if backend == "triton":
        return _triton().forward(logits, target, alpha, reduction, compute_grad)
    return backends.COMPILED.nll_epe_loss_kernel(logits, target, alpha, REDUCTIONS.index(reduction), compute_grad)


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
        return _triton().backward(grad_loss, logits, target, alpha)
    return backends.COMPILED.nll_epe_loss_backward_kernel(grad_loss, logits, target, alpha)


@_backward_op.register_fake
def _(grad_loss, logits, target, alpha, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device, memory_format=backends.preserved_format(logits))


_backward_op.register_autograd(backends.no_double_backward(OP))


@torch.library.custom_op("slsdeep_kernels::nll_epe_loss_scale_", mutates_args=("gradient",))
def _scale_op(gradient: Tensor, grad_loss: Tensor, backend: str) -> None:
    """``gradient *= grad_loss`` (a scalar) in place; no work where ``grad_loss == 1`` (decided on the device)."""
    if backend == "triton":
        _triton().scale(gradient, grad_loss)
    else:
        backends.COMPILED.nll_epe_loss_scale_kernel(gradient, grad_loss)


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
# 3. Public function: validation, the backend, then the reference or the custom op.
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
        return nll_epe_loss_reference(logits, target, alpha, reduction)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    return _loss_op(logits, target, alpha, reduction, compute_grad, name)[0]


__getattr__ = backends.deprecated_aliases(globals(), {"reference": "nll_epe_loss_reference"})  # until 0.2

"""Fused conv2d + BatchNorm2d (+ ReLU), dilated, strided, padded, in both BatchNorm modes (docs/design.md §4.1).

``conv_bn_relu(...) == relu(batch_norm(conv2d(x, W, b, stride, padding, dilation, groups), ...))``,
including the running-statistics update in training (unbiased variance in the running estimate,
``momentum=None`` = cumulative average over ``num_batches_tracked``).

* Eval: BatchNorm is an affine map per output channel, so it folds into the convolution
  (``scale = γ/√(σ²+ε)``, ``W' = W·scale``, ``b' = (b−μ)·scale + β``, in fp32) and the ReLU becomes
  the convolution's epilogue: one pass over the output instead of three. ``triton``: ATen's
  convolution (cuDNN) with the raw weights, then one Triton pass applying the fold and the ReLU in
  place; ``cpu``: oneDNN conv with the ReLU as a post-op (C++ epilogue for fp64/fp16); ``cuda``:
  with a ReLU, the folded weights through cuDNN's fused conv + bias + ReLU where cuDNN takes the
  configuration (decided at run time, the first refusal remembered), else cuDNN conv + one epilogue
  kernel.
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

import dataclasses

import torch
import torch.nn.functional as F

from slsdeep_kernels import backend as backends

OP = "conv_bn_relu"


def _triton():
    return backends.triton_kernels(OP)


# ---------------------------------------------------------------------------------------------
# 1. Reference: plain differentiable PyTorch, the spec.
# ---------------------------------------------------------------------------------------------
def conv_bn_relu_reference(
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
# 2. Custom ops (torch.library): schema, fake kernel, autograd. They run the compiled kernels
#    ("cpu", "cuda") or the Triton launchers of ops/conv_bn_relu_triton.py ("triton", imported on first use).
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConvBNOptions:
    """The non-tensor parameters of the conv and its BatchNorm. They travel as this object through the
    Python layers and are flattened by name into the custom ops' and the compiled kernels' schemas
    (``csrc/ops.cpp``), which take primitive types only: a new parameter is one field here and one
    argument per schema."""

    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    eps: float
    relu: bool

    @classmethod
    def of(cls, arguments: dict) -> ConvBNOptions:
        """The options among a custom op's arguments (by name)."""
        return cls(**{name: arguments[name] for name in _OPTION_NAMES})

    def as_arguments(self) -> dict:
        return {name: getattr(self, name) for name in _OPTION_NAMES}


_OPTION_NAMES = tuple(field.name for field in dataclasses.fields(ConvBNOptions))
_DIFFERENTIABLE = ("x", "weight", "bias", "bn_weight", "bn_bias")  # what the backward ops return, in order

# The custom ops' schemas, the options written once from the dataclass's fields (the compiled kernels'
# schemas in csrc/ops.cpp mirror them). Every layer reads a custom op's inputs by these names.
_SCHEMA_TYPES = {"list[int]": "SymInt[]", "int": "SymInt", "float": "float", "bool": "bool"}
_OPTIONS = ", ".join(f"{_SCHEMA_TYPES[field.type]} {field.name}" for field in dataclasses.fields(ConvBNOptions))
_PARAMETERS = "Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias"
_STATISTICS = "Tensor running_mean, Tensor running_var"
_SCHEMAS = {
    "conv_bn_relu_eval": f"({_PARAMETERS}, {_STATISTICS}, {_OPTIONS}, str backend) -> Tensor",
    "conv_bn_relu_eval_backward":
        f"(Tensor grad_out, Tensor? out, {_PARAMETERS}, {_STATISTICS}, {_OPTIONS}, bool[] output_mask) -> Tensor[]",
    "conv_bn_relu_train":
        f"({_PARAMETERS}, {_OPTIONS}, bool memory_efficient, str backend) -> (Tensor, Tensor, Tensor, Tensor)",
    "conv_bn_relu_train_backward":
        "(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? conv_out, Tensor mean, Tensor var, "
        f"Tensor? bn_weight, Tensor? bn_bias, {_OPTIONS}, bool[] output_mask, str backend) -> Tensor[]",
}  # fmt: skip
_SCHEMA_NAMES = {
    op: tuple(argument.split()[-1] for argument in schema[1 : schema.index(") ->")].split(", "))
    for op, schema in _SCHEMAS.items()
}


def _arguments(op: str, inputs: tuple) -> dict:
    """A custom op's inputs (as the dispatcher and autograd hand them, in schema order) by name."""
    return dict(zip(_SCHEMA_NAMES[op], inputs))


def _flatten(op: str, **arguments) -> tuple:
    """``arguments`` (an ``options=`` object spread by name) in ``op``'s schema order."""
    if "options" in arguments:
        arguments.update(arguments.pop("options").as_arguments())
    return tuple(arguments[name] for name in _SCHEMA_NAMES[op])


def _custom_op(op: str, body, fake):
    """``body(arguments)`` registered as ``slsdeep_kernels::<op>`` (schema ``_SCHEMAS[op]``) with the
    fake kernel ``fake(arguments)``; ``arguments``: the inputs by name."""
    defined = torch.library.custom_op(
        f"slsdeep_kernels::{op}", lambda *inputs: body(_arguments(op, inputs)), mutates_args=(), schema=_SCHEMAS[op]
    )
    defined.register_fake(lambda *inputs: fake(_arguments(op, inputs)))
    return defined


def _input_gradients(op: str, grads, wanted) -> tuple:
    """autograd's answer for ``op``: the gradients of the differentiable inputs, None for the rest of its schema."""
    none_for_the_rest = (None,) * (len(_SCHEMA_NAMES[op]) - len(_DIFFERENTIABLE))
    return *(g if w else None for g, w in zip(grads, wanted)), *none_for_the_rest


def _options(a: dict) -> ConvBNOptions:
    """The options among a custom op's arguments ``a``, built once per call and kept in ``a``."""
    if "options" not in a:
        a["options"] = ConvBNOptions.of(a)
    return a["options"]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _output_size(x, weight, options: ConvBNOptions) -> list[int]:
    kernel, (stride, padding, dilation) = weight.shape[2:], (options.stride, options.padding, options.dilation)
    return [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)]


def _conv_backward(grad_y, x, weight, options: ConvBNOptions, conv_mask):
    return torch.ops.aten.convolution_backward(
        grad_y, x, weight, [weight.shape[0]], options.stride, options.padding, options.dilation, False, [0, 0],
        options.groups, conv_mask,
    )  # fmt: skip


def _eval_forward(a: dict):
    tensors = [a[name] for name in (*_DIFFERENTIABLE, "running_mean", "running_var")]
    if a["backend"] == "triton":
        return _triton().eval_forward(*tensors, _options(a))
    return backends.COMPILED.conv_bn_relu_eval_kernel(*tensors, **_options(a).as_arguments())


def _eval_scale(running_var, bn_weight, eps: float, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/σ, γ/σ) of an eval BatchNorm in ``acc``: the fold's per-channel scale."""
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    return invstd, invstd * bn_weight.to(acc) if bn_weight is not None else invstd


def _eval_centre(bias, running_mean, acc: torch.dtype) -> torch.Tensor:
    """b − μ of an eval BatchNorm in ``acc`` (−μ without a conv bias): what the scale multiplies into the shift."""
    return -running_mean.to(acc) if bias is None else bias.to(acc) - running_mean.to(acc)


def _eval_backward(a: dict):
    """Backward of frozen BN: backward of the folded conv (W' = W·scale), chained to W, b, γ, β (ATen, any
    backend). ``out`` (the forward's output, the ReLU's mask) is needed only with the ReLU."""
    x, weight, bias, bn_weight, bn_bias = (a[name] for name in _DIFFERENTIABLE)
    running_mean, running_var, output_mask, options = a["running_mean"], a["running_var"], a["output_mask"], _options(a)
    acc = _accumulation_dtype(x.dtype)
    invstd, scale = _eval_scale(running_var, bn_weight, options.eps, acc)
    per_channel = (-1, 1, 1, 1)
    g = torch.ops.aten.threshold_backward(a["grad_out"], a["out"], 0) if options.relu else a["grad_out"]
    folded = (weight.to(acc) * scale.view(per_channel)).to(weight.dtype)
    grad_x, grad_folded_w, grad_shift = _conv_backward(
        g, x, folded, options, [output_mask[0], output_mask[1] or output_mask[3], True]
    )
    grad_shift = grad_shift.to(acc)
    grads = [grad_x, None, None, None, None]
    if output_mask[1]:
        grads[1] = (grad_folded_w.to(acc) * scale.view(per_channel)).to(weight.dtype)
    if output_mask[2]:
        grads[2] = (grad_shift * scale).to(bias.dtype)
    if output_mask[3]:
        grad_scale = (grad_folded_w.to(acc) * weight.to(acc)).sum((1, 2, 3)) + grad_shift * _eval_centre(bias, running_mean, acc)
        grads[3] = (grad_scale * invstd).to(bn_weight.dtype)
    if output_mask[4]:
        grads[4] = grad_shift.to(bn_bias.dtype)
    return grads


def _train_forward(a: dict):
    tensors = [a[name] for name in _DIFFERENTIABLE]
    if a["backend"] == "triton":
        return _triton().train_forward(*tensors, _options(a))
    return backends.COMPILED.conv_bn_relu_train_kernel(*tensors, **_options(a).as_arguments())


def _train_backward(a: dict):
    tensors = [a[name] for name in ("grad_out", "x", "weight", "bias", "conv_out", "mean", "var", "bn_weight", "bn_bias")]
    conv_mask = a["output_mask"][:3]
    if a["backend"] == "triton":
        return _triton().train_backward(*tensors, _options(a), conv_mask)
    return backends.COMPILED.conv_bn_relu_train_backward_kernel(*tensors, **_options(a).as_arguments(), output_mask=conv_mask)


def _as_gradients(grads, a: dict):
    """Each gradient laid out as its input (what the fake kernel promises); an empty tensor stands
    for a gradient nobody asked for (custom ops return tensors only)."""
    out = []
    for g, name, wanted in zip(grads, _DIFFERENTIABLE, a["output_mask"]):
        t = a[name]
        if not wanted:
            out.append(a["x"].new_empty(0))
        elif g.stride() != t.stride() or g.dtype != t.dtype:
            out.append(torch.empty_like(t).copy_(g))
        else:
            out.append(g)
    return out


def _fake_output(a: dict):
    shape = (a["x"].shape[0], a["weight"].shape[0], *_output_size(a["x"], a["weight"], _options(a)))
    return torch.empty(shape, dtype=a["x"].dtype, device=a["x"].device, memory_format=backends.preserved_format(a["x"]))


def _fake_train_outputs(a: dict):
    out = _fake_output(a)
    stats = dict(dtype=_accumulation_dtype(out.dtype), device=out.device)
    return out, torch.empty_like(out), torch.empty(out.shape[1], **stats), torch.empty(out.shape[1], **stats)


def _fake_grads(a: dict):
    return [torch.empty_like(a[name]) if wanted else a["x"].new_empty(0) for name, wanted in zip(_DIFFERENTIABLE, a["output_mask"])]


# eval: (out); train: (out, conv output, batch mean, biased batch variance), the statistics in fp32 (fp64
# for fp64). Backward: the grads of (x, weight, bias, bn_weight, bn_bias); conv_out None recomputes the conv.
_eval_op = _custom_op("conv_bn_relu_eval", _eval_forward, _fake_output)
_eval_backward_op = _custom_op("conv_bn_relu_eval_backward", lambda a: _as_gradients(_eval_backward(a), a), _fake_grads)
_train_op = _custom_op("conv_bn_relu_train", _train_forward, _fake_train_outputs)
_train_backward_op = _custom_op("conv_bn_relu_train_backward", lambda a: _as_gradients(_train_backward(a), a), _fake_grads)

_EVAL_SAVED = ("out", *_DIFFERENTIABLE, "running_mean", "running_var")
_TRAIN_SAVED = ("x", "weight", "bias", "conv_out", "mean", "var", "bn_weight", "bn_bias")


def _eval_setup(ctx, a: dict, output):
    ctx.options, ctx.backend = _options(a), a["backend"]
    # The output is the ReLU's mask; without a ReLU it is not kept (callers may add to it in place).
    a["out"] = output if ctx.options.relu else None
    ctx.save_for_backward(*(a[name] for name in _EVAL_SAVED))


def _train_setup(ctx, a: dict, output):
    out, conv_out, a["mean"], a["var"] = output
    ctx.mark_non_differentiable(conv_out, a["mean"], a["var"])
    ctx.set_materialize_grads(False)
    a["conv_out"] = None if a["memory_efficient"] else conv_out
    ctx.save_for_backward(*(a[name] for name in _TRAIN_SAVED))
    ctx.options, ctx.backend = _options(a), a["backend"]


def _gradients(ctx, grad_out, mode: str, through_op: bool):
    """The backward of ``mode`` ("eval" or "train") for autograd. ``through_op``: the backward custom op
    (differentiable as an op: its backward raises), else its Python body directly (eager)."""
    forward = f"conv_bn_relu_{mode}"
    output_mask = list(ctx.needs_input_grad[: len(_DIFFERENTIABLE)])
    if grad_out is None:
        return _input_gradients(forward, [None] * len(_DIFFERENTIABLE), output_mask)
    a = dict(zip(_EVAL_SAVED if mode == "eval" else _TRAIN_SAVED, ctx.saved_tensors))
    a.update(options=ctx.options, grad_out=grad_out, output_mask=output_mask, backend=ctx.backend)
    if through_op:
        grads = (_eval_backward_op if mode == "eval" else _train_backward_op)(*_flatten(f"{forward}_backward", **a))
    else:
        grads = (_eval_backward if mode == "eval" else _train_backward)(a)
    return _input_gradients(forward, grads, output_mask)


torch.library.register_autograd(
    "slsdeep_kernels::conv_bn_relu_eval", lambda ctx, grad_out: _gradients(ctx, grad_out, "eval", through_op=True),
    setup_context=lambda ctx, inputs, output: _eval_setup(ctx, _arguments("conv_bn_relu_eval", inputs), output),
)  # fmt: skip
torch.library.register_autograd(
    "slsdeep_kernels::conv_bn_relu_train", lambda ctx, grad_out, *unused: _gradients(ctx, grad_out, "train", through_op=True),
    setup_context=lambda ctx, inputs, output: _train_setup(ctx, _arguments("conv_bn_relu_train", inputs), output),
)  # fmt: skip
for _name in ("conv_bn_relu_eval_backward", "conv_bn_relu_train_backward"):
    torch.library.register_autograd(f"slsdeep_kernels::{_name}", backends.no_double_backward(OP), setup_context=lambda ctx, inputs, output: None)


def _eager_function(mode: str) -> type[torch.autograd.Function]:
    """The op of ``mode`` ("eval" or "train") for eager calls: the custom op's forward, setup and backward
    without its dispatch, which costs ~0.15 ms a call (paid by every layer of a network at every step).
    ``torch.compile`` traces the custom ops instead (see :func:`conv_bn_relu`). Under ``create_graph``
    the backward runs as the backward custom op, whose own backward raises. Its inputs are the custom
    op's, in schema order (``_flatten``)."""
    op = f"conv_bn_relu_{mode}"
    run, setup = (_eval_forward, _eval_setup) if mode == "eval" else (_train_forward, _train_setup)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            a = _arguments(op, inputs)
            output = run(a)
            setup(ctx, a, output)
            return output

        @staticmethod
        def backward(ctx, grad_out, *unused):
            return _gradients(ctx, grad_out, mode, through_op=torch.is_grad_enabled())

    Eager.__name__ = Eager.__qualname__ = f"_{mode.capitalize()}Function"
    return Eager


_EvalFunction, _TrainFunction = _eager_function("eval"), _eager_function("train")


# ---------------------------------------------------------------------------------------------
# 3. Public function: validation, the backend, then the reference or the custom op.
# ---------------------------------------------------------------------------------------------
def _pair(name, value, minimum):
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair) or min(pair) < minimum:
        raise ValueError(f"{OP}: {name} must be an int or a pair of ints, each >= {minimum}; got {value!r}")
    return list(pair)


def _validate(x, weight, per_channel, options: ConvBNOptions, training):
    if x.dim() != 4:
        raise ValueError(f"{OP}: input must be 4-D (N, C, H, W); got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{OP}: weight must be 4-D (C_out, C_in / groups, KH, KW); got shape {tuple(weight.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{OP}: input must be a floating-point tensor; got {x.dtype}")
    groups = options.groups
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
    out_size = _output_size(x, weight, options)
    if min(out_size) < 1:
        raise ValueError(
            f"{OP}: the output would be empty ({out_size[0]}×{out_size[1]}) for input {tuple(x.shape[2:])}, kernel "
            f"{tuple(weight.shape[2:])}, stride {options.stride}, padding {options.padding}, dilation {options.dilation}"
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
    device = backends.common_device(
        OP, input=x, weight=weight, bias=bias, bn_weight=bn_weight, bn_bias=bn_bias,
        running_mean=running_mean, running_var=running_var, num_batches_tracked=num_batches_tracked,
    )  # fmt: skip
    options = ConvBNOptions(
        stride=_pair("stride", stride, 1), padding=_pair("padding", padding, 0), dilation=_pair("dilation", dilation, 1),
        groups=groups, eps=eps, relu=relu,
    )  # fmt: skip
    if torch.is_autocast_enabled(device.type):
        x, weight, bias = _autocast(device.type, x, weight, bias)
    per_channel = dict(bias=bias, bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean, running_var=running_var)
    _validate(x, weight, per_channel, options, training)
    factor = momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if training and running_mean is not None and momentum is None:
        if num_batches_tracked is None:
            raise ValueError(f"{OP}: momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / num_batches_tracked.to(running_mean.dtype)
    chosen = backends.resolve(OP, device, x.dtype, backend)
    if training and x.shape[0] == 0:  # no statistics: F.batch_norm keeps the running ones, zero gradients
        chosen = "reference"
    if chosen == "reference":
        if isinstance(factor, torch.Tensor):
            factor = float(factor)
        return conv_bn_relu_reference(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, **options.as_arguments(),
                         training=training, momentum=0.0 if factor is None else factor)  # fmt: skip
    # torch.compile traces the custom ops; eager calls skip their dispatch cost (same kernels, same autograd).
    compiling = torch.compiler.is_compiling()
    tensors = dict(x=x, weight=weight, bias=bias, bn_weight=bn_weight, bn_bias=bn_bias)
    if not training:
        eval_op = _eval_op if compiling else _EvalFunction.apply
        inputs = _flatten("conv_bn_relu_eval", **tensors, running_mean=running_mean, running_var=running_var,
                          options=options, backend=chosen)  # fmt: skip
        return eval_op(*inputs)
    train_op = _train_op if compiling else _TrainFunction.apply
    inputs = _flatten("conv_bn_relu_train", **tensors, options=options, memory_efficient=memory_efficient, backend=chosen)
    out, _, mean, var = train_op(*inputs)
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


def fold_batch_norm(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval BatchNorm folded into the conv before it: ``(W·γ/σ`` in ``dtype``, ``(b − μ)·γ/σ + β`` in
    the accumulation type``)``, computed in the accumulation type (differentiable)."""
    acc = _accumulation_dtype(dtype)
    _, scale = _eval_scale(bn.running_var, bn.weight, bn.eps, acc)
    shift = _eval_centre(conv.bias, bn.running_mean, acc) * scale
    shift = shift if bn.bias is None else shift + bn.bias.to(acc)
    return (conv.weight.to(acc) * scale.view(-1, 1, 1, 1)).to(dtype), shift


def _folded_parameters(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, dtype: torch.dtype):
    """:func:`fold_batch_norm`, cached on ``conv`` for eager inference (``backend.derived``)."""
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, dtype)
    return backends.derived(conv, "conv_bn_relu eval fold", sources, lambda: fold_batch_norm(conv, bn, dtype))


def _onednn_folds(dtype: torch.dtype) -> bool:
    """Whether the cpu eval kernel folds BN into the weight for ``dtype`` (oneDNN's conv + post-ops:
    fp32, and bf16 where the CPU has it); for other dtypes it scales after the conv, nothing to cache."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _caches_fold(backend: str, dtype: torch.dtype) -> bool:
    """Whether eager inference on ``backend`` runs the conv with the fold cached: ``cpu`` where oneDNN
    folds (:func:`_onednn_folds`), ``cuda`` for its three dtypes (cuDNN's fused conv + bias + ReLU, or
    the conv and one bias+ReLU pass where cuDNN refuses the configuration)."""
    if backend == "cpu":
        return _onednn_folds(dtype)
    return backend == "cuda" and dtype in (torch.float32, torch.float16, torch.bfloat16)


def _cached_eval(x, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, relu: bool) -> torch.Tensor | None:
    """Eager inference on the ``cpu`` or ``cuda`` backend with the fold cached: the conv + bias + ReLU
    alone. None where it does not apply (training statistics, autograd, torch.compile, another
    backend)."""
    if bn.training or bn.running_mean is None or torch.compiler.is_compiling() or not isinstance(x, torch.Tensor):
        return None
    parameters = (x, conv.weight, conv.bias, bn.weight, bn.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in parameters):
        return None
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point() and x.dtype != torch.float64:
        x = x.to(torch.get_autocast_dtype(x.device.type))
    elif conv.weight.dtype != x.dtype:
        return None  # the custom op's path raises the dtype error
    if conv.weight.device != x.device or not _caches_fold(backends.resolve(OP, x.device, x.dtype, None), x.dtype):
        return None
    options = ConvBNOptions(stride=_pair("stride", conv.stride, 1), padding=_pair("padding", _conv_padding(conv), 0),
                            dilation=_pair("dilation", conv.dilation, 1), groups=conv.groups, eps=bn.eps, relu=relu)  # fmt: skip
    per_channel = dict(bias=None, bn_weight=bn.weight, bn_bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var)
    _validate(x, torch.empty_like(conv.weight, dtype=x.dtype, device="meta"), per_channel, options, training=False)
    weight, shift = _folded_parameters(conv, bn, x.dtype)
    return backends.COMPILED.conv_bias_act_kernel(x, weight, shift, options.stride, options.padding, options.dilation,
                                                  options.groups, relu)  # fmt: skip


def conv_bn_relu_modules(x, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, relu: bool = True, memory_efficient: bool = False):
    """``relu(bn(conv(x)))`` (``bn(conv(x))`` with ``relu=False``), fused: the modules' parameters and
    BatchNorm's mode and state (running statistics, ``num_batches_tracked``, momentum) exactly as
    calling the modules in turn would use and update them. In eager inference on the ``cpu`` and
    ``cuda`` backends the folded weight and bias are cached on ``conv`` (recomputed whenever a
    parameter or statistic changes)."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"{OP}: only padding_mode='zeros' convolutions fuse; got {conv.padding_mode!r}")
    cached = _cached_eval(x, conv, bn, relu)
    if cached is not None:
        return cached
    tracking = bn.training and bn.track_running_stats
    use_running = not bn.training or bn.track_running_stats
    return conv_bn_relu(
        x, conv.weight, conv.bias, bn.weight, bn.bias,
        bn.running_mean if use_running else None, bn.running_var if use_running else None,
        conv.stride, _conv_padding(conv), conv.dilation, conv.groups,
        training=bn.training or bn.running_mean is None, momentum=bn.momentum, eps=bn.eps, relu=relu,
        memory_efficient=memory_efficient, num_batches_tracked=bn.num_batches_tracked if tracking else None,
    )  # fmt: skip


__getattr__ = backends.deprecated_aliases(globals(), {"reference": "conv_bn_relu_reference"})  # until 0.2

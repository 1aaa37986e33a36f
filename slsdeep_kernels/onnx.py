"""ONNX translations of the fused ops, for ``torch.onnx.export(..., dynamo=True)``.

``torch.onnx.export(model.eval(), args, dynamo=True, custom_translation_table=onnx_translations())``
exports every fused op as standard ONNX ops (opset >= 18) with the op's numbers. Under tracing the
fused layers call their custom ops, which the exporter meets as ``slsdeep_kernels::*`` nodes; each
translation below is a plain Python function of onnxscript ops (traced, so Python ints and lists
become constants). Every one is shape-generic: the batch, and also H and W, may be dynamic.

* ``conv_bn_relu_eval`` -> ``Conv`` with BatchNorm folded into its weight and bias, then ``Relu``:
  ``scale = γ/√(σ²+ε)``, ``W' = W·scale``, ``b' = (b−μ)·scale + β`` in fp32, as the op folds. The fold
  is emitted as ops on the parameters; :func:`fold_constants` (or onnxruntime at load) computes it once.
* ``pyramid_pool`` -> per cell a ``Slice`` of PyTorch's adaptive window ``[⌊i·H/b⌋, ⌈(i+1)·H/b⌉)`` (bounds
  computed from the map's shape in int64, so any H, W, also not divisible by b or smaller than it) and
  ``ReduceMean`` over it: the window's sum divided by its size, as adaptive average pooling.
* ``upsample_concat`` -> ``Concat`` of x and every branch through ``Resize`` (linear, to x's H×W,
  ``half_pixel`` or ``align_corners``). PyTorch's bilinear rule is ``half_pixel`` with the source
  coordinate clamped at 0, which ``Resize`` does too; ``pytorch_half_pixel`` differs where an output side is 1.
* ``pyramid_conv`` -> the low-resolution form (see :mod:`slsdeep_kernels.ops.pyramid`): ``Conv`` over
  the full-resolution parts (``Concat`` of them where there are several) with their weight slice,
  and per branch its ``(k²·C_out, C_b)`` matrix as one 1×1 ``Conv`` to ``k²·C_out`` channels at the
  branch's own size (``z_t = W_t·y`` for the k×k taps), ``Resize`` to H×W (a per-channel linear map,
  so it commutes with the 1×1 conv), summed over branches, zero-padded by k//2, and the taps' shifted
  ``Slice`` s added to the conv: ``conv(up(y))(p) = Σ_t up(W_t·y)(p + t − k//2)``, zero outside the
  image; then ``Relu`` when the op has it. The weight's split comes before the op as ordinary ops
  on the parameters (folded to constants by :func:`fold_constants`); which parts are at full
  resolution is the op's own argument, decided when the call was traced.

A training-mode ``conv_bn_relu`` (batch statistics) raises: export in eval mode. The loss has no
translation: it is not part of an inference graph.
"""

from __future__ import annotations

import torch

MIN_OPSET = 18


def _ops(opset: int):
    """The translations bound to ONNX opset ``opset`` (onnxscript imported here, only when asked)."""
    import onnxscript

    op = onnxscript.values.Opset("", opset)

    def spatial_size(x):
        """x's (H, W) as an int64 tensor of 2."""
        return op.Shape(x, start=2, end=4)

    def conv_bn_relu_eval(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                          stride, padding, dilation, groups, eps, relu, backend):  # fmt: skip
        float_ = onnxscript.ir.DataType.FLOAT
        scale = op.Reciprocal(op.Sqrt(op.Add(op.Cast(running_var, to=float_), op.Constant(value_float=eps))))
        if bn_weight is not None:
            scale = op.Mul(scale, op.Cast(bn_weight, to=float_))
        shift = op.Neg(op.Cast(running_mean, to=float_))
        if bias is not None:
            shift = op.Add(shift, op.Cast(bias, to=float_))
        shift = op.Mul(shift, scale)
        if bn_bias is not None:
            shift = op.Add(shift, op.Cast(bn_bias, to=float_))
        folded = op.Mul(op.Cast(weight, to=float_), op.Unsqueeze(scale, [1, 2, 3]))
        out = op.Conv(
            x, op.CastLike(folded, x), op.CastLike(shift, x),
            strides=list(stride), pads=[padding[0], padding[1], padding[0], padding[1]],
            dilations=list(dilation), group=groups,
        )  # fmt: skip
        return op.Relu(out) if relu else out

    def pyramid_pool(x, bins, backend):
        size = spatial_size(x)
        cells = []
        for b in bins:
            for i in range(b):
                for j in range(b):
                    start = op.Div(op.Mul(size, [i, j]), [b, b])  # ⌊i·H/b⌋ (non-negative: floor)
                    end = op.Div(op.Add(op.Mul(size, [i + 1, j + 1]), [b - 1, b - 1]), [b, b])  # ⌈(i+1)·H/b⌉
                    cells.append(op.ReduceMean(op.Slice(x, start, end, [2, 3]), [2, 3], keepdims=1))
        return op.Reshape(op.Concat(*cells, axis=2), [0, 0, -1])

    def resize(y, size, align_corners):
        mode = "align_corners" if align_corners else "half_pixel"
        return op.Resize(y, None, None, size, axes=[2, 3], mode="linear", coordinate_transformation_mode=mode)

    def upsample_concat(x, branches, align_corners, backend):
        size = spatial_size(x)
        return op.Concat(x, *(resize(y, size, align_corners) for y in branches), axis=1)

    def pyramid_conv(parts, weight_x, branch_weights, bias, full, align_corners, relu, backend):
        k, out_channels = weight_x.shape[-1], weight_x.shape[0]
        half = k // 2
        inputs = [p for p, f in zip(parts, full) if f]
        spatial = spatial_size(inputs[0])
        x = inputs[0] if len(inputs) == 1 else op.Concat(*inputs, axis=1)
        out = op.Conv(x, weight_x, bias, pads=[half] * 4)
        taps = None
        for y, weight in zip((p for p, f in zip(parts, full) if not f), branch_weights):
            # (k²·C_out, C_b), rows (ky, kx, out channel), as a 1×1 conv: tap t is the block of channels
            # [t·C_out, (t+1)·C_out).
            by_tap = op.Reshape(weight, [k * k * out_channels, -1, 1, 1])
            z = resize(op.Conv(y, by_tap), spatial, align_corners)
            taps = z if taps is None else op.Add(taps, z)
        if taps is not None and k == 1:
            out = op.Add(out, taps)
        elif taps is not None:
            padded = op.Pad(taps, [0, 0, half, half, 0, 0, half, half])
            for ky in range(k):
                for kx in range(k):
                    t = k * ky + kx
                    ends = op.Concat(op.Constant(value_ints=[(t + 1) * out_channels]), op.Add(spatial, [ky, kx]), axis=0)
                    out = op.Add(out, op.Slice(padded, [t * out_channels, ky, kx], ends, [1, 2, 3]))
        return op.Relu(out) if relu else out

    def conv_bn_relu_train(*args):
        raise ValueError("slsdeep_kernels: conv_bn_relu in training mode (batch statistics) has no ONNX form; "
                         "export the model in eval mode (model.eval())")

    return {
        torch.ops.slsdeep_kernels.conv_bn_relu_eval.default: conv_bn_relu_eval,
        torch.ops.slsdeep_kernels.conv_bn_relu_train.default: conv_bn_relu_train,
        torch.ops.slsdeep_kernels.pyramid_pool.default: pyramid_pool,
        torch.ops.slsdeep_kernels.upsample_concat.default: upsample_concat,
        torch.ops.slsdeep_kernels.pyramid_conv.default: pyramid_conv,
    }


def fold_constants(program) -> None:
    """Optimise an exported ``torch.onnx.ONNXProgram`` in place as the exporter does, but fold every
    parameter-only subgraph whatever its size (the exporter skips tensors over 8192 elements): the BN
    folds and the pyramid conv's weight slices, so the saved graph holds plain ``Conv`` weights.
    Export with ``optimize=False`` to skip the exporter's own, then redundant, pass."""
    import onnxscript.optimizer

    unlimited = 2**62
    onnxscript.optimizer.optimize_ir(program.model, input_size_limit=unlimited, output_size_limit=unlimited)


def onnx_translations(opset: int = MIN_OPSET) -> dict:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True, opset_version=opset)``.

    Needs ``onnxscript`` (``pip install onnx onnxscript``). ``opset`` must be the export's and >= 18
    (``Resize`` with ``axes``); a lower one raises ValueError.
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"onnx_translations: opset must be an int >= {MIN_OPSET} (Resize with axes); got {opset!r}")
    try:
        return _ops(opset)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"onnx_translations needs onnxscript: pip install onnx onnxscript ({error})") from error

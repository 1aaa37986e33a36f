"""Ahead-of-time compile check of every Triton launch of the library, without a GPU.

What: every Triton kernel launch that the GPU path makes, at the SLSDeep model's shapes (batch 16,
384×384, training and inference) and at the GPU tests' shapes, in bf16, fp16 and fp32, NCHW and
channels_last, under PyTorch's default TF32 settings and the tests' (both off), is compiled for
``sm_90`` (and a subset for ``sm_80``) with ``triton.compile``; per variant
the table records the registers, shared memory, spills (``ptxas -v``), tensor-core use and the
vector widths of the global loads, stores and ``cp.async`` copies (all, and in the innermost loops).

Why: a kernel that spills or asks for more shared memory than the GPU has is found on a laptop in a
few minutes instead of on a rented GPU, and a change of tile or precision shows up as a diff of the
committed table ``bench/compile/triton-sm90.json``.

How the variants are found. Every Triton launch goes through :func:`slsdeep_kernels.backend.launch`;
under :func:`~slsdeep_kernels.backend.observe_launches` the real launcher functions of each op
(``forward``, ``pool``, ``eval_forward``, ...) are called with ordinary CPU tensors of
the real shapes, strides and storage offsets (``torch.empty``: nothing runs), in a process without
``TRITON_INTERPRET`` (so tile, precision and warp decisions are the GPU's). Each captured launch is
then specialised by **Triton's own JIT**: ``JITFunction.run(..., warmup=True)`` runs with a stand-in
driver that only answers "the current target is ``GPUTarget("cuda", arch, 32)``" and a
``knobs.runtime.jit_cache_hook`` that takes the specialisation Triton would compile (its
signature, constexprs, ``tt.divisibility`` attributes of pointers and ints, ints equal to 1 made
constants, options) and stops before compiling. Worker processes compile it through
``JITFunction.preload`` (Triton's own deserialise-and-compile path), i.e. ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32), options=...)`` exactly as the JIT calls it (no kernel of the
library is autotuned: one launch, one variant). Pointer alignment is that of the CPU tensors: CPU
allocations are 64-byte aligned and CUDA ones
256-byte aligned, so ``data_ptr() % 16`` differs between the two only through the storage offset
(``out[:, offset:]`` views, slices of the pooled cells), which is reproduced exactly. ATen work between
launches that only produces operands (the training conv and its backward in ``conv_bn_relu``) runs on
the ``meta`` device and is materialised as empty CPU tensors of the same size and strides, so the
launches see the real batch-16 shapes without computing a convolution on the CPU.

The ptxas numbers are those of Triton's own ``ptxas -v`` run (its bundled ptxas; the log is kept
through ``knobs.nvidia.dump_ptxas_log``), in a fresh ``TRITON_CACHE_DIR``. Each variant also carries
Triton's cache hash (computed from the specialisation with Triton's own ``get_cache_key`` and
checked against the hash of the compiled kernel: the JIT looks the kernel up in its cache under that
hash, the directory being named by its base32 form) and, in the table, ``content_hash``: the same key
with every kernel's starting line number set to 0 (Triton's key contains it), so that an edit above
a kernel in its file neither makes the table stale nor forces its variants to be compiled again.

Records (one per variant, sorted; ``id`` = arch/kernel/hash of the specialisation): kernel, op,
launchers, dtypes / layouts / TF32 settings / groups of the cases that launch it (a layout is the
case's: a channels_last model still runs some kernels on NCHW views), config (constexpr
meta-parameters, num_warps, num_stages), signature, constants (ints equal to 1),
divisible_by_16, registers, shared (Triton's dynamic shared memory, what the launch compares with
the limit), ptxas_static_smem, spill_stores / spill_loads / stack_frame (bytes per thread),
tensor_cores (mma.sync / wgmma / ldmatrix instruction counts), global_memory (for ``all`` the
kernel and ``loop`` its innermost loops: {bytes per instruction: count} of ``ld.global``,
``st.global`` and ``cp.async`` global->shared copies, atomics, the widest load and store),
int64_division (64-bit ``div``/``rem`` in all and in the innermost loops), status (ok / fail),
problems, sources (the cases, with their shapes).

Failures (exit status 1, one line each): a compile error; shared memory above the target's limit
(``cudaDevAttrMaxSharedMemoryPerBlockOptin``: sm_90 232,448 B, sm_80 166,912 B); a spill.

Cases. sm_90 compiles every variant of every case (275 at the time of writing: ~30 s on 2 cores);
other architectures the variants of the ``--subset`` cases (default ``model``). ``--reuse TABLE``
and ``--check TABLE`` take the compiled fields of a variant whose content hash
the table has from the table (the same key is the same compiled kernel, Triton's own cache rule,
line info aside) and compile only the others; ``--check`` compiles ``--verify N`` of the reused ones again and
compares (exit 1 when the table is stale, not reproducible or has failures).

Run::

    python -m slsdeep_kernels.compile_check                       # sm_90, every variant
    python -m slsdeep_kernels.compile_check --arch 90 --arch 80 --json table.json
    python -m slsdeep_kernels.compile_check --json bench/compile/triton-sm90.json \
        --reuse bench/compile/triton-sm90.json                    # regenerate the committed table
    python -m slsdeep_kernels.compile_check --check bench/compile/triton-sm90.json  # CI: fail if stale
    python -m slsdeep_kernels.compile_check --precompile          # on a GPU: fill the Triton cache
    python -m slsdeep_kernels.compile_check --capture-only        # list the variants, compile nothing

``--precompile`` (on a machine with a CUDA GPU) compiles every variant of every case for the local
GPU into the normal Triton cache (``TRITON_CACHE_DIR`` or ``~/.triton/cache``) through the same JIT
path and the machine's own driver, so the tests' launches find their kernels there. Run from a
process with ``TRITON_INTERPRET=1`` set, the command re-runs itself without it. The
tests' cases mirror the ``@pytest.mark.gpu`` tests and must be kept in step with them
(:func:`gpu_test_cases`); the model's come from ``slsdeep.model.SLSDeep`` itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from slsdeep_kernels.ops.pyramid import PYRAMID_BINS

FORMAT = 1
DEFAULT_TABLE = "bench/compile/triton-sm90.json"
# cudaDevAttrMaxSharedMemoryPerBlockOptin, what Triton compares a kernel's shared memory with at launch.
SHARED_LIMITS = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448, 100: 232_448, 120: 101_376}
# Environment variables removed for the capture: the interpreter (CPU decisions, no JIT functions),
# the test suite's NaN poisoning (a fill of every output: slow at batch 16, irrelevant here) and a
# forced backend.
CLEAN_ENV_REMOVED = ("TRITON_INTERPRET", "SLSDEEP_KERNELS_POISON", "SLSDEEP_KERNELS_BACKEND")
# fp32 decisions read these: PyTorch's defaults, and the tests' (conftest turns both off).
FLAG_SETTINGS = {
    "pytorch-default": {"matmul_tf32": False, "cudnn_tf32": True},
    "tests": {"matmul_tf32": False, "cudnn_tf32": False},
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The launcher functions the cases call (a missing one is a clear error: the cases need updating).
OPS = {
    "nll_epe_loss": "slsdeep_kernels.ops.nll_epe_loss_triton",
    "pyramid": "slsdeep_kernels.ops.pyramid_triton",
    "conv_bn_relu": "slsdeep_kernels.ops.conv_bn_relu_triton",
}
LAUNCHERS = {
    "nll_epe_loss": ("forward", "backward", "scale"),
    "pyramid": (
        "pool", "pool_backward", "upsample_concat", "upsample_concat_backward",
        "taps_add", "taps_backward",
    ),
    "conv_bn_relu": ("eval_forward", "train_forward", "train_backward"),
}  # fmt: skip
MODEL_BATCH, MODEL_SIZE = 16, 384


class CompileCheckError(RuntimeError):
    """The check cannot run as set up (interpreter, a renamed launcher, a kernel never launched)."""


class LaunchBypassError(CompileCheckError):
    """A Triton kernel was launched without ``slsdeep_kernels.backend.launch``."""


def clean_environment(base: dict | None = None) -> dict:
    """``base`` (default ``os.environ``) without the variables that would change the GPU decisions."""
    env = dict(os.environ if base is None else base)
    for name in CLEAN_ENV_REMOVED:
        env.pop(name, None)
    return env


def _triton():
    import triton

    return triton


# ---------------------------------------------------------------------------------------------
# Tensors of a given geometry (shape, strides, storage offset): uninitialised, nothing computed.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0

    @classmethod
    def of(cls, t: torch.Tensor) -> Geometry:
        return cls(tuple(t.shape), tuple(t.stride()), t.storage_offset())

    @classmethod
    def dense(cls, shape, channels_last: bool = False) -> Geometry:
        fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
        return cls.of(torch.empty(shape, device="meta", memory_format=fmt))

    def empty(self, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
        """An uninitialised tensor of this geometry. On the CPU its storage is a fresh allocation (64-byte
        aligned; CUDA's are 256-byte aligned), so data_ptr() % 16 depends on the offset alone, as on a GPU."""
        extent = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n > 0)
        base = torch.empty(extent, dtype=dtype, device=device)
        if device == "cpu" and base.data_ptr() % 16:
            raise CompileCheckError("a CPU allocation is not 16-byte aligned: the pointer specialisation would differ from a GPU's")
        return base.as_strided(self.shape, self.stride, self.offset)

    def describe(self) -> str:
        text = "x".join(map(str, self.shape))
        dense_nchw = Geometry.dense(self.shape)
        if self.stride != dense_nchw.stride:
            text += "@" + ",".join(map(str, self.stride))
        if self.offset:
            text += f"+{self.offset}"
        return text


def _layout(channels_last: bool) -> str:
    return "channels_last" if channels_last else "nchw"


# ---------------------------------------------------------------------------------------------
# Cases: a call of real launchers at one set of shapes, dtype and layout.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    group: str  # "model" or "tests"
    op: str
    label: str  # what and at which shapes (without dtype and layout)
    dtype: str
    layout: str
    run: Callable[[], None]


def _module(op: str):
    """The op's Triton module (kernels and launchers)."""
    return importlib.import_module(OPS[op])


def _op_module(op: str):
    """The op's module (custom ops and public functions)."""
    return importlib.import_module(f"slsdeep_kernels.ops.{op}")


def _launcher(op: str, name: str):
    module = _module(op)
    if not hasattr(module, name):
        raise CompileCheckError(
            f"{module.__name__}.{name} does not exist: slsdeep_kernels.compile_check calls it to capture the "
            f"op's Triton launches; update the cases in compile_check.py to the op's current launchers"
        )
    return getattr(module, name)


def _loss_cases(group, label, logits: Geometry, target: Geometry, target_dtype, dtype, layout, passes) -> list[Case]:
    """``passes``: which of the loss's launches: "mean+grad", "mean", "sum+grad", "none" (forward and the
    map's backward), "scale" / "scale-sum" (the backward of mean / sum: the saved gradient scaled in
    place by the upstream gradient, which backward turns to fp32 where the forward deferred the mean's
    1/(N·H·W): see nll_epe_loss._saved_gradient_scale)."""
    cases = []
    n, _, h, w = logits.shape
    for kind in passes:

        def run(kind=kind):
            forward = _launcher("nll_epe_loss", "forward")
            x, t = logits.empty(DTYPES[dtype]), target.empty(target_dtype)
            if kind == "none":
                forward(x, t, 0.5, "none", True)
                _launcher("nll_epe_loss", "backward")(Geometry.dense((n, h, w)).empty(DTYPES[dtype]), x, t, 0.5)
            elif kind in ("scale", "scale-sum"):
                reduction = "mean" if kind == "scale" else "sum"
                _, gradient = forward(x, t, 0.5, reduction, True)
                pixels = n * h * w
                saved = _op_module("nll_epe_loss")._saved_gradient_scale(DTYPES[dtype], reduction, pixels)
                deferred = (1.0 / pixels if reduction == "mean" else 1.0) / saved  # as _setup_context computes it
                factor_dtype = torch.float32 if deferred != 1.0 else DTYPES[dtype]  # as _scaled_gradient passes it
                _launcher("nll_epe_loss", "scale")(gradient, torch.empty((), dtype=factor_dtype))
            else:
                reduction, _, grad = kind.partition("+")
                forward(x, t, 0.5, reduction, bool(grad))

        target_name = str(target_dtype).removeprefix("torch.")
        cases.append(Case(group, "nll_epe_loss", f"{label} logits {logits.describe()} target {target_name} {kind}", dtype, layout, run))
    return cases


def _pyramid_pool_case(group, label, x: Geometry, bins, dtype, layout, backward: bool) -> Case:
    def run():
        pooled = _launcher("pyramid", "pool")(x.empty(DTYPES[dtype]), list(bins))
        if backward:
            grad = Geometry.dense(pooled.shape).empty(DTYPES[dtype])
            _launcher("pyramid", "pool_backward")(grad, list(bins), x.shape[2], x.shape[3], layout == "channels_last")

    return Case(group, "pyramid", f"{label} pyramid_pool x {x.describe()} bins {tuple(bins)}{' +backward' if backward else ''}", dtype, layout, run)


def _pyramid_conv_case(group, label, x: Geometry, branches: Sequence[Geometry], weight: Geometry, align_corners, dtype, layout,
                       backward: bool, grad: Geometry | None = None) -> Case:  # fmt: skip
    """pyramid_conv's Triton part: the taps (z_t = W_t·y, as the op builds them) added into the conv
    output, and (backward) the taps' gradient from ``grad`` (default: dense in the output's layout)."""

    def run():
        d = DTYPES[dtype]
        # as _pyramid_conv_op builds them (the weight split once, one matmul per branch), on the meta
        # device (a bf16 matmul of the model's size takes seconds on a CPU), then materialised
        ys, kernel_size = [g.empty(d, "meta") for g in branches], weight.shape[-1]
        parts, full = [x.empty(d, "meta"), *ys], [True] + [False] * len(ys)
        _, branch_weights = _op_module("pyramid")._split_weight(weight.empty(d, "meta"), parts, full)
        taps = [Geometry.of(z).empty(d) for z in _op_module("pyramid")._taps(branch_weights, ys, kernel_size, "triton")]
        out_shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
        out = Geometry.dense(out_shape, layout == "channels_last").empty(d)
        _launcher("pyramid", "taps_add")(out, taps, align_corners)
        if backward:
            g = grad if grad is not None else Geometry.dense(out_shape, layout == "channels_last")
            sizes = [s for y in branches for s in y.shape[2:]]
            _launcher("pyramid", "taps_backward")(g.empty(d), sizes, kernel_size, align_corners)

    text = ", ".join(b.describe() for b in branches)
    return Case(group, "pyramid", f"{label} pyramid_conv x {x.describe()} branches [{text}] weight {weight.describe()} "
                f"align_corners={align_corners}{' +backward' if backward else ''}", dtype, layout, run)  # fmt: skip


def _upsample_case(group, label, x: Geometry, branches: Sequence[Geometry], align_corners, dtype, layout, grad: Geometry | None) -> Case:
    def run():
        d = DTYPES[dtype]
        out = _launcher("pyramid", "upsample_concat")(x.empty(d), [b.empty(d) for b in branches], align_corners)
        if grad is not None:
            sizes = [s for b in branches for s in b.shape[1:]]
            _launcher("pyramid", "upsample_concat_backward")(grad.empty(d), x.shape[1], sizes, align_corners)
        del out

    text = ", ".join(b.describe() for b in branches)
    return Case(group, "pyramid", f"{label} upsample_concat x {x.describe()} branches [{text}] align_corners={align_corners}"
                f"{' +backward' if grad is not None else ''}", dtype, layout, run)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ConvCall:
    """One conv_bn_relu call: geometries and options (dtype-free; the case gives the dtypes)."""

    x: Geometry
    weight: Geometry
    bias: bool
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    gamma: bool
    beta: bool
    eps: float
    relu: bool

    def describe(self) -> str:
        co, ci, kh, kw = self.weight.shape
        text = f"x {self.x.describe()} {kh}x{kw} {ci * self.groups}->{co}"
        for name, value, default in (("stride", self.stride, (1, 1)), ("padding", self.padding, (0, 0)),
                                     ("dilation", self.dilation, (1, 1))):  # fmt: skip
            if value != default:
                text += f" {name} {value[0]}" if value[0] == value[1] else f" {name} {value}"
        if self.groups != 1:
            text += f" groups {self.groups}"
        text += "" if self.bias else " no-bias"
        text += "" if self.relu else " no-relu"
        if not (self.gamma and self.beta):
            text += f" gamma={self.gamma} beta={self.beta}"
        return text


def _conv_case(group, label, call: ConvCall, dtype, layout, training: bool, param_dtype: str) -> Case:
    """Eval: ``eval_forward`` (BN parameters and running statistics in ``param_dtype``). Training: the
    forward ``train_forward`` and ``train_backward`` (BN parameters in ``param_dtype``)."""

    def run():
        d, p = DTYPES[dtype], DTYPES[param_dtype]
        co = call.weight.shape[0]
        x, weight = call.x.empty(d), call.weight.empty(d)
        bias = torch.empty(co, dtype=d) if call.bias else None
        gamma = torch.empty(co, dtype=p) if call.gamma else None
        beta = torch.empty(co, dtype=p) if call.beta else None
        options = _op_module("conv_bn_relu").ConvBNOptions(
            stride=list(call.stride), padding=list(call.padding), dilation=list(call.dilation), groups=call.groups,
            eps=call.eps, relu=call.relu,
        )  # fmt: skip
        if not training:
            mean, var = torch.empty(co, dtype=p), torch.empty(co, dtype=p)
            _launcher("conv_bn_relu", "eval_forward")(x, weight, bias, gamma, beta, mean, var, options)
            return
        out, y, mean, var = _launcher("conv_bn_relu", "train_forward")(x, weight, bias, gamma, beta, options)
        grad_out = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype)
        backward = _launcher("conv_bn_relu", "train_backward")
        backward(grad_out, x, weight, bias, y, mean, var, gamma, beta, options, [True, True, call.bias])

    mode = "train fwd+bwd" if training else "eval"
    params = "" if param_dtype == dtype else f" (BN parameters {param_dtype})"
    return Case(group, "conv_bn_relu", f"{label} conv_bn_relu {mode} {call.describe()}{params}", dtype, layout, run)


# --- the model's shapes: one forward of the real SLSDeep model on the meta device records every call


@dataclasses.dataclass
class ModelCalls:
    convs: dict  # ConvCall -> [layer names]
    pools: list  # (x geometry, bins)
    pyramid_convs: list  # (x, [branches], weight, align_corners)
    logits: Geometry


def _model_calls(channels_last: bool, training: bool) -> ModelCalls:
    """The fused SLSDeep model (paper preset, default variant) at batch 16, 384×384, on the meta device,
    with the three slsdeep_kernels entry points it calls replaced by recorders returning outputs of
    the op's geometry (shapes, formats)."""
    try:
        from slsdeep.model import SLSDeep
    except ImportError as error:  # pragma: no cover - the repository ships slsdeep
        raise CompileCheckError(f"the model's shapes come from slsdeep.model, which does not import: {error}") from error
    import torch.nn.functional as F

    import slsdeep_kernels
    from slsdeep_kernels import backend

    with torch.device("meta"):
        model = SLSDeep(preset="paper")
    names = {id(m): name for name, m in model.named_modules()}
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train(training)
    calls = ModelCalls({}, [], [], None)

    def conv_bn_relu_modules(x, conv, bn, relu=True, memory_efficient=False):
        padding = conv.padding if isinstance(conv.padding, tuple) else tuple(_op_module("conv_bn_relu")._conv_padding(conv))
        call = ConvCall(Geometry.of(x), Geometry.of(conv.weight), conv.bias is not None, tuple(conv.stride), tuple(padding),
                        tuple(conv.dilation), conv.groups, bn.weight is not None, bn.bias is not None, bn.eps, relu)  # fmt: skip
        calls.convs.setdefault(call, []).append(names[id(conv)])
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)
        return torch.empty(y.shape, device="meta", memory_format=backend.preserved_format(x))

    def pyramid_pool(x, bins=PYRAMID_BINS, backend_=None):
        calls.pools.append((Geometry.of(x), tuple(bins)))
        return torch.empty((x.shape[0], x.shape[1], sum(b * b for b in bins)), device="meta")

    def pyramid_conv_modules(parts, conv, bn=None, relu=False, size=None, align_corners=False, backend_=None):
        x, *branches = parts  # the model's order: its dense input, then the branches
        weight = conv.weight
        calls.pyramid_convs.append((Geometry.of(x), [Geometry.of(y) for y in branches], Geometry.of(weight), bool(align_corners)))
        return torch.empty((x.shape[0], weight.shape[0], *x.shape[2:]), device="meta", memory_format=backend.preserved_format(x))

    recorders = {"conv_bn_relu_modules": conv_bn_relu_modules, "pyramid_pool": pyramid_pool,
                 "pyramid_conv_modules": pyramid_conv_modules}  # fmt: skip
    saved = {name: getattr(slsdeep_kernels, name) for name in recorders}
    try:
        for name, fn in recorders.items():
            setattr(slsdeep_kernels, name, fn)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.empty((MODEL_BATCH, 3, MODEL_SIZE, MODEL_SIZE), device="meta", memory_format=fmt)
        calls.logits = Geometry.of(model(x))
    finally:
        for name, fn in saved.items():
            setattr(slsdeep_kernels, name, fn)
    if not (calls.convs and calls.pools and calls.pyramid_convs):
        raise CompileCheckError(
            "the SLSDeep model no longer calls slsdeep_kernels.conv_bn_relu_modules, pyramid_pool and pyramid_conv_modules "
            "(as compile_check's model cases expect): update _model_calls"
        )
    return calls


# BN parameters (and running statistics) of the model in eval, per activation dtype: bf16 inference is
# model.to(bfloat16) (slsdeep/benchmark.py), fp16 is autocast's (train.py validates under autocast,
# which keeps the BN parameters fp32). Training is always under autocast: BN parameters fp32.
EVAL_PARAM_DTYPE = {"bfloat16": "bfloat16", "float16": "float32", "float32": "float32"}


def model_cases() -> list[Case]:
    """The fused model's launches at batch 16, 384×384, in eval (BN parameters: EVAL_PARAM_DTYPE) and
    training (under autocast: activations and conv weights in the dtype, BN parameters fp32; the loss
    in the dtype too, though autocast gives it fp32 logits)."""
    cases = []
    for channels_last in (False, True):
        layout = _layout(channels_last)
        for training in (False, True):
            calls = _model_calls(channels_last, training)
            mode = "train" if training else "eval"
            for dtype in DTYPES:
                param_dtype = "float32" if training else EVAL_PARAM_DTYPE[dtype]
                for call, layers in calls.convs.items():
                    label = f"{mode} {_layer_summary(layers)}:"
                    cases.append(_conv_case("model", label, call, dtype, layout, training, param_dtype))
                for x, bins in calls.pools:
                    cases.append(_pyramid_pool_case("model", f"{mode} decoder:", x, bins, dtype, layout, backward=training))
                for x, branches, weight, align_corners in calls.pyramid_convs:
                    cases.append(_pyramid_conv_case("model", f"{mode} decoder:", x, branches, weight, align_corners, dtype, layout,
                                                    backward=training))  # fmt: skip
                logits = calls.logits
                one_class = Geometry.dense((logits.shape[0], 1, *logits.shape[2:]), channels_last)
                target = Geometry.dense((logits.shape[0], *logits.shape[2:]))
                passes = ("mean+grad", "scale") if training else ("mean",)
                for geometry in (logits, one_class):
                    cases += _loss_cases("model", f"{mode} loss:", geometry, target, torch.int64, dtype, layout, passes)
    return cases


def _layer_summary(layers: list[str]) -> str:
    first = layers[0]
    return first if len(layers) == 1 else f"{first} (+{len(layers) - 1} alike)"


# --- the GPU tests' shapes (tests/test_*.py, the @pytest.mark.gpu cases; keep in step with them)


def gpu_test_cases() -> list[Case]:
    cases = []
    # tests/test_nll_epe_loss.py::test_gpu_matches_reference and ::test_gpu_channels_last_...
    for (n, h, w), target_dtype in (((4, 384, 384), torch.uint8), ((3, 37, 53), torch.int64), ((2, 1, 257), torch.bool)):
        for c in (1, 2):
            for dtype in DTYPES:
                logits, target = Geometry.dense((n, c, h, w)), Geometry.dense((n, h, w))
                passes = ("mean+grad", "sum+grad", "scale", "scale-sum", "none")
                cases += _loss_cases("tests", "test_nll_epe_loss:", logits, target, target_dtype, dtype, "nchw", passes)
    logits = Geometry.dense((2, 2, 130, 67), channels_last=True)
    cases += _loss_cases("tests", "test_nll_epe_loss:", logits, Geometry.dense((2, 130, 67)), torch.float32, "float32",
                         "channels_last", ("mean+grad", "scale", "none"))  # fmt: skip
    # tests/test_pyramid.py::test_gpu_ops: pool, upsample_concat and pyramid_conv (3×3, 1×1) forward and backward
    # (the tests' cotangents are dense NCHW whatever the layout), both align_corners
    bins = PYRAMID_BINS
    for dtype in ("float32", "bfloat16"):
        for channels_last in (False, True):
            layout = _layout(channels_last)
            x = Geometry.dense((4, 256, 48, 48), channels_last)
            branches = [Geometry.dense((4, 128, b, b)) for b in bins]
            weight = Geometry.dense((64, 256 + 512, 3, 3))
            cases.append(_pyramid_pool_case("tests", "test_gpu_ops:", x, bins, dtype, layout, backward=True))
            for align_corners in (False, True):
                grad = Geometry.dense((4, 256 + 512, 48, 48))
                cases.append(_upsample_case("tests", "test_gpu_ops:", x, branches, align_corners, dtype, layout, grad))
                for w in (weight, Geometry.dense((64, 256 + 512, 1, 1))):  # pyramid_conv3x3 and pyramid_conv 1×1
                    cases.append(_pyramid_conv_case("tests", "test_gpu_ops:", x, branches, w, align_corners, dtype, layout,
                                                    backward=True, grad=Geometry.dense((4, 64, 48, 48))))  # fmt: skip
    # ::test_gpu_conv_never_allocates_the_concatenation: bf16, .sum().backward() (an expanded cotangent)
    x = Geometry.dense((4, 512, 48, 48))
    grad = Geometry((4, 128, 48, 48), (0, 0, 0, 0), 0)
    cases.append(_pyramid_conv_case("tests", "test_gpu_conv_never_allocates:", x, [Geometry.dense((4, 256, b, b)) for b in bins],
                                    Geometry.dense((128, 512 + 1024, 3, 3)), False, "bfloat16", "nchw", backward=True, grad=grad))  # fmt: skip
    # tests/test_conv_bn_relu.py::test_gpu_backends (x channels_last, weight and the rest dense, bias) and
    # ::test_gpu_nchw_stride_and_memory_efficient
    for c_in, c_out, kernel, dilation in ((1024, 256, 1, 1), (256, 256, 3, 2), (512, 512, 3, 4)):
        pad = dilation * (kernel // 2)
        call = ConvCall(Geometry.dense((4, c_in, 48, 48), True), Geometry.dense((c_out, c_in, kernel, kernel)), True, (1, 1),
                        (pad, pad), (dilation, dilation), 1, True, True, 1e-5, True)  # fmt: skip
        for dtype in ("float32", "bfloat16"):
            for training in (False, True):
                cases.append(_conv_case("tests", "test_gpu_backends:", call, dtype, "channels_last", training, dtype))
    call = ConvCall(Geometry.dense((3, 64, 37, 53)), Geometry.dense((96, 64, 3, 3)), True, (2, 2), (1, 1), (1, 1), 1,
                    True, True, 1e-5, True)  # fmt: skip
    for training in (False, True):
        cases.append(_conv_case("tests", "test_gpu_nchw_stride_and_memory_efficient:", call, "float16", "nchw", training, "float16"))
    return cases


def all_cases(groups: Iterable[str] = ("model", "tests")) -> list[Case]:
    groups = set(groups)
    return (model_cases() if "model" in groups else []) + (gpu_test_cases() if "tests" in groups else [])


# ---------------------------------------------------------------------------------------------
# Capture: the launches of the cases, specialised by Triton's own JIT for a target.
# ---------------------------------------------------------------------------------------------


class _TargetOnlyDriver:
    """Enough of a Triton driver for the JIT's binder, ``run(warmup=True)`` and ``preload``: the current
    device, stream and target. Anything else (loading a module, launching) has no GPU behind it."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return f"compile-check-sm_{self.arch}"

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def __getattr__(self, name):
        raise CompileCheckError(f"compile_check compiles for sm_{self.arch} without a GPU: the driver has no {name!r} here")


@contextlib.contextmanager
def target_driver(arch: int, real: bool = False):
    """Triton's active driver answers for ``arch`` (``real``: the machine's own driver, checked to be ``arch``)."""
    from triton.runtime.driver import driver

    if real:
        found = driver.active.get_current_target()
        if found.arch != arch:
            raise CompileCheckError(f"the local GPU is sm_{found.arch}, not sm_{arch}")
        yield
        return
    previous = driver._active
    driver._active = _TargetOnlyDriver(arch)
    try:
        yield
    finally:
        driver._active = previous


def _unwrap(kernel):
    """The JITFunction under a wrapper (``.fn``: triton's Autotuner, Heuristics)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        if not hasattr(kernel, "fn"):
            raise CompileCheckError(f"{kernel!r} is not a Triton JIT function (is TRITON_INTERPRET set?)")
        kernel = kernel.fn
    return kernel


@dataclasses.dataclass
class Spec:
    """One variant: Triton's specialisation of (kernel, arch) for a launch, and where it came from."""

    arch: int
    module: str
    name: str
    key: str  # the JIT's in-memory cache key (unique per specialisation and options)
    data: str  # the JIT's serialised specialisation (signature, constexprs, attrs, options, target)
    op: str = ""
    triton_hash: str = ""  # Triton's compile cache hash of the variant (the JIT's cache lookup)
    content_hash: str = ""  # the same with every kernel's line number set to 0: what reuse and --check compare
    sources: set = dataclasses.field(default_factory=set)
    launchers: set = dataclasses.field(default_factory=set)
    dtypes: set = dataclasses.field(default_factory=set)
    layouts: set = dataclasses.field(default_factory=set)
    flags: set = dataclasses.field(default_factory=set)
    groups: set = dataclasses.field(default_factory=set)

    @property
    def uid(self) -> tuple:
        return (self.arch, self.module, self.name, self.key)

    @property
    def jit(self):
        return _unwrap(getattr(importlib.import_module(self.module), self.name))


def specialise(kernel, arch: int, grid, args, kwargs: dict, real: bool = False) -> tuple[str, str]:
    """(key, specialisation data) that Triton's JIT computes for ``kernel[grid](*args, **kwargs)`` on
    ``arch``: ``JITFunction.run(warmup=True)`` with a ``jit_cache_hook`` that keeps them and stops."""
    from triton import knobs

    jit = _unwrap(kernel)
    captured = []

    def hook(*, key, compile, **_):
        captured.append((key, compile["specialization_data"]))
        return True  # do not compile

    from triton.runtime.driver import driver

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        with target_driver(arch, real), _specialising():
            # a kernel this process already compiled would skip the hook: hide the in-memory cache
            kernel_cache = jit.device_caches[driver.active.get_current_device()][0]
            cached = dict(kernel_cache)
            kernel_cache.clear()
            try:
                jit.run(*args, grid=grid, warmup=True, **kwargs)
            finally:
                kernel_cache.update(cached)
    finally:
        knobs.runtime.jit_cache_hook = previous
    if len(captured) != 1:
        raise CompileCheckError(f"{jit._fn_name}: Triton's JIT did not reach compilation once (got {len(captured)})")
    return captured[0]


def triton_cache_hash(jit, arch: int, data: str, real: bool = False) -> str:
    """The hash Triton's ``compile()`` gives this variant (the name of its cache directory), without
    compiling: ``JITFunction.preload(data)`` (the JIT's own path to ``compile``) with ``compile`` cut
    down to its first lines, which make the key (same code in triton 3.6 and 3.8)."""
    from triton import knobs
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler import make_backend
    from triton.runtime.cache import get_cache_key
    from triton.runtime.driver import driver

    if knobs.runtime.add_stages_inspection_hook is not None:
        raise CompileCheckError("knobs.runtime.add_stages_inspection_hook is set: Triton's cache keys would differ")

    def key_only(src, target=None, options=None, _env_vars=None):
        backend = make_backend(target)
        options = backend.parse_options(dict(options or dict(), **src.parse_options()))
        env_vars = get_cache_invalidating_env_vars() if _env_vars is None else _env_vars
        return hashlib.sha256(get_cache_key(src, backend, options, env_vars=env_vars).encode("utf-8")).hexdigest()

    with target_driver(arch, real):
        device = driver.active.get_current_device()
        kernel_cache = jit.device_caches[device][0]  # creates the binder, which sets jit.compile
        saved = jit.compile
        jit.compile = key_only
        try:
            value = jit.preload(data)
        finally:
            jit.compile = saved
            kernel_cache.pop(json.loads(data)["key"], None)
    return value


@contextlib.contextmanager
def _line_numbers_ignored(*extra):
    """Every JIT function of the ops with its starting line number set to 0 (and its cached hash
    cleared), so that Triton's cache key no longer depends on where in its file a kernel is: a kernel
    moved by an edit above it compiles to the same code (its line info aside)."""
    from triton.runtime.jit import JITFunction

    jits = set(extra)
    for op in OPS:
        for obj in vars(_module(op)).values():
            while obj is not None and not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
                obj = obj.fn
            if isinstance(obj, JITFunction):
                jits.add(obj)
    saved = {jit: (jit.starting_line_number, jit.hash) for jit in jits}
    try:
        for jit in jits:
            jit.starting_line_number, jit.hash = 0, None
        yield
    finally:
        for jit, (line, value) in saved.items():
            jit.starting_line_number, jit.hash = line, value


def content_hash(jit, arch: int, data: str, real: bool = False) -> str:
    """:func:`triton_cache_hash` with the kernels' line numbers set to 0 (see _line_numbers_ignored)."""
    with _line_numbers_ignored(jit):
        return triton_cache_hash(jit, arch, data, real)


_SPECIALISING = [0]


@contextlib.contextmanager
def _specialising():
    _SPECIALISING[0] += 1
    try:
        yield
    finally:
        _SPECIALISING[0] -= 1


@contextlib.contextmanager
def _no_direct_launches():
    """Any ``JITFunction.run`` outside :func:`specialise` (a ``kernel[grid](...)`` that bypasses
    ``backend.launch``) raises :class:`LaunchBypassError` naming the kernel."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self, *args, **kwargs):
        if not _SPECIALISING[0]:
            raise LaunchBypassError(
                f"{self._fn_name} was launched without slsdeep_kernels.backend.launch: the compile check cannot see "
                "this launch (and neither can the device guard); launch it through backend.launch"
            )
        return original(self, *args, **kwargs)

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


@contextlib.contextmanager
def _meta_aten():
    """conv_bn_relu's ATen helpers (the training conv and its backward) run on the meta device and
    their results are materialised as empty CPU tensors of the same sizes and strides: the launches
    around them see the real shapes, and no convolution is computed on the CPU."""
    module = _module("conv_bn_relu")
    saved = {}
    for name in ("_conv", "_conv_backward"):
        if not hasattr(module, name):
            raise CompileCheckError(f"{module.__name__}.{name} does not exist: update compile_check._meta_aten")
        saved[name] = getattr(module, name)

    def to_meta(value):
        if isinstance(value, torch.Tensor):
            return Geometry.of(value).empty(value.dtype, "meta")
        return value

    def materialise(value):
        if isinstance(value, torch.Tensor):
            return Geometry.of(value).empty(value.dtype)
        if isinstance(value, (tuple, list)):
            return type(value)(materialise(v) for v in value)
        return value

    def wrap(original):
        def on_meta(*args):
            return materialise(original(*(to_meta(a) for a in args)))

        return on_meta

    try:
        for name, original in saved.items():
            setattr(module, name, wrap(original))
        yield
    finally:
        for name, original in saved.items():
            setattr(module, name, original)


@contextlib.contextmanager
def _tf32(matmul_tf32: bool, cudnn_tf32: bool):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _check_gpu_decisions() -> None:
    from slsdeep_kernels import backend

    if backend.triton_interpreted():
        raise CompileCheckError(
            "TRITON_INTERPRET=1 is set: the launches would make the interpreter's decisions and the kernels are not "
            "JIT functions. Run `python -m slsdeep_kernels.compile_check` (it re-runs itself without it) or call "
            "compile_check.run_clean()"
        )


def _calling_launcher(op_module: str) -> str:
    """The name of the innermost launcher function (``LAUNCHERS``) on the stack."""
    names = {name for names in LAUNCHERS.values() for name in names}
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in names and frame.f_globals.get("__name__") == op_module:
            return frame.f_code.co_name
        frame = frame.f_back
    return "?"


def launched_kernels() -> dict[str, object]:
    """Every Triton kernel the ops define (module-level JIT functions that no other JIT
    function of the module calls), by full name."""
    from triton.runtime.jit import JITFunction

    kernels = {}
    for op in OPS:
        module = _module(op)
        found = {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}
        sources = {name: _unwrap(obj).src for name, obj in found.items()}
        for name, obj in found.items():
            called = re.compile(rf"\b{re.escape(name)}\s*\(")
            if not any(called.search(src) for other, src in sources.items() if other != name):
                kernels[f"{module.__name__}.{name}"] = obj
    return kernels


def capture(cases: Sequence[Case], archs: Sequence[int], case_archs: Callable[[Case], Sequence[int]] | None = None,
            real: bool = False, require_all_kernels: bool = True) -> list[Spec]:  # fmt: skip
    """Run every case under both TF32 settings with launches observed; return the variants, deduplicated
    by (arch, kernel, JIT key), each with the cases that produced it. ``case_archs(case)``: the archs a
    case is captured for (default: all of ``archs``)."""
    from slsdeep_kernels import backend

    _check_gpu_decisions()
    specs: dict[tuple, Spec] = {}
    seen_kernels = set()
    for op, names in LAUNCHERS.items():
        for name in names:
            _launcher(op, name)
    with _no_direct_launches(), _meta_aten():
        for case in cases:
            for_archs = list(case_archs(case) if case_archs else archs)
            module_name = OPS[case.op]
            for flag_name, flags in FLAG_SETTINGS.items():

                def observer(kernel, grid, args, meta, device, flag_name=flag_name, case=case, for_archs=for_archs):
                    jit = _unwrap(kernel)
                    if jit is not kernel:
                        raise CompileCheckError(f"{jit._fn_name} is launched through {type(kernel).__name__}: the check "
                                                "specialises plain JIT launches (an autotuner's configs are not captured)")
                    seen_kernels.add(jit._fn_name)
                    launcher = _calling_launcher(module_name)
                    for arch in for_archs:
                        key, data = specialise(kernel, arch, grid, args, dict(meta), real)
                        spec = Spec(arch, jit.module, jit.fn.__name__, key, data)
                        if spec.uid not in specs:
                            spec.op, spec.triton_hash = case.op, triton_cache_hash(jit, arch, data, real)
                            spec.content_hash = content_hash(jit, arch, data, real)
                            specs[spec.uid] = spec
                        spec = specs[spec.uid]
                        spec.sources.add(f"{case.group}: {case.label}")
                        spec.launchers.add(launcher)
                        spec.dtypes.add(case.dtype)
                        spec.layouts.add(case.layout)
                        spec.flags.add(flag_name)
                        spec.groups.add(case.group)

                with _tf32(**flags), backend.observe_launches(observer):
                    case.run()
    if require_all_kernels:
        missing = sorted(set(launched_kernels()) - seen_kernels)
        if missing:
            raise CompileCheckError(f"no case launches {', '.join(missing)}: add the launcher that runs it to compile_check's cases")
    return sorted(specs.values(), key=lambda s: (-s.arch, s.module, s.name, s.key))


# ---------------------------------------------------------------------------------------------
# ptxas -v and PTX analysis
# ---------------------------------------------------------------------------------------------

_PTXAS_PATTERNS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "ptxas_smem": re.compile(r"(\d+) bytes smem"),
    "barriers": re.compile(r"used (\d+) barriers"),
}


def parse_ptxas_log(log: str, kernel: str | None = None, strict: bool = False) -> dict | None:
    """Registers, stack frame, spill stores/loads, static shared memory and barriers of the entry
    function ``kernel`` (default: the first) from a ``ptxas -v`` log; None when there is none. A
    ``kernel`` the log does not name gives the first entry (Triton's logs name one), or None when
    ``strict``."""
    blocks = re.split(r"(?=ptxas info\s*: Compiling entry function)", log)
    blocks = [b for b in blocks if "Compiling entry function" in b]
    if kernel is not None:
        named = [b for b in blocks if re.search(rf"entry function '{re.escape(kernel)}'", b)]
        blocks = named if named or strict else blocks
    if not blocks:
        return None
    block = blocks[0]
    out = {}
    for field, pattern in _PTXAS_PATTERNS.items():
        match = pattern.search(block)
        out[field] = int(match.group(1)) if match else 0
    if not _PTXAS_PATTERNS["registers"].search(block):
        return None
    return out


_LABEL = re.compile(r"^\s*(\$?[\w.$]+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$?[\w.$]+)\s*;")
_GLOBAL = re.compile(r"^\s*(?:@!?%\w+\s+)?(ld|st)\.global((?:\.[\w:]+)*)\s")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared(?:::\w+)?\.global(?:\.[\w:]+)*\s+\[[^\]]*\]\s*,\s*\[[^\]]*\]\s*,\s*(0x[0-9a-fA-F]+|\d+)")
_ATOMIC = re.compile(r"\b(?:atom|red)\.global\b")
_BITS = re.compile(r"^[bsuf](8|16|32|64|128)$|^bf(16)$")


def _access_bytes(modifiers: str) -> int | None:
    vector, bits = 1, None
    for part in modifiers.split(".")[1:]:
        if re.fullmatch(r"v(\d+)", part):
            vector = int(part[1:])
        match = _BITS.match(part)
        if match:
            bits = int(match.group(1) or match.group(2))
    return None if bits is None else vector * bits // 8


def _innermost_loops(lines: Sequence[str]) -> list[tuple[int, int]]:
    """(first, last) line of each innermost loop of a PTX function: a label and a later branch back
    to it, containing no other such loop."""
    labels, loops = {}, []
    for i, line in enumerate(lines):
        match = _LABEL.match(line)
        if match:
            labels[match.group(1)] = i
    for i, line in enumerate(lines):
        match = _BRANCH.search(line)
        if match and match.group(1) in labels and labels[match.group(1)] <= i:
            loops.append((labels[match.group(1)], i))
    return [(a, b) for a, b in loops if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]


_INT64_DIVISION = re.compile(r"\b(?:div|rem)\.[su]64\b")


def analyse_ptx(ptx: str) -> dict:
    """Tensor-core instructions, global accesses and 64-bit divisions of a PTX kernel: per access kind
    (``ld``, ``st``, ``cp_async``) a map {bytes per instruction: count}, and the count of ``div``/``rem``
    on 64-bit integers, over the whole kernel and within its innermost loops (a label and a later
    branch back to it; the hot loop of a pipelined kernel)."""
    lines = ptx.splitlines()
    innermost = _innermost_loops(lines)
    in_loop = set()
    for a, b in innermost:
        in_loop.update(range(a, b + 1))

    def empty():
        return {"ld": {}, "st": {}, "cp_async": {}, "atomic": 0}

    summary = {"all": empty(), "loop": empty()}
    for i, line in enumerate(lines):
        scopes = ["all", "loop"] if i in in_loop else ["all"]
        kind, size = None, None
        match = _GLOBAL.match(line)
        if match:
            kind, size = match.group(1), _access_bytes(match.group(2))
        else:
            match = _CP_ASYNC.search(line)
            if match:
                kind, size = "cp_async", int(match.group(1), 0)
            elif _ATOMIC.search(line):
                for scope in scopes:
                    summary[scope]["atomic"] += 1
        if kind is not None:
            for scope in scopes:
                counts = summary[scope][kind]
                counts[str(size)] = counts.get(str(size), 0) + 1
    for scope in summary.values():
        for kind in ("ld", "st", "cp_async"):
            scope[kind] = dict(sorted(scope[kind].items(), key=lambda kv: int(kv[0]) if kv[0] != "None" else -1))
        loads = [int(k) for kind in ("ld", "cp_async") for k in scope[kind] if k != "None"]
        scope["max_load_bytes"] = max(loads, default=0)
        stores = [int(k) for k in scope["st"] if k != "None"]
        scope["max_store_bytes"] = max(stores, default=0)
    summary["loops"] = len(innermost)
    loop_lines = [lines[i] for i in sorted(in_loop)]
    int64_division = {  # each a call of a ~70-instruction routine in SASS
        "all": len(_INT64_DIVISION.findall(ptx)),
        "loop": sum(len(_INT64_DIVISION.findall(line)) for line in loop_lines),
    }
    tensor = {
        "mma": len(re.findall(r"\bmma\.sync\.", ptx)),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
        "ldmatrix": len(re.findall(r"\bldmatrix\.", ptx)),
    }
    return {"global_memory": summary, "tensor_cores": tensor, "int64_division": int64_division}


# ---------------------------------------------------------------------------------------------
# The CUDA kernels (csrc/cuda/*.cu): nvcc's PTX and ptxas -v, and the SASS, per entry function
# ---------------------------------------------------------------------------------------------

_PTX_ENTRY = re.compile(r"^(?:\.visible\s+)?\.entry\s+(\w+)\s*\(", re.M)
_SASS_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)", re.M)
_SASS_GLOBAL = re.compile(r"\b(LDG|STG)\.E((?:\.[\w]+)*)")
_SASS_WIDTH = re.compile(r"^[US]?(8|16|32|64|128)$")


def cuda_tools() -> dict:
    """Paths of nvcc and a cuobjdump (the toolkit's, else the one Triton bundles); a missing tool is
    absent from the result."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    tools = {}
    for name in ("nvcc", "cuobjdump"):
        path = os.path.join(home, "bin", name)
        if os.access(path, os.X_OK):
            tools[name] = path
    if "cuobjdump" not in tools:
        with contextlib.suppress(ImportError):
            import triton

            bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
            if os.access(bundled, os.X_OK):
                tools["cuobjdump"] = bundled
    return tools


def _ptx_entries(ptx: str) -> dict[str, str]:
    """Each entry function's PTX text, by mangled name (a body ends at the first column-0 brace)."""
    entries = {}
    for match in _PTX_ENTRY.finditer(ptx):
        end = ptx.find("\n}", match.end())
        entries[match.group(1)] = ptx[match.start(): len(ptx) if end < 0 else end + 2]
    return entries


def _sass_functions(sass: str) -> dict[str, dict]:
    """Per function of a cuobjdump -sass listing: {"LDG"|"STG": {bytes per instruction: count}}."""
    functions = {}
    starts = list(_SASS_FUNCTION.finditer(sass))
    for i, match in enumerate(starts):
        body = sass[match.end(): starts[i + 1].start() if i + 1 < len(starts) else len(sass)]
        counts = {"LDG": {}, "STG": {}}
        for kind, modifiers in _SASS_GLOBAL.findall(body):
            widths = [int(m.group(1)) for m in map(_SASS_WIDTH.match, modifiers.split(".")) if m]
            size = str(widths[0] // 8 if widths else 4)  # no width modifier: 32 bits
            counts[kind][size] = counts[kind].get(size, 0) + 1
        functions[match.group(1)] = counts
    return functions


# nvcc flags of the shipped build that change what the kernels compile to (torch's BuildExtension
# adds them to every .cu); -Xptxas -v prints the ptxas fields, --keep keeps the PTX.
CUDA_BUILD_FLAGS = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
                    "-Xcompiler=-ffp-contract=off")  # fmt: skip


def analyse_cuda(source: str, arch: int = 90, include: str = "csrc", tools: dict | None = None) -> dict[str, dict]:
    """Compiles one torch-free CUDA file alone for ``sm_<arch>`` (``nvcc -c``: host and device code,
    with the shipped build's flags) and describes each entry function, by demangled name: the
    ptxas -v fields (registers, spills, stack frame, static shared memory), ``global_memory``
    (:func:`analyse_ptx` of its PTX: access widths, in all and in the innermost loops),
    ``int64_division`` (64-bit ``div``/``rem`` instructions in its PTX, in all and in the innermost
    loops: each becomes a call of a ~70-instruction routine in SASS) and, where a cuobjdump is found,
    ``sass`` (``LDG``/``STG`` instructions by width in its SASS: whether ptxas kept the 16-byte
    accesses; None without one). Raises CompileCheckError when nvcc or cuobjdump fails."""
    tools = tools or cuda_tools()
    with tempfile.TemporaryDirectory() as work:
        stem = os.path.splitext(os.path.basename(source))[0]
        objects = os.path.join(work, f"{stem}.o")
        compile_command = [tools["nvcc"], "-std=c++17", f"-arch=sm_{arch}", f"-I{include}", *CUDA_BUILD_FLAGS,
                           "-Xptxas", "-v", "--keep", "--keep-dir", work, "-c", source, "-o", objects]  # fmt: skip
        done = subprocess.run(compile_command, capture_output=True, text=True)
        if done.returncode != 0:
            raise CompileCheckError(f"nvcc failed on {source}:\n{done.stderr[-2000:]}")
        ptxas_log = done.stdout + done.stderr
        with open(os.path.join(work, f"{stem}.ptx")) as f:
            ptx = f.read()
        listing = None
        if "cuobjdump" in tools:
            dumped = subprocess.run([tools["cuobjdump"], "-sass", objects], capture_output=True, text=True)
            if dumped.returncode != 0:
                raise CompileCheckError(f"cuobjdump failed on {source}:\n{dumped.stderr[-2000:]}")
            listing = dumped.stdout
    entries = _ptx_entries(ptx)
    sass = _sass_functions(listing) if listing is not None else None
    names = list(entries)
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    if len(demangled) != len(names):
        demangled = names
    records = {}
    for mangled, readable in zip(names, demangled):
        record = parse_ptxas_log(ptxas_log, mangled, strict=True)
        if record is None:
            raise CompileCheckError(f"{source}: ptxas -v printed nothing for {readable}")
        record.update(analyse_ptx(entries[mangled]))
        record["sass"] = None if sass is None else sass.get(mangled, {"LDG": {}, "STG": {}})
        record["mangled"] = mangled
        records[readable] = record
    return records


# ---------------------------------------------------------------------------------------------
# Compilation (worker processes) and the records
# ---------------------------------------------------------------------------------------------

COMPILED_FIELDS = ("registers", "shared", "ptxas_static_smem", "spill_stores", "spill_loads", "stack_frame", "tensor_cores",
                   "global_memory", "int64_division")


def _worker_init() -> None:
    torch.set_num_threads(1)


def compile_spec(task: dict) -> dict:
    """Compile one variant through ``JITFunction.preload`` (Triton's JIT compile path) and analyse it."""
    from triton import knobs

    jit = _unwrap(getattr(importlib.import_module(task["module"]), task["name"]))
    out = io.StringIO()
    started = time.perf_counter()
    result = {"uid": task["uid"]}
    previous = knobs.nvidia.dump_ptxas_log
    try:
        knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v log
        with target_driver(task["arch"], task.get("real", False)), contextlib.redirect_stdout(out):
            kernel = jit.preload(task["data"])
            from triton.runtime.driver import driver

            jit.device_caches[driver.active.get_current_device()][0].pop(json.loads(task["data"])["key"], None)
    except Exception as error:  # noqa: BLE001 - every compile error is a finding
        text = [line for line in str(error).strip().splitlines() if line.strip()]
        result["error"] = f"{type(error).__name__}: {' | '.join(text[:6])[:800]}"
        return result
    finally:
        knobs.nvidia.dump_ptxas_log = previous
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["hash"] = kernel.hash
    metadata = kernel.metadata
    result["shared"] = int(metadata.shared)
    ptxas = parse_ptxas_log(out.getvalue(), metadata.name) or {}
    result.update(
        registers=ptxas.get("registers"), ptxas_static_smem=ptxas.get("ptxas_smem"), spill_stores=ptxas.get("spill_stores"),
        spill_loads=ptxas.get("spill_loads"), stack_frame=ptxas.get("stack_frame"),
    )  # fmt: skip
    result.update(analyse_ptx(kernel.asm["ptx"]))
    return result


def _run_tasks(tasks: list[dict], jobs: int, progress: bool) -> list[dict]:
    tasks = sorted(tasks, key=lambda t: -t["weight"])  # big kernels first: the last job is not the slowest
    results = []
    start = time.perf_counter()
    if not tasks:
        return results
    pool = None
    if jobs <= 1:
        iterator = map(compile_spec, tasks)
    else:
        pool = multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks)), initializer=_worker_init)
        iterator = pool.imap_unordered(compile_spec, tasks)
    try:
        for i, result in enumerate(iterator, 1):
            results.append(result)
            if progress and (i % 50 == 0 or i == len(tasks)):
                print(f"compile_check: {i}/{len(tasks)} compiled ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return results


def _weight(spec: Spec) -> int:
    """A compile-time estimate for scheduling: the product of the largest tile constants × stages."""
    data = json.loads(spec.data)
    tiles = [v for v in data["constant_vals"] if isinstance(v, int) and not isinstance(v, bool) and v >= 16]
    weight = 1
    for v in sorted(tiles)[-3:]:
        weight *= v
    return weight * data["options"].get("num_stages", 1) * (4 if '"*fp32"' in json.dumps(data["signature"]) else 1)


def describe_spec(spec: Spec) -> dict:
    """The variant's identity in readable form (signature, constants, divisible args, config) and its id."""
    jit = spec.jit
    data = json.loads(spec.data)
    names = list(jit.arg_names)
    declared = {p.name for p in jit.params if p.is_constexpr}
    constants, meta = {}, {}
    for key, value in zip(data["constant_keys"], data["constant_vals"]):
        name = ".".join([names[key[0]], *map(str, key[1:])])
        value = value["constexpr"] if isinstance(value, dict) and "constexpr" in value else value
        (meta if names[key[0]] in declared else constants)[name] = value
    divisible = []
    for key, value in zip(data["attrs_keys"], data["attrs_vals"]):
        if any(list(attr) == ["tt.divisibility", 16] for attr in value):
            divisible.append(".".join([names[key[0]], *map(str, key[1:])]))
    options = data["options"]
    signature = {k: v for k, v in data["signature"].items() if v != "constexpr"}
    config = {"meta": dict(sorted(meta.items())), "num_warps": options["num_warps"], "num_stages": options["num_stages"],
              "num_ctas": options.get("num_ctas", 1)}  # fmt: skip
    if options.get("maxnreg") is not None:
        config["maxnreg"] = options["maxnreg"]
    ident = json.dumps([spec.arch, spec.module, spec.name, signature, sorted(constants.items()), config, sorted(divisible)], sort_keys=True)
    return {
        "id": f"sm{spec.arch}/{spec.name}/{hashlib.sha1(ident.encode()).hexdigest()[:12]}",
        "config": config,
        "signature": signature,
        "constants": dict(sorted(constants.items())),
        "divisible_by_16": sorted(divisible),
    }


def problems(record: dict, shared_limits: dict) -> list[str]:
    """The failures of one record (see the module docstring for the rules)."""
    if record.get("error"):
        return [f"compile error: {record['error']}"]
    failures = []
    limit = shared_limits.get(record["arch"])
    if limit is None:
        failures.append(f"no shared-memory limit known for sm_{record['arch']}")
    elif record["shared"] > limit:
        failures.append(f"shared memory {record['shared']:,} B > sm_{record['arch']} limit {limit:,} B")
    if record["registers"] is None:
        failures.append("no ptxas -v log (the cubin came from a cache?)")
    elif record["spill_stores"] or record["spill_loads"]:
        failures.append(f"spills {record['spill_stores']:,} B stores / {record['spill_loads']:,} B loads ({record['registers']} registers)")
    return failures


def make_record(spec: Spec, compiled: dict, shared_limits: dict) -> dict:
    """The table's record of a variant from its spec and its compiled fields (a compile result or a
    reused record of the same content hash)."""
    record = {"arch": spec.arch, "kernel": spec.name, "op": spec.op, **describe_spec(spec)}
    record.update(
        launchers=sorted(spec.launchers), dtypes=sorted(spec.dtypes), layouts=sorted(spec.layouts),
        flags=sorted(spec.flags), groups=sorted(spec.groups), content_hash=spec.content_hash,
    )  # fmt: skip
    if compiled.get("error"):
        record["error"] = compiled["error"]
    for field in COMPILED_FIELDS:
        record[field] = compiled.get(field)
    if not compiled.get("error") and compiled.get("hash") not in (None, spec.triton_hash):
        record["error"] = f"Triton compiled it under hash {compiled['hash']}, not the {spec.triton_hash} computed for the JIT"
    record["problems"] = problems(record, shared_limits)
    record["status"] = "fail" if record["problems"] else "ok"
    record["sources"] = sorted(spec.sources)
    return record


def _sort_records(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (-r["arch"], r["op"], r["kernel"], r["id"]))


def failure_lines(records: Sequence[dict]) -> list[str]:
    """One line per failing variant: which, what, which limit, a case that launches it."""
    lines = []
    for r in records:
        if r["status"] != "fail":
            continue
        meta = " ".join(f"{k}={v}" for k, v in r["config"]["meta"].items())
        config = f"{meta} num_warps={r['config']['num_warps']} num_stages={r['config']['num_stages']}"
        lines.append(
            f"FAIL {r['id']} [{r['op']}; {','.join(r['dtypes'])}; {','.join(r['layouts'])}; {','.join(r['flags'])}; {config}]: "
            f"{'; '.join(r['problems'])} -- e.g. {r['sources'][0]}"
        )
    return lines


def tool_versions(archs: Iterable[int]) -> dict:
    triton = _triton()
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = {}
    for arch in sorted(set(archs)):
        tool = get_ptxas(arch)
        version = subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"V(\d+\.\d+\.\d+)", version)
        bundled = os.path.dirname(os.path.abspath(triton.__file__)) in os.path.abspath(tool.path)
        ptxas[str(arch)] = {"version": match.group(1) if match else version.strip()[-40:], "bundled_with_triton": bundled}
    return {"triton": triton.__version__, "torch": torch.__version__.split("+")[0], "ptxas": ptxas}


def make_table(records: Sequence[dict], cases: dict, shared_limits: dict, captured: dict) -> dict:
    """The table: a header (versions, limits, the cases of each arch, counts, failures) and the records."""
    summary = {}
    for arch, which in sorted(cases.items(), reverse=True):
        mine = [r for r in records if r["arch"] == arch]
        summary[str(arch)] = {
            "cases": which, "captured": captured.get(arch, 0), "variants": len(mine),
            "fail": sum(r["status"] == "fail" for r in mine), "max_registers": max((r["registers"] or 0 for r in mine), default=0),
        }  # fmt: skip
    return {
        "tool": "slsdeep_kernels.compile_check",
        "format": FORMAT,
        **tool_versions(cases),
        "shared_limits": {str(a): shared_limits[a] for a in sorted(cases, reverse=True) if a in shared_limits},
        "model": {"batch": MODEL_BATCH, "size": MODEL_SIZE},
        "summary": summary,
        "failures": failure_lines(records),
        "variants": _sort_records(list(records)),
    }


def write_table(table: dict, path: str) -> None:
    """The header indented, one variant per line (diffs show the variants that changed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    header = {k: v for k, v in table.items() if k != "variants"}
    text = json.dumps(header, indent=1)[:-2]
    lines = [json.dumps(r, sort_keys=False, separators=(",", ":")) for r in table["variants"]]
    text += ',\n "variants": [\n' + ",\n".join(lines) + "\n ]\n}\n"
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------
# Staleness
# ---------------------------------------------------------------------------------------------

COMPARED_FIELDS = (
    "kernel", "op", "launchers", "dtypes", "layouts", "flags", "groups", "config", "signature", "constants",
    "divisible_by_16", "content_hash", "error", *COMPILED_FIELDS, "status", "problems", "sources",
)  # fmt: skip


def compare_tables(committed: dict, fresh: dict, arch: int = 90) -> list[str]:
    """Differences between a committed table and a fresh one for ``arch``: [] when it is current. Every
    field but the header's versions and counts; records by id."""
    problems_ = []
    for field in ("format", "triton"):
        if committed.get(field) != fresh.get(field):
            problems_.append(f"{field} {committed.get(field)} != {fresh.get(field)}")
    old = {v["id"]: v for v in committed.get("variants", []) if v.get("arch") == arch}
    new = {v["id"]: v for v in fresh.get("variants", []) if v.get("arch") == arch}
    added, removed = sorted(new.keys() - old.keys()), sorted(old.keys() - new.keys())
    changed = []
    for uid in sorted(old.keys() & new.keys()):
        fields = [f for f in COMPARED_FIELDS if old[uid].get(f) != new[uid].get(f)]
        if fields:
            changed.append((uid, fields))
    if added:
        problems_.append(f"{len(added)} variants added (e.g. {added[0]})")
    if removed:
        problems_.append(f"{len(removed)} removed (e.g. {removed[0]})")
    if changed:
        uid, fields = changed[0]
        example = ", ".join(f"{f} {_short(old[uid].get(f))} -> {_short(new[uid].get(f))}" for f in fields[:2])
        problems_.append(f"{len(changed)} changed (e.g. {uid}: {example})")
    return problems_


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def verification_sample(records: Sequence[dict], count: int) -> list[dict]:
    """``count`` reused records to compile again: the cheapest of every kernel first, then by hash
    order (deterministic, spread over the kernels and their specialisations)."""
    by_kernel = {}
    for r in sorted(records, key=lambda r: (r.get("registers") or 0, r["id"])):
        by_kernel.setdefault(r["kernel"], r)
    chosen = {r["id"]: r for r in list(by_kernel.values())[:count]}
    for r in sorted(records, key=lambda r: r.get("content_hash") or ""):
        if len(chosen) >= count:
            break
        chosen.setdefault(r["id"], r)
    return list(chosen.values())


# ---------------------------------------------------------------------------------------------
# Driver: capture, compile (or reuse), report
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    specs: list
    records: list
    captured: dict  # arch -> variants captured
    cases: dict  # arch -> the cases compiled: "all" or the subset
    compiled: int = 0
    reused: int = 0
    unreproducible: list = dataclasses.field(default_factory=list)
    compile_seconds: float = 0.0
    seconds_by_kernel: dict = dataclasses.field(default_factory=dict)


def run_check(archs: Sequence[int], subset: str = "model", jobs: int | None = None,
              groups=("model", "tests"), select: str | None = None, shared_limits: dict | None = None,
              real: bool = False, reuse: dict | None = None, verify: int = 0, progress: bool = True,
              primary: int = 90) -> Outcome:  # fmt: skip
    """Capture every case, compile the variants (the ``primary`` arch: of every case; the others: of
    the ``subset`` cases), reusing from ``reuse`` (a table) the records of equal content hash, of
    which ``verify`` are compiled again and compared."""
    limits = {**SHARED_LIMITS, **(shared_limits or {})}
    archs = sorted(set(archs), reverse=True)
    started = time.perf_counter()
    cases = all_cases(groups)

    def case_archs(case: Case) -> list[int]:
        return [a for a in archs if a == primary or subset == "all" or case.group == subset]

    specs = capture(cases, archs, case_archs, real=real, require_all_kernels="tests" in groups)
    captured = {a: sum(s.arch == a for s in specs) for a in archs}
    cases_of = {a: ("all" if a == primary or subset == "all" else subset) for a in archs}
    if select:
        pattern = re.compile(select)
        specs = [s for s in specs if pattern.search(s.name) or any(pattern.search(src) for src in s.sources)]
    reusable = {}
    for r in (reuse or {}).get("variants", []):
        if r.get("content_hash") and not r.get("error") and r.get("registers") is not None:
            reusable[(r["arch"], r["content_hash"])] = r
    if (reuse or {}).get("triton") not in (None, _triton().__version__):
        reusable = {}
    to_compile, reused = [], {}
    for s in specs:
        if (s.arch, s.content_hash) in reusable:
            reused[s.uid] = reusable[(s.arch, s.content_hash)]
        else:
            to_compile.append(s)
    check = [s for s in specs if s.uid in reused]
    sample_ids = {r["id"] for r in verification_sample([reused[s.uid] for s in check], verify)} if verify else set()
    verify_specs = [s for s in check if reused[s.uid]["id"] in sample_ids]
    if progress:
        counts = ", ".join(f"sm_{a}: {captured[a]} captured, {sum(s.arch == a for s in specs)} to compile ({cases_of[a]} cases)" for a in archs)
        print(f"compile_check: {len(cases)} cases -> {counts}; {time.perf_counter() - started:.0f} s. Compiling {len(to_compile)}, "
              f"reusing {len(reused)} of equal content hash ({len(verify_specs)} compiled again to verify)", file=sys.stderr, flush=True)  # fmt: skip
    tasks = [{"uid": list(s.uid), "arch": s.arch, "module": s.module, "name": s.name, "data": s.data, "real": real, "weight": _weight(s)}
             for s in to_compile + verify_specs]  # fmt: skip
    results = {tuple(r["uid"]): r for r in _run_tasks(tasks, jobs or os.cpu_count() or 1, progress)}
    records, unreproducible = [], []
    for s in specs:
        if s.uid in reused:
            old = reused[s.uid]
            compiled = {f: old.get(f) for f in COMPILED_FIELDS}
            if s.uid in results:
                fresh = results[s.uid]
                differing = [f for f in COMPILED_FIELDS if fresh.get(f) != old.get(f)]
                if fresh.get("error") or differing:
                    unreproducible.append(f"{old['id']}: {fresh.get('error') or ', '.join(f'{f} {_short(old.get(f))} -> {_short(fresh.get(f))}' for f in differing[:2])}")
                    compiled = fresh
            records.append(make_record(s, compiled, limits))
        else:
            records.append(make_record(s, results[s.uid], limits))
    by_kernel = {}
    for uid, r in results.items():
        key = f"sm{uid[0]}/{uid[2]}"
        by_kernel[key] = by_kernel.get(key, 0.0) + r.get("seconds", 0.0)
    return Outcome(specs, _sort_records(records), captured, cases_of, compiled=len(to_compile), reused=len(reused),
                   unreproducible=unreproducible, compile_seconds=sum(by_kernel.values()), seconds_by_kernel=by_kernel)  # fmt: skip


def run_clean(argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """``python -m slsdeep_kernels.compile_check ARGV`` in a process without TRITON_INTERPRET & co."""
    env = clean_environment()
    return subprocess.run([sys.executable, "-m", "slsdeep_kernels.compile_check", *argv], env=env, **kwargs)


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m slsdeep_kernels.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="target compute capability (repeatable; default 90)")
    parser.add_argument("--json", metavar="FILE", help="write the table of every arch compiled to FILE")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    parser.add_argument("--subset", choices=("model", "tests", "all"), default="model",
                        help="the cases whose variants the archs other than 90 compile (default: model)")
    parser.add_argument("--check", metavar="FILE", help="exit 1 when the committed sm_90 table FILE is stale (compiles the "
                        "variants whose content hash FILE lacks, reuses the others, compiles --verify of those again)")
    parser.add_argument("--verify", type=int, default=40, metavar="N", help="with --check: reused variants compiled again (default 40)")
    parser.add_argument("--reuse", metavar="FILE", help="take the compiled fields of variants of equal content hash from table FILE")
    parser.add_argument("--precompile", action="store_true",
                        help="compile every variant for the local GPU into the normal Triton cache (needs a CUDA GPU)")
    parser.add_argument("--capture-only", action="store_true", help="print the variants as JSON lines, compile nothing")
    parser.add_argument("--group", action="append", choices=("model", "tests"), help="only these case groups (repeatable)")
    parser.add_argument("--select", metavar="REGEX", help="only the variants whose kernel name or a source matches REGEX")
    parser.add_argument("--shared-limit", action="append", default=[], metavar="ARCH=BYTES", help="override a shared-memory limit")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    from slsdeep_kernels import backend

    if backend.triton_interpreted():  # the ops' kernels were made for the interpreter: start afresh
        return run_clean(argv).returncode
    groups = tuple(args.group or ("model", "tests"))
    limits = {int(a): int(v) for a, _, v in (item.partition("=") for item in args.shared_limit)}
    subset = args.subset
    if args.precompile:
        if not torch.cuda.is_available():
            print("compile_check --precompile: no CUDA GPU here", file=sys.stderr)
            return 2
        major, minor = torch.cuda.get_device_capability()
        archs, real, subset = [major * 10 + minor], True, "all"
    else:
        archs, real = sorted(set(args.arch or [90]) | ({90} if args.check else set()), reverse=True), False
    if args.capture_only:
        primary = archs[0] if real else 90
        specs = capture(all_cases(groups), archs, lambda c: [a for a in archs if a == primary or subset == "all" or c.group == subset],
                        real=real, require_all_kernels="tests" in groups)  # fmt: skip
        for s in specs:
            print(json.dumps({"arch": s.arch, "kernel": s.name, "op": s.op, "id": describe_spec(s)["id"],
                              "triton_hash": s.triton_hash, "content_hash": s.content_hash, "specialization": json.loads(s.data), "launchers": sorted(s.launchers),
                              "dtypes": sorted(s.dtypes), "layouts": sorted(s.layouts), "flags": sorted(s.flags),
                              "groups": sorted(s.groups), "sources": sorted(s.sources)}, sort_keys=True))  # fmt: skip
        return 0
    started = time.perf_counter()
    committed = None
    if args.check:
        try:
            committed = _load(args.check)
        except (OSError, ValueError) as error:
            print(f"STALE {args.check}: cannot read it ({error})")
    reuse = committed if committed is not None else (_load(args.reuse) if args.reuse else None)
    temp, cache_dir = None, os.environ.get("TRITON_CACHE_DIR")
    if not real:  # a fresh cache: every variant is compiled and ptxas -v runs for each
        temp = tempfile.TemporaryDirectory(prefix="compile-check-cache-")
        os.environ["TRITON_CACHE_DIR"] = temp.name
    try:
        outcome = run_check(archs, subset, args.jobs, groups, args.select, limits, real, reuse,
                            args.verify if args.check else 0, not args.quiet, primary=archs[0] if real else 90)  # fmt: skip
    finally:
        if temp is not None:
            temp.cleanup()
            if cache_dir is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = cache_dir
    table = make_table(outcome.records, outcome.cases, {**SHARED_LIMITS, **limits}, outcome.captured)
    elapsed = time.perf_counter() - started
    if args.json:
        write_table(table, args.json)
    for arch, row in table["summary"].items():
        print(f"compile_check: sm_{arch} ({row['cases']} cases): {row['variants']} variants of {row['captured']} captured, "
              f"{row['fail']} failing, max {row['max_registers']} registers (triton {table['triton']}, "
              f"ptxas {table['ptxas'].get(arch, {}).get('version')})")  # fmt: skip
    slowest = sorted(outcome.seconds_by_kernel.items(), key=lambda kv: -kv[1])[:4]
    print(f"compile_check: {outcome.compiled} compiled, {outcome.reused} reused by content hash; compile time {outcome.compile_seconds:.0f} s "
          f"over the workers ({', '.join(f'{k} {v:.0f} s' for k, v in slowest)})")  # fmt: skip
    for line in table["failures"]:
        print(line)
    if real:
        errors = [r for r in outcome.records if r.get("error")]
        print(f"compile_check --precompile: {len(outcome.records) - len(errors)} variants in the Triton cache "
              f"({os.environ.get('TRITON_CACHE_DIR') or '~/.triton/cache'}), {len(errors)} compile errors, {elapsed:.0f} s")  # fmt: skip
        return 1 if errors else 0
    status = 1 if table["failures"] else 0
    if args.check:
        stale = ["cannot read it"] if committed is None else compare_tables(committed, table, 90)
        stale += [f"not reproducible: {outcome.unreproducible[0]} (+{len(outcome.unreproducible) - 1} more)"] if outcome.unreproducible else []
        if stale:
            print(f"STALE {args.check}: {'; '.join(stale)}. Regenerate: python -m slsdeep_kernels.compile_check --json {args.check} "
                  f"--reuse {args.check}")  # fmt: skip
            status = 1
        else:
            print(f"compile_check: {args.check} is current")
    print(f"compile_check: {elapsed:.0f} s, exit {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Test helpers of slsdeep_kernels, shared by ``tests/`` and ``bench/`` (as :mod:`torch.testing` is for PyTorch).

* Numeric comparison: :data:`TOLERANCE` by dtype and :data:`ERROR_FACTOR`; :func:`relative_error`;
  :func:`assert_matches_reference` compares an op's forward and EVERY gradient against its
  reference, norm-wise, against a float64 ground truth.
* :func:`backends_to_test`: the backends a test runs an op on, for a device and dtype, as pytest
  parameters; one that cannot run in this process is skipped with the reason. ``cpu`` comes once
  per instruction-set variant this machine runs (:class:`CpuVariant`, :func:`cpu_variant_override`).
* Benchmarks: :data:`BENCH_DEVICE`, the ``SLSDEEP_BENCH_QUICK`` / ``SLSDEEP_BENCH_WAYS`` settings,
  :func:`keep_way` and :func:`case_parameters`.

What the test run sets for the whole process (``TRITON_INTERPRET=1`` without a CUDA device, output
poisoning with ``SLSDEEP_KERNELS_POISON=1``, TF32 off) stays in ``tests/conftest.py``: it must
happen before anything imports triton. This module imports torch only (pytest inside the functions
that build parameters), so the package imports without pytest installed.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from slsdeep_kernels import backend as backends

# Norm-wise relative error allowed per dtype: ||actual - exact|| / ||exact|| where "exact" is the
# reference evaluated in float64. An implementation passes when its error is within this floor or
# within ERROR_FACTOR times what the reference itself loses in the same dtype, whichever is larger.
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
ERROR_FACTOR = 4.0


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """Norm-wise relative error of ``actual`` against ``exact`` (both compared in float64)."""
    actual, exact = actual.detach().double(), exact.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = exact.norm().item()
    diff = (actual - exact).norm().item()
    return diff / scale if scale > 0 else diff


def _run(fn, inputs, grad_output_seed):
    """Outputs of ``fn(*inputs)`` and the gradients of every differentiable input."""
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    outputs = [o for o in outputs if isinstance(o, torch.Tensor)]
    differentiable = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = []
    if differentiable:
        generator = torch.Generator().manual_seed(grad_output_seed)
        cotangents = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o) for o in outputs]
        grads = torch.autograd.grad(
            [o for o in outputs if o.requires_grad],
            differentiable,
            [c for o, c in zip(outputs, cotangents) if o.requires_grad],
            allow_unused=True,
        )
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(differentiable, grads)]
    return outputs, grads


def assert_matches_reference(fn, reference, inputs, *, dtype=None, names=None):
    """Compare ``fn`` with ``reference`` on ``inputs``: every output and every input gradient.

    ``inputs`` are tensors (those with ``requires_grad`` are differentiated) or plain values. The
    exact answer is ``reference`` on the inputs cast to float64; ``fn`` must be within the dtype's
    tolerance, or within ERROR_FACTOR of ``reference``'s own error in the dtype under test.
    """
    dtype = dtype or next(x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point())
    seed = int(torch.randint(0, 2**31 - 1, ()).item())

    def as_f64(x):
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    exact_out, exact_grads = _run(reference, [as_f64(x) for x in inputs], seed)
    actual_out, actual_grads = _run(fn, inputs, seed)
    if dtype == torch.float64:
        ref_out, ref_grads = exact_out, exact_grads
    else:
        ref_out, ref_grads = _run(reference, inputs, seed)
    names = names or [f"input {i}" for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    pairs = [(f"output {i}", a, r, e) for i, (a, r, e) in enumerate(zip(actual_out, ref_out, exact_out))]
    pairs += [(f"grad of {n}", a, r, e) for n, a, r, e in zip(names, actual_grads, ref_grads, exact_grads)]
    assert len(actual_out) == len(exact_out), "different number of outputs"
    for label, actual, ref, exact in pairs:
        assert actual.shape == exact.shape, f"{label}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
        assert actual.dtype == ref.dtype, f"{label}: dtype {actual.dtype} != {ref.dtype}"
        if not exact.is_floating_point():
            assert torch.equal(actual.cpu(), exact.cpu()), f"{label}: differs"
            continue
        allowed = max(TOLERANCE[dtype], ERROR_FACTOR * relative_error(ref, exact))
        error = relative_error(actual, exact)
        assert error <= allowed, f"{label}: relative error {error:.3e} > allowed {allowed:.3e} ({dtype})"


class CpuVariant(str):
    """The backend name ``"cpu"`` that also names the instruction-set variant its test runs under
    (``tests/conftest.py`` applies :func:`cpu_variant_override` for the test's duration)."""

    def __new__(cls, variant: str):
        self = super().__new__(cls, "cpu")
        self.cpu_variant = variant
        return self


class cpu_variant_override:
    """Test-only: the C++ CPU kernels of this process run ``variant`` (``"DEFAULT"``, ``"AVX2"``,
    ``"AVX512"``) inside the ``with`` block, then what ran before it (overrides nest).
    ``ATEN_CPU_CAPABILITY`` cannot do this: it is read once per process. A variant this CPU cannot
    run raises."""

    def __init__(self, variant: str):
        self.variant = variant

    def __enter__(self):
        self.previous = torch.ops.slsdeep_kernels._set_cpu_variant(self.variant)
        return self

    def __exit__(self, *exc):
        torch.ops.slsdeep_kernels._set_cpu_variant(self.previous or None)


# The device types each backend takes tensors of (triton: CPU tensors only under the interpreter).
_DEVICE_TYPES = {"reference": ("cpu", "cuda"), "cpu": ("cpu",), "triton": ("cpu", "cuda"), "cuda": ("cuda",)}


def _why_not_here(op: str, name: str, device: torch.device, dtype: torch.dtype, interpreter: bool) -> str | None:
    """Why backend ``name`` cannot run ``op`` on such tensors in this process (None when it can)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    if interpreter and name == "triton" and device.type == "cpu":
        return None if importlib.util.find_spec("triton") is not None else "triton is not installed"
    try:
        backends.resolve(op, device, dtype, backend=name)
    except RuntimeError as error:
        return str(error)
    return None


def backends_to_test(op: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
                     fused: bool = False, interpreter: bool = False) -> list:
    """The backends a test runs ``op`` on, for tensors of ``device`` (and ``dtype``), as pytest params.

    One ``pytest.param(name, id=name)`` per backend of :data:`slsdeep_kernels.backend.BACKENDS`, in
    that order, that takes tensors of this device type (``reference`` any; ``cpu`` CPU; ``cuda`` CUDA;
    ``triton`` CUDA, and CPU under ``TRITON_INTERPRET=1``) and, when ``dtype`` is given, supports it
    (:data:`~slsdeep_kernels.backend.SUPPORTED_DTYPES`). ``fused=True`` leaves ``reference`` out.
    A listed backend that cannot run here (extension not built, triton missing or not interpreted,
    no CUDA device) is skipped with the reason :func:`~slsdeep_kernels.backend.resolve` gives.
    ``interpreter=True``: the test runs Triton under ``TRITON_INTERPRET=1`` in a subprocess, so
    ``triton`` on CPU needs only triton installed. The backend's name is ``param.values[0]``; a
    skipped one has ``param.marks``. ``cpu`` is followed by one :class:`CpuVariant` param
    (id ``cpu-DEFAULT``, ...) for every other variant this build and CPU run.
    """
    import pytest

    device = torch.device(device)
    params = []
    for name in backends.BACKENDS:
        if (fused and name == "reference") or device.type not in _DEVICE_TYPES[name]:
            continue
        if dtype is not None and dtype not in backends.SUPPORTED_DTYPES[name]:
            continue
        reason = _why_not_here(op, name, device, dtype or torch.float32, interpreter)
        marks = () if reason is None else pytest.mark.skip(reason=reason)
        params.append(pytest.param(name, id=name, marks=marks))
        if name == "cpu" and reason is None:
            active = backends.cpu_variant()
            params += [pytest.param(CpuVariant(v), id=f"cpu-{v}") for v in backends.cpu_variants() if v != active]
    return params


# ------------------------------------------------------------------------------------------------
# Benchmarks (bench/): the device they time on and their environment settings.
# ------------------------------------------------------------------------------------------------

BENCH_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# SLSDEEP_BENCH_QUICK=1: the first case of each op, its last pass only, fewer rounds.
QUICK = os.environ.get("SLSDEEP_BENCH_QUICK", "0") == "1"
# SLSDEEP_BENCH_WAYS: a comma list of the ways to run ("fused,eager"); "-NAME" drops a way
# ("-compile": every way but torch.compile). Unset or empty: every way.
WAYS = os.environ.get("SLSDEEP_BENCH_WAYS", "")


def keep_way(way: str, spec: str = WAYS) -> bool:
    """Whether ``way`` passes the SLSDEEP_BENCH_WAYS filter ``spec``."""
    entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
    wanted = [entry for entry in entries if not entry.startswith("-")]
    dropped = {entry[1:] for entry in entries if entry.startswith("-")}
    return (not wanted or way in wanted) and way not in dropped


def case_parameters(cases):
    """pytest parameters (case, way, which) for every way and pass of ``cases``, with readable ids."""
    import pytest

    return [
        pytest.param(case, way, which, id=f"{case.name.replace(' ', '-')}-{which}-{way}")
        for case in cases
        for which in case.passes
        for way in case.ways
    ]

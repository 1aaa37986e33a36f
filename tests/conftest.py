"""Test harness shared by every test file.

* Without a CUDA device the Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1``
  is set here, before anything imports triton.
* ``SLSDEEP_KERNELS_POISON=1``: every kernel output is filled with NaN before the kernel writes it.
* One tolerance table by dtype, and helpers that compare an op's forward and EVERY gradient
  against its reference, norm-wise, against a float64 ground truth.
* The ``gpu`` marker skips cleanly without a CUDA device.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SLSDEEP_KERNELS_POISON", "1")

import pytest  # noqa: E402

# TF32 would make the float32 references themselves inexact.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed every test from its own name, so inputs are random but a failure reproduces."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    torch.manual_seed(seed)
    return seed


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

"""pytest hooks and fixtures of the test suite, and the settings of its process.

* Without a CUDA device the Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1``
  is set here, before anything imports triton.
* ``SLSDEEP_KERNELS_POISON=1``: every kernel output is filled with NaN before the kernel writes it.
* TF32 off: it would make the float32 references themselves inexact.
* The ``gpu`` marker skips cleanly without a CUDA device; every test is seeded from its id; a test
  whose backend is a ``CpuVariant`` (``cpu-DEFAULT``, ...) runs under that instruction-set variant.

The tolerance table, the comparisons against a float64 ground truth and the backends each test runs
are in :mod:`slsdeep_kernels.testing` (``from slsdeep_kernels.testing import ...``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SLSDEEP_KERNELS_POISON", "1")

import pytest  # noqa: E402

from slsdeep_kernels.testing import CpuVariant, cpu_variant_override  # noqa: E402

# TF32 would make the float32 references themselves inexact.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_variant(request):
    """A test whose backend is a :class:`~slsdeep_kernels.testing.CpuVariant` runs under that variant."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    variant = next((value.cpu_variant for value in params.values() if isinstance(value, CpuVariant)), None)
    if variant is None:
        yield
        return
    with cpu_variant_override(variant):
        yield


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed every test from its own name, so inputs are random but a failure reproduces."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    torch.manual_seed(seed)
    return seed

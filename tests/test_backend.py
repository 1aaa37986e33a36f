"""Backend selection: what is available, defaults by device, explicit requests and their errors."""

import importlib
import subprocess
import sys

import pytest
import torch

import slsdeep_kernels
from slsdeep_kernels import backend

CPU = torch.device("cpu")


def test_compiled_cpu_extension_is_loaded():
    # CI installs the package, so the C++ extension must have been built and must load.
    assert backend.cpu_extension_error() is None
    assert slsdeep_kernels.available_backends()[:2] == ["reference", "cpu"]


def test_triton_listed_under_the_interpreter():
    # conftest sets TRITON_INTERPRET=1 on machines without a CUDA device.
    assert "triton" in slsdeep_kernels.available_backends()


def test_cuda_backend_listed_only_with_a_device():
    assert ("cuda" in slsdeep_kernels.available_backends()) == (
        torch.cuda.is_available() and backend.cuda_extension_error() is None
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cpu_tensors_default_to_the_cpu_backend(dtype):
    assert backend.resolve("op", CPU, dtype) == "cpu"


def test_triton_never_chosen_by_default_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(backend.ENV_BACKEND, raising=False)
    assert backend.resolve("op", CPU, torch.float32) != "triton"


def test_explicit_request_wins_and_is_checked():
    assert backend.resolve("op", CPU, torch.float32, "reference") == "reference"
    assert backend.resolve("op", CPU, torch.float32, "triton") == "triton"
    with pytest.raises(RuntimeError, match=r"myop: backend 'triton' cannot run here: it supports .*got float64"):
        backend.resolve("myop", CPU, torch.float64, "triton")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run here"):
        backend.resolve("myop", CPU, torch.float32, "cuda")
    with pytest.raises(ValueError, match=r"myop: backend must be one of reference, cpu, triton, cuda; got 'fast'"):
        backend.resolve("myop", CPU, torch.float32, "fast")


def test_environment_variable_overrides_the_default(monkeypatch):
    monkeypatch.setenv(backend.ENV_BACKEND, "reference")
    assert backend.resolve("op", CPU, torch.float32) == "reference"
    assert backend.resolve("op", CPU, torch.float32, "cpu") == "cpu"  # the argument beats the variable
    monkeypatch.setenv(backend.ENV_BACKEND, "nope")
    with pytest.raises(ValueError, match=backend.ENV_BACKEND):
        backend.resolve("op", CPU, torch.float32)


def test_missing_extension_warns_and_falls_back_to_reference(monkeypatch):
    with pytest.warns(RuntimeWarning, match="falls? back to the reference"):
        reason = backend._load_extension("slsdeep_kernels._no_such_extension")
    assert "ModuleNotFoundError" in reason
    monkeypatch.setattr(backend, "cpu_extension_error", lambda: reason)
    assert backend.resolve("op", CPU, torch.float32) == "reference"
    assert "cpu" not in backend.available_backends()
    with pytest.raises(RuntimeError, match="_no_such_extension"):
        backend.resolve("op", CPU, torch.float32, "cpu")


def test_other_devices_use_the_reference():
    assert backend.resolve("op", torch.device("meta"), torch.float32) == "reference"


def test_common_device_names_the_arguments():
    a, b = torch.ones(1), torch.ones(1, device="meta")
    assert backend.common_device("op", x=a, y=None) == CPU
    with pytest.raises(ValueError, match=r"op: all tensors must be on one device; got x on cpu, y on meta"):
        backend.common_device("op", x=a, y=b)


def test_new_output_is_poisoned_in_tests():
    out = backend.new_output((3, 4), dtype=torch.float32, device=CPU)
    assert out.shape == (3, 4) and torch.isnan(out).all()
    channels_last = backend.new_output((1, 3, 2, 2), dtype=torch.float16, device=CPU, memory_format=torch.channels_last)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)


def test_import_is_quiet_when_everything_is_built():
    # A fresh interpreter: loading the extension must not warn when the build is complete.
    code = "import slsdeep_kernels as s; print(s.available_backends())"
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "'cpu'" in done.stdout


def test_resolve_is_a_constant_under_torch_compile():
    # fullgraph: a graph break (Dynamo tracing into the extension import) fails the test.
    @torch.compile(fullgraph=True, backend="eager")
    def pick(x):
        return x + 1 if backend.resolve("op", x.device, x.dtype) == "cpu" else x - 1

    x = torch.randn(3)
    assert torch.equal(pick(x), x + 1)


@pytest.mark.parametrize("op", ["nll_epe_loss", "conv_bn_relu"])
def test_renamed_reference_keeps_a_deprecated_alias(op):
    module = importlib.import_module(f"slsdeep_kernels.ops.{op}")
    with pytest.warns(DeprecationWarning, match=f"slsdeep_kernels.ops.{op}.reference is deprecated: use {op}_reference"):
        alias = module.reference
    assert alias is getattr(module, f"{op}_reference")
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name


def test_moved_pyramid_modules_keep_a_deprecated_alias():
    from slsdeep_kernels.ops import pyramid

    with pytest.warns(DeprecationWarning, match="use slsdeep_kernels.nn.PyramidPooling"):
        assert pyramid.PyramidPooling is slsdeep_kernels.nn.PyramidPooling

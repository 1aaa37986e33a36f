"""Which implementation of an op runs: ``reference``, ``cpu``, ``triton`` or ``cuda``.

Every op has the four with one meaning (``reference`` is plain differentiable PyTorch and is the
spec). The choice, made per call by :func:`resolve`:

1. the call's ``backend=`` argument, else the ``SLSDEEP_KERNELS_BACKEND`` environment variable;
   a requested backend that cannot run for these tensors raises a clear error;
2. otherwise by device: CPU tensors -> ``cpu`` (the compiled C++ extension) else ``reference``;
   CUDA tensors -> the op's GPU backends that a committed ``bench/gpu_validate.sh`` run has
   validated (:data:`GPU_VALIDATED`, fastest first), else ``reference`` (ATen / cuDNN): no GPU
   kernel is what a GPU user gets by default before it has passed its tests on a GPU.
   ``triton`` runs on CPU tensors only when asked for explicitly under ``TRITON_INTERPRET=1``
   (how the test suite checks the Triton kernels without a GPU).

A compiled extension that fails to load costs one warning and the ``reference`` path, never a crash.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import warnings
import weakref

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_BACKEND = "SLSDEEP_KERNELS_BACKEND"
ENV_POISON = "SLSDEEP_KERNELS_POISON"

# The GPU backends each op runs by default on CUDA tensors, fastest first. An op enters only with a
# committed bench/gpu_validate.sh results file whose GPU tests of that op and backend passed (cite
# the file beside the entry). None has run on a GPU yet, so CUDA tensors default to ``reference``;
# ``backend="triton"`` / ``"cuda"`` (or $SLSDEEP_KERNELS_BACKEND) opt in.
GPU_VALIDATED: dict[str, tuple[str, ...]] = {}

_GPU_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
SUPPORTED_DTYPES = {
    "reference": frozenset({torch.float64}) | _GPU_DTYPES,
    "cpu": frozenset({torch.float64}) | _GPU_DTYPES,
    "triton": _GPU_DTYPES,
    "cuda": _GPU_DTYPES,
}


def _build_info():
    """The generated record of the build (``slsdeep_kernels/_build_info.py``), None if absent."""
    try:
        return importlib.import_module("slsdeep_kernels._build_info")
    except ImportError:
        return None


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _load_extension(module: str) -> str | None:
    """Import a compiled extension; return None on success, else why it failed (warned once).

    An extension built against another torch minor version is not imported at all (its C++ ABI
    differs: loading it may fail or worse); the reason names both versions. A pure-Python build
    (``SLSDEEP_KERNELS_NO_EXTENSION=1``) has no extension by choice: no warning then.
    """
    info = _build_info()
    built = getattr(info, "TORCH_VERSION", None)
    versions = f"built against torch {built}, running torch {torch.__version__}"
    if info is not None and built is None and importlib.util.find_spec(module) is None:
        return f"{module} was not built (installed with SLSDEEP_KERNELS_NO_EXTENSION=1)"
    if built is not None and _major_minor(built) != _major_minor(torch.__version__):
        reason = f"ABI mismatch: {versions}"
    else:
        try:
            importlib.import_module(module)
            return None
        except (ImportError, OSError) as error:
            reason = f"{type(error).__name__}: {error}"
            if built is not None and built != torch.__version__:
                reason = f"{versions}; {reason}"
    warnings.warn(
        f"slsdeep_kernels: compiled extension {module} is unavailable ({reason}); "
        "ops fall back to the reference PyTorch implementation. Rebuild with "
        "`pip install --no-build-isolation -e .` (or install a wheel built for this torch).",
        RuntimeWarning,
        stacklevel=3,
    )
    return reason


@functools.cache
def cpu_extension_error() -> str | None:
    """None when the C++ CPU extension is loaded, else the reason it is not."""
    return _load_extension("slsdeep_kernels._C")


@functools.cache
def cuda_extension_error() -> str | None:
    """None when the CUDA extension is loaded, else the reason it is not."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if cpu_extension_error() is not None:  # the CUDA module registers kernels for the schemas in _C
        return "the CPU extension (which declares the op schemas) did not load"
    if importlib.util.find_spec("slsdeep_kernels._C_cuda") is None:
        return "slsdeep_kernels._C_cuda was not built (no nvcc or CUDA torch at install time)"
    return _load_extension("slsdeep_kernels._C_cuda")


def load_extensions() -> None:
    """Register the compiled kernels now (each failure warned once): a loaded ``torch.export``
    program calls the custom ops directly, without an op ever resolving its backend."""
    cpu_extension_error()
    if torch.cuda.is_available():
        cuda_extension_error()


def cpu_variant() -> str | None:
    """The instruction-set variant the C++ CPU kernels run: ``"DEFAULT"``, ``"AVX2"`` or ``"AVX512"``
    (``csrc/cpu/variant.h``), or None without the CPU extension. Picked at the first kernel call:
    the best variant this CPU runs, lowered by ATen's capability (``ATEN_CPU_CAPABILITY``)."""
    return None if cpu_extension_error() is not None else torch.ops.slsdeep_kernels.cpu_variant()


def cpu_variants() -> list[str]:
    """The variants this build has and this CPU can run, ``"DEFAULT"`` first ([] without the extension)."""
    return [] if cpu_extension_error() is not None else list(torch.ops.slsdeep_kernels.cpu_variants())


def triton_interpreted() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_error() -> str | None:
    """None when Triton kernels can run here (a CUDA device, or the interpreter), else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not (torch.cuda.is_available() or triton_interpreted()):
        return "no CUDA device is visible and TRITON_INTERPRET=1 is not set"
    return None


# The compiled kernels (csrc/): the ``<op>_kernel`` ops the extensions register in this namespace.
COMPILED = torch.ops.slsdeep_kernels


def triton_kernels(module: str):
    """The Triton kernels and launchers of ``module`` (``slsdeep_kernels.ops.<module>_triton``),
    imported on first use: ``import slsdeep_kernels`` and every other backend never import triton."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(f"{module}: backend 'triton' cannot run here: triton is not installed (pip install triton)")
    return importlib.import_module(f"slsdeep_kernels.ops.{module}_triton")


def _backend_error(name: str) -> str | None:
    return {
        "reference": lambda: None,
        "cpu": cpu_extension_error,
        "triton": triton_error,
        "cuda": cuda_extension_error,
    }[name]()


def available_backends() -> list[str]:
    """The backends that can run in this process, in the order of :data:`BACKENDS`."""
    return [name for name in BACKENDS if _backend_error(name) is None]


def _device_error(name: str, device: torch.device) -> str | None:
    if name == "cpu" and device.type != "cpu":
        return f"it runs on CPU tensors, got {device.type} tensors"
    if name == "cuda" and device.type != "cuda":
        return f"it runs on CUDA tensors, got {device.type} tensors"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        return f"it runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device.type} tensors"
    return None


def _why_not(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot run for tensors of this device and dtype (None if it can)."""
    reason = _backend_error(name) or _device_error(name, device)
    if reason is None and dtype not in SUPPORTED_DTYPES[name]:
        supported = ", ".join(sorted(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES[name]))
        reason = f"it supports {supported}, got {str(dtype).removeprefix('torch.')}"
    return reason


@torch.compiler.assume_constant_result
def requested_backend(backend: str | None = None) -> str | None:
    """The backend a call asks for: its ``backend=`` argument, else ``$SLSDEEP_KERNELS_BACKEND``;
    None when neither names one (the automatic choice). A constant of a compiled graph, as resolve."""
    return backend if backend is not None else (os.environ.get(ENV_BACKEND) or None)


@torch.compiler.assume_constant_result
def resolve(
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    backend: str | None = None,
) -> str:
    """The backend that runs ``op`` on tensors of ``device``/``dtype``.

    ``backend`` (else ``$SLSDEEP_KERNELS_BACKEND``) forces a choice and raises ``RuntimeError``
    when it cannot run here; by default CUDA tensors get the op's :data:`GPU_VALIDATED` backends.
    Under ``torch.compile`` the choice is made once at trace time and is a constant of the graph
    (it imports extensions and reads the environment, which Dynamo cannot trace).
    """
    requested = requested_backend(backend)
    if requested is not None:
        if requested not in BACKENDS:
            source = "backend" if backend is not None else ENV_BACKEND
            raise ValueError(f"{op}: {source} must be one of {', '.join(BACKENDS)}; got {requested!r}")
        reason = _why_not(requested, device, dtype)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {requested!r} cannot run here: {reason}")
        return requested
    if device.type == "cpu":
        candidates: tuple[str, ...] = ("cpu",)
    elif device.type == "cuda":
        candidates = GPU_VALIDATED.get(op, ())
    else:
        candidates = ()
    for name in candidates:
        if _why_not(name, device, dtype) is None:
            return name
    return "reference"


def common_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """The one device of the named tensor arguments; a ``ValueError`` naming them otherwise."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device; got {listed}")
    return next(iter(devices.values()))


def preserved_format(tensor: torch.Tensor) -> torch.memory_format:
    """The memory format an op's output keeps from ``tensor``, as PyTorch's own ops do:
    channels_last for a 4-D channels_last tensor (that is not also plain contiguous), else contiguous."""
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# Derived weights (a BatchNorm folded into a conv's weight and bias) cached per module for eager
# inference: {module: {key: (signature of the sources, value)}}, dropped with the module.
_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(source) -> tuple:
    """What must not change for a derivation from ``source`` to stay valid: a tensor's identity,
    storage, dtype, device and version counter (bumped by every in-place write, e.g.
    ``load_state_dict``, ``p.data = …`` and ``.to()`` replace the storage); any other value itself."""
    if isinstance(source, torch.Tensor):
        return (weakref.ref(source), source.data_ptr(), source.dtype, source.device, source._version)
    return (source,)


def _same(signature: tuple, sources) -> bool:
    for entry, source in zip(signature, sources, strict=True):
        if isinstance(source, torch.Tensor):
            if entry[0]() is not source or entry[1:] != _signature(source)[1:]:
                return False
        elif entry != (source,):
            return False
    return True


def derived(owner: torch.nn.Module, key: str, sources: tuple, derive):
    """``derive()``, cached on ``owner`` under ``key`` while no tensor of ``sources`` changes (the one
    helper for every derived-weight cache of the library). Not cached, but derived on every call,
    under ``torch.compile`` (which folds by itself), where autograd needs the derivation (grad
    enabled and a source requires grad) and in inference mode (its tensors have no version counter).

    A write through ``p.data`` (``p.data.mul_(…)``) bumps the version of that alias only and is not
    seen: write parameters in place under ``torch.no_grad()`` (as optimisers do), assign ``p.data =``
    a new tensor, or call :func:`clear_derived`.
    """
    tensors = [t for t in sources if isinstance(t, torch.Tensor)]
    if (
        torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or any(t.is_inference() for t in tensors)
        or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    ):  # fmt: skip
        return derive()
    entries = _DERIVED.setdefault(owner, {})
    hit = entries.get(key)
    if hit is not None and _same(hit[0], sources):
        return hit[1]
    value = derive()
    entries[key] = (tuple(_signature(source) for source in sources), value)
    return value


def clear_derived(owner: torch.nn.Module | None = None) -> None:
    """Drop the derived weights cached for ``owner`` and its submodules (every module: None)."""
    if owner is None:
        _DERIVED.clear()
        return
    for module in owner.modules():
        _DERIVED.pop(module, None)


# Test hook (tests/guard_pages.py places outputs next to unreadable pages): within
# :func:`allocate_outputs_with`, :func:`new_output` allocates through the given allocator.
_output_allocator = None


@contextlib.contextmanager
def allocate_outputs_with(allocator):
    """Within the block, :func:`new_output` gets its tensor from ``allocator(shape, dtype=, device=,
    memory_format=)`` instead of ``torch.empty`` (a test hook; the poison still applies)."""
    global _output_allocator
    previous, _output_allocator = _output_allocator, allocator
    try:
        yield
    finally:
        _output_allocator = previous


def new_output(shape, *, dtype: torch.dtype, device: torch.device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """An uninitialised output tensor, filled with NaN when ``$SLSDEEP_KERNELS_POISON`` is set.

    Kernels write every element of their outputs; the poison (set by the test suite) makes an
    element a kernel forgot visible instead of leaving whatever the allocator had there.
    """
    allocate = torch.empty if _output_allocator is None else _output_allocator
    out = allocate(shape, dtype=dtype, device=device, memory_format=memory_format)
    if os.environ.get(ENV_POISON, "0") not in ("", "0"):
        out.fill_(float("nan") if out.is_floating_point() else 0x5A)
    return out


def dot_precision(dtype: torch.dtype, *, convolution: bool, full: str = "ieee") -> str:
    """``input_precision`` of a Triton ``tl.dot``, one rule for every op: for fp32 inputs "tf32" where
    the kernel computes (part of) a convolution and PyTorch lets its own convolutions use TF32
    (``torch.backends.cudnn.allow_tf32``, as the op's reference would on cuDNN), else ``full``: "ieee",
    or "tf32x3" (fp32's accuracy from three TF32 products) where the FMA dot of a tile spills. "ieee"
    for 16-bit inputs (the setting is ignored there) and under the interpreter, which gets
    low-precision dots wrong."""
    if dtype != torch.float32 or triton_interpreted():
        return "ieee"
    return "tf32" if convolution and torch.backends.cudnn.allow_tf32 else full


def deprecated_aliases(namespace: dict, aliases: dict[str, str]):
    """A module ``__getattr__`` that serves renamed names (kept one release) with a DeprecationWarning.

    ``namespace``: the module's ``globals()``; ``aliases``: old name -> new name, in this module or,
    dotted, in another (``"slsdeep_kernels.nn.PyramidPooling"``)."""

    def __getattr__(name: str):
        if name not in aliases:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        new = aliases[name]
        warnings.warn(f"{namespace['__name__']}.{name} is deprecated: use {new}", DeprecationWarning, stacklevel=2)
        if "." not in new:
            return namespace[new]
        module, attribute = new.rsplit(".", 1)
        return getattr(importlib.import_module(module), attribute)

    return __getattr__


def no_double_backward(op: str):
    """The autograd formula of a backward custom op: it raises (the fused backwards are not differentiable)."""

    def backward(ctx, *grads):
        raise RuntimeError(f"{op}: double backward is not supported")

    return backward


# Elements per program of every elementwise Triton kernel (the BN passes, the loss's in-place scale).
ELEMENTWISE_BLOCK = 1024

# Every Triton kernel of the library is launched through :func:`launch`, so one place guards the
# device and tests and the ahead-of-time compile check (``slsdeep_kernels.compile_check``) can
# observe each launch with the arguments the GPU path computes.
_launch_observer = None


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` under the CUDA device of its tensor arguments.

    Triton launches on the *current* device; without the guard, tensors on ``cuda:1`` while the
    current device is 0 would be read by a kernel on device 0. Under :func:`observe_launches` the
    observer receives ``(kernel, grid, args, meta, device)`` (inside the guard) instead of the launch.
    A grid with no program (an empty tensor's) launches nothing.
    """
    if not callable(grid) and 0 in grid:
        return
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        if _launch_observer is not None:
            _launch_observer(kernel, grid, args, meta, device)
        else:
            kernel[grid](*args, **meta)


@contextlib.contextmanager
def observe_launches(observer):
    """Within the block, Triton launches call ``observer(kernel, grid, args, meta, device)`` and run nothing."""
    global _launch_observer
    previous, _launch_observer = _launch_observer, observer
    try:
        yield
    finally:
        _launch_observer = previous

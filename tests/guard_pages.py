"""Guard-page tests: every op on every backend that runs on CPU (``reference``, ``cpu``, ``triton``
under the interpreter) with each tensor it touches placed once *ending at* and once *starting right
after* an unreadable page, forward and backward. A read or write past either end of a tensor faults
(SIGSEGV) instead of quietly using a neighbour's bytes: neither the C++ kernels nor Triton's
interpreter (which reads raw memory) bounds-check.

Usage (one process per (op, backend), each forking its children)::

    python -m tests.guard_pages OP BACKEND            # e.g. nll_epe_loss triton
    python -m tests.guard_pages OP:BACKEND ... [--json FILE] [--jobs N] [--case TEXT] [--verbose]

BACKEND ``cpu-VARIANT`` (``cpu-DEFAULT``, ``cpu-AVX2``, ``cpu-AVX512``) runs the cpu backend under that
instruction-set variant of the C++ kernels (``slsdeep_kernels.testing.cpu_variant_override``).

``TRITON_INTERPRET=1``, ``SLSDEEP_KERNELS_POISON=1`` and ``OMP_NUM_THREADS=1`` are set (unless set
already) before torch, triton or the library is imported; anything else in the environment (a CPU
ISA override, say) passes through. Exit status 0 when no placement faulted or failed.

Placement. A tensor's storage span (first to last element through its strides: a strided or
channels_last tensor is placed by the bytes it spans) lies in a memfd mapping with 64 KiB of
``PROT_NONE`` right after its last byte ("end") or right before its first byte ("start"). Placed are:

* inputs and upstream gradients (copied in before the pass that uses them);
* outputs of ``backend.new_output`` (its test hook ``allocate_outputs_with``; the poison still applies);
* on the library backends, intermediates: every fresh tensor an ATen op or compiled kernel returns
  inside the op (a conv output a kernel then updates, the scratch ``torch.empty`` a Triton kernel
  writes, a C++ kernel's output read by the next kernel) is replaced by a placed copy;
* on the ``cpu`` backend, what the C++ kernels allocate (``slsdeep::new_output`` and the copies their
  ``.contiguous()`` make): ATen's factory dispatch (``at::empty``/``at::empty_strided``, BackendSelect)
  is overridden in the child while a compiled kernel runs. Allocations ATen/oneDNN make without the
  dispatcher are listed as "not placeable".

A child places every tensor of a case at one side at once (two children per case: the interpreter
is slow); a child that faults is re-run once per tensor it had placed, each child placing that one
tensor alone, so the failure names the op, backend, case, tensor, side and pass, with the Python
stack at the fault (faulthandler).

Counted only in place. A placement counts only where the op's own code read or wrote the placed bytes
next to the guard, not where it copied the tensor first (a ``.contiguous()``, a dtype cast, oneDNN's
reorder inside a convolution): a stray access would then land in the unguarded copy. The proof is the
page's *present* bit: before each access the edge page (the data page touching the guard) is dropped
with ``MADV_DONTNEED`` (a memfd keeps its contents) and ``/proc/self/pagemap`` says afterwards whether
that access mapped it again. Accesses are seen at three doors:

* Triton launches, through ``backend.observe_launches`` (the observer runs the kernel itself): the
  launch received the placed storage and touched the edge -> in place by that kernel.
* Compiled kernels (``torch.ops.slsdeep_kernels.*``), by a ``TorchDispatchMode`` with the arguments'
  storage; an execution trace of the call names every ATen op the kernel dispatches on that same
  storage (storage ids): a copy of it (clone, _to_copy, copy_ from it) -> "copied first", a
  convolution -> "opaque" (oneDNN may reorder, ATen may im2col), another op -> in place, by ATen.
  A C++ allocation counts where the kernel left its edge element different from both the sentinel
  it was filled with and the poison (the edge page is touched by the poison fill itself).
* ATen ops, by the same dispatch mode (the library's Python custom ops are opened, so the ops inside
  them are seen one by one): copies (clone, _to_copy, copy_ *from* it, *_copy, a reshape that could
  not view), convolutions (opaque) and fills (the poison) do not count; any other op counts as
  "in place by aten X" (status "counted (ATen only)" where no library kernel touched it).

The reference backend's outputs and intermediates are ATen's own and are not placed.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import faulthandler
import json
import math
import mmap
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

if __name__ == "__main__":  # before anything imports triton or the library
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SLSDEEP_KERNELS_POISON", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

OPS = ("nll_epe_loss", "pyramid_pool", "upsample_concat", "pyramid_conv", "conv_bn_relu")
SELFTEST = "_selftest"
SIDES = ("end", "start")
SEED = 20240611
CHILD_TIMEOUT_S = 240.0

PAGE = mmap.PAGESIZE
GUARD_BYTES = 16 * PAGE
_PROT_NONE, _PROT_RW = 0, 3
_MAP_SHARED = 0x01
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

PROTOCOL = "@@guard "  # lines the child writes to its log for the parent

# Kinds of access. Counted: the op's own code touched the placed bytes in place.
KERNEL, ATEN, COPY, OPAQUE, INIT = "kernel", "aten", "copy", "opaque", "init"
COUNTED_KINDS = (KERNEL, ATEN)
_COPY_OPS = {
    "aten::clone", "aten::_to_copy", "aten::_copy_from", "aten::_copy_from_and_resize", "aten::repeat", "aten::tile",
}  # fmt: skip
# Composite ops that return a view where they can and a copy where they cannot (a copy: not counted)
_VIEW_OR_COPY_OPS = {"aten::reshape", "aten::flatten", "aten::unflatten", "aten::contiguous", "aten::to", "aten::type_as"}
_INIT_OPS = {"aten::fill_", "aten::zero_"}
_NO_ACCESS_OPS = {  # nested ops that only allocate or view (a copy they make shows as its own nested op)
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::to", "aten::view", "aten::permute",
    "aten::as_strided", "aten::slice", "aten::select", "aten::expand", "aten::t", "aten::transpose",
    "aten::reshape", "aten::detach", "aten::alias", "aten::unsqueeze", "aten::squeeze", "aten::narrow",
    "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::lift_fresh", "aten::resize_",
    "aten::is_nonzero", "aten::flatten", "aten::unflatten", "aten::chunk", "aten::result_type",
}  # fmt: skip
_C_NAMESPACES = ("slsdeep_kernels", "guard_selftest")  # compiled kernels (guard_selftest: the self-test's stand-in)


def _copy_kind(name: str, position) -> bool:
    """Whether a (possibly nested) op copies its argument at ``position`` into a fresh tensor."""
    if name == "aten::copy_":
        return position == 1  # copy_(self, src): reading src is a copy; writing self is in place
    return name in _COPY_OPS or name.endswith("_copy")


def _opaque(name: str) -> bool:
    return "conv" in name or name.startswith("mkldnn::") or "mkldnn" in name


# ---------------------------------------------------------------------------------------------
# Placing a tensor next to an unreadable page
# ---------------------------------------------------------------------------------------------


class _Pagemap:
    fd: int | None = None
    pid: int | None = None

    @classmethod
    def present(cls, address: int) -> bool:
        if cls.pid != os.getpid():  # /proc/self is resolved when opened: reopen after a fork
            cls.fd, cls.pid = os.open("/proc/self/pagemap", os.O_RDONLY), os.getpid()
        entry = int.from_bytes(os.pread(cls.fd, 8, (address // PAGE) * 8), "little")
        return bool(entry >> 63)


def _span_elements(shape, strides) -> int:
    if any(s < 0 for s in strides):
        raise ValueError(f"negative strides {strides} cannot be placed")
    if math.prod(shape) == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, strides))


def _non_overlapping(shape, strides) -> bool:
    span = 1
    for size, stride in sorted(((n, s) for n, s in zip(shape, strides) if n > 1), key=lambda d: d[1]):
        if stride < span:
            return False
        span = stride * (size - 1) + span
    return True


class Guard:
    """A tensor whose storage span ends at (``side="end"``) or starts right after (``"start"``)
    ``GUARD_BYTES`` of PROT_NONE; ``edge`` is the data page touching the guard."""

    def __init__(self, name: str, role: str, shape, strides, dtype: torch.dtype, side: str):
        self.name, self.role, self.side = name, role, side
        self.shape, self.strides, self.dtype = tuple(shape), tuple(strides), dtype
        itemsize = dtype.itemsize
        elements = max(_span_elements(self.shape, self.strides), 1)
        span = elements * itemsize
        pages = -(-span // PAGE)
        size = pages * PAGE + GUARD_BYTES
        fd = os.memfd_create(f"guard-{role}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            base = _libc.mmap(None, size, _PROT_RW, _MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {size} bytes failed")
        if side == "end":
            guard, start = base + pages * PAGE, base + pages * PAGE - span
            self.edge = base + (pages - 1) * PAGE
        elif side == "start":
            guard, start = base, base + GUARD_BYTES
            self.edge = start
        else:
            raise ValueError(side)
        if _libc.mprotect(guard, GUARD_BYTES, _PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
        self.lo, self.hi = start, start + span
        self._buffer = (ctypes.c_char * span).from_address(start)  # the mapping lives as long as the process
        flat = torch.frombuffer(self._buffer, dtype=dtype)
        with torch.no_grad():
            self.tensor = torch.empty(0, dtype=dtype).set_(flat.untyped_storage(), 0, self.shape, self.strides)
        self.events: list[dict] = []

    def drop(self) -> None:
        _libc.madvise(self.edge, PAGE, _MADV_DONTNEED)

    def touched(self) -> bool:
        return _Pagemap.present(self.edge)

    def describe(self) -> dict:
        return {
            "name": self.name, "role": self.role, "side": self.side, "shape": list(self.shape),
            "strides": list(self.strides), "dtype": str(self.dtype).removeprefix("torch."), "events": self.events,
        }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Observing every access: Triton launches, compiled kernels, ATen ops
# ---------------------------------------------------------------------------------------------


def _tensors(value, position=None):
    """(position, tensor) of every tensor in a value (lists, tuples and dicts opened)."""
    if isinstance(value, torch.Tensor):
        yield position, value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item, position)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, key)


def _storage_pointer(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class Tracer:
    def __init__(self):
        self.guards: list[Guard] = []
        self._by_pointer: dict[int, Guard] = {}
        self.phase = "setup"
        self.unplaceable: list[str] = []
        self._allocations: dict = {}  # calls so far, per kind and pass (names stay the same in every child)
        self.place_intermediates: Callable[[str], bool] | None = None  # which fresh op outputs to place
        self.side = "end"
        self.in_compiled: str | None = None  # the compiled kernel running now
        self.place_cpp: Callable[[str], bool] | None = None
        self._allocating = False
        self._cpp_allocations: list[Guard] = []

    def add(self, guard: Guard) -> Guard:
        self.guards.append(guard)
        self._by_pointer[guard.lo] = guard
        _protocol("GUARD", guard.name)
        return guard

    def hits(self, args, kwargs=None) -> dict[Guard, list]:
        """The placed tensors among the arguments: guard -> [(position, tensor)]."""
        found: dict[Guard, list] = {}
        if not self._by_pointer:
            return found
        items = list(enumerate(args)) + list((kwargs or {}).items())
        for position, value in items:
            for _, t in _tensors(value, position):
                guard = self._by_pointer.get(_storage_pointer(t))
                if guard is not None:
                    found.setdefault(guard, []).append((position, t))
        return found

    def begin(self, hits) -> None:
        for guard in hits:
            if guard.touched():
                guard.events.append({"phase": self.phase, "label": "(outside any observed op)", "kind": "unobserved", "touched": True})
            guard.drop()

    def end(self, hits, label: str, kind_of: Callable) -> None:
        for guard, positions in hits.items():
            touched = guard.touched()
            guard.drop()
            guard.events.append({"phase": self.phase, "label": label, "kind": kind_of(guard, positions), "touched": touched})

    def start_pass(self, phase: str) -> None:
        self.phase = phase
        _protocol("PASS", phase)
        for guard in self.guards:
            guard.drop()

    def end_pass(self) -> None:
        for guard in self.guards:
            if guard.touched():
                guard.events.append({"phase": self.phase, "label": "(outside any observed op)", "kind": "unobserved", "touched": True})
                guard.drop()

    # ---- Triton launches
    def launch_observer(self, kernel, grid, args, meta, device):
        from torch.utils._python_dispatch import _disable_current_modes

        hits = self.hits(args, meta)
        self.begin(hits)
        with _disable_current_modes():  # the interpreter's own bookkeeping is not the kernel's access
            kernel[grid](*args, **meta)
        self.end(hits, f"triton {_kernel_name(kernel)}", lambda guard, positions: KERNEL)

    # ---- compiled kernels: identity at the call; the ATen ops dispatched inside, by storage, from an
    # execution trace (it names every op a kernel dispatches, with each tensor's storage id)
    def compiled_kernel(self, func, args, kwargs, hits):
        from torch.profiler import ExecutionTraceObserver

        name = func._schema.name
        observer = None
        if hits:
            fd, path = tempfile.mkstemp(prefix="guard-et-", suffix=".json", dir=_scratch_dir())
            os.close(fd)
            observer = ExecutionTraceObserver()
            observer.register_callback(path)
        self.begin(hits)
        self.in_compiled, self._cpp_allocations = name, []
        if observer is not None:
            observer.start()
        try:
            out = func(*args, **kwargs)
        finally:
            if observer is not None:
                observer.stop()
                observer.unregister_callback()
            self.in_compiled = None
        touched = {guard: guard.touched() for guard in hits}
        for guard in self._cpp_allocations:  # its edge element changed from the sentinel and the poison
            written = _edge_written(guard)
            label = f"C++ {name} wrote its edge element (its own loops or an ATen op it dispatches)"
            guard.events.append({"phase": self.phase, "label": label if written else f"C++ {name} (edge element not written)",
                                 "kind": KERNEL if written else "unwritten", "touched": written})  # fmt: skip
            guard.drop()
        nested = {}
        if observer is not None:
            with open(path) as f:
                nodes = json.load(f)["nodes"]
            os.unlink(path)
            nested = _nested_accesses(nodes, func, args, kwargs, hits)
        for guard in hits:
            guard.drop()
            inner = nested.get(guard, [])
            kinds = {_nested_kind(op, position) for op, position in inner} - {None}
            kind = next((k for k in (COPY, OPAQUE, ATEN) if k in kinds), KERNEL)
            ops = sorted({op for op, position in inner if _nested_kind(op, position)})
            label = f"C++ {name}" + (f" (dispatching on it: {', '.join(ops)})" if ops else "")
            guard.events.append({"phase": self.phase, "label": label, "kind": kind, "touched": touched[guard]})
        for i, (_, t) in enumerate(_tensors(out)):
            if t.numel() and self._by_pointer.get(_storage_pointer(t)) is None:
                where = "inside ATen/oneDNN, without a dispatched at::empty" if self.place_cpp else "in C++"
                self.unplaceable.append(f"{self.phase}: output {i} of C++ {name} {tuple(t.shape)} (allocated {where})")
        return out

    # ---- allocations made while a compiled kernel runs (its outputs, and the copies it makes),
    # through an override of ATen's factory dispatch (see _install_allocation_hook)
    def cpp_allocation(self, size, strides, dtype):
        if self.in_compiled is None or self._allocating or self.place_cpp is None or math.prod(size) == 0:
            return None
        index = self._allocations.get(("C++", self.phase), 0)
        self._allocations[("C++", self.phase)] = index + 1
        name = f"C++ allocation {self.phase}#{index} in {self.in_compiled} {tuple(size)}"
        if not self.place_cpp(name):
            return None
        self._allocating = True
        try:
            guard = Guard(name, "C++ allocation", size, strides, dtype, self.side)
            ctypes.memset(guard.lo, _SENTINEL, guard.hi - guard.lo)
            self.add(guard)
        finally:
            self._allocating = False
        self._cpp_allocations.append(guard)
        return guard.tensor

    # ---- ATen ops
    def aten_op(self, func, args, kwargs, hits):
        name = func._schema.name
        self.begin(hits)
        out = func(*args, **kwargs)

        def kind_of(guard, positions):
            kinds = set()
            for position, _ in positions:
                if name in _VIEW_OR_COPY_OPS:
                    fresh = [t for _, t in _tensors(out) if self._by_pointer.get(_storage_pointer(t)) is not guard]
                    kinds.add(COPY if fresh else ATEN)
                elif _copy_kind(name, position):
                    kinds.add(COPY)
                elif _opaque(name):
                    kinds.add(OPAQUE)
                elif name in _INIT_OPS and position == 0:
                    kinds.add(INIT)
                else:
                    kinds.add(ATEN)
            return ATEN if ATEN in kinds else sorted(kinds)[0]

        self.end(hits, f"aten {name.removeprefix('aten::')}", kind_of)
        return out

    # ---- intermediates: fresh tensors an op returns (ATen or compiled), copied into a placement
    def placed_outputs(self, func, out):
        """``out`` with each fresh CPU tensor replaced by a placed copy (the op's later readers and
        writers then work on placed memory). Outputs that alias an input are left alone."""
        if self.place_intermediates is None or any(r.alias_info is not None for r in func._schema.returns):
            return out
        from torch.utils._python_dispatch import _disable_current_modes
        from torch.utils._pytree import tree_map

        name = func._schema.name

        def place(t):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.numel() == 0 or t.is_sparse:
                return t
            if not _non_overlapping(t.shape, t.stride()) or self._by_pointer.get(_storage_pointer(t)) is not None:
                return t
            index = self._allocations.get(("intermediate", self.phase), 0)
            self._allocations[("intermediate", self.phase)] = index + 1
            label = f"intermediate {self.phase}#{index} {name} -> {tuple(t.shape)}"
            if not self.place_intermediates(label):
                return t
            with _disable_current_modes(), torch.no_grad():
                guard = self.add(Guard(label, "intermediate", t.shape, t.stride(), t.dtype, self.side))
                guard.tensor.copy_(t)
                guard.drop()
            return guard.tensor

        return tree_map(place, out)

    # ---- outputs through backend.new_output
    def allocator(self, placed: Callable[[str], bool], side: str):
        def allocate(shape, *, dtype, device, memory_format=torch.contiguous_format):
            from torch.utils._python_dispatch import _disable_current_modes

            index = self._allocations.get(self.phase, 0)
            self._allocations[self.phase] = index + 1
            name = f"output {self.phase}#{index} {_caller()} {tuple(shape)}"
            with _disable_current_modes():
                if torch.device(device).type != "cpu" or not placed(name):
                    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
                strides = torch.empty(shape, dtype=dtype, device="meta", memory_format=memory_format).stride()
                return self.add(Guard(name, "output", shape, strides, dtype, side)).tensor

        return allocate


_SENTINEL = 0xA5  # the bytes of a C++ allocation before the kernel runs


def _edge_written(guard: Guard) -> bool:
    """Whether the element of ``guard`` next to its guard page holds neither the sentinel nor the poison."""
    itemsize = guard.dtype.itemsize
    address = guard.hi - itemsize if guard.side == "end" else guard.lo
    raw = ctypes.string_at(address, itemsize)
    if raw == bytes([_SENTINEL]) * itemsize:
        return False
    value = torch.frombuffer(bytearray(raw), dtype=guard.dtype)[0]
    if guard.dtype.is_floating_point:
        return not bool(torch.isnan(value))
    return int(value) != 0x5A  # the integer poison of csrc/alloc.h


def _dense_strides(size, memory_format) -> tuple:
    size = list(size)
    if memory_format == torch.channels_last and len(size) == 4:
        n, c, h, w = size
        return (h * w * c, 1, w * c, c)
    if memory_format == torch.channels_last_3d and len(size) == 5:
        n, c, d, h, w = size
        return (d * h * w * c, 1, h * w * c, w * c, c)
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _install_allocation_hook(tracer: Tracer):
    """Route ATen's CPU factory calls (``at::empty`` / ``at::empty_strided``, what ``slsdeep::new_output``
    and ``.contiguous()`` allocate with) through ``tracer.cpp_allocation`` while a compiled kernel runs:
    an override of their BackendSelect kernels, in this child process only."""
    import warnings

    keys = {"cpu": torch._C.DispatchKey.CPU, "meta": torch._C.DispatchKey.Meta}

    def redispatch(op, device, args, kwargs):
        key = keys.get(torch.device(device).type if device is not None else "cpu")
        if key is None:
            raise RuntimeError(f"guard_pages: unexpected factory device {device}")
        return op.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)

    def plain(kwargs):
        device = kwargs.get("device")
        return (device is None or torch.device(device).type == "cpu") and kwargs.get("layout") in (None, torch.strided) \
            and not kwargs.get("pin_memory")  # fmt: skip

    def empty(*args, **kwargs):
        if len(args) == 1 and plain(kwargs) and kwargs.get("memory_format") != torch.preserve_format:
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            size = tuple(args[0])
            placed = tracer.cpp_allocation(size, _dense_strides(size, kwargs.get("memory_format")), dtype)
            if placed is not None:
                return placed
        return redispatch(torch.ops.aten.empty.memory_format, kwargs.get("device"), args, kwargs)

    def empty_strided(*args, **kwargs):
        if len(args) == 2 and plain(kwargs):
            size, strides = tuple(args[0]), tuple(args[1])
            if min(strides, default=0) >= 0 and _non_overlapping(size, strides):
                placed = tracer.cpp_allocation(size, strides, kwargs.get("dtype") or torch.get_default_dtype())
                if placed is not None:
                    return placed
        return redispatch(torch.ops.aten.empty_strided.default, kwargs.get("device"), args, kwargs)

    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        library.impl("empty.memory_format", empty, "BackendSelect")
        library.impl("empty_strided", empty_strided, "BackendSelect")
    return library


def _tensor_values(value):
    """The [tensor id, storage id, offset, numel, itemsize, device] entries of an execution-trace value."""
    if isinstance(value, list) and len(value) == 6 and all(isinstance(v, int) for v in value[:5]) and isinstance(value[5], str):
        return [value]
    if isinstance(value, list):
        return [t for item in value for t in _tensor_values(item)]
    return []


def _nested_accesses(nodes, func, args, kwargs, hits) -> dict:
    """guard -> [(op, input position)] of every op dispatched inside the kernel that takes the guard's
    storage (matched by the trace's storage ids, which follow the storage pointers)."""
    name = func._schema.name
    outer = [n for n in nodes if n["name"] == name]
    if len(outer) != 1:
        raise RuntimeError(f"execution trace of {name}: expected one node for the kernel, got {len(outer)}")
    outer = outer[0]
    values = outer["inputs"]["values"]
    argument_names = [a.name for a in func._schema.arguments]
    storage_of: dict[int, Guard] = {}
    for guard, positions in hits.items():
        for position, t in positions:
            index = position if isinstance(position, int) else argument_names.index(position)
            arg = args[index] if isinstance(position, int) else kwargs[position]
            value = values[index]
            pairs = zip(arg, value) if isinstance(arg, (list, tuple)) else [(arg, value)]
            for python_tensor, entry in pairs:
                if python_tensor is t:
                    for _, sid, *_ in _tensor_values(entry):
                        storage_of[sid] = guard
        if guard not in storage_of.values():  # never classify a placement the trace does not show
            raise RuntimeError(f"execution trace of {name}: no storage id for the placed {guard.name}")
    below = {outer["id"]}
    found: dict[Guard, list] = {}
    for node in sorted(nodes, key=lambda n: n["id"]):
        if node["id"] == outer["id"] or node.get("ctrl_deps") not in below:
            continue
        below.add(node["id"])
        if node["name"] in _NO_ACCESS_OPS:
            continue
        for position, value in enumerate(node.get("inputs", {}).get("values", [])):
            for _, sid, *_ in _tensor_values(value):
                if sid in storage_of:
                    found.setdefault(storage_of[sid], []).append((node["name"], position))
    return found


def _nested_kind(name: str, position) -> str | None:
    if _copy_kind(name, position):
        return COPY
    if _opaque(name):
        return OPAQUE
    if name in _INIT_OPS:
        return None
    return ATEN


def _kernel_name(kernel) -> str:
    for _ in range(4):
        name = getattr(kernel, "__name__", None)
        if isinstance(name, str):
            return name
        kernel = getattr(kernel, "fn", None)
    return "kernel"


def _caller() -> str:
    """The functions that asked backend.new_output for an output (callee<caller)."""
    frame = sys._getframe(2)
    names = []
    while frame is not None and len(names) < 2:
        if not frame.f_code.co_filename.endswith("backend.py"):
            names.append(frame.f_code.co_name)
        frame = frame.f_back
    return "<".join(names)


def _make_mode(tracer: Tracer):
    from torch._library.custom_ops import OPDEFS
    from torch.utils._python_dispatch import TorchDispatchMode

    class Observe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            qualified = func._schema.name
            if qualified.startswith("slsdeep_kernels::") and qualified in OPDEFS:  # the library's Python custom ops: their body in view
                with self:
                    return OPDEFS[qualified]._init_fn(*args, **kwargs)
            hits = tracer.hits(args, kwargs)
            if func.namespace in _C_NAMESPACES:
                out = tracer.compiled_kernel(func, args, kwargs, hits)
            elif not hits:
                out = func(*args, **kwargs)
            else:
                out = tracer.aten_op(func, args, kwargs, hits)
            return tracer.placed_outputs(func, out)

    return Observe()


# ---------------------------------------------------------------------------------------------
# The cases: small, seeded, over the tile borders (interpreter tiles for triton, vector widths and
# row bands for the C++ kernels) and odd sizes.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    name: str
    inputs: Callable[[], dict]  # name -> tensor or list of tensors (seeded by the caller)
    run: Callable[[dict], list]  # the op forward; returns the outputs that get upstream gradients
    grad_layout: str = "like"  # "like" the output, or "expanded" (one value broadcast: stride 0)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a view with a gap after every row (not dense)
        wide = torch.empty(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
        view = wide[..., 1 : t.shape[-1] + 1]
        view.copy_(t)
        return view
    raise ValueError(layout)


def _randn(shape, layout="contiguous"):
    return _layout(torch.randn(shape), layout)


def _nll_cases(backend: str) -> list[Case]:
    import slsdeep_kernels as sk

    combinations = [(c, r, t) for c in (1, 2) for r in ("none", "mean", "sum") for t in (torch.uint8, torch.float32)]
    if backend == "triton":  # the interpreter is slow: every pair of values of (C, reduction, target dtype) once
        combinations = [(c, r, t) for c, r, t in combinations if (c == 1) == (r == "mean") ^ (t == torch.uint8)]
    cases = []
    for channels, reduction, target_dtype in combinations:
        if backend == "triton":  # interpreter tiles ROWS=8, BLOCK_W=16: 2x2 tiles for the backward's halo, else 2 images
            shape = (1, channels, 9, 17) if reduction == "none" else (2, channels, 5, 7)
        else:  # C++: 32-row bands, 8/16-wide vectors
            shape = (2, channels, 37, 21)
        if channels == 2 and target_dtype == torch.uint8:
            layout = "channels_last"
        elif channels == 1 and target_dtype == torch.float32 and reduction != "sum":
            layout = "strided"
        else:
            layout = "contiguous"

        def inputs(shape=shape, layout=layout, target_dtype=target_dtype):
            n, _, h, w = shape
            return {
                "logits": _randn(shape, layout).requires_grad_(),
                "target": (torch.rand(n, h, w) > 0.5).to(target_dtype),
            }

        def run(t, reduction=reduction):
            return [sk.nll_epe_loss(t["logits"], t["target"], alpha=0.7, reduction=reduction, backend=backend)]

        dtype = str(target_dtype).removeprefix("torch.")
        cases.append(Case(f"C={channels} reduction={reduction} target={dtype} logits {layout} {shape}", inputs, run))
    return cases


def _pool_cases(backend: str) -> list[Case]:
    import slsdeep_kernels as sk

    # triton: 64-channel and 64-pixel tiles; C++: odd sizes, a bin larger than the image
    big = (2, 70, 9, 10) if backend == "triton" else (2, 19, 13, 11)
    specs = [
        ("NCHW bins=(1,2,3,6)", big, "contiguous", (1, 2, 3, 6), "like"),
        ("channels_last bins=(1,2,3,6)", big, "channels_last", (1, 2, 3, 6), "like"),
        ("strided, bins larger than the image, expanded upstream gradient", (2, 3, 5, 4), "strided", (1, 3, 6), "expanded"),
    ]
    cases = []
    for name, shape, layout, bins, grad_layout in specs:

        def inputs(shape=shape, layout=layout):
            return {"x": _randn(shape, layout).requires_grad_()}

        def run(t, bins=bins):
            return [sk.pyramid_pool(t["x"], bins, backend=backend)]

        cases.append(Case(f"{name} {shape}", inputs, run, grad_layout))
    return cases


def _branches_inputs(x_shape, x_layout, branch_shapes, branch_layouts):
    return {
        "x": _randn(x_shape, x_layout).requires_grad_(),
        "branches": [_randn(s, layout).requires_grad_() for s, layout in zip(branch_shapes, branch_layouts)],
    }


def _upsample_cases(backend: str) -> list[Case]:
    import slsdeep_kernels as sk

    n, c, h, w = (2, 4, 9, 10) if backend == "triton" else (2, 5, 13, 11)
    wide = 70 if backend == "triton" else 6  # a branch over two 64-channel tiles
    specs = [
        ("NCHW align_corners=False", "contiguous", [(n, 3, 1, 1), (n, wide, 3, 2)], ["contiguous", "contiguous"], False),
        ("channels_last align_corners=True", "channels_last", [(n, 2, h + 2, w + 2), (n, 3, 2, 5)], ["channels_last", "strided"], True),
    ]
    cases = []
    for name, x_layout, branch_shapes, branch_layouts, align in specs:

        def inputs(x_layout=x_layout, branch_shapes=branch_shapes, branch_layouts=branch_layouts):
            return _branches_inputs((n, c, h, w), x_layout, branch_shapes, branch_layouts)

        def run(t, align=align):
            return [sk.upsample_concat(t["x"], t["branches"], align_corners=align, backend=backend)]

        cases.append(Case(f"{name} x={(n, c, h, w)} branches={branch_shapes}", inputs, run))
    return cases


def _pyramid_conv_cases(backend: str) -> list[Case]:
    import slsdeep_kernels as sk

    n, c, h, w = (2, 4, 9, 10) if backend == "triton" else (2, 5, 13, 11)
    branch_shapes = [(n, 3, 1, 1), (n, 5, 3, 2)]
    out_channels = 7
    cases = []
    for name, layout, bias in (("bias NCHW", "contiguous", True), ("no bias channels_last", "channels_last", False)):

        def inputs(layout=layout, bias=bias):
            t = _branches_inputs((n, c, h, w), layout, branch_shapes, ["contiguous", "contiguous"])
            t["weight"] = (torch.randn(out_channels, c + 8, 3, 3) / 5).requires_grad_()
            if bias:
                t["bias"] = torch.randn(out_channels).requires_grad_()
            return t

        def run(t):
            return [sk.pyramid_conv([t["x"], *t["branches"]], t["weight"], t.get("bias"), backend=backend)]

        cases.append(Case(f"3x3 {name} x={(n, c, h, w)} branches={branch_shapes}", inputs, run))

    def inputs_1x1():  # ASPP-like: a branch between two full-resolution parts, 1×1, ReLU
        t = _branches_inputs((n, c, h, w), "channels_last", branch_shapes[:1], ["contiguous"])
        t["other"] = _randn((n, 2, h, w), "contiguous").requires_grad_()
        t["weight"] = (torch.randn(out_channels, c + 3 + 2, 1, 1) / 3).requires_grad_()
        return t

    def run_1x1(t):
        parts = [t["x"], t["branches"][0], t["other"]]
        return [sk.pyramid_conv(parts, t["weight"], None, (h, w), relu=True, backend=backend)]

    cases.append(Case(f"1x1 relu parts=[x, branch, other] x={(n, c, h, w)}", inputs_1x1, run_1x1))
    return cases


def _conv_bn_relu_cases(backend: str) -> list[Case]:
    import slsdeep_kernels as sk

    # interpreter: 32-pixel, 16-channel tiles (2 x 2 programs); C++: vector tails
    n, c_in, h, w, c_out = (2, 5, 5, 4, 18) if backend == "triton" else (2, 5, 9, 10, 18)
    cases = []
    for training in (False, True):
        for kernel, dilation in ((1, 1), (3, 2)):
            for layout in ("contiguous", "channels_last"):

                def inputs(kernel=kernel, layout=layout):
                    return {
                        "x": _randn((n, c_in, h, w), layout).requires_grad_(),
                        "weight": (torch.randn(c_out, c_in, kernel, kernel) / 3).requires_grad_(),
                        "bias": torch.randn(c_out).requires_grad_(),
                        "bn_weight": (torch.rand(c_out) + 0.5).requires_grad_(),
                        "bn_bias": torch.randn(c_out).requires_grad_(),
                        "running_mean": torch.randn(c_out) / 4,
                        "running_var": torch.rand(c_out) + 0.5,
                    }

                def run(t, kernel=kernel, dilation=dilation, training=training):
                    out = sk.conv_bn_relu(
                        t["x"], t["weight"], t["bias"], t["bn_weight"], t["bn_bias"], t["running_mean"], t["running_var"],
                        stride=1, padding=dilation * (kernel // 2), dilation=dilation, training=training, backend=backend,
                    )  # fmt: skip
                    return [out]

                mode = "training" if training else "eval"
                name = f"{mode} {kernel}x{kernel} dilation={dilation} {layout} x={(n, c_in, h, w)} C_out={c_out}"
                cases.append(Case(name, inputs, run))
    return cases


# ---- the self-test: a kernel that reads one element past either end of its input, or writes one past
# the end of its output, must be caught; a copy must not be counted, and an in-place read must be.

tl = None  # triton.language, bound before the self-test kernels run (they are interpreted)


def _selftest_read(x_ptr, out_ptr, n, shift):
    offsets = tl.arange(0, 16)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets + shift, mask=mask), mask=mask)


def _selftest_library():
    import torch.library

    lib = torch.library.Library("guard_selftest", "FRAGMENT")
    lib.define("copy_then_read(Tensor x) -> Tensor")
    lib.define("read(Tensor x) -> Tensor")
    lib.define("write_past_end(Tensor x) -> Tensor")

    def write_past_end(x):  # a kernel that writes one element more than its output holds
        out = torch.empty(x.shape, dtype=x.dtype)
        ctypes.memset(out.data_ptr(), 0, out.nbytes + out.element_size())
        return out

    lib.impl("copy_then_read", lambda x: x.contiguous() * 2, "CPU")
    lib.impl("read", lambda x: x * 2, "CPU")
    lib.impl("write_past_end", write_past_end, "CPU")
    return lib


def _selftest_cases(backend: str) -> list[Case]:
    global tl
    import triton
    import triton.language

    from slsdeep_kernels import backend as backends

    tl = triton.language
    kernel = triton.jit(_selftest_read)
    _selftest_cases.library = getattr(_selftest_cases, "library", None) or _selftest_library()

    def read(shift):
        def run(t):
            x = t["x"].contiguous()  # a copy where x is transposed
            out = backends.new_output((x.numel(),), dtype=x.dtype, device=x.device)
            backends.launch(kernel, (1,), x, out, x.numel(), shift)
            return []

        return run

    def compiled(name):
        def run(t):
            getattr(torch.ops.guard_selftest, name)(t["x"])
            return []

        return run

    def inputs(transposed=False):
        return lambda: {"x": torch.randn(3, 4).t() if transposed else torch.randn(12)}

    return [
        Case("triton reads one element past the end", inputs(), read(1)),
        Case("triton reads one element before the start", inputs(), read(-1)),
        Case("triton reads in place", inputs(), read(0)),
        Case("triton reads a copy", inputs(transposed=True), read(0)),
        Case("compiled kernel reads in place", inputs(), compiled("read")),
        Case("compiled kernel copies first", inputs(transposed=True), compiled("copy_then_read")),
        Case("compiled kernel writes one element past its output", inputs(), compiled("write_past_end")),
    ]


CASES = {
    "nll_epe_loss": _nll_cases,
    "pyramid_pool": _pool_cases,
    "upsample_concat": _upsample_cases,
    "pyramid_conv": _pyramid_conv_cases,
    "conv_bn_relu": _conv_bn_relu_cases,
    SELFTEST: _selftest_cases,
}


# ---------------------------------------------------------------------------------------------
# The child: one placement (every tensor of a case at one side, or one tensor alone)
# ---------------------------------------------------------------------------------------------

_LOG_FD = 2
_PLACE_INTERMEDIATES = False  # set per (op, backend): the reference backend's intermediates are ATen's own


_SCRATCH = None  # the (op, backend) process's directory for its children's traces, removed when it ends


def _scratch_dir() -> str:
    return _SCRATCH or tempfile.gettempdir()


def _protocol(kind: str, value) -> None:
    os.write(_LOG_FD, f"\n{PROTOCOL}{kind} {json.dumps(value)}\n".encode())


def _input_names(inputs: dict):
    for key, value in inputs.items():
        if isinstance(value, list):
            for i, t in enumerate(value):
                yield f"input {key}[{i}]", (key, i), t
        else:
            yield f"input {key}", (key, None), value


def _child(case: Case, side: str, only: str | None) -> None:
    from slsdeep_kernels import backend as backends

    def placed(name: str) -> bool:
        return only is None or name == only

    tracer = Tracer()
    tracer.side = side
    if _PLACE_INTERMEDIATES:
        tracer.place_intermediates = placed
        tracer.place_cpp = placed
        hook_library = _install_allocation_hook(tracer)  # noqa: F841 - kept registered while the child runs
    torch.manual_seed(SEED)
    inputs = case.inputs()
    for name, (key, index), t in list(_input_names(inputs)):
        if not placed(name) or t.numel() == 0:
            continue
        guard = tracer.add(Guard(name, "input", t.shape, t.stride(), t.dtype, side))
        with torch.no_grad():
            guard.tensor.copy_(t)
        guard.tensor.requires_grad_(t.requires_grad)
        if index is None:
            inputs[key] = guard.tensor
        else:
            inputs[key][index] = guard.tensor
    mode = _make_mode(tracer)
    observe = getattr(backends, "observe_launches", None)
    hook = getattr(backends, "allocate_outputs_with", None)
    if observe is None:
        tracer.unplaceable.append("Triton launches not observable: backend.observe_launches is missing")
    if hook is None:
        tracer.unplaceable.append("outputs of backend.new_output not placeable: backend.allocate_outputs_with is missing")

    def observed():
        import contextlib

        stack = contextlib.ExitStack()
        if observe is not None:
            stack.enter_context(observe(tracer.launch_observer))
        if hook is not None:
            stack.enter_context(hook(tracer.allocator(placed, side)))
        stack.enter_context(mode)
        return stack

    tracer.start_pass("forward")
    with observed():
        outputs = case.run(inputs)
    tracer.end_pass()
    outputs = [o for o in outputs if o.requires_grad]
    if outputs:
        generator = torch.Generator().manual_seed(SEED + 1)
        grads = []
        for i, o in enumerate(outputs):
            values = torch.randn(o.shape, generator=generator, dtype=o.dtype)
            expanded = case.grad_layout == "expanded"
            shape, strides = ((), ()) if expanded else (o.shape, o.stride())
            name = f"upstream gradient {i} {tuple(o.shape)}" + (" (expanded)" if expanded else "")
            if placed(name):
                g = tracer.add(Guard(name, "upstream gradient", shape, strides, o.dtype, side)).tensor
            else:
                g = torch.empty_strided(shape, strides, dtype=o.dtype)
            with torch.no_grad():
                g.copy_(values.flatten()[0] if expanded else values)
            grads.append(g.expand(o.shape) if expanded else g)
        tracer.start_pass("backward")
        with observed():
            torch.autograd.backward(outputs, grads)
        tracer.end_pass()
    _protocol("RESULT", {"guards": [g.describe() for g in tracer.guards], "unplaceable": sorted(set(tracer.unplaceable))})


def _fork_child(case: Case, side: str, only: str | None):
    """Start a child; returns (pid, log path)."""
    fd, path = tempfile.mkstemp(prefix="child-", suffix=".log", dir=_scratch_dir())
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            faulthandler.enable(file=sys.stderr, all_threads=False)
            torch.set_num_threads(1)
            _child(case, side, only)
            code = 0
        except BaseException:  # noqa: BLE001 - reported through the log
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(fd)
    return pid, path


def _parse_log(path: str) -> dict:
    with open(path, errors="replace") as f:
        text = f.read()
    os.unlink(path)
    protocol = {"GUARD": [], "PASS": [], "RESULT": None}
    other = []
    for line in text.splitlines():
        if line.startswith(PROTOCOL):
            kind, _, value = line[len(PROTOCOL) :].partition(" ")
            value = json.loads(value)
            if kind == "RESULT":
                protocol["RESULT"] = value
            else:
                protocol[kind].append(value)
        elif line.strip() and "execution_trace_observer" not in line:  # the trace's start/stop chatter
            other.append(line)
    other = [line for line in other if not line.startswith("Extension modules:")]  # faulthandler's module list
    protocol["log"] = "\n".join(other if len(other) <= 80 else [*other[:50], "...", *other[-30:]])
    return protocol


def is_fault(how: str) -> bool:
    """Whether a child's end (``_status_text``) was a memory fault rather than an error or a timeout."""
    return how in ("killed by SIGSEGV", "killed by SIGBUS")


def excerpt(failure: dict, lines: int = 18) -> str:
    """The part of a child's log that explains it: the top of the faulting stack, or the end of a traceback."""
    log = failure["log"].splitlines()
    return "\n".join(log[:lines] if is_fault(failure["how"]) else log[-lines:])


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return f"killed by {signal.Signals(number).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


# ---------------------------------------------------------------------------------------------
# One (op, backend): every case, both sides, a child each; re-run a faulting child tensor by tensor
# ---------------------------------------------------------------------------------------------


def _classify(guard: dict) -> tuple[str, str]:
    """(status, detail) of one placed tensor from its access events."""
    touching = [e for e in guard["events"] if e["touched"]]
    counted = [e for e in touching if e["kind"] in COUNTED_KINDS]

    def listing(events):
        by_label: dict[str, list] = {}
        for e in events:
            by_label.setdefault(f"{e['label']} [{e['kind']}]", [])
            if e["phase"] not in by_label[f"{e['label']} [{e['kind']}]"]:
                by_label[f"{e['label']} [{e['kind']}]"].append(e["phase"])
        return "; ".join(f"{label} ({', '.join(phases)})" for label, phases in by_label.items())

    if counted:
        kernel = any(e["kind"] == KERNEL for e in counted)
        others = [e for e in touching if e["kind"] not in COUNTED_KINDS]
        detail = "in place by " + listing(counted) + ("; also touched through " + listing(others) if others else "")
        return ("counted" if kernel else "counted (ATen only)"), detail
    if touching:
        return "not counted", "touched only through " + listing(touching)
    received = sorted({e["label"] for e in guard["events"]})
    if received:
        return "not counted", "edge never touched; received by " + ", ".join(received)
    return "not counted", "never reached an observed op"


def run_pair(op: str, backend: str, jobs: int = 1, verbose: bool = False, only_case: str | None = None) -> dict:
    global _SCRATCH
    import shutil

    _SCRATCH = tempfile.mkdtemp(prefix="guard-pages-")
    try:
        return _run_pair(op, backend, jobs, verbose, only_case)
    finally:
        shutil.rmtree(_SCRATCH, ignore_errors=True)


def _run_pair(op: str, backend: str, jobs: int, verbose: bool, only_case: str | None) -> dict:
    global _PLACE_INTERMEDIATES
    started = time.monotonic()
    torch.set_num_threads(1)
    _PLACE_INTERMEDIATES = backend != "reference"
    name, _, variant = backend.partition("-")
    if variant:  # this process and the children it forks run the C++ kernels' variant
        torch.ops.slsdeep_kernels._set_cpu_variant(variant)
    cases = [c for c in CASES[op](name) if only_case is None or only_case in c.name]
    queue = [(case, side, None) for case in cases for side in SIDES]
    running: dict[int, tuple] = {}
    timed_out: set[int] = set()
    rows, failures, unplaceable, children = [], [], set(), 0
    while queue or running:
        while queue and len(running) < jobs:
            case, side, only = queue.pop(0)
            pid, path = _fork_child(case, side, only)
            running[pid] = (case, side, only, path, time.monotonic())
            children += 1
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for pid_, (case, side, only, path, t0) in list(running.items()):
                if time.monotonic() - t0 > CHILD_TIMEOUT_S and pid_ not in timed_out:
                    timed_out.add(pid_)
                    os.kill(pid_, signal.SIGKILL)
            time.sleep(0.002)
            continue
        if pid not in running:
            continue
        case, side, only, path, _ = running.pop(pid)
        log = _parse_log(path)
        result = log["RESULT"]
        if status == 0 and result is not None:
            unplaceable.update(result["unplaceable"])
            for guard in result["guards"]:
                if guard["role"] == "intermediate" and not any(e["kind"] == KERNEL for e in guard["events"]):
                    continue  # placed all the same; listed only where a library kernel received it
                state, detail = _classify(guard)
                rows.append({"case": case.name, "tensor": guard["name"], "role": guard["role"], "side": side,
                             "status": state, "detail": detail, "shape": guard["shape"], "strides": guard["strides"],
                             "dtype": guard["dtype"], "solo": only is not None})  # fmt: skip
            continue
        phase = log["PASS"][-1] if log["PASS"] else "setup"
        how = f"timed out after {CHILD_TIMEOUT_S:.0f} s" if pid in timed_out else _status_text(status)
        if status == 0 and result is None:
            how = "exited without a result"
        failure = {"case": case.name, "side": side, "tensor": only or "(every tensor of the case)", "pass": phase,
                   "how": how, "log": log["log"]}  # fmt: skip
        failures.append(failure)
        if only is None and os.WIFSIGNALED(status):  # a fault: name the tensor, each placed alone
            for name in log["GUARD"]:
                queue.append((case, side, name))
    combined = "(every tensor of the case)"
    named = {(f["case"], f["side"]) for f in failures if f["tensor"] != combined}
    for f in failures:  # a child that placed every tensor and faulted: named by the re-runs, else kept
        if f["tensor"] == combined and (f["case"], f["side"]) not in named:
            f["note"] = "no tensor faults when placed alone"
    failures = [f for f in failures if f["tensor"] != combined or (f["case"], f["side"]) not in named]
    summary = {
        "op": op, "backend": backend, "cases": [c.name for c in cases], "children": children, "rows": rows,
        "failures": failures, "unplaceable": sorted(unplaceable), "seconds": round(time.monotonic() - started, 2),
    }  # fmt: skip
    _print_pair(summary, verbose)
    return summary


def _print_pair(summary: dict, verbose: bool) -> None:
    rows, failures = summary["rows"], summary["failures"]
    counted = sum(r["status"].startswith("counted") for r in rows)
    print(
        f"== {summary['op']} [{summary['backend']}]: {len(summary['cases'])} cases, {summary['children']} children, "
        f"{len(rows)} placements: {counted} counted, {len(rows) - counted} not counted; "
        f"{len(failures)} FAILED ({summary['seconds']} s)"
    )
    for f in failures:
        print(f"  FAILED {summary['op']} [{summary['backend']}] {f['case']}: {f['tensor']} placed at the {f['side']}: "
              f"{f['how']} during {f['pass']}" + (f" ({f['note']})" if f.get("note") else ""))  # fmt: skip
        print("    " + excerpt(f).replace("\n", "\n    "))
    if verbose:
        for r in rows:
            print(f"  {r['case']} | {r['tensor']} | {r['side']} | {r['status']} | {r['detail']}")
    for u in summary["unplaceable"]:
        print(f"  not placeable: {u}")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", help="OP BACKEND, or OP:BACKEND ...")
    parser.add_argument("--json", help="write every (op, backend) result here")
    parser.add_argument("--jobs", type=int, default=1, help="children at once")
    parser.add_argument("--case", help="only the cases whose name contains this")
    parser.add_argument("--verbose", action="store_true", help="print every placement")
    args = parser.parse_args(argv)
    pairs = args.pairs
    if len(pairs) == 2 and ":" not in pairs[0] + pairs[1]:
        pairs = [f"{pairs[0]}:{pairs[1]}"]
    if any(":" not in p for p in pairs):
        parser.error("give OP BACKEND, or OP:BACKEND pairs")
    pairs = [tuple(p.split(":", 1)) for p in pairs]
    for op, backend in pairs:
        if op not in CASES:
            parser.error(f"unknown op {op!r}; one of {', '.join(CASES)}")
        if ("cpu" if backend.startswith("cpu-") else backend) not in ("reference", "cpu", "triton"):
            parser.error(f"backend {backend!r} does not run on CPU here; one of reference, cpu, cpu-VARIANT, triton")
    torch.set_num_threads(1)
    import slsdeep_kernels  # noqa: F401 - loads the extension before forking

    results, failed = {}, False
    for op, backend in pairs:
        fd, path = tempfile.mkstemp(prefix="guard-pair-", suffix=".json")
        os.close(fd)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # one process per (op, backend)
            code = 1
            try:
                summary = run_pair(op, backend, args.jobs, args.verbose, args.case)
                with open(path, "w") as f:
                    json.dump(summary, f)
                code = 0 if not summary["failures"] else 3
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        try:
            with open(path) as f:
                summary = json.load(f)
        except (OSError, json.JSONDecodeError):
            summary = {"op": op, "backend": backend, "rows": [], "unplaceable": [], "cases": [],
                       "failures": [{"case": "(the process itself)", "side": "-", "tensor": "-", "pass": "-",
                                     "how": _status_text(status), "log": ""}]}  # fmt: skip
        os.unlink(path)
        failed |= bool(summary["failures"])
        results[f"{op}:{backend}"] = summary
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

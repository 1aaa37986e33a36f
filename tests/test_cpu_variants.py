"""The C++ CPU kernels' instruction-set variants (csrc/cpu/variant.h, csrc/cpu/dispatch.h).

* The variant in use, the ones this machine runs, and the test-only override with its errors.
* Every variant computes the same bits (no FMA contraction, fixed-lane reductions), for every CPU
  kernel op; each op is registered as a function that dispatches on the variant.
* Every other CPU op test runs under each variant (``backends_to_test``'s ``cpu-VARIANT`` params).
* No function of ``_C`` outside a variant's namespace uses that variant's instructions: an AVX-512
  (EVEX) instruction anywhere but ``slsdeep::cpu::AVX512`` would kill an AVX2-only CPU with SIGILL,
  and the likely way in is an inline ATen/c10/std function whose out-of-line copy the linker took
  from an AVX-512 translation unit.
"""

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from slsdeep_kernels import backend
from slsdeep_kernels.testing import backends_to_test, cpu_variant_override

pytestmark = pytest.mark.skipif(backend.cpu_extension_error() is not None, reason="the C++ CPU extension is not built")
VARIANTS = ("DEFAULT", "AVX2", "AVX512")
AUTOMATIC = backend.cpu_variant()  # read at collection, outside any override


def test_variant_in_use_is_the_best_this_machine_runs():
    runnable = backend.cpu_variants()
    assert runnable[0] == "DEFAULT" and list(runnable) == [v for v in VARIANTS if v in runnable]
    # ATEN_CPU_CAPABILITY caps the choice as it caps ATen's own kernels.
    aten = torch.backends.cpu.get_cpu_capability()
    cap = VARIANTS.index(aten) if aten in VARIANTS else 0
    assert backend.cpu_variant() == runnable[min(len(runnable) - 1, cap)]


def test_override_selects_nests_and_restores():
    automatic, runnable = backend.cpu_variant(), backend.cpu_variants()
    for variant in runnable:
        with cpu_variant_override(variant):
            assert backend.cpu_variant() == variant
            with cpu_variant_override(runnable[0]):
                assert backend.cpu_variant() == runnable[0]
            assert backend.cpu_variant() == variant  # the outer override again, not the automatic choice
        assert backend.cpu_variant() == automatic


def test_override_rejects_unknown_and_unrunnable_variants():
    with pytest.raises(RuntimeError, match="unknown variant 'SSE'"):
        torch.ops.slsdeep_kernels._set_cpu_variant("SSE")
    beyond = [v for v in VARIANTS if v not in backend.cpu_variants()]
    for variant in beyond:
        with pytest.raises(RuntimeError, match=f"{variant} cannot run here"):
            torch.ops.slsdeep_kernels._set_cpu_variant(variant)
    assert backend.cpu_variant() in backend.cpu_variants()


def test_environment_variable_lowers_the_choice():
    code = "import torch, slsdeep_kernels; print(torch.ops.slsdeep_kernels.cpu_variant())"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "DEFAULT"


@pytest.mark.parametrize("cpu", [p for p in backends_to_test("pyramid") if p.values[0] == "cpu"])
def test_every_cpu_param_runs_under_its_variant(cpu):
    """backends_to_test gives cpu (the automatic variant) and cpu-VARIANT for each other one."""
    assert backend.cpu_variant() == getattr(cpu, "cpu_variant", AUTOMATIC)


def _kernel_calls():
    """Every CPU kernel op on random inputs (odd sizes; fp32, fp64 and bf16), as (name, thunk) pairs."""
    kernels = torch.ops.slsdeep_kernels
    x, branches = torch.randn(2, 5, 13, 11), [torch.randn(2, 3, b, b) for b in (1, 2, 3, 6)]
    taps = [torch.randn(2, 4, k, k, b, b) for k, b in ((3, 2), (1, 3), (3, 6))]
    conv = (torch.randn(2, 8, 9, 10), torch.randn(6, 8, 3, 3), torch.randn(6), torch.rand(6) + 0.5, torch.randn(6))
    geometry = ([1, 1], [2, 2], [2, 2], 1)
    # Rows wider than 2 x 16 lanes + odd, so the vector loops and their tails both run.
    logits, target = 3 * torch.randn(2, 2, 37, 213), (torch.rand(2, 37, 213) < 0.3).to(torch.uint8)
    grad_map = torch.randn(2, 37, 213)

    def train_backward(dtype):
        c = [t.to(dtype) for t in conv]
        out, y, mean, var = kernels.conv_bn_relu_train_kernel(c[0], c[1], c[2], c[3], c[4], *geometry, 1e-5, True)
        return kernels.conv_bn_relu_train_backward_kernel(
            torch.randn_like(out), c[0], c[1], c[2], y, mean, var, c[3], c[4], *geometry, 1e-5, True, [True, True, True]
        )

    calls = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        xd, bd = x.to(dtype), [b.to(dtype) for b in branches]
        c = [t.to(dtype) for t in conv]
        calls += [
            ("pyramid_pool_kernel", lambda xd=xd: kernels.pyramid_pool_kernel(xd, [1, 2, 3, 6])),
            ("pyramid_pool_backward_kernel", lambda xd=xd: kernels.pyramid_pool_backward_kernel(
                torch.randn(2, 5, 50).to(xd.dtype), [1, 2, 3, 6], 13, 11, True)),
            ("upsample_concat_kernel", lambda xd=xd, bd=bd: kernels.upsample_concat_kernel(xd, bd, True, False)),
            ("upsample_concat_kernel", lambda xd=xd, bd=bd: kernels.upsample_concat_kernel(
                xd.contiguous(memory_format=torch.channels_last), bd, False, True)),
            ("upsample_concat_backward_kernel", lambda dtype=dtype: kernels.upsample_concat_backward_kernel(
                torch.randn(2, 17, 13, 11).to(dtype), 5, [3, 1, 1, 3, 2, 2, 3, 3, 3, 3, 6, 6], False)),
            ("pyramid_taps_add_kernel", lambda xd=xd, dtype=dtype: _in_place(
                kernels.pyramid_taps_add_kernel, torch.randn(2, 4, 13, 37).to(dtype), [t.to(dtype) for t in taps], False)),
            ("pyramid_taps_backward_kernel", lambda dtype=dtype: kernels.pyramid_taps_backward_kernel(
                torch.randn(2, 4, 13, 37).to(dtype), [2, 2, 3, 3, 6, 6], 3, True)),
            ("conv_bn_relu_train_kernel", lambda c=c: kernels.conv_bn_relu_train_kernel(*c, *geometry, 1e-5, True)),
            ("conv_bn_relu_train_kernel", lambda c=c: kernels.conv_bn_relu_train_kernel(
                c[0].contiguous(memory_format=torch.channels_last), *c[1:], *geometry, 1e-5, False)),
            ("conv_bn_relu_train_backward_kernel", lambda dtype=dtype: train_backward(dtype)),
            ("conv_bn_relu_eval_kernel", lambda c=c: kernels.conv_bn_relu_eval_kernel(
                c[0], c[1], c[2], c[3], c[4], c[4].float(), c[3].float(), *geometry, 1e-5, True)),
            ("conv_bias_act_kernel", lambda c=c: kernels.conv_bias_act_kernel(
                c[0], c[1], c[2].to(torch.promote_types(c[2].dtype, torch.float32)), *geometry, True)),
            ("nll_epe_loss_kernel", lambda dtype=dtype: kernels.nll_epe_loss_kernel(logits.to(dtype), target, 0.7, 1, True)),
            ("nll_epe_loss_kernel", lambda dtype=dtype: kernels.nll_epe_loss_kernel(
                logits.to(dtype).contiguous(memory_format=torch.channels_last), target, 0.7, 2, False)),
            ("nll_epe_loss_backward_kernel", lambda dtype=dtype: kernels.nll_epe_loss_backward_kernel(
                grad_map.to(dtype), logits.to(dtype), target, 0.7)),
            ("nll_epe_loss_scale_kernel", lambda dtype=dtype: _in_place(
                kernels.nll_epe_loss_scale_kernel, torch.randn(2, 2, 37, 35).to(dtype), torch.tensor(0.3))),
        ]
    return calls


def _in_place(kernel, out, *args):
    kernel(out, *args)
    return out


def _flat(result):
    return [t for t in (result if isinstance(result, (tuple, list)) else [result]) if t.numel()]


def test_calls_cover_every_cpu_kernel():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
                  if name.startswith("slsdeep_kernels::")}  # fmt: skip
    assert {name for name, _ in _kernel_calls()} == registered


@pytest.mark.skipif(len(backend.cpu_variants()) < 2, reason="this machine runs one variant only")
def test_every_variant_computes_the_same_bits():
    """No FMA contraction and fixed-lane reductions: the variant never changes what the library's
    kernels compute (the ATen convolutions inside conv_bn_relu are the same code here either way)."""
    for name, call in _kernel_calls():
        results = {}
        for variant in backend.cpu_variants():
            torch.manual_seed(0)
            with cpu_variant_override(variant):
                results[variant] = _flat(call())
        first = results["DEFAULT"]
        for variant, outputs in results.items():
            assert all(torch.equal(a, b) for a, b in zip(first, outputs, strict=True)), f"{name}: {variant} != DEFAULT"


# ---------------------------------------------------------------- the disassembly

LEGACY_PREFIXES = {"66", "67", "f2", "f3", "2e", "36", "3e", "26", "64", "65", "f0"}


def _instruction_encodings(library: str) -> dict[str, set[str]]:
    """Per function of ``library`` (demangled name), the encodings it uses beyond legacy SSE,
    ``"VEX"`` (first opcode byte C4/C5: AVX, AVX2, FMA) and ``"EVEX"`` (62: AVX-512), and the
    vector registers wider than SSE's it names (``"ymm"``, ``"zmm"``)."""
    text = subprocess.run(
        ["objdump", "-d", "--insn-width=15", "-C", "--no-addresses", library], capture_output=True, text=True, check=True
    ).stdout
    encodings: dict[str, set[str]] = {}
    function = None
    for line in text.splitlines():
        header = re.match(r"^<(.*)>:$", line)
        if header:
            function = header[1]
            encodings.setdefault(function, set())
            continue
        fields = line.split("\t")
        if function is None or len(fields) < 2:
            continue
        opcode = next((b for b in fields[1].split() if b not in LEGACY_PREFIXES), None)
        if opcode == "62":
            encodings[function].add("EVEX")
        elif opcode in ("c4", "c5"):
            encodings[function].add("VEX")
        encodings[function].update(r for r in ("ymm", "zmm") if f"%{r}" in fields[-1])
    return encodings


def _own_name(function: str) -> str:
    """A demangled name without its template arguments and parameter lists: the namespace a function
    is in, not the ones its arguments name (``Dispatch<&AVX512::f, ...>::call`` is baseline code)."""
    name = re.sub(r" \[clone [^\]]*\]", "", function)
    name = re.sub(r"operator(<<|>>|<=|>=|->|<|>|\(\))", "operator", name)
    for group in (r"<[^<>]*>", r"\((?!\*)[^()]*\)"):  # parameter lists; "(*f)" of a function pointer stays
        while re.search(group, name):
            name = re.sub(group, "", name)
    name = re.sub(r"\(\*([^()]*)\)", r"\1", name)  # a function returning a function pointer: void (*f)(...)
    return re.sub(r" const\b", "", name).split(" ")[-1]  # the qualified name, after any return type


def test_own_name_drops_template_arguments_and_parameters():
    dispatch = "slsdeep::cpu::Dispatch<&slsdeep::cpu::DEFAULT::f, &slsdeep::cpu::AVX512::f>::call(at::Tensor const&)"
    assert _own_name(dispatch) == "slsdeep::cpu::Dispatch::call"
    lambda_ = "slsdeep::cpu::AVX2::(anonymous namespace)::run<float>(P<float> const&)::{lambda(long, long)#1}::operator()(long, long) const"
    assert _own_name(lambda_).startswith("slsdeep::cpu::AVX2::")
    returning = "std::vector<T<float>, A> slsdeep::cpu::AVX512::(anonymous namespace)::taps<float>(long) [clone .isra.0]"
    assert _own_name(returning) == "slsdeep::cpu::AVX512::::taps"
    baseline = "void at::parallel_for<slsdeep::cpu::AVX512::(anonymous namespace)::f(long)::{lambda(long, long)#1}>(long, long)"
    assert _own_name(baseline) == "at::parallel_for"
    pointer = "void (*slsdeep::cpu::AVX2::(anonymous namespace)::reader<float>(c10::ScalarType))(char const*, long) [clone .cold]"
    assert _own_name(pointer) == "slsdeep::cpu::AVX2::::reader"
    member = "void std::vector<slsdeep::cpu::AVX512::X>::_M_insert<X const&>(std::iter<X*>, slsdeep::cpu::AVX512::X const&)"
    assert _own_name(member) == "std::vector::_M_insert"
    nested = "slsdeep::cpu::AVX512::k(at::Tensor const&)::{lambda()#1}::operator()() const::{lambda()#2}::operator()() const"
    assert _own_name(nested) == "slsdeep::cpu::AVX512::k::{lambda#1}::operator::{lambda#2}::operator"


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None, reason="needs x86-64 and objdump")
def test_no_function_uses_instructions_beyond_its_variant():
    library = importlib.util.find_spec("slsdeep_kernels._C").origin
    encodings = _instruction_encodings(library)
    own = {f: _own_name(f) for f in encodings}
    outside = {
        "EVEX": sorted(f for f, e in encodings.items() if "EVEX" in e and not own[f].startswith("slsdeep::cpu::AVX512::")),
        "VEX": sorted(
            f for f, e in encodings.items() if "VEX" in e and not re.match(r"slsdeep::cpu::(AVX2|AVX512)::", own[f])
        ),
    }
    assert not outside["EVEX"], f"AVX-512 instructions outside the AVX512 variant: {outside['EVEX'][:10]}"
    assert not outside["VEX"], f"AVX instructions outside the AVX2/AVX512 variants: {outside['VEX'][:10]}"
    # Every CPU kernel op has its dispatching function (what csrc/cpu/<op>.cpp registers).
    for name in {n.split("::")[1] for n in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
                 if n.startswith("slsdeep_kernels::")}:  # fmt: skip
        assert any(f.startswith(f"slsdeep::cpu::Dispatch<&slsdeep::cpu::DEFAULT::{name},") for f in encodings), name
    if not any(name.startswith("slsdeep::cpu::AVX2::") for name in own.values()):
        pytest.skip("this build has the DEFAULT variant only (variants need GCC on x86-64)")
    # And each variant was compiled for its instructions and vectors: a hot loop of every op file uses
    # them. AVX512 runs 256-bit vectors except where an op's wrapper asks for 512 (cpu/variant.h).
    hot_loops = {"upsample_concat_planes<": "ymm", "channel_moments<": "ymm", "::run<": "zmm"}  # pyramid, BN, loss
    for loop, avx512_register in hot_loops.items():
        for variant, needed in (("AVX2", {"VEX", "ymm"}), ("AVX512", {"EVEX", avx512_register})):
            used = set().union(*(e for f, e in encodings.items() if f"slsdeep::cpu::{variant}::" in f and loop in f))
            assert needed <= used, f"{variant} {loop}: uses {sorted(used)}, not {sorted(needed)} (built and vectorised?)"

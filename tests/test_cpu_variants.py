"""The C++ CPU kernels' instruction-set variants (csrc/cpu/variant.h, csrc/cpu/dispatch.h).

* The variant in use, the ones this machine runs, and the test-only override with its errors.
* The override reaches the kernels: DEFAULT and the best variant compute different last bits.
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
from slsdeep_kernels.testing import TOLERANCE, backends_to_test, cpu_variant_override, relative_error

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


def test_override_selects_and_restores():
    automatic = backend.cpu_variant()
    for variant in backend.cpu_variants():
        with cpu_variant_override(variant):
            assert backend.cpu_variant() == variant
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


@pytest.mark.skipif(len(backend.cpu_variants()) < 2, reason="this machine runs one variant only")
def test_variants_run_their_own_code():
    """BN's y·scale + shift contracts to an FMA in the AVX2/AVX512 variants and not in DEFAULT: the
    last bits differ, so the override reaches the kernels; both stay within fp32's tolerance."""
    x, weight = torch.randn(2, 8, 9, 10, dtype=torch.float64), torch.randn(6, 8, 3, 3, dtype=torch.float64)
    gamma, beta = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    args = ([1, 1], [1, 1], [1, 1], 1, 1e-5, True)
    exact = torch.ops.slsdeep_kernels.conv_bn_relu_train_kernel(x, weight, None, gamma, beta, *args)[0]
    outputs = {}
    for variant in (backend.cpu_variants()[0], backend.cpu_variants()[-1]):
        with cpu_variant_override(variant):
            outputs[variant] = torch.ops.slsdeep_kernels.conv_bn_relu_train_kernel(
                x.float(), weight.float(), None, gamma.float(), beta.float(), *args
            )[0]
        assert relative_error(outputs[variant], exact) < TOLERANCE[torch.float32]
    first, last = outputs.values()
    assert not torch.equal(first, last)


# ---------------------------------------------------------------- the disassembly

LEGACY_PREFIXES = {"66", "67", "f2", "f3", "2e", "36", "3e", "26", "64", "65", "f0"}


def _instruction_encodings(library: str) -> dict[str, set[str]]:
    """Per function of ``library`` (demangled name), the encodings it uses beyond legacy SSE:
    ``"VEX"`` (first opcode byte C4/C5: AVX, AVX2, FMA) and ``"EVEX"`` (62: AVX-512)."""
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
    return encodings


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None, reason="needs x86-64 and objdump")
def test_no_function_uses_instructions_beyond_its_variant():
    library = importlib.util.find_spec("slsdeep_kernels._C").origin
    encodings = _instruction_encodings(library)
    outside = {
        "EVEX": sorted(f for f, e in encodings.items() if "EVEX" in e and "slsdeep::cpu::AVX512::" not in f),
        "VEX": sorted(
            f for f, e in encodings.items() if "VEX" in e and not re.search(r"slsdeep::cpu::(AVX2|AVX512)::", f)
        ),
    }
    assert not outside["EVEX"], f"AVX-512 instructions outside the AVX512 variant: {outside['EVEX'][:10]}"
    assert not outside["VEX"], f"AVX instructions outside the AVX2/AVX512 variants: {outside['VEX'][:10]}"
    # And each variant was compiled for its instructions: a hot loop of every op file uses them.
    hot_loops = ("upsample_concat_planes<", "channel_moments<", "::run<")  # pyramid, conv_bn_relu, nll_epe_loss
    for variant, encoding in (("AVX2", "VEX"), ("AVX512", "EVEX")):
        for loop in hot_loops:
            used = set().union(*(e for f, e in encodings.items() if f"slsdeep::cpu::{variant}::" in f and loop in f))
            assert encoding in used, f"{variant} {loop}: no {encoding} instruction (is the variant built?)"

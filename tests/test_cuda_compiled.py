"""The CUDA kernels as compiled, without a GPU (issue 12's compile-level gate): each csrc/cuda/*.cu
compiles alone for sm_90 (nvcc -c: host and device code, torch-free, only -Icsrc) and no kernel
spills; the kernels rewritten to the roofline design (the BatchNorm passes of conv_bn_relu.cu; the
pool passes, the upsample forward, the taps forward and the taps backward, which is also the
upsample backward, of pyramid.cu; the loss's tile kernel and its in-place scale) move their data in
16-byte accesses in their hot loops (ld/st.global.v4 in the PTX, LDG/STG.E.128 in the SASS) with no
64-bit division in the kernel. The analysis is slsdeep_kernels.compile_check.analyse_cuda (nvcc with
ptxas -v, then cuobjdump)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from slsdeep_kernels import compile_check as cc

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
TOOLS = cc.cuda_tools()
# .ci/run sets this: there a missing tool fails the gate instead of skipping it
REQUIRED = os.environ.get("SLSDEEP_KERNELS_REQUIRE_CUDA_TOOLS") == "1"
MISSING = sorted({"nvcc"} - set(TOOLS)) + ([] if shutil.which("c++filt") else ["c++filt"])
needs_tools = pytest.mark.skipif(bool(MISSING) and not REQUIRED, reason=f"needs {', '.join(MISSING)} (CUDA_HOME or PATH)")
needs_cuobjdump = pytest.mark.skipif("cuobjdump" not in TOOLS and not REQUIRED,
                                     reason="needs a cuobjdump (the CUDA toolkit's or the triton wheel's)")  # fmt: skip

# The BatchNorm passes: every element type at its 16-byte width (16 / sizeof) in both layouts.
WIDE = {"float": 4, "__half": 8, "__nv_bfloat16": 8}
ROOFLINE_KERNELS = [
    f"{family}<{dtype}, {width}>"
    for family in ("planes_stats_kernel", "rows_stats_kernel", "planes_backward_sums_kernel", "rows_backward_sums_kernel")
    for dtype, width in WIDE.items()
] + [
    f"{layout}_elementwise_kernel<{width}, {op}<{dtype}, {width}, {'true' if layout == 'planes' else 'false'}> >"
    for layout in ("planes", "rows")
    for op in ("BnAct", "BackwardApply")
    for dtype, width in WIDE.items()
]


# The pool passes' big kernels (segment sums of x, the fill of grad_x) at their 16-byte width, both
# layouts; and the small ones, which must not divide in 64 bits either.
POOL_KERNELS = [
    f"{family}<{dtype}, {width}, {layout}>"
    for family in ("pool_segment_sums_kernel", "pool_fill_kernel")
    for dtype, width in WIDE.items()
    for layout in ("true", "false")
]
# The upsample forward (the branch's channels of the concatenation): NHWC threads walk a run of
# columns (a loop of 16-byte loads and stores); NCHW threads store one 16-byte pack of columns.
UPSAMPLE_NHWC = [f"upsample_branch_kernel<{dtype}, {width}, true>" for dtype, width in WIDE.items()]
UPSAMPLE_NCHW = [f"upsample_branch_kernel<{dtype}, {width}, false>" for dtype, width in WIDE.items()]
POOL_SMALL_KERNELS = [f"{family}<{dtype}>" for family in ("pool_cells_kernel", "pool_segment_grads_kernel") for dtype in WIDE]
# The pyramid conv's taps forward: NHWC blocks read z in 16-byte channel packs in their innermost
# loops (the kx-sums); both layouts read and write the output in 16-byte packs. Width 1 (unaligned or
# odd-sized tensors) runs the same code an element at a time, without 64-bit division either.
TAPS_NHWC = [f"taps_add_kernel<{dtype}, {width}, true>" for dtype, width in WIDE.items()]
TAPS_NCHW = [f"taps_add_kernel<{dtype}, {width}, false>" for dtype, width in WIDE.items()]
TAPS_NARROW = [f"taps_add_kernel<{dtype}, 1, {layout}>" for dtype in WIDE for layout in ("true", "false")]
# The taps backward (and, as its k = 1 case, the upsample backward): every read of grad is a 16-byte
# pack in both layouts (its only global loads); every form writes grad_z in 16-byte packs, directly
# (NHWC lanes) or from the shared-memory stage (the upsample's NCHW grad_z, NCHW grad); the strips'
# second pass and the width-1 forms must not divide in 64 bits either.
ADJOINT_WIDE = [f"taps_backward_kernel<{dtype}, {width}, {layout}>" for dtype, width in WIDE.items() for layout in ("true", "false")]
ADJOINT_OTHERS = [f"taps_backward_kernel<{dtype}, 1, {layout}>" for dtype in WIDE for layout in ("true", "false")] + [
    f"taps_backward_strips_kernel<{dtype}>" for dtype in WIDE
]

# The loss: the packed tile kernels (channel planes, or channels_last C = 2) read and write only
# 16-byte packs, but for the tile's one fp32 partial sum; the element-wise fallback must not divide
# in 64 bits either. The in-place scale of the saved gradient streams 16-byte packs.
LOSS_PACKED = [f"tile_kernel<{dtype}, true, {layout}>" for dtype in WIDE for layout in ("false", "true")]
LOSS_ELEMENTS = [f"tile_kernel<{dtype}, false, false>" for dtype in WIDE]
LOSS_SCALE_WIDE = [f"scale_kernel<{dtype}, {width}>" for dtype, width in WIDE.items()]
LOSS_SCALE_NARROW = [f"scale_kernel<{dtype}, 1>" for dtype in WIDE]


def short_name(demangled: str) -> str:
    """'rows_stats_kernel<float, 4>' from the demangled signature."""
    name = re.sub(r"\(anonymous namespace\)::|^void ", "", demangled)
    name = name[: name.index("(")] if "(" in name else name
    return re.sub(r"\bslsdeep::\w+::", "", name)


@pytest.fixture(scope="module")
def compiled():
    return {source.name: {short_name(k): v for k, v in cc.analyse_cuda(str(source), 90, str(REPO / "csrc"), TOOLS).items()}
            for source in SOURCES}


@needs_tools
def test_every_kernel_compiles_alone_for_sm90_without_spills(compiled):
    assert not MISSING, f"missing tools: {MISSING}"
    assert set(compiled) == {"conv_bn_relu.cu", "nll_epe_loss.cu", "pyramid.cu"}
    for source, kernels in compiled.items():
        assert kernels, f"{source}: no entry function found"
        for name, record in kernels.items():
            spills = {k: record[k] for k in ("stack_frame", "spill_stores", "spill_loads")}
            assert not any(spills.values()), f"{source} {name}: {spills}"


def check_16_byte_hot_loops(kernels: dict, names: list[str], reads: bool, writes: bool) -> None:
    """Every kernel of `names` loads (if reads) and stores (if writes) in its innermost loops, only
    16-byte packs there, and (where a cuobjdump read the SASS) ptxas kept 16-byte instructions."""
    missing = [name for name in names if name not in kernels]
    assert not missing, f"kernels not found (renamed? update the lists): {missing}\nfound: {sorted(kernels)}"
    for name in names:
        record = kernels[name]
        loop, sass = record["global_memory"]["loop"], record["sass"]
        assert set(loop["ld"]) <= {"16"} and set(loop["st"]) <= {"16"}, f"{name}: innermost loops {loop}"
        if reads:
            assert loop["ld"], f"{name}: no load in the innermost loops"
            assert sass is None or sass["LDG"].get("16"), f"{name}: ptxas kept no 16-byte load (LDG {sass['LDG']})"
        if writes:
            assert loop["st"], f"{name}: no store in the innermost loops"
            assert sass is None or set(sass["STG"]) == {"16"}, f"{name}: stores by width {sass['STG']}"


@needs_tools
@needs_cuobjdump
def test_the_sass_of_every_kernel_is_read(compiled):
    # the SASS half of the checks above runs wherever a cuobjdump is found (CI: the triton wheel's)
    for source, kernels in compiled.items():
        unread = [name for name, record in kernels.items() if record["sass"] is None or not record["sass"]["LDG"]]
        assert not unread, f"{source}: no SASS (or no global load in it) for {unread}"


@needs_tools
def test_batchnorm_passes_move_16_bytes_per_access_in_their_hot_loops(compiled):
    kernels = compiled["conv_bn_relu.cu"]
    check_16_byte_hot_loops(kernels, [n for n in ROOFLINE_KERNELS if "elementwise" not in n], reads=True, writes=False)
    check_16_byte_hot_loops(kernels, [n for n in ROOFLINE_KERNELS if "elementwise" in n], reads=True, writes=True)


@needs_tools
def test_pool_passes_move_16_bytes_per_access_in_their_hot_loops(compiled):
    kernels = compiled["pyramid.cu"]
    check_16_byte_hot_loops(kernels, [n for n in POOL_KERNELS if "sums" in n], reads=True, writes=False)
    check_16_byte_hot_loops(kernels, [n for n in POOL_KERNELS if "fill" in n], reads=False, writes=True)


@needs_tools
def test_upsample_forward_writes_16_byte_packs(compiled):
    kernels = compiled["pyramid.cu"]
    check_16_byte_hot_loops(kernels, UPSAMPLE_NHWC, reads=True, writes=True)
    for name in UPSAMPLE_NCHW:
        assert name in kernels, f"{name} not found in pyramid.cu: {sorted(kernels)}"
        sass = kernels[name]["sass"]
        assert sass is None or set(sass["STG"]) == {"16"}, f"{name}: stores by width {sass['STG']}"


@needs_tools
def test_taps_forward_moves_16_byte_packs(compiled):
    kernels = compiled["pyramid.cu"]
    check_16_byte_hot_loops(kernels, TAPS_NHWC, reads=True, writes=False)
    for name in TAPS_NHWC + TAPS_NCHW:
        assert name in kernels, f"{name} not found in pyramid.cu: {sorted(kernels)}"
        sass = kernels[name]["sass"]
        assert sass is None or (set(sass["STG"]) == {"16"} and sass["LDG"].get("16")), f"{name}: SASS {sass}"


@needs_tools
def test_taps_backward_moves_16_byte_packs(compiled):
    kernels = compiled["pyramid.cu"]
    missing = [name for name in ADJOINT_WIDE + ADJOINT_OTHERS if name not in kernels]
    assert not missing, f"kernels not found (renamed? update the lists): {missing}\nfound: {sorted(kernels)}"
    for name in ADJOINT_WIDE:
        loads, sass = kernels[name]["global_memory"]["all"]["ld"], kernels[name]["sass"]
        assert set(loads) == {"16"}, f"{name}: loads by width {loads}"
        assert sass is None or set(sass["LDG"]) == {"16"}, f"{name}: SASS loads by width {sass['LDG']}"
    for name in [n for n in ADJOINT_WIDE + ADJOINT_OTHERS if n.startswith("taps_backward_kernel<")]:
        stores, sass = kernels[name]["global_memory"]["all"]["st"], kernels[name]["sass"]
        assert "16" in stores and (sass is None or "16" in sass["STG"]), f"{name}: stores by width {stores}"


@needs_tools
def test_loss_tile_kernels_move_16_byte_packs(compiled):
    kernels = compiled["nll_epe_loss.cu"]
    missing = [name for name in LOSS_PACKED + LOSS_ELEMENTS + LOSS_SCALE_WIDE + LOSS_SCALE_NARROW if name not in kernels]
    assert not missing, f"kernels not found (renamed? update the lists): {missing}\nfound: {sorted(kernels)}"
    for name in LOSS_PACKED:
        memory, sass = kernels[name]["global_memory"]["all"], kernels[name]["sass"]
        assert set(memory["ld"]) == {"16"}, f"{name}: loads by width {memory['ld']}"
        assert memory["st"].get("16") and memory["st"].get("4") == 1 and set(memory["st"]) == {"16", "4"}, (
            f"{name}: stores by width {memory['st']} (16-byte packs and the one fp32 partial)")
        assert sass is None or (set(sass["LDG"]) == {"16"} and sass["STG"].get("4", 0) <= 1), f"{name}: SASS {sass}"
    check_16_byte_hot_loops(kernels, LOSS_SCALE_WIDE, reads=True, writes=True)


@needs_tools
def test_rewritten_kernels_have_no_64bit_division(compiled):
    for name, record in compiled["conv_bn_relu.cu"].items():
        assert record["int64_division"]["loop"] == 0, f"{name}: {record['int64_division']}"
        if name in ROOFLINE_KERNELS:
            assert record["int64_division"]["all"] == 0, f"{name}: {record['int64_division']}"
    pool = compiled["pyramid.cu"]
    for name in POOL_KERNELS + POOL_SMALL_KERNELS + UPSAMPLE_NHWC + UPSAMPLE_NCHW + TAPS_NHWC + TAPS_NCHW + TAPS_NARROW + ADJOINT_WIDE + ADJOINT_OTHERS:
        assert name in pool, f"{name} not found in pyramid.cu: {sorted(pool)}"
        assert pool[name]["int64_division"]["all"] == 0, f"{name}: {pool[name]['int64_division']}"
    loss = compiled["nll_epe_loss.cu"]
    for name in LOSS_PACKED + LOSS_ELEMENTS + LOSS_SCALE_WIDE + LOSS_SCALE_NARROW:
        assert loss[name]["int64_division"]["all"] == 0, f"{name}: {loss[name]['int64_division']}"


# ------------------------------------------------------------------ the taps backward's plans, on the host

# make_adjoint_plan's choices at the decoder's shape (bf16, (16, 512, 48, 48), bins 1, 2, 3, 6), read
# by a host program that includes pyramid.cu: how (2) writes each branch's grad_z (0 direct, 1 one
# run, 2 packs of channels), the stage's floats and the block's shared bytes, for the layouts the
# bindings make (taps: (N, h, w, k, k, C) storage; the upsample's branches NCHW) and the device limits
# (48 KB without opt-in; 227 KB, Hopper's opt-in).
PLAN_PROBE = r"""
#include "cuda/pyramid.cu"
#include <cstdio>
using namespace slsdeep;
using namespace slsdeep::pyramid_cuda;
alignas(16) static char buffer[16];
int main() {
  const int64_t N = 16, C = 512, H = 48, W = 48, bins[4] = {1, 2, 3, 6};
  for (int channels_last = 0; channels_last < 2; ++channels_last)
    for (int k : {1, 3})
      for (int taps_storage = 0; taps_storage < 2; ++taps_storage)
        for (int limit : {48 * 1024, 227 * 1024}) {
          TapGradient grads[4];
          for (int b = 0; b < 4; ++b) {
            const int64_t h = bins[b], e = k * k * h * h;
            const TapStrides nchw = {C * e, e, k * h * h, h * h, h, 1}, taps = {e * C, 1, k * C, C, h * k * k * C, k * k * C};
            grads[b] = {buffer, k, h, h, taps_storage ? taps : nchw};
          }
          AdjointPlan p;
          const bool ok = make_adjoint_plan(grads, 4, 0, N, C, H, W, channels_last, 8, 8, false, limit / 4, &p);
          printf("%s k%d %s %dKB: %d %d %d %d %d %d stage %d bytes %d\n", channels_last ? "nhwc" : "nchw", k,
                 taps_storage ? "taps" : "contiguous", limit / 1024, ok, p.column_strips, p.branch[0].store,
                 p.branch[1].store, p.branch[2].store, p.branch[3].store, p.stage_floats, p.shared_bytes());
        }
}
"""


@pytest.fixture(scope="module")
def adjoint_plans(tmp_path_factory):
    """{'nchw k3 taps 227KB': (planned, column strips, (store of each branch), stage floats, shared bytes)}."""
    work = tmp_path_factory.mktemp("plans")
    (work / "probe.cu").write_text(PLAN_PROBE)
    build = [TOOLS["nvcc"], "-std=c++17", "-arch=sm_90", f"-I{REPO / 'csrc'}", *cc.CUDA_BUILD_FLAGS,
             str(work / "probe.cu"), "-o", str(work / "probe")]  # fmt: skip
    done = subprocess.run(build, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = subprocess.run([str(work / "probe")], capture_output=True, text=True, check=True).stdout
    plans = {}
    for line in printed.splitlines():
        case, fields = line.split(": ")
        v = [int(f) for f in fields.replace("stage ", "").replace("bytes ", "").split()]
        plans[case] = (bool(v[0]), v[1], tuple(v[2:6]), v[6], v[7])
    assert len(plans) == 16, printed
    return plans


@needs_tools
def test_taps_backward_plans_write_16_byte_packs_at_the_models_shape(adjoint_plans):
    direct, run, channels = 0, 1, 2
    for case, (planned, strips, stores, stage, shared) in adjoint_plans.items():
        limit = int(case.split()[-1][:-2]) * 1024
        assert planned and shared <= limit and (strips == 1 or limit == 48 * 1024), (case, adjoint_plans[case])
        assert (stage > 0) == any(store != direct for store in stores), (case, adjoint_plans[case])
    stores = {case: plan[2] for case, plan in adjoint_plans.items() if case.endswith("227KB")}
    # NHWC grad, channels-innermost grad_z: the lanes' channel packs, straight to grad_z
    assert stores["nhwc k3 taps 227KB"] == stores["nhwc k1 taps 227KB"] == (direct,) * 4
    # NCHW grad: staged, as packs of channels (the taps' storage) or runs (NCHW grad_z: the upsample's
    # branches; bin 1's grad_z is both, its sizes 1)
    assert stores["nchw k3 taps 227KB"] == (channels,) * 4
    assert stores["nchw k1 taps 227KB"] == (run, channels, channels, channels)
    assert stores["nchw k1 contiguous 227KB"] == stores["nchw k3 contiguous 227KB"] == (run,) * 4
    # NHWC grad into NCHW grad_z: runs, but bin 1's channels, a pack
    assert stores["nhwc k1 contiguous 227KB"] == (direct, run, run, run)


# ------------------------------------------------------------------ the parsers, on known text

PTX = """\
.entry _Z1kPf(
\t.param .u64 _Z1kPf_param_0
)
{
\tdiv.s64 \t%rd1, %rd2, %rd3;
$L__BB0_1:
\tld.global.cg.v4.u32 \t{%r1, %r2, %r3, %r4}, [%rd4];
\trem.u64 \t%rd5, %rd6, %rd7;
\tst.global.f32 \t[%rd8], %f1;
\t@%p1 bra \t$L__BB0_1;
\tret;
}
"""

SASS = """\
\t\tFunction : _Z1kPf
        /*0070*/                   LDG.E.128.STRONG.GPU R4, desc[UR4][R2.64] ;
        /*0080*/                   LDG.E R9, desc[UR4][R6.64] ;
        /*0090*/                   STG.E.64 desc[UR4][R2.64], R4 ;
\t\tFunction : _Z1gv
        /*0010*/                   STG.E.U16 desc[UR4][R2.64], R4 ;
"""


def test_ptx_entries_and_loop_scoped_64bit_division_are_found():
    entries = cc._ptx_entries(PTX)
    assert list(entries) == ["_Z1kPf"]
    lines = entries["_Z1kPf"].splitlines()
    loops = cc._innermost_loops(lines)
    assert len(loops) == 1
    assert sum(bool(cc._INT64_DIVISION.search(lines[i])) for a, b in loops for i in range(a, b + 1)) == 1
    assert len(cc._INT64_DIVISION.findall(entries["_Z1kPf"])) == 2
    memory = cc.analyse_ptx(entries["_Z1kPf"])["global_memory"]
    assert memory["loop"]["ld"] == {"16": 1} and memory["loop"]["st"] == {"4": 1}


def test_sass_accesses_are_counted_by_width():
    functions = cc._sass_functions(SASS)
    assert functions["_Z1kPf"] == {"LDG": {"16": 1, "4": 1}, "STG": {"8": 1}}
    assert functions["_Z1gv"] == {"LDG": {}, "STG": {"2": 1}}

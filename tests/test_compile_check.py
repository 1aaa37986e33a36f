"""The ahead-of-time compile check (slsdeep_kernels.compile_check): its parsers and rules here, and its
capture, Triton's specialisation and the cache keys in one clean subprocess (the suite runs under
TRITON_INTERPRET=1, where the kernels are not JIT functions and the launch decisions are the
interpreter's). The full check is .ci/compile_check."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from slsdeep_kernels import compile_check as cc  # noqa: E402
from slsdeep_kernels.ops import conv_bn_relu_triton as conv_op  # noqa: E402
from slsdeep_kernels.ops.conv_bn_relu import ConvBNOptions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ parsers (in-process)

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_helper_kernel' for 'sm_90a'
ptxas info    : Function properties for _helper_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 384 bytes cmem[0]
ptxas info    : Compiling entry function '_reduce_kernel' for 'sm_90a'
ptxas info    : Function properties for _reduce_kernel
    5232 bytes stack frame, 8636 bytes spill stores, 11612 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 16 bytes smem, 5232 bytes cumulative stack size
ptxas info    : Compile time = 786.045 ms
"""


def test_ptxas_log_parser_reads_the_named_entry_function():
    assert cc.parse_ptxas_log(PTXAS_LOG, "_reduce_kernel") == {
        "registers": 32, "stack_frame": 5232, "spill_stores": 8636, "spill_loads": 11612, "ptxas_smem": 16, "barriers": 1,
    }  # fmt: skip
    assert cc.parse_ptxas_log(PTXAS_LOG)["registers"] == 40  # the first entry by default
    assert cc.parse_ptxas_log("no log here") is None


PTX = """\
.visible .entry k(
	.param .u64 k_param_0
)
{
	ld.global.b32 	%r1, [%rd1];
	@%p1 st.global.v2.b32 [ %rd2 + 0 ], { %r2, %r3 };
$L__BB0_1:
	@%p2 ld.global.v4.b32 { %r4, %r5, %r6, %r7 }, [ %rd3 + 0 ];
	rem.s64 	%rd12, %rd13, %rd14;
	@!%p3 ld.global.L1::evict_last.v4.b32 { %r8, %r9, %r10, %r11 }, [ %rd4 + 0 ];
	cp.async.cg.shared.global [ %r12 + 0 ], [ %rd5 + 0 ], 0x10, %r13;
	cp.async.ca.shared.global [ %r14 + 0 ], [ %rd6 + 0 ], 4, %r15;
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f1, %f2, %f3, %f4 }, { %r1, %r2, %r3, %r4 }, { %r5, %r6 }, { %f1, %f2, %f3, %f4 };
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd7, %rd8, 1, 1, 1, 0, 1;
	@%p4 bra $L__BB0_1;
	ld.global.b16 	%rs1, [%rd9];
	div.u64 	%rd15, %rd16, %rd17;
	div.s32 	%r20, %r21, %r22;
	red.global.add.f32 	[%rd10], %f5;
	st.global.v4.b32 [ %rd11 + 0 ], { %r16, %r17, %r18, %r19 };
	ret;
}
"""


def test_ptx_analysis_counts_access_widths_in_the_kernel_and_its_loop():
    out = cc.analyse_ptx(PTX)
    everywhere, loop = out["global_memory"]["all"], out["global_memory"]["loop"]
    assert everywhere["ld"] == {"2": 1, "4": 1, "16": 2} and everywhere["st"] == {"8": 1, "16": 1}
    assert everywhere["cp_async"] == {"4": 1, "16": 1} and everywhere["atomic"] == 1
    assert loop["ld"] == {"16": 2} and loop["st"] == {} and loop["cp_async"] == {"4": 1, "16": 1}
    assert loop["max_load_bytes"] == 16 and everywhere["max_store_bytes"] == 16 and out["global_memory"]["loops"] == 1
    assert out["tensor_cores"] == {"mma": 1, "wgmma": 1, "ldmatrix": 0}
    assert out["int64_division"] == {"all": 2, "loop": 1}  # 32-bit division is not counted


# ------------------------------------------------------------------ rules and staleness (in-process)


def _record(**change):
    record = {
        "arch": 90, "kernel": "_k", "op": "pyramid", "id": "sm90/_k/abc", "dtypes": ["float32"],
        "layouts": ["nchw"], "flags": ["tests"], "config": {"meta": {"BLOCK_K": 128}, "num_warps": 4, "num_stages": 3},
        "registers": 128, "shared": 1024, "spill_stores": 0, "spill_loads": 0, "sources": ["model: x"],
    }  # fmt: skip
    record.update(change)
    record["problems"] = cc.problems(record, cc.SHARED_LIMITS)
    record["status"] = "fail" if record["problems"] else "ok"
    return record


def test_failures_spill_or_shared_above_the_limit():
    assert _record()["status"] == "ok"
    spill = _record(spill_stores=88, spill_loads=88)
    assert spill["status"] == "fail" and "spills 88 B stores / 88 B loads" in spill["problems"][0]
    assert _record(spill_loads=4)["status"] == "fail"
    over = _record(shared=245_760)
    assert over["status"] == "fail" and "shared memory 245,760 B > sm_90 limit 232,448 B" in over["problems"][0]
    assert _record(shared=196_608, arch=80, id="sm80/_k/abc")["status"] == "fail"  # 166,912 B on an A100
    assert _record(shared=196_608)["status"] == "ok"
    assert _record(error="PTXASError: boom")["status"] == "fail"
    (line,) = cc.failure_lines([spill, _record()])
    assert line.startswith("FAIL sm90/_k/abc [pyramid; float32; nchw; tests; BLOCK_K=128 num_warps=4 num_stages=3]: spills")


def test_staleness_comparison_names_what_changed():
    table = {"format": cc.FORMAT, "triton": "3.8.0", "variants": [_record(), _record(id="sm90/_k/def"), _record(arch=80, id="sm80/_k/x")]}
    assert cc.compare_tables(table, json.loads(json.dumps(table))) == []
    fresh = json.loads(json.dumps(table))
    fresh["variants"][0]["registers"] = 130
    fresh["variants"][1]["id"] = "sm90/_k/new"
    fresh["variants"][2]["registers"] = 1  # another arch: not compared
    problems = cc.compare_tables(table, fresh)
    assert problems == ["1 variants added (e.g. sm90/_k/new)", "1 removed (e.g. sm90/_k/def)",
                        "1 changed (e.g. sm90/_k/abc: registers 128 -> 130)"]  # fmt: skip
    assert cc.compare_tables({**table, "triton": "3.6.0"}, table)[0] == "triton 3.6.0 != 3.8.0"


def test_table_file_has_one_variant_per_line(tmp_path):
    table = {"format": cc.FORMAT, "triton": "3.8.0", "variants": [_record(), _record(id="sm90/_k/def")]}
    cc.write_table(table, tmp_path / "t.json")
    text = (tmp_path / "t.json").read_text()
    assert json.loads(text) == table
    assert sum(line.startswith('{"arch":90') for line in text.splitlines()) == 2


# ------------------------------------------------------------------ the committed sm_90 table (CI's compile check keeps it current)

BN_PASSES = ("_stats_partial_kernel", "_bn_act_kernel", "_backward_partial_kernel", "_backward_apply_kernel")


def _committed_table() -> dict:
    return json.loads((REPO / cc.DEFAULT_TABLE).read_text())


def test_the_bn_passes_stream_16_byte_packs_without_64_bit_division():
    """Issue 12's compile-level bar for conv_bn_relu's Triton passes, on every variant the model and
    the GPU tests launch: no spill, no 64-bit division anywhere, and, where the tile's contiguous axis
    is a multiple of 16 elements (C in channels_last, S in NCHW), every activation access a 16-byte
    pack (the only narrower loads are the per-channel fp32 coefficients, never 2- or 8-byte ones)."""
    variants = [r for r in _committed_table()["variants"] if r["arch"] == 90 and r["kernel"] in BN_PASSES]
    assert {r["kernel"] for r in variants} == set(BN_PASSES)
    packed = 0
    for r in variants:
        name = f"{r['id']} ({r['sources'][0]})"
        assert r["spill_stores"] == r["spill_loads"] == 0, name
        assert r["int64_division"] == {"all": 0, "loop": 0}, name
        contiguous_extent = "C" if r["config"]["meta"]["CHANNELS_LAST"] else "S"
        if contiguous_extent not in r["divisible_by_16"]:
            continue
        packed += 1
        memory = r["global_memory"]
        hot = memory["loop"] if memory["loops"] else memory["all"]
        assert "16" in hot["ld"] and not set(memory["all"]["ld"]) & {"1", "2", "8"}, f"{name}: {memory['all']['ld']}"
        if "partial" in r["kernel"]:  # its loop loads only the tiles (a part of one tile has no loop)
            assert not memory["loops"] or set(hot["ld"]) == {"16"}, f"{name}: {hot['ld']}"
        else:
            assert set(memory["all"]["st"]) == {"16"}, f"{name}: {memory['all']['st']}"
    assert packed >= len(variants) // 2


def test_no_triton_variant_divides_in_64_bits():
    """Each 64-bit div/rem is a call of a ~70-instruction routine: none in any Triton kernel."""
    dividing = [r["id"] for r in _committed_table()["variants"] if r["int64_division"]["all"]]
    assert not dividing, dividing[:5]


def test_the_pyramid_pool_reduce_streams_16_byte_packs():
    """The 16-bit pyramid pool at the model's shape (151 MB of x read per batch of 16): its hot loop
    loads x and the (W, K) weight table, padded to 16 cells a row, in 16-byte packs only."""
    pools = [r for r in _committed_table()["variants"]
             if r["kernel"] == "_reduce_kernel" and r["dtypes"] != ["float32"]
             and any(s.startswith("model:") and "pyramid_pool x" in s for s in r["sources"])]  # fmt: skip
    assert pools
    for r in pools:
        loop = r["global_memory"]["loop"]
        assert set(loop["ld"]) | set(loop["cp_async"]) == {"16"}, f"{r['id']}: {loop}"


def test_the_pyramid_expand_streams_16_byte_packs():
    """The expand (pool backward, upsample, taps) at the model's shapes, every dtype and layout: its k
    loop loads the packed cell values and both weight tables in 16-byte packs only (v's rows padded
    by _cell_values: 50 pooling cells or 450 taps no longer split them into 2-byte loads)."""
    expands = [r for r in _committed_table()["variants"]
               if r["kernel"] == "_expand_kernel" and any(s.startswith("model:") for s in r["sources"])]  # fmt: skip
    assert {(r["dtypes"][0], r["layouts"][0]) for r in expands} == {
        (dtype, layout) for dtype in ("float32", "float16", "bfloat16") for layout in ("nchw", "channels_last")
    }
    for r in expands:
        loop = r["global_memory"]["loop"]
        assert r["global_memory"]["loops"] and set(loop["ld"]) | set(loop["cp_async"]) == {"16"}, f"{r['id']}: {loop}"


def test_the_triton_loss_streams_16_byte_packs():
    """The loss at the model's shapes (16 x C x 384 x 384, both layouts, with and without the saved
    gradient): every global access in its row loop is a 16-byte pack of the logits, the mask or the
    gradient (the lanes' neighbours come by shuffles, not by shifted loads); no variant spills."""
    variants = [r for r in _committed_table()["variants"] if r["arch"] == 90 and r["kernel"] == "_nll_epe_kernel"]
    assert variants and all(r["spill_stores"] == r["spill_loads"] == 0 for r in variants)
    model = [r for r in variants if any(s.startswith("model:") for s in r["sources"])]
    forms = {(r["config"]["meta"]["PAIRED"], r["config"]["meta"]["WRITE_GRADIENT"], r["dtypes"][0]) for r in model}
    assert forms == {(paired, gradient, dtype) for paired in (False, True) for gradient in (False, True)
                     for dtype in ("float32", "float16", "bfloat16")}, forms  # fmt: skip
    for r in model:
        loop = r["global_memory"]["loop"]
        assert set(loop["ld"]) == {"16"} and set(loop["st"]) <= {"16"}, f"{r['id']} ({r['sources'][0]}): {loop}"


# ------------------------------------------------------------------ shapes and tensors (in-process)


def test_geometry_keeps_strides_and_the_pointer_offset_of_a_view():
    pooled = torch.empty(16, 2048, 50)
    cells = pooled[:, :, 1:5].unflatten(2, (2, 2))  # a model branch's input: 4 bytes past the allocation
    geometry = cc.Geometry.of(cells)
    made = geometry.empty(torch.float32)
    assert (made.shape, made.stride(), made.storage_offset()) == (cells.shape, cells.stride(), 1)
    assert made.data_ptr() % 16 == 4 and cc.Geometry.of(pooled).empty(torch.bfloat16).data_ptr() % 16 == 0
    assert geometry.describe() == "16x2048x2x2@102400,50,2,1+1"


@pytest.mark.parametrize("x_channels_last,w_channels_last", [(False, False), (True, False), (False, True), (True, True)])
def test_meta_conv_gives_the_layout_of_the_real_one(x_channels_last, w_channels_last):
    x = torch.randn(2, 8, 9, 11)
    w = torch.randn(4, 8, 3, 3)
    x = x.to(memory_format=torch.channels_last) if x_channels_last else x
    w = w.to(memory_format=torch.channels_last) if w_channels_last else w
    options = ConvBNOptions(stride=[2, 1], padding=[1, 1], dilation=[1, 2], groups=1, eps=1e-5, relu=True)
    real = conv_op._conv(x, w, None, options)
    with cc._meta_aten():
        meta = conv_op._conv(x, w, None, options)
        grads = conv_op._conv_backward(real, x, w, options, [True, True, False])
    assert (meta.shape, meta.stride(), meta.dtype, meta.device.type) == (real.shape, real.stride(), real.dtype, "cpu")
    reference = conv_op._conv_backward(real, x, w, options, [True, True, False])
    assert [(g.shape, g.stride()) for g in grads[:2]] == [(g.shape, g.stride()) for g in reference[:2]]


def test_model_calls_are_the_papers_shapes():
    calls = cc._model_calls(channels_last=True, training=True)
    convs = {c.describe(): layers for c, layers in calls.convs.items()}
    dilated = next(d for d in convs if "x 16x256x48x48" in d and "3x3 256->256 padding 2 dilation 2" in d)
    assert len(convs[dilated]) == 5  # layer3.1-5.conv2
    assert any("decoder.branches.1.conv" in layers for layers in convs.values())
    ((x, bins),) = calls.pools
    assert x.shape == (16, 2048, 48, 48) and x.stride[1] == 1 and bins == (1, 2, 3, 6)
    ((dense, branches, weight, align_corners),) = calls.pyramid_convs
    assert weight.shape == (512, 2048 + 4 * 1024, 3, 3) and [b.shape[2:] for b in branches] == [(1, 1), (2, 2), (3, 3), (6, 6)]
    assert calls.logits.shape == (16, 2, 384, 384) and not align_corners


# ------------------------------------------------------------------ capture and compile (one clean subprocess)

KERNEL_MODULE = '''
import triton
import triton.language as tl


@triton.jit
def tiny_kernel(x_ptr, y_ptr, n, m, k, scale, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets * m, mask=mask, other=0.0)
    tl.store(y_ptr + offsets * k, x * scale, mask=mask)


tiny_tuned = triton.autotune(configs=[triton.Config({"BLOCK": 8})], key=["n"])(tiny_kernel)
'''

SCRIPT = r'''
import json, os, sys, tempfile
import torch
import tiny
from slsdeep_kernels import compile_check as cc
from slsdeep_kernels.ops import nll_epe_loss_triton as loss_op

out = {}
# 1. every launcher and kernel of the tests' cases, through backend.launch, with the GPU decisions
specs = cc.capture(cc.all_cases(["tests"]), [90])
out["kernels"] = sorted({s.name for s in specs})
out["expected_kernels"] = sorted(name.rsplit(".", 1)[1] for name in cc.launched_kernels())
out["launchers"] = sorted({l for s in specs for l in s.launchers})
out["flags"] = sorted({f for s in specs for f in s.flags})
out["records"] = [cc.describe_spec(s) | {"kernel": s.name, "sources": sorted(s.sources)} for s in specs]

# 2. a launch that bypasses backend.launch fails loudly
def direct():
    g = torch.empty(8)
    loss_op._scale_kernel[(1,)](g, torch.ones(()), 8, BLOCK=8)
try:
    cc.capture([cc.Case("tests", "nll_epe_loss", "direct", "float32", "nchw", direct)], [90], require_all_kernels=False)
    out["bypass"] = None
except cc.LaunchBypassError as error:
    out["bypass"] = str(error)

# 2b. an autotuned launch is refused (its configs are not captured)
def tuned():
    from slsdeep_kernels import backend
    backend.launch(tiny.tiny_tuned, (1,), torch.empty(8), torch.empty(8), 8, 1, 1, 1.0)
try:
    cc.capture([cc.Case("tests", "nll_epe_loss", "tuned", "float32", "nchw", tuned)], [90], require_all_kernels=False)
    out["autotuned"] = None
except cc.CompileCheckError as error:
    out["autotuned"] = str(error)

# 3. Triton's specialisation of a small kernel, its cache hash, and the JIT finding the compiled kernel
cache = tempfile.mkdtemp()
os.environ["TRITON_CACHE_DIR"] = cache
x = torch.empty(64)[1:]  # 4 bytes past a 64-byte aligned allocation
y = torch.empty(64)
args = (x, y, 32, 1, 7, 0.5)
key, data = cc.specialise(tiny.tiny_kernel, 90, (1,), args, {"BLOCK": 32})
spec = json.loads(data)
out["tiny_signature"] = spec["signature"]
out["tiny_constants"] = dict(zip([k[0] for k in spec["constant_keys"]], spec["constant_vals"]))
out["tiny_divisible"] = [k[0] for k, v in zip(spec["attrs_keys"], spec["attrs_vals"]) if ["tt.divisibility", 16] in v]
out["tiny_hash"] = cc.triton_cache_hash(tiny.tiny_kernel, 90, data)
content = cc.content_hash(tiny.tiny_kernel, 90, data)
tiny.tiny_kernel.starting_line_number += 7  # as if an edit above it moved the kernel
tiny.tiny_kernel.hash = None
out["moved"] = {"triton_hash_same": cc.triton_cache_hash(tiny.tiny_kernel, 90, data) == out["tiny_hash"],
                "content_hash_same": cc.content_hash(tiny.tiny_kernel, 90, data) == content}
tiny.tiny_kernel.starting_line_number -= 7
tiny.tiny_kernel.hash = None
result = cc.compile_spec({"uid": [0], "arch": 90, "module": "tiny", "name": "tiny_kernel", "data": data})
out["tiny_compiled"] = {k: result.get(k) for k in ("hash", "registers", "spill_stores", "shared", "global_memory", "error")}
before = sorted(os.path.join(d, f) for d, _, files in os.walk(cache) for f in files)
out["cache_dirs"] = sorted(os.listdir(cache))
try:  # the JIT itself: compiles (from the cache) then cannot launch without a GPU
    with cc.target_driver(90):
        tiny.tiny_kernel[(1,)](*args, BLOCK=32)
    out["jit_launch"] = "launched?"
except Exception as error:
    out["jit_launch"] = type(error).__name__
out["new_files_after_jit"] = sorted(set(os.path.join(d, f) for d, _, files in os.walk(cache) for f in files) - set(before))

# 4. the command line: passing variants exit 0, --check of that table (reused by hash, one compiled
# again) exits 0, a stale table exits 1, a variant over a (lowered) shared-memory limit exits 1
table, failing = os.path.join(cache, "table.json"), os.path.join(cache, "failing.json")
argv = ["--group", "tests", "--select", "_stats_partial_kernel", "--jobs", "1", "--quiet"]
out["exit_ok"] = cc.main(argv + ["--json", table])
out["table"] = json.load(open(table))
out["exit_check_current"] = cc.main(argv + ["--check", table, "--verify", "1"])
good = json.load(open(table))
stale = dict(good, variants=good["variants"][1:])  # a launch the table lacks: compiled, reported as added
json.dump(stale, open(table, "w"))
out["exit_check_stale"] = cc.main(argv + ["--check", table, "--verify", "0"])
edited = dict(good, variants=[dict(good["variants"][0], registers=good["variants"][0]["registers"] + 1)] + good["variants"][1:])
json.dump(edited, open(table, "w"))  # numbers no compile gives: reused by hash, found by --verify
out["exit_check_edited"] = cc.main(argv + ["--check", table, "--verify", "100"])
out["exit_failing"] = cc.main(argv + ["--shared-limit", "90=256", "--json", failing])
out["failing"] = json.load(open(failing))
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compile_check")
    (folder / "tiny.py").write_text(KERNEL_MODULE)
    (folder / "script.py").write_text(SCRIPT)
    env = cc.clean_environment()
    env["PYTHONPATH"] = f"{folder}:{REPO}"
    proc = subprocess.run([sys.executable, str(folder / "script.py")], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["stdout"] = proc.stdout
    return result


def test_capture_sees_every_kernel_and_launcher_through_backend_launch(clean_run):
    assert clean_run["kernels"] == clean_run["expected_kernels"] and len(clean_run["kernels"]) >= 10
    assert clean_run["launchers"] == sorted(name for names in cc.LAUNCHERS.values() for name in names)
    tiles = {(r["config"]["meta"]["BLOCK_R"], r["config"]["meta"]["BLOCK_C"]) for r in clean_run["records"] if r["kernel"] == "_bn_act_kernel"}
    assert (256, 4) in tiles and (16, 64) in tiles  # the GPU's tiles (NCHW, channels_last), not the interpreter's
    lanes = {r["config"]["meta"]["LANES"] for r in clean_run["records"] if r["kernel"] == "_nll_epe_kernel"}
    assert lanes == {32}  # the GPU's warp of lanes, not the interpreter's 4
    assert clean_run["flags"] == ["pytorch-default", "tests"]
    assert "_scale_kernel was launched without slsdeep_kernels.backend.launch" in clean_run["bypass"]
    assert "tiny_kernel is launched through Autotuner" in clean_run["autotuned"]


def test_strides_reach_the_specialisation(clean_run):
    # dense gradients have a unit innermost stride (a constant); the pyramid conv's expanded cotangent
    # (.sum().backward() in test_gpu_conv_never_allocates...) has zero strides (divisible by 16)
    reduce_records = [r for r in clean_run["records"] if r["kernel"] == "_reduce_kernel"]
    assert any(r["constants"].get("x_sw") == 1 for r in reduce_records)  # dense gradients: unit stride is a constant
    assert any("x_sw" in r["divisible_by_16"] for r in reduce_records)  # the expanded one: stride 0, divisible


def test_specialisation_is_tritons_for_a_small_kernel(clean_run):
    assert clean_run["tiny_signature"] == {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "m": "constexpr", "k": "i32",
                                           "scale": "fp32", "BLOCK": "constexpr"}  # fmt: skip
    assert clean_run["tiny_constants"] == {"3": 1, "6": 32}  # m == 1 becomes a constant, as on a GPU
    assert clean_run["tiny_divisible"] == [1, 2]  # y_ptr and n = 32; x_ptr (4 bytes off) and k = 7 are not


def test_content_hash_ignores_where_the_kernel_is_in_its_file(clean_run):
    assert clean_run["moved"] == {"triton_hash_same": False, "content_hash_same": True}


def test_the_jit_finds_what_the_check_compiled(clean_run):
    compiled = clean_run["tiny_compiled"]
    assert compiled["error"] is None and compiled["hash"] == clean_run["tiny_hash"]
    directory = base64.b32encode(bytes.fromhex(clean_run["tiny_hash"])).decode().rstrip("=")
    assert clean_run["cache_dirs"] == [directory]  # Triton's cache directory of that kernel (base32 of the hash)
    assert compiled["registers"] > 0 and compiled["spill_stores"] == 0
    assert compiled["global_memory"]["all"]["ld"] and compiled["global_memory"]["all"]["st"]
    # the JIT's own launch compiles from the cache (no new file) and fails only where a GPU is needed
    assert clean_run["jit_launch"] == "CompileCheckError" and clean_run["new_files_after_jit"] == []


def test_command_line_exit_status(clean_run):
    table = clean_run["table"]
    assert clean_run["exit_ok"] == 0 and table["summary"]["90"]["fail"] == 0 and table["failures"] == []
    assert table["variants"] and all(r["kernel"] == "_stats_partial_kernel" and r["status"] == "ok" for r in table["variants"])
    assert all(r["content_hash"] and r["registers"] and r["shared"] > 0 for r in table["variants"])
    over = sum(r["shared"] > 256 for r in table["variants"])
    assert 1 <= over < len(table["variants"])  # the launches' shared memory: 32 B to 1 KiB
    assert clean_run["exit_check_current"] == 0 and "is current" in clean_run["stdout"]
    assert clean_run["exit_check_stale"] == 1 and "STALE" in clean_run["stdout"] and "1 variants added" in clean_run["stdout"]
    assert clean_run["exit_check_edited"] == 1 and "not reproducible" in clean_run["stdout"]
    failing = clean_run["failing"]
    assert clean_run["exit_failing"] == 1 and failing["summary"]["90"]["fail"] == over
    assert failing["failures"][0].startswith("FAIL sm90/_stats_partial_kernel/") and "> sm_90 limit 256 B" in failing["failures"][0]
    assert "FAIL sm90/_stats_partial_kernel/" in clean_run["stdout"]

"""bench/gpu_validate.sh without a GPU: the dry run of both calls (its plan and budgets, every
stage's plumbing, the results file and its per-op pass table), call 2 restoring call 1's cache, and
bench/results.py reading junit XML, selections, event logs, benchmarks and memcheck summaries."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_validate.sh"
CALL1 = ["build", "precompile", "precompile_model", "test_bf16", "test_fp16", "test_fp32", "sanitize", "quick", "quick_cuda"]
CALL2 = ["build", "precompile_model", "compile_bench", "full"]
# What the device machine allows a call (8 and 5 minutes), in seconds, and one command (10 minutes).
CALL_LIMITS = {"1": 480, "2": 300}
COMMAND_LIMIT = 600


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results = _load("gpu_validate_results", ROOT / "bench" / "results.py")


def _env():
    """The environment a user's shell would give the script (not this test run's interpreter flags)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLSDEEP_", "CAP_", "CALL")) and k not in ("TRITON_INTERPRET", "OUT", "RESULTS", "PYTEST_ADDOPTS")}
    env["PYTHON"] = sys.executable
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run_script(*args, timeout=240):
    start = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    done, seconds = _run_script("--dry-run", "--out", str(out), "--save-cache")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = list(out.glob("dry-run-*.json"))
    assert len(files) == 1, sorted(p.name for p in out.iterdir())
    return {"out": out, "stdout": done.stdout, "seconds": seconds, "file": files[0], "data": json.loads(files[0].read_text())}


def _plan(stdout, title):
    """{stage: cap} and the printed total of one call's plan."""
    block = stdout.split(f"plan: {title}", 1)[1].split("\n  total", 1)
    rows = {}
    for line in block[0].splitlines()[2:]:
        fields = line.split()
        rows[fields[0]] = int(fields[1])
    total = int(re.match(r" (\d+) s", block[1]).group(1))
    budget = int(re.search(r"budget (\d+) s", stdout.split(f"plan: {title}", 1)[1].splitlines()[0]).group(1))
    return rows, total, budget


def test_dry_run_prints_both_calls_within_their_limits(dry):
    for call, stages in (("1", CALL1), ("2", CALL2)):
        rows, total, budget = _plan(dry["stdout"], f"call {call}")
        assert list(rows) == stages
        assert budget <= CALL_LIMITS[call]
        assert total + 10 <= budget, f"call {call}: stage limits {total} s + the final record exceed {budget} s"
        assert all(cap > 0 for cap in rows.values())
    assert "DRY RUN" in dry["stdout"]


def test_dry_run_records_every_stage(dry):
    data = dry["data"]
    assert data["dry_run"] is True
    assert data["device"] and data["torch"] and len(data["sources_sha256"]) == 64
    stages = data["stages"]
    assert set(stages) == set(CALL1) | set(CALL2)
    for name, stage in stages.items():
        assert stage["rc"] == 0, (name, stage.get("log_tail"))
        assert stage["kind"] and stage["budget_s"] > 0 and "ended" in stage and "log_tail" in stage, name
    assert set(data["runs"][0]["plan_s"]) == set(stages)
    # The results file and the logs were copied to --out, with the cache for call 2.
    with tarfile.open(dry["out"] / "gpu-validate-logs.tgz") as logs:
        names = {Path(n).name for n in logs.getnames()}
    assert {"test_bf16.xml", "test_fp32.selection.json", "sanitize.sanitize.json", "quick.log", "build.log"} <= names
    with tarfile.open(dry["out"] / "gpu-validate-cache.tgz") as cache:
        names = cache.getnames()
    assert "./build.sha256" in names and any(n.startswith("./results/") and n.endswith(".json") for n in names)
    # No dry run ever lands among the committed results.
    assert not list((ROOT / "bench" / "results").glob("dry-run-*"))


def test_dry_run_splits_the_gpu_tests_by_dtype(dry):
    stages = dry["data"]["stages"]
    with tarfile.open(dry["out"] / "gpu-validate-logs.tgz") as logs:
        everything = json.load(logs.extractfile("./dry-all.selection.json"))
    assert len(everything) > 50  # every GPU test, collected from the real test files
    seen = []
    for name, groups in results.TEST_STAGES.items():
        cases = stages[name]["tests"]["cases"]
        assert all(c["group"] in groups.split(",") for c in cases), name
        assert stages[name]["tests"]["skipped"] == len(cases) == stages[name]["tests"]["selected"]
        seen += [c["id"] for c in cases]
    assert sorted(seen) == sorted(c["id"] for c in everything)  # each GPU test in exactly one stage
    dtypes = {c["dtype"] for c in stages["test_bf16"]["tests"]["cases"]}
    assert dtypes == {"bfloat16"}
    assert {c["dtype"] for c in stages["test_fp16"]["tests"]["cases"]} == {"float16"}
    assert all(c["backend"] in ("triton", "cuda", "all") for c in everything)


def test_dry_run_per_op_table_validates_nothing(dry):
    ops = dry["data"]["ops"]
    assert {"conv_bn_relu", "nll_epe_loss", "pyramid"} <= set(ops)
    assert {"pyramid_pool", "upsample_concat"} <= set(ops["pyramid"]["functions"])
    for op, row in ops.items():
        for backend in ("triton", "cuda"):
            assert row[backend]["validated"] is False and "dry run" in row[backend]["why_not"], (op, backend)
    entries = dry["data"]["stages"]["sanitize"]["sanitize"]["entries"]
    assert {(e["op"], e["backend"]) for e in entries} == {(op, b) for op in ("conv_bn_relu", "nll_epe_loss", "pyramid")
                                                          for b in ("triton", "cuda")}
    assert all(e["status"] == "dry-run" and e["cases"] for e in entries)


def test_dry_run_quick_stage_collects_fused_and_eager_only(dry):
    log = dry["data"]["stages"]["quick"]["log_tail"]
    ids = re.findall(r"::test_\w+\[([^\]]+)\]", log)
    assert ids and all(i.endswith(("-fused", "-eager")) or i in ("fused", "eager") for i in ids), ids


def test_call_2_restores_call_1(dry, tmp_path):
    done, _ = _run_script("--dry-run", "--call", "2", "--out", str(tmp_path), "--restore",
                          str(dry["out"] / "gpu-validate-cache.tgz"), timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    data = json.loads((tmp_path / dry["file"].name).read_text())  # the same results file, continued
    stages = data["stages"]
    assert {"test_bf16", "sanitize", "compile_bench", "full", "build", "build@callall"} <= set(stages)
    assert any("restores them instead of building" in n for n in stages["build"].get("notes", []))
    # compile_bench takes the call's slack, the stages after it keep their limits.
    assert stages["compile_bench"]["budget_s"] > 90 and stages["compile_bench"]["budget_s"] + 60 <= 290
    assert [r["call"] for r in data["runs"]] == ["all", "2"]


def test_the_models_max_autotune_baseline_runs_only_in_a_stage_of_its_own(tmp_path):
    """torch.compile(mode="max-autotune") of the whole model takes minutes per batch size: the calls'
    compile stages and compile_full run the default mode only; compile_model, by name only, runs the
    max-autotune baselines within one device command."""
    plan = subprocess.run(["bash", str(SCRIPT), "--plan", "compile_model"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=60, check=True).stdout
    cap = int(re.search(r"^  compile_model +(\d+)", plan, re.MULTILINE).group(1))
    assert cap + 30 <= COMMAND_LIMIT and "compile_model" not in CALL1 + CALL2
    for stage, mode in (("compile_bench", "default"), ("compile_full", "default"), ("compile_model", "max-autotune")):
        body = subprocess.run(["bash", str(SCRIPT), "--_stage", stage], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**_env(), "GV_DRY": "1", "GV_PYTHON": sys.executable, "GV_LOGS": str(tmp_path)}, check=True)
        command = body.stdout.split("would run: ", 1)[1]
        assert f"SLSDEEP_BENCH_COMPILE_MODE={mode} " in command, body.stdout
    assert "bench/test_bench_model.py -q" in command  # compile_model: the model's file only


# ---------------------------------------------------------------------------------------------
# bench/results.py on synthetic stage outputs
# ---------------------------------------------------------------------------------------------


def _junit(path, cases):
    """cases: (nodeid, outcome, props)."""
    body = []
    for nodeid, outcome, props in cases:
        module, name = nodeid.split("::")
        classname = module.removesuffix(".py").replace("/", ".")
        child = {"passed": "", "failed": '<failure message="boom">x</failure>', "skipped": '<skipped message="no"/>'}[outcome]
        properties = "".join(f'<property name="{k}" value="{v}"/>' for k, v in {"nodeid": nodeid, **props}.items())
        body.append(f'<testcase classname="{classname}" name="{name}"><properties>{properties}</properties>{child}</testcase>')
    body.append('<testcase time="0.000" />')  # what a KeyboardInterrupt leaves
    Path(path).write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{"".join(body)}</testsuite></testsuites>')


def _record(file, *args):
    results.main(["record", str(file), *args])


def test_op_table_validates_only_complete_clean_runs(tmp_path):
    file = tmp_path / "r.json"
    props = lambda op, backend, dtype, group: {"op": op, "backend": backend, "dtype": dtype, "group": group}  # noqa: E731
    for stage, groups in results.TEST_STAGES.items():
        group = groups.split(",")[0]
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(group, "float32")
        cases = [(f"tests/test_conv_bn_relu.py::test_gpu[{stage}-{b}]", "passed", props("conv_bn_relu", b, dtype, group))
                 for b in ("triton", "cuda")]
        cases.append((f"tests/test_nll_epe_loss.py::test_gpu[{stage}-triton]", "passed", props("nll_epe_loss", "triton", dtype, group)))
        if stage == "test_fp16":
            cases[1] = (cases[1][0], "failed", cases[1][2])  # conv cuda fails in fp16
        _junit(tmp_path / f"{stage}.xml", cases)
        selection = [{"id": c[0], **c[2]} for c in cases]
        if stage == "test_fp32":  # one selected test that never reported (the stage was cut)
            selection.append({"id": "tests/test_nll_epe_loss.py::test_gpu[late-cuda]", **props("nll_epe_loss", "cuda", "float32", "fp32")})
        (tmp_path / f"{stage}.sel.json").write_text(json.dumps(selection))
        _record(file, "--stage", stage, "--kind", "gpu-tests", "--rc", "0", "--seconds", "3", "--junit-xml",
                str(tmp_path / f"{stage}.xml"), "--selection", str(tmp_path / f"{stage}.sel.json"), "--call", "1")
    before = json.loads(file.read_text())["ops"]
    assert before["conv_bn_relu"]["triton"]["validated"] is False
    assert "memcheck not run" in before["conv_bn_relu"]["triton"]["why_not"]
    summary = {"tool": "memcheck", "entries": [
        {"op": op, "backend": b, "status": "passed", "errors": 0, "cases": [{"name": "c", "status": "passed"}]}
        for op in ("conv_bn_relu", "nll_epe_loss", "pyramid") for b in ("triton", "cuda")]}
    summary["entries"][-1]["status"] = "failed"
    (tmp_path / "san.json").write_text(json.dumps(summary))
    _record(file, "--stage", "sanitize", "--kind", "sanitize", "--rc", "1", "--seconds", "50", "--sanitize-json",
            str(tmp_path / "san.json"), "--call", "1")
    ops = json.loads(file.read_text())["ops"]
    conv, loss, pyramid = ops["conv_bn_relu"], ops["nll_epe_loss"], ops["pyramid"]
    assert conv["triton"]["validated"] is True and "why_not" not in conv["triton"]
    assert conv["triton"]["passed"] == len(results.TEST_STAGES) and set(conv["triton"]["dtypes"]) == {"bfloat16", "float16", "float32"}
    assert conv["cuda"]["validated"] is False and "1 failed" in conv["cuda"]["why_not"]
    assert conv["cuda"]["failed_tests"] == ["tests/test_conv_bn_relu.py::test_gpu[test_fp16-cuda]"]
    assert loss["triton"]["validated"] is True
    assert loss["cuda"]["validated"] is False and "1 not run" in loss["cuda"]["why_not"]
    assert pyramid["triton"]["validated"] is False and "no GPU test of it ran" in pyramid["triton"]["why_not"]
    assert "memcheck failed" in pyramid["cuda"]["why_not"]
    markdown = results.validated_markdown([str(file)])
    assert "| conv_bn_relu (conv_bn_relu) | passed | not validated | `bench/results/r.json` |" in markdown
    assert re.search(r"conv_bn_relu +triton +yes", results.summary_text(json.loads(file.read_text())))
    # A dry run never validates.
    data = json.loads(file.read_text())
    data["dry_run"] = True
    assert not any(row[b]["validated"] for row in results.op_table(data).values() for b in ("triton", "cuda"))
    # Test stages from calls on other sources do not validate together.
    data["dry_run"] = False
    data["runs"] = [{"call": "1", "sources_sha256": "a"}, {"call": "2", "sources_sha256": "b"}]
    data["stages"]["test_bf16"]["call"] = "2"
    assert "different sources" in results.op_table(data)["conv_bn_relu"]["triton"]["why_not"]
    # A stage of a later call keeps the earlier call's under its own name.
    _record(file, "--stage", "test_bf16", "--kind", "gpu-tests", "--rc", "0", "--seconds", "3", "--call", "2")
    assert {"test_bf16", "test_bf16@call1"} <= set(json.loads(file.read_text())["stages"])


def test_tests_come_from_the_event_log_when_the_junit_xml_is_missing(tmp_path):
    events = tmp_path / "e.jsonl"
    lines = [
        {"event": "report", "nodeid": "tests/test_pyramid.py::test_gpu_ops[a]", "when": "call", "outcome": "passed",
         "props": {"op": "pyramid", "backend": "triton", "dtype": "bfloat16", "group": "bf16"}},
        {"event": "report", "nodeid": "tests/test_pyramid.py::test_gpu_ops[b]", "when": "setup", "outcome": "failed", "message": "x",
         "props": {"op": "pyramid", "backend": "cuda", "dtype": "bfloat16", "group": "bf16"}},
    ]
    events.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")
    file = tmp_path / "r.json"
    _record(file, "--stage", "test_bf16", "--kind", "gpu-tests", "--rc", "124", "--seconds", "40", "--events", str(events),
            "--junit-xml", str(tmp_path / "missing.xml"))
    stage = json.loads(file.read_text())["stages"]["test_bf16"]
    assert stage["timed_out"] is True
    assert stage["tests"]["source"] == "events" and stage["tests"]["passed"] == 1 and stage["tests"]["error"] == 1


def test_benchmarks_are_tagged_with_their_backend(tmp_path):
    def bench(way, median, group="nll (1,)"):
        return {"name": f"test[{way}]", "group": group, "stats": {"median": median, "iqr": 0.0, "rounds": 5},
                "extra_info": {"way": way, "op": "nll"}}

    (tmp_path / "quick.json").write_text(json.dumps({"benchmarks": [bench("fused", 1e-3), bench("eager", 3e-3)]}))
    events = tmp_path / "cuda.jsonl"
    events.write_text(json.dumps({"event": "benchmark", **bench("fused", 2e-3)}) + "\n")
    file = tmp_path / "r.json"
    _record(file, "--stage", "quick", "--kind", "bench", "--rc", "0", "--seconds", "9", "--benchmark-json",
            str(tmp_path / "quick.json"), "--backend", "triton")
    _record(file, "--stage", "quick_cuda", "--kind", "bench", "--rc", "124", "--seconds", "9", "--events", str(events),
            "--backend", "cuda")  # killed: no pytest-benchmark JSON, the event log has it
    rows = results.speedups([b for _, s in results.ordered_stages(json.loads(file.read_text())) for b in s.get("benchmarks", [])])
    assert [(r["backend"], round(r["vs_eager"], 3)) for r in rows] == [("cuda", 1.5), ("triton", 3.0)]
    assert "nll (1,) · cuda" in results.markdown([str(file)])


def test_table_shows_the_models_images_per_s_and_the_compile_mode(tmp_path):
    def bench(way, median, **extra_info):
        return {"name": f"test[{way}]", "group": "slsdeep inference (64, 3, 384, 384) bfloat16 forward",
                "stats": {"median": median}, "extra_info": {"way": way, **extra_info}}

    (tmp_path / "full.json").write_text(json.dumps({"benchmarks": [
        bench("fused", 0.02, images_per_s=3200.0), bench("eager", 0.04, images_per_s=1600.0),
        bench("compile", 0.03, images_per_s=2133.3, compile_mode="max-autotune")]}))
    file = tmp_path / "r.json"
    _record(file, "--stage", "full", "--kind", "bench", "--rc", "0", "--seconds", "9", "--benchmark-json", str(tmp_path / "full.json"))
    table = results.markdown([str(file)])
    assert table.splitlines()[0] == "| device | case | fused ms | fused images/s | × eager | × compile | bandwidth roof |"
    assert "| 20.000 | 3200.0 | 2.00 | 1.50 (max-autotune) |  |" in table
    recorded = json.loads(file.read_text())
    assert table.splitlines()[2].startswith(f"| {recorded['device']}, {recorded['date'][:10]} |")  # the run's day


def test_bench_way_filter():
    from slsdeep_kernels import testing

    keep = testing.keep_way
    assert keep("compile", "") and keep("fused", "fused,eager") and not keep("compile", "fused,eager")
    assert keep("folded", "-compile") and not keep("compile", "-compile")
    assert not keep("fused-memory-efficient", "fused,eager")
    from slsdeep_kernels.benchmark import op_cases

    ways = {p.values[1] for p in testing.case_parameters(op_cases("cpu", quick=True))}
    assert {w for w in ways if keep(w, "fused,eager")} == {"fused", "eager"}


def test_plugin_groups_orders_and_skips_after_the_deadline(tmp_path):
    (tmp_path / "test_synthetic.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'float16'])\n"
        "@pytest.mark.parametrize('backend', ['triton', 'cuda'])\n"
        "def test_gpu_op(backend, dtype): assert dtype != 'float16' or backend != 'cuda'\n"
        "def test_plain(): pass\n")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "pytest", str(tmp_path / "test_synthetic.py"), "-q", "-p", "no:cacheprovider",
                               "-p", "bench.results", f"--junitxml={tmp_path / 'j.xml'}", "--gpu-selection",
                               str(tmp_path / "s.json"), "--rootdir", str(tmp_path), *args],
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)

    done = run("--gpu-group", "bf16,other")
    assert done.returncode == 0, done.stdout + done.stderr
    selection = json.loads((tmp_path / "s.json").read_text())
    assert [s["group"] for s in selection] == ["bf16", "bf16", "other"]  # in the order asked for
    assert [s["backend"] for s in selection] == ["triton", "cuda", "all"]
    cases = {c["id"]: c for c in results._junit_cases(str(tmp_path / "j.xml"))}
    assert all(c["outcome"] == "passed" and c["op"] == "synthetic" for c in cases.values())
    done = run("--gpu-group", "fp16")
    assert done.returncode == 1  # the failing fp16 cuda case
    assert run("--gpu-group", "nonsense").returncode != 0
    done = run("--gpu-group", "fp32", "--gpu-deadline", str(time.time() - 1), "--gpu-log", str(tmp_path / "e.jsonl"))
    assert done.returncode == 0
    events = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert len(events) == 2 and all(e["outcome"] == "skipped" and "budget" in e["message"] for e in events)

"""Results files of GPU validation runs: record a stage, the per-op pass table, and the README's tables.

    python bench/results.py init FILE [--call 1] [--dry-run] [--plan STAGE=SECONDS ...]
    python bench/results.py record FILE --stage NAME --rc 0 --seconds 42 [--kind gpu-tests|bench|sanitize|build]
                                        [--budget S] [--log LOG] [--junit-xml X] [--selection SEL]
                                        [--events JSONL] [--benchmark-json J] [--backend triton]
                                        [--sanitize-json S] [--note TEXT] [--copy-to DIR]
    python bench/results.py summary FILE              # stages and the per-op table, as text
    python bench/results.py validated [FILES]         # markdown: which ops passed on which GPU
    python bench/results.py table [FILES]             # markdown: the performance table
    python bench/results.py readme                    # rewrite README.md's and docs/performance.md's tables from bench/results/
    python bench/results.py merge OUT IN...           # one file from several calls' files
    python bench/results.py source-hash [--build]     # the hash a results file records of the sources

A results file is one JSON object: when and where it was measured (date, device, driver, torch,
triton and CUDA versions, a hash of the kernel sources), the runs (calls) that wrote it, one entry
per stage, and ``ops``: per op and GPU backend, whether its GPU tests passed (from the junit XML
of the ``test_*`` stages) and whether ``compute-sanitizer`` memcheck found it clean. ``record``
rewrites the file atomically (under a lock) after every stage, so a stage that fails or hangs later
never loses what earlier stages measured.

The same module is a pytest plugin (``-p bench.results``) that the GPU test and benchmark stages of
``bench/gpu_validate.sh`` load: ``--gpu-group`` keeps the GPU tests of some dtype groups (test ids
spell dtypes as ``dtype0``/``dtype1``, so the group is read from the test's parameters),
``--gpu-selection`` writes what was selected, ``--gpu-log`` appends every outcome and benchmark as
it happens (so a stage cut at its time limit keeps what ran), ``--gpu-deadline`` skips tests not
started by then.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = RESULTS_DIR.parent.parent
GPU_BACKENDS = ("triton", "cuda")
# The GPU test stages of gpu_validate.sh and the dtype groups each runs. An op is validated only
# when all of them ran, every test of the op passed in them, and memcheck found the op clean.
TEST_STAGES = {"test_bf16": "bf16", "test_fp16": "fp16", "test_fp32": "fp32,other"}
GROUPS = ("bf16", "fp16", "fp32", "other")
DTYPE_GROUP = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
OUTCOMES = ("passed", "failed", "error", "skipped", "not_run")


# ----------------------------------------------------------------------------------------------
# Where and what: the environment, without importing torch (a stage record must cost nothing).
# ----------------------------------------------------------------------------------------------


def _run(*command: str) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def device_info() -> dict:
    """The GPU's name and driver from nvidia-smi, else the CPU."""
    if shutil.which("nvidia-smi"):
        line = _run("nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader")
        if line:
            name, _, driver = line.splitlines()[0].partition(",")
            return {"device": name.strip(), "driver": driver.strip() or None}
    return {"device": f"cpu ({os.cpu_count()} cores, {_cpu_capability()})", "driver": None}


def _cpu_capability() -> str:
    """ATen's CPU capability (``AVX2``, ``AVX512``, ...), and ``AMX`` where the CPU has AMX-BF16
    (oneDNN's bf16 convolutions run on its tiles): what tells two CPUs' figures apart."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    try:
        amx = "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        amx = False
    return f"{capability}, AMX" if amx else capability


def _package_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_cuda_version() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None


def source_hash(build_only: bool = False) -> str:
    """sha256 over the kernel sources: csrc, setup.py, pyproject.toml (and slsdeep_kernels' Python
    unless ``build_only``), so a committed results file names exactly the code it validated."""
    patterns = ["setup.py", "pyproject.toml", "csrc/**/*"] + ([] if build_only else ["slsdeep_kernels/**/*.py"])
    files = sorted({p for pattern in patterns for p in ROOT.glob(pattern) if p.is_file() and "__pycache__" not in p.parts})
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def environment() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **device_info(),
        "torch": _package_version("torch"),
        "cuda": _torch_cuda_version(),
        "triton": _package_version("triton"),
        "python": sys.version.split()[0],
        "sources_sha256": source_hash(),
    }


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600; results are for everyone to read
    os.replace(handle.name, path)


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock for read-modify-write of ``path`` (two stages can end at once)."""
    import fcntl

    name = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"slsdeep-results-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else environment()


# ----------------------------------------------------------------------------------------------
# Reading what a stage left: junit XML, the plugin's selection and event log, benchmark JSON.
# ----------------------------------------------------------------------------------------------


def _nodeid(classname: str, name: str) -> str:
    return classname.replace(".", "/") + ".py::" + name


def _junit_cases(path: str) -> list[dict]:
    """One dict per testcase: its id, outcome, message and the properties the plugin attached."""
    root = ElementTree.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        if not case.get("name"):
            continue  # the test a KeyboardInterrupt cut: pytest writes an empty <testcase>
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        outcome, message = "passed", None
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            element = case.find(tag)
            if element is not None:
                outcome, message = name, (element.get("message") or element.text or "")[:300]
                break
        cases.append({
            "id": props.pop("nodeid", None) or _nodeid(case.get("classname", ""), case.get("name")),
            "outcome": outcome, **({"message": message} if message else {}),
            **{k: v for k, v in props.items() if k in ("op", "backend", "dtype", "group")},
        })
    return cases


def _read_jsonl(path: str) -> list[dict]:
    events = []
    for line in Path(path).read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return events


def _event_cases(events: list[dict]) -> list[dict]:
    """Outcomes from the plugin's event log (when the junit XML is missing: a killed stage)."""
    cases: dict[str, dict] = {}
    for event in events:
        if event.get("event") != "report":
            continue
        case = cases.setdefault(event["nodeid"], {"id": event["nodeid"], "outcome": "passed", **event.get("props", {})})
        if event["outcome"] == "failed":
            case["outcome"] = "failed" if event["when"] == "call" else "error"
            case["message"] = event.get("message", "")[:300]
        elif event["outcome"] == "skipped" and case["outcome"] == "passed":
            case["outcome"], case["message"] = "skipped", event.get("message", "")[:300]
    return list(cases.values())


def _tests(junit: str | None, selection: str | None, events: str | None) -> dict | None:
    """The stage's per-test outcomes; a selected test that left no record is ``not_run``."""
    cases, source = None, None
    if junit and os.path.exists(junit):
        with contextlib.suppress(ElementTree.ParseError):
            cases, source = _junit_cases(junit), "junit"
    if cases is None and events and os.path.exists(events):
        cases, source = _event_cases(_read_jsonl(events)), "events"
    selected = json.loads(Path(selection).read_text()) if selection and os.path.exists(selection) else None
    if cases is None and selected is None:
        return None
    cases = cases or []
    if selected is not None:
        seen = {c["id"] for c in cases}
        props = {s["id"]: s for s in selected}
        for case in cases:
            for key, value in props.get(case["id"], {}).items():
                case.setdefault(key, value)
        cases += [{**s, "outcome": "not_run"} for s in selected if s["id"] not in seen]
    counts = collections.Counter(c["outcome"] for c in cases)
    return {
        "source": source or "selection",
        "selected": len(selected) if selected is not None else None,
        **{outcome: counts.get(outcome, 0) for outcome in OUTCOMES},
        "failed_ids": [c["id"] for c in cases if c["outcome"] in ("failed", "error")][:50],
        "cases": [{k: v for k, v in c.items() if v not in (None, "")} for c in cases],
    }


def _benchmark_entry(bench: dict) -> dict:
    stats = bench.get("stats", {})
    return {
        "name": bench["name"],
        "group": bench.get("group"),
        "median_s": stats.get("median"),
        "min_s": stats.get("min"),
        "max_s": stats.get("max"),
        "iqr_s": stats.get("iqr"),
        "rounds": stats.get("rounds"),
        **bench.get("extra_info", {}),
    }


def _benchmarks(path: str) -> list[dict]:
    data = json.loads(Path(path).read_text())
    return [_benchmark_entry(bench) for bench in data.get("benchmarks", [])]


def _sanitize(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    entries = []
    for entry in data.get("entries", []):
        keep = {k: entry.get(k) for k in ("op", "backend", "status", "errors", "rc", "seconds", "reason") if entry.get(k) is not None}
        keep["cases"] = {c["name"]: c["status"] for c in entry.get("cases", [])}
        if entry.get("status") != "passed" and entry.get("log_tail"):
            keep["log_tail"] = entry["log_tail"][-2000:]
        entries.append(keep)
    return {"tool": data.get("tool"), "sanitizer": data.get("sanitizer"), "dry_run": data.get("dry_run", False),
            "entries": entries}


# ----------------------------------------------------------------------------------------------
# The per-op, per-backend pass table.
# ----------------------------------------------------------------------------------------------


def op_functions() -> dict[str, list[str]]:
    """The op modules (``slsdeep_kernels/ops/<op>.py``) and the public op names each resolves."""
    found = {}
    for path in sorted((ROOT / "slsdeep_kernels" / "ops").glob("*.py")):
        if path.stem.startswith("_"):
            continue
        names = re.findall(r"^\s*(?:OP|op)\s*=\s*[\"'](\w+)[\"']", path.read_text(), re.MULTILINE)
        found[path.stem] = sorted(set(names)) or [path.stem]
    return found


def op_table(data: dict) -> dict:
    """``{op: {"functions": [...], backend: {"validated": bool, counts..., "why_not": "..."}}}``.

    A backend of an op is validated when this is no dry run, every stage of TEST_STAGES left a test
    record, at least one of the op's GPU tests for that backend ran, none failed, errored, was
    skipped or was left unrun, and memcheck found that op and backend clean.
    """
    stages = data.get("stages", {})
    cases: dict[str, dict] = {}
    for name, stage in ordered_stages(data):
        if stage.get("kind") == "gpu-tests" and stage.get("tests"):
            for case in stage["tests"]["cases"]:
                cases[case["id"]] = {**case, "stage": name}
    memcheck: dict[tuple, str] = {}
    for _, stage in ordered_stages(data):
        if stage.get("kind") == "sanitize":
            for entry in stage.get("sanitize", {}).get("entries", []):
                memcheck[(entry["op"], entry["backend"])] = entry["status"]
    missing = [s for s in TEST_STAGES if s not in stages]
    unrecorded = [s for s in TEST_STAGES if s in stages and not stages[s].get("tests")]
    # The test and memcheck stages must have run on one version of the sources (calls can differ).
    sources = {run.get("call"): run.get("sources_sha256") for run in data.get("runs", [])}
    versions = {sources.get(stage.get("call")) for stage in stages.values()
                if stage.get("kind") in ("gpu-tests", "sanitize") and stage.get("call") in sources}
    functions = op_functions()
    ops = sorted(set(functions) | {c.get("op") for c in cases.values() if c.get("op")} | {op for op, _ in memcheck})
    table = {}
    for op in ops:
        row: dict = {"functions": functions.get(op, [op])}
        for backend in GPU_BACKENDS:
            mine = [c for c in cases.values() if c.get("op") == op and c.get("backend") in (backend, "all")]
            counts = collections.Counter(c["outcome"] for c in mine)
            dtypes: dict[str, collections.Counter] = {}
            for case in mine:
                dtypes.setdefault(case.get("dtype") or "none", collections.Counter())[case["outcome"]] += 1
            clean = memcheck.get((op, backend), "not run")
            reasons = []
            if data.get("dry_run"):
                reasons.append("dry run")
            if missing:
                reasons.append(f"stages not run: {', '.join(missing)}")
            if unrecorded:
                reasons.append(f"no test record from {', '.join(unrecorded)}")
            if len(versions) > 1:
                reasons.append("its test and memcheck stages ran on different sources")
            if not mine:
                reasons.append("no GPU test of it ran")
            reasons += [f"{counts[o]} {o.replace('_', ' ')}" for o in OUTCOMES[1:] if counts[o]]
            if clean != "passed":
                reasons.append(f"memcheck {clean}")
            entry = {"validated": not reasons, **{o: counts.get(o, 0) for o in OUTCOMES}, "memcheck": clean,
                     "dtypes": {d: dict(c) for d, c in sorted(dtypes.items())}}
            failed = [c["id"] for c in mine if c["outcome"] in ("failed", "error")]
            if failed:
                entry["failed_tests"] = failed[:20]
            if reasons:
                entry["why_not"] = "; ".join(reasons)
            row[backend] = entry
        table[op] = row
    return table


# ----------------------------------------------------------------------------------------------
# Commands.
# ----------------------------------------------------------------------------------------------


def _now(timespec: str = "seconds") -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec=timespec)


def ordered_stages(data: dict) -> list[tuple[str, dict]]:
    """The stages in the order they ended (the file's keys are sorted)."""
    return sorted(data.get("stages", {}).items(), key=lambda item: item[1].get("ended", ""))


def init(args: argparse.Namespace) -> None:
    path = Path(args.file)
    with locked(path):
        data = _load(path)
        if args.dry_run:
            data["dry_run"] = True
        plan = {}
        for item in args.plan or []:
            name, _, seconds = item.partition("=")
            plan[name] = int(seconds)
        data.setdefault("runs", []).append({
            "call": args.call, "started": _now(),
            "plan_s": plan, "cpus": os.cpu_count(), **device_info(), "sources_sha256": source_hash(),
            **({"dry_run": True} if args.dry_run else {}),
        })
        data["ops"] = op_table(data)
        write_atomic(path, data)
        _copy(path, args.copy_to)


def _copy(path: Path, directory: str | None) -> None:
    if directory:
        target = Path(directory) / path.name
        if target.resolve() != path.resolve():
            write_atomic(target, json.loads(path.read_text()))


def record(args: argparse.Namespace) -> None:
    path = Path(args.file)
    stage: dict = {"rc": args.rc, "seconds": args.seconds, "ended": _now("milliseconds")}
    if args.kind:
        stage["kind"] = args.kind
    if args.budget is not None:
        stage["budget_s"] = args.budget
    if args.rc in (124, 137):
        stage["timed_out"] = True
    if args.note:
        stage["notes"] = args.note
    if args.backend:
        stage["backend"] = args.backend
    if args.log and os.path.exists(args.log):
        stage["log_tail"] = Path(args.log).read_text(errors="replace")[-4000:]
    tests = _tests(args.junit_xml, args.selection, args.events)
    if tests is not None:
        stage["tests"] = tests
    benchmarks = None
    if args.benchmark_json and os.path.exists(args.benchmark_json):
        with contextlib.suppress(json.JSONDecodeError):
            benchmarks = _benchmarks(args.benchmark_json)
    if benchmarks is None and args.events and os.path.exists(args.events) and args.kind in (None, "bench"):
        benchmarks = [_benchmark_entry(e) for e in _read_jsonl(args.events) if e.get("event") == "benchmark"]
    if benchmarks is not None:
        for bench in benchmarks:
            if args.backend and bench.get("way", "").startswith("fused"):
                bench["backend"] = args.backend
        stage["benchmarks"] = benchmarks
    if args.sanitize_json and os.path.exists(args.sanitize_json):
        stage["sanitize"] = _sanitize(args.sanitize_json)
    if args.call:
        stage["call"] = args.call
    with locked(path):
        data = _load(path)
        stages = data.setdefault("stages", {})
        earlier = stages.get(args.stage)
        if earlier and earlier.get("call") and earlier.get("call") != args.call:  # the same stage in an earlier call
            stages[f"{args.stage}@call{earlier['call']}"] = earlier
        stages[args.stage] = stage
        data["ops"] = op_table(data)
        write_atomic(path, data)
        _copy(path, args.copy_to)


def merge(args: argparse.Namespace) -> None:
    """Later files' stages and runs win; the environment is the first file's."""
    datas = [json.loads(Path(f).read_text()) for f in args.inputs]
    merged = dict(datas[0])
    merged["stages"], merged["runs"] = {}, []
    for data in datas:
        merged["stages"].update(data.get("stages", {}))
        merged["runs"] += data.get("runs", [])
        merged["dry_run"] = merged.get("dry_run", False) or data.get("dry_run", False)
    merged["ops"] = op_table(merged)
    write_atomic(Path(args.out), merged)


def summary_text(data: dict) -> str:
    lines = [f"device: {data.get('device')}   torch {data.get('torch')}   triton {data.get('triton')}   "
             f"sources {str(data.get('sources_sha256'))[:12]}{'   DRY RUN' if data.get('dry_run') else ''}",
             f"{'stage':<15} {'rc':>4} {'seconds':>8} {'budget':>7}  result"]
    for name, stage in ordered_stages(data):
        what = []
        if "tests" in stage:
            t = stage["tests"]
            what.append(", ".join(f"{t[o]} {o.replace('_', ' ')}" for o in OUTCOMES if t.get(o)) or "no tests")
        if "benchmarks" in stage:
            what.append(f"{len(stage['benchmarks'])} benchmarks")
        if "sanitize" in stage:
            what.append(", ".join(f"{e['op']}/{e['backend']} {e['status']}" for e in stage["sanitize"]["entries"]))
        if stage.get("timed_out"):
            what.append("TIMED OUT")
        what += stage.get("notes", [])
        lines.append(f"{name:<15} {stage['rc']:>4} {stage['seconds']:>8.0f} {stage.get('budget_s', ''):>7}  {'; '.join(what)}")
    lines.append(f"{'op':<15} {'backend':<7} {'validated':<9} passed failed error skipped not_run  memcheck  why not")
    for op, row in data.get("ops", {}).items():
        for backend in GPU_BACKENDS:
            e = row[backend]
            lines.append(f"{op:<15} {backend:<7} {'yes' if e['validated'] else 'no':<9} {e['passed']:>6} {e['failed']:>6} "
                         f"{e['error']:>5} {e['skipped']:>7} {e['not_run']:>7}  {e['memcheck']:<8}  {e.get('why_not', '')}")
    return "\n".join(lines)


def speedups(benchmarks: list[dict]) -> list[dict]:
    """One row per group and fused backend: the fused time (and images/s for the whole model's
    cases) and its ratios to eager and compile (with the compile's mode, where not the default) of
    the same group (later stages win, so a full run replaces the quick one's figures)."""
    groups: dict[str, dict] = {}
    for bench in benchmarks:
        way = bench.get("way", bench["name"])
        if way == "fused":
            way = ("fused", bench.get("backend"))
        groups.setdefault(bench["group"], {})[way] = bench
    rows = []
    for group, ways in sorted(groups.items()):
        for key in sorted((k for k in ways if isinstance(k, tuple)), key=lambda k: str(k[1])):
            fused = ways[key]
            if not fused.get("median_s"):
                continue
            row = {"group": group, "backend": key[1], "fused_ms": fused["median_s"] * 1e3}
            for other in ("eager", "compile", "onnxruntime"):
                if ways.get(other, {}).get("median_s"):
                    row[f"vs_{other}"] = ways[other]["median_s"] / fused["median_s"]
            if "vs_compile" in row and ways["compile"].get("compile_mode"):
                row["compile_mode"] = ways["compile"]["compile_mode"]
            if fused.get("bandwidth_roof_share") is not None:
                row["roof"] = fused["bandwidth_roof_share"]
            if fused.get("images_per_s") is not None:
                row["images_per_s"] = fused["images_per_s"]
            rows.append(row)
    return rows


def _result_files(files: list[str]) -> list[str]:
    return files or sorted(glob.glob(str(RESULTS_DIR / "*.json")))


def markdown(files: list[str]) -> str:
    """The performance table of ``files``: one row per file, benchmark group and fused backend; the device
    cell names the run's day, so that the same machine's runs tell apart."""
    lines = ["| device | case | fused ms | fused images/s | × eager | × compile | bandwidth roof |",
             "|---|---|---|---|---|---|---|"]
    for file in files:
        data = json.loads(Path(file).read_text())
        if data.get("dry_run"):
            continue
        benchmarks = [b for _, stage in ordered_stages(data) for b in stage.get("benchmarks", [])]
        for row in speedups(benchmarks):
            vs_compile = f"{row['vs_compile']:.2f}" if "vs_compile" in row else ""
            cells = [
                data.get("device", "?") + (f", {data['date'][:10]}" if data.get("date") else ""),  # a machine's runs apart
                row["group"] + (f" · {row['backend']}" if row["backend"] else ""),
                f"{row['fused_ms']:.3f}",
                f"{row['images_per_s']:.1f}" if "images_per_s" in row else "",
                f"{row['vs_eager']:.2f}" if "vs_eager" in row else "",
                f"{vs_compile} ({row['compile_mode']})" if "compile_mode" in row else vs_compile,
                f"{row['roof']:.0%}" if "roof" in row else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validated_markdown(files: list[str]) -> str:
    """Which ops' GPU backends passed their GPU tests and memcheck, per device, citing the file."""
    lines = ["| device | op | triton | cuda | results file |", "|---|---|---|---|---|"]
    for file in files:
        data = json.loads(Path(file).read_text())
        if data.get("dry_run") or "ops" not in data or not any(s.get("kind") == "gpu-tests" for s in data.get("stages", {}).values()):
            continue
        for op, row in data["ops"].items():
            cells = [data.get("device", "?"), f"{op} ({', '.join(row['functions'])})"]
            cells += ["passed" if row[b]["validated"] else "not validated" for b in GPU_BACKENDS]
            cells.append(f"`bench/results/{Path(file).name}`")
            lines.append("| " + " | ".join(cells) + " |")
    if len(lines) == 2:
        lines.append("| (none) | no GPU validation run is committed yet: every op defaults to `reference` on CUDA tensors | | | |")
    return "\n".join(lines)


def table(args: argparse.Namespace) -> None:
    print(markdown(_result_files(args.files)))


def validated(args: argparse.Namespace) -> None:
    print(validated_markdown(_result_files(args.files)))


GENERATED_DOCS = ("README.md", "docs/performance.md")


def readme(args: argparse.Namespace) -> None:
    """Rewrites the blocks between ``<!-- results-table -->`` and ``<!-- validation-table -->``
    markers (each closed by its ``<!-- /... -->``) that README.md and docs/performance.md have."""
    files = _result_files([])
    blocks = (("results-table", markdown(files)), ("validation-table", validated_markdown(files)))
    for name in GENERATED_DOCS:
        path = ROOT / name
        text = path.read_text()
        for marker, body in blocks:
            begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
            if begin in text and end in text:
                head, rest = text.split(begin, 1)
                _, tail = rest.split(end, 1)
                text = f"{head}{begin}\n{body}\n{end}{tail}"
        path.write_text(text)


def dry_split(args: argparse.Namespace) -> None:
    """Dry run only: a test stage's stand-in junit XML and selection, cut from one CPU run of every
    GPU test (all skipped there) by the stage's dtype groups."""
    groups = set(args.groups.split(","))
    cases = [c for c in _junit_cases(args.junit) if c.get("group") in groups]
    suite = ElementTree.Element("testsuite", name="pytest", tests=str(len(cases)), skipped=str(len(cases)), failures="0", errors="0")
    for case in cases:
        classname, _, name = case["id"].partition("::")
        element = ElementTree.SubElement(suite, "testcase", classname=classname.removesuffix(".py").replace("/", "."), name=name)
        properties = ElementTree.SubElement(element, "properties")
        for key in ("nodeid", "op", "backend", "dtype", "group"):
            value = case["id"] if key == "nodeid" else case.get(key, "")
            ElementTree.SubElement(properties, "property", name=key, value=value or "")
        ElementTree.SubElement(element, "skipped", message=f"dry run: {case.get('message', '')}"[:200])
    root = ElementTree.Element("testsuites")
    root.append(suite)
    ElementTree.ElementTree(root).write(args.junit_out, encoding="utf-8", xml_declaration=True)
    selected = [s for s in json.loads(Path(args.selection).read_text()) if s.get("group") in groups]
    Path(args.selection_out).write_text(json.dumps(selected, indent=1))
    print(f"dry run: {len(cases)} tests of groups {args.groups} (stand-in for the GPU run)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ini = commands.add_parser("init")
    ini.add_argument("file")
    ini.add_argument("--call", default=None)
    ini.add_argument("--dry-run", action="store_true")
    ini.add_argument("--plan", nargs="*")
    ini.add_argument("--copy-to")
    rec = commands.add_parser("record")
    rec.add_argument("file")
    rec.add_argument("--stage", required=True)
    rec.add_argument("--rc", type=int, required=True)
    rec.add_argument("--seconds", type=float, required=True)
    rec.add_argument("--kind", choices=["build", "precompile", "gpu-tests", "sanitize", "bench"])
    rec.add_argument("--budget", type=int)
    rec.add_argument("--log")
    rec.add_argument("--benchmark-json")
    rec.add_argument("--junit-xml")
    rec.add_argument("--selection")
    rec.add_argument("--events")
    rec.add_argument("--backend")
    rec.add_argument("--sanitize-json")
    rec.add_argument("--note", action="append")
    rec.add_argument("--call", help="the call (1, 2, all) that ran the stage")
    rec.add_argument("--copy-to")
    commands.add_parser("summary").add_argument("file")
    for name in ("table", "validated"):
        commands.add_parser(name).add_argument("files", nargs="*")
    commands.add_parser("readme")
    mer = commands.add_parser("merge")
    mer.add_argument("out")
    mer.add_argument("inputs", nargs="+")
    commands.add_parser("device")
    commands.add_parser("source-hash").add_argument("--build", action="store_true")
    split = commands.add_parser("dry-split")
    split.add_argument("junit")
    split.add_argument("selection")
    split.add_argument("--groups", required=True)
    split.add_argument("--junit-out", required=True)
    split.add_argument("--selection-out", required=True)
    args = parser.parse_args(argv)
    if args.command == "summary":
        print(summary_text(json.loads(Path(args.file).read_text())))
    elif args.command == "device":
        print(device_info()["device"])
    elif args.command == "source-hash":
        print(source_hash(build_only=args.build))
    else:
        {"init": init, "record": record, "table": table, "validated": validated, "readme": readme,
         "merge": merge, "dry-split": dry_split}[args.command](args)
    return 0


# ----------------------------------------------------------------------------------------------
# The pytest plugin (``python -m pytest -p bench.results ...``): selection by dtype group, a record
# of the selection, outcomes and benchmarks as they happen, and a soft deadline.
# ----------------------------------------------------------------------------------------------

if "pytest" in sys.modules:  # loaded by pytest (-p bench.results, or a test importing it)
    import pytest as _pytest

    _hookimpl = _pytest.hookimpl
else:  # the command line: no pytest import (each stage record stays cheap)
    _pytest = None

    def _hookimpl(**_):
        return lambda function: function


_config = None


def _append(path: str | None, event: dict) -> None:
    if path:
        with open(path, "a") as handle:  # one short line per write: appends from several processes stay whole
            handle.write(json.dumps(event, default=str) + "\n")


def _dtype_name(value) -> str | None:
    """``"bfloat16"`` for ``torch.bfloat16`` (without importing torch), else None."""
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value).removeprefix("torch.")
    return None


def properties_of(item) -> dict:
    """op (the test module ``test_<op>.py``), backend, dtype and dtype group of a GPU test."""
    params = getattr(getattr(item, "callspec", None), "params", {}) or {}
    dtype = _dtype_name(params.get("dtype")) or next(
        (_dtype_name(v) for k, v in params.items() if k.endswith("dtype") and not k.startswith("target") and _dtype_name(v)), None)
    if dtype is None and isinstance(params.get("dtype"), str):
        dtype = params["dtype"]
    dtype = dtype or ""
    name = item.name.split("[")[0]
    backend = params.get("backend")
    if backend not in GPU_BACKENDS:
        backend = next((b for b in GPU_BACKENDS if b in name.split("_")), "all")
    group = DTYPE_GROUP.get(dtype, "other")
    return {"op": Path(str(item.path)).stem.removeprefix("test_"), "backend": backend, "dtype": dtype, "group": group}


def pytest_addoption(parser):
    group = parser.getgroup("gpu_validate", "bench/gpu_validate.sh (bench/results.py)")
    group.addoption("--gpu-group", help=f"comma list of {', '.join(GROUPS)}: keep only those tests, in that order")
    group.addoption("--gpu-selection", help="write the selected tests (id, op, backend, dtype, group) here as JSON")
    group.addoption("--gpu-log", help="append every test outcome and benchmark here as JSON lines, as they happen")
    group.addoption("--gpu-deadline", type=float, help="Unix time after which tests not yet started are skipped")


def pytest_configure(config):
    global _config
    _config = config


@_hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    groups = config.getoption("gpu_group")
    if not groups:
        return
    order = [g for g in groups.split(",") if g]
    unknown = set(order) - set(GROUPS)
    if unknown:
        raise _pytest.UsageError(f"--gpu-group: unknown {', '.join(sorted(unknown))} (known: {', '.join(GROUPS)})")
    keep, drop = [], []
    for item in items:
        props = properties_of(item)
        if props["group"] in order:
            item.user_properties += [("nodeid", item.nodeid)] + list(props.items())
            keep.append((order.index(props["group"]), len(keep), item, props))
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    keep.sort(key=lambda entry: entry[:2])
    items[:] = [entry[2] for entry in keep]
    path = config.getoption("gpu_selection")
    if path:
        selection = [{"id": item.nodeid, **props} for _, _, item, props in keep]
        tmp = f"{path}.{os.getpid()}.tmp"  # pytest-xdist: every worker collects and writes the same list
        Path(tmp).write_text(json.dumps(selection, indent=1))
        os.replace(tmp, path)


@_hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = item.config.getoption("gpu_deadline")
    if deadline and time.time() > deadline:
        _pytest.skip("gpu_validate: the stage's time budget was spent before this test started")


@_hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    path = item.config.getoption("gpu_log")
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    meta = getattr(fixture, "stats", None)
    if path and meta is not None:
        with contextlib.suppress(Exception):  # a benchmark cut short has no statistics
            stats = meta.stats
            _append(path, {"event": "benchmark", "name": meta.name, "fullname": meta.fullname, "group": meta.group,
                           "stats": {"median": stats.median, "iqr": stats.iqr, "rounds": stats.rounds, "min": stats.min},
                           "extra_info": dict(meta.extra_info)})


def pytest_runtest_logreport(report):
    if _config is None or hasattr(_config, "workerinput"):  # xdist: the controller writes every report once
        return
    final = report.when == "call" or report.outcome != "passed"
    if final:
        message = ""
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        elif report.outcome == "failed":
            message = str(report.longrepr)[-300:]
        props = {k: v for k, v in report.user_properties if k in ("op", "backend", "dtype", "group")}
        _append(_config.getoption("gpu_log"), {"event": "report", "nodeid": report.nodeid, "when": report.when,
                                               "outcome": report.outcome, "message": message, "props": props})


def pytest_sessionfinish(session, exitstatus):
    # A dtype group with no test is an empty stage, not a failure.
    if session.config.getoption("gpu_group") and exitstatus == 5:
        session.exitstatus = 0


if __name__ == "__main__":
    sys.exit(main())

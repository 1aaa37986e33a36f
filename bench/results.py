"""Benchmark results files: record a stage of a validation run, and render the README's table.

    python bench/results.py record FILE --stage build --rc 0 --seconds 42 [--log LOG]
                                        [--benchmark-json J] [--junit-xml X]
    python bench/results.py table [bench/results/*.json]   # markdown
    python bench/results.py readme                         # rewrite README.md's table from bench/results/

A results file is one JSON object: when and where it was measured (date, device, torch, triton and
CUDA versions) and one entry per stage. ``record`` rewrites the file atomically after every stage,
so a stage that fails or hangs later never loses what earlier stages measured.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600; results are for everyone to read
    os.replace(handle.name, path)


def _junit_counts(path: str) -> dict:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for suite in suites
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {**counts, "failed": failed}


def _benchmarks(path: str) -> list[dict]:
    data = json.loads(Path(path).read_text())
    return [
        {
            "name": bench["name"],
            "group": bench["group"],
            "median_s": bench["stats"]["median"],
            "iqr_s": bench["stats"]["iqr"],
            "rounds": bench["stats"]["rounds"],
            **bench.get("extra_info", {}),
        }
        for bench in data.get("benchmarks", [])
    ]


def record(args: argparse.Namespace) -> None:
    path = Path(args.file)
    data = json.loads(path.read_text()) if path.exists() else environment()
    stage: dict = {"rc": args.rc, "seconds": args.seconds}
    if args.log and os.path.exists(args.log):
        stage["log_tail"] = Path(args.log).read_text(errors="replace")[-4000:]
    if args.junit_xml and os.path.exists(args.junit_xml):
        stage["tests"] = _junit_counts(args.junit_xml)
    if args.benchmark_json and os.path.exists(args.benchmark_json):
        stage["benchmarks"] = _benchmarks(args.benchmark_json)
    data.setdefault("stages", {})[args.stage] = stage
    write_atomic(path, data)


def speedups(benchmarks: list[dict]) -> list[dict]:
    """One row per group with the fused time and its ratios to eager and compile of the same run."""
    groups: dict[str, dict] = {}
    for bench in benchmarks:
        groups.setdefault(bench["group"], {})[bench.get("way", bench["name"])] = bench
    rows = []
    for group, ways in sorted(groups.items()):
        fused = ways.get("fused")
        if fused is None:
            continue
        row = {"group": group, "fused_ms": fused["median_s"] * 1e3}
        for other in ("eager", "compile"):
            if other in ways:
                row[f"vs_{other}"] = ways[other]["median_s"] / fused["median_s"]
        if fused.get("bandwidth_roof_share") is not None:
            row["roof"] = fused["bandwidth_roof_share"]
        rows.append(row)
    return rows


def markdown(files: list[str]) -> str:
    """The performance table of ``files``: one row per benchmark group that has a fused way."""
    lines = ["| device | case | fused ms | × eager | × compile | bandwidth roof |", "|---|---|---|---|---|---|"]
    for file in files:
        data = json.loads(Path(file).read_text())
        benchmarks = [b for stage in data.get("stages", {}).values() for b in stage.get("benchmarks", [])]
        for row in speedups(benchmarks):
            cells = [
                data.get("device", "?"),
                row["group"],
                f"{row['fused_ms']:.3f}",
                f"{row['vs_eager']:.2f}" if "vs_eager" in row else "",
                f"{row['vs_compile']:.2f}" if "vs_compile" in row else "",
                f"{row['roof']:.0%}" if "roof" in row else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(args: argparse.Namespace) -> None:
    print(markdown(args.files or sorted(glob.glob(str(RESULTS_DIR / "*.json")))))


def readme(args: argparse.Namespace) -> None:
    path = RESULTS_DIR.parent.parent / "README.md"
    text = path.read_text()
    begin, end = "<!-- results-table -->", "<!-- /results-table -->"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    body = markdown(sorted(glob.glob(str(RESULTS_DIR / "*.json"))))
    path.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record")
    rec.add_argument("file")
    rec.add_argument("--stage", required=True)
    rec.add_argument("--rc", type=int, required=True)
    rec.add_argument("--seconds", type=float, required=True)
    rec.add_argument("--log")
    rec.add_argument("--benchmark-json")
    rec.add_argument("--junit-xml")
    tab = commands.add_parser("table")
    tab.add_argument("files", nargs="*")
    commands.add_parser("readme")
    args = parser.parse_args(argv)
    {"record": record, "table": table, "readme": readme}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

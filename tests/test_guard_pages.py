"""Guard-page tests: every op on every backend that runs on CPU, each tensor placed once ending at and
once starting right after an unreadable page, forward and backward (``tests/guard_pages.py`` does the
work: one process per (op, backend), a child per placement; its docstring says how a placement is
made and when it counts as read or written in place).

One subprocess runs every selected (op, backend) (the imports are paid once; each (op, backend) is
its own forked process inside it). A test fails when a placement faults (the message names the op,
backend, case, tensor, side and pass, with the Python stack), when a case did not run at both sides,
or when an (op, backend) loses coverage it has: ``REQUIRED`` lists, per (op, backend), the tensors
that must be read or written in place at the page edge at both sides in some case — by a library
kernel ("kernel") or at least by an ATen op ("any").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slsdeep_kernels.testing import backends_to_test

ROOT = Path(__file__).resolve().parents[1]
OPS = ("nll_epe_loss", "pyramid_pool", "upsample_concat", "pyramid_conv", "conv_bn_relu")
# Every backend on CPU tensors, triton under the interpreter in the subprocess; one unavailable is skipped.
# The backend is named by its test id: "cpu-DEFAULT" is the cpu backend under that instruction-set variant.
PARAMS = [
    pytest.param(op, p.id, id=f"{op}-{p.id}", marks=p.marks)
    for op in OPS for p in backends_to_test(op, interpreter=True)
]  # fmt: skip
PAIRS = [tuple(p.values) for p in PARAMS]
SELFTEST = ("_selftest", "triton")
JOBS = 2
TIMEOUT_S = 900

_K, _A = "kernel", "any"
REQUIRED = {
    ("nll_epe_loss", "reference"): [("input logits", _A), ("input target", _A), ("upstream gradient", _A)],
    ("nll_epe_loss", "cpu"): [
        ("input logits", _K), ("input target", _K), ("upstream gradient", _K),
        ("C++ allocation forward", _K), ("C++ allocation backward", _K),
    ],
    ("nll_epe_loss", "triton"): [
        ("input logits", _K), ("input target", _K), ("upstream gradient", _K), ("output forward", _K), ("output backward", _K),
    ],
    ("pyramid_pool", "reference"): [("input x", _A), ("upstream gradient", _A)],
    ("pyramid_pool", "cpu"): [("input x", _K), ("upstream gradient", _K), ("C++ allocation forward", _K), ("C++ allocation backward", _K)],
    ("pyramid_pool", "triton"): [  # the expand reads the upstream gradient as _cell_values' packed copy, an output
        ("input x", _K), ("upstream gradient", _A), ("output forward", _K), ("output backward", _K),
    ],
    ("upsample_concat", "reference"): [("input x", _A), ("input branches[0]", _A), ("input branches[1]", _A), ("upstream gradient", _A)],
    ("upsample_concat", "cpu"): [
        ("input x", _K), ("input branches[0]", _K), ("input branches[1]", _K), ("upstream gradient", _K),
        ("C++ allocation forward", _K), ("C++ allocation backward", _K),
    ],
    ("upsample_concat", "triton"): [  # x reaches the output through ATen's copy_, the branches the expand as _cell_values' copy
        ("input branches[0]", _A), ("input branches[1]", _A), ("upstream gradient", _K), ("output forward", _K), ("output backward", _K),
    ],
    ("pyramid_conv", "reference"): [("input x", _A), ("input branches[0]", _A), ("input branches[1]", _A)],
    ("pyramid_conv", "cpu"): [("upstream gradient", _K), ("intermediate forward", _K), ("C++ allocation backward", _K)],
    ("pyramid_conv", "triton"): [("upstream gradient", _K), ("intermediate forward", _K), ("output backward", _K)],
    ("conv_bn_relu", "reference"): [
        ("input bn_weight", _A), ("input bn_bias", _A), ("input running_mean", _A), ("input running_var", _A), ("upstream gradient", _A),
    ],
    ("conv_bn_relu", "cpu"): [
        ("input bias", _K), ("input bn_weight", _K), ("input bn_bias", _K), ("input running_mean", _K), ("input running_var", _K),
        ("upstream gradient", _K), ("C++ allocation forward", _K), ("C++ allocation backward", _K),
    ],
    ("conv_bn_relu", "triton"): [  # x and W reach only ATen's conv
        ("input bias", _K), ("input bn_weight", _K), ("input bn_bias", _K), ("input running_mean", _K), ("input running_var", _K),
        ("upstream gradient", _K), ("output forward", _K), ("output backward", _K), ("intermediate forward", _K),
    ],
}  # fmt: skip


def _selected(session) -> list[tuple[str, str]]:
    """The (op, backend) pairs of this file's selected tests (the subprocess runs only those)."""
    pairs = []
    for item in session.items:
        if Path(str(item.fspath)).resolve() != Path(__file__).resolve():
            continue
        if item.originalname == "test_guard_pages" and item.get_closest_marker("skip") is None:
            pairs.append((item.callspec.params["op"], item.callspec.params["backend"]))
        elif item.originalname == "test_harness_catches_strays_and_copies":
            pairs.append(SELFTEST)
    return sorted(set(pairs), key=lambda p: ([*PAIRS, SELFTEST].index(p)))


@pytest.fixture(scope="module")
def guard_results(request, tmp_path_factory):
    pairs = _selected(request.session)
    out = tmp_path_factory.mktemp("guard_pages") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", SLSDEEP_KERNELS_POISON="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "tests.guard_pages", *(f"{op}:{b}" for op, b in pairs), "--json", str(out), "--jobs", str(JOBS)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if not out.exists():
        pytest.fail(f"{' '.join(command)} wrote no results (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return json.loads(out.read_text()), done.stdout


def _failure_text(result: dict) -> str:
    lines = []
    for f in result["failures"]:
        fault = f["how"] in ("killed by SIGSEGV", "killed by SIGBUS")
        what = f"a stray access {'past the end' if f['side'] == 'end' else 'before the start'}" if fault else "not a fault"
        lines.append(
            f"{result['op']} [{result['backend']}] case {f['case']!r}: {f['tensor']} placed at the {f['side']} of its "
            f"page(s): {f['how']} during {f['pass']} ({what})" + (f" ({f['note']})" if f.get("note") else "")
        )
        log = f["log"].splitlines()
        lines += ["    " + line for line in (log[:18] if fault else log[-18:])]
    return "\n".join(lines)


def _table(result: dict) -> str:
    return "\n".join(f"{r['case']} | {r['tensor']} | {r['side']} | {r['status']} | {r['detail']}" for r in result["rows"])


def _counted(row: dict, by: str) -> bool:
    return row["status"] == "counted" if by == _K else row["status"].startswith("counted")


@pytest.mark.parametrize("op, backend", PARAMS)
def test_guard_pages(guard_results, op, backend):
    results, _ = guard_results
    result = results[f"{op}:{backend}"]
    print(_table(result))  # the placements, counted or not and why (pytest -s / -rA)
    assert not result["failures"], "placements that failed:\n" + _failure_text(result)
    ran = {(r["case"], r["side"]) for r in result["rows"]}
    missing = [(case, side) for case in result["cases"] for side in ("end", "start") if (case, side) not in ran]
    assert result["cases"] and not missing, f"{op} [{backend}]: cases that placed nothing: {missing}"
    lost = []
    for prefix, by in REQUIRED[(op, backend.partition("-")[0])]:
        for side in ("end", "start"):
            rows = [r for r in result["rows"] if r["tensor"].startswith(prefix) and r["side"] == side]
            if not any(_counted(r, by) for r in rows):
                seen = "; ".join(f"{r['case']}: {r['status']} ({r['detail']})" for r in rows) or "never placed"
                lost.append(f"{prefix!r} at the {side} ({'by a library kernel' if by == _K else 'in place'}): {seen}")
    assert not lost, f"{op} [{backend}]: placements no longer read or written in place:\n" + "\n".join(lost)


def test_harness_catches_strays_and_copies(guard_results):
    """The harness itself: a Triton kernel reading one element past the end (or before the start) of
    its input, and a compiled kernel writing one element past the output it allocated, fault and are
    named; a tensor the op copies before its kernel reads the copy is not counted; in-place reads by a
    Triton kernel and by a compiled kernel are."""
    results, _ = guard_results
    result = results[":".join(SELFTEST)]
    faults = {(f["case"], f["tensor"], f["side"], f["pass"], f["how"]) for f in result["failures"]}
    assert faults == {
        ("triton reads one element past the end", "input x", "end", "forward", "killed by SIGSEGV"),
        ("triton reads one element before the start", "input x", "start", "forward", "killed by SIGSEGV"),
        ("compiled kernel writes one element past its output",
         "C++ allocation forward#0 in guard_selftest::write_past_end (12,)", "end", "forward", "killed by SIGSEGV"),
    }, _failure_text(result)  # fmt: skip
    status = {(r["case"], r["tensor"], r["side"]): (r["status"], r["detail"]) for r in result["rows"]}
    for side in ("end", "start"):
        assert status[("triton reads in place", "input x", side)][0] == "counted"
        harmless = "triton reads one element past the end" if side == "start" else "triton reads one element before the start"
        assert status[(harmless, "input x", side)][0] == "counted"  # the other side of the stray read is fine
        copied = status[("triton reads a copy", "input x", side)]
        assert copied[0] == "not counted" and "aten clone [copy]" in copied[1], copied
        assert status[("compiled kernel reads in place", "input x", side)][0].startswith("counted")
        copied = status[("compiled kernel copies first", "input x", side)]
        assert copied[0] == "not counted" and "aten::clone" in copied[1], copied
    triton_cases = {r["case"] for r in result["rows"] if r["case"].startswith("triton")}
    assert len(triton_cases) == 4, triton_cases
    for case in triton_cases:  # each writes an output placed through backend.new_output (alone, where x faults)
        for side in ("end", "start"):
            outputs = [v for (c, tensor, s), v in status.items() if c == case and s == side and tensor.startswith("output forward")]
            assert outputs and all(v[0] == "counted" for v in outputs), (case, side, outputs)

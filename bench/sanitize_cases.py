"""``compute-sanitizer --tool memcheck`` over a small case of every kernel: each op on the ``triton``
and ``cuda`` backends, forward and backward, odd shapes where the tests have them.

    python bench/sanitize_cases.py --run --out-dir DIR [--jobs 6] [--timeout 80] [--json SUMMARY]
    python bench/sanitize_cases.py --dry-run --json SUMMARY   # no GPU: every case built, run through
                                                              # the reference on fake tensors
    python bench/sanitize_cases.py --list
    python bench/sanitize_cases.py --child --op OP --backend B --json FILE   # what --run starts

``--run`` starts one process per (op, backend) under memcheck, all at once (one GPU holds them
easily; the sanitizer's cost is mostly on the CPU), each with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``
so every tensor is its own allocation and a read or write past its end is caught rather than landing
in the caching allocator's slack (the cases reuse the GPU tests' shapes, so their kernels come from
the Triton cache). A (op, backend) passes when memcheck reports 0 errors, exits 0, and every case ran.
The summary JSON (one entry per op and backend) is what ``bench/results.py record --sanitize-json``
reads. No ``--leak-check``: PyTorch's allocator and cuBLAS/cuDNN keep device memory until exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (bench/ is sys.path[0]): the package is the repo's
    sys.path.insert(0, str(ROOT))

BACKENDS = ("triton", "cuda")


def _dtype(name):
    import torch

    return getattr(torch, name)


# ---- the cases: each builder returns (fn, inputs); fn(*inputs) gives the output(s) -------------


def conv_case(*, dtype, n, c_in, c_out, k, size, stride=1, dilation=1, channels_last=False, training=False,
              memory_efficient=False):
    def build(device, backend):
        import torch

        import slsdeep_kernels

        dt = _dtype(dtype)
        x = torch.randn(n, c_in, *size, dtype=dt, device=device)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        weight = torch.randn(c_out, c_in, k, k, dtype=dt, device=device) / (c_in * k) ** 0.5
        bias = torch.randn(c_out, dtype=dt, device=device)
        gamma, beta = torch.rand(c_out, dtype=dt, device=device) + 0.5, torch.randn(c_out, dtype=dt, device=device)
        mean, var = torch.randn(c_out, dtype=dt, device=device) * 0.1, torch.rand(c_out, dtype=dt, device=device) + 0.5
        for t in (x, weight, gamma, beta):
            t.requires_grad_(True)
        bias.requires_grad_(not training)
        padding = dilation * (k // 2)

        def fn(x, weight, bias, gamma, beta):
            return slsdeep_kernels.conv_bn_relu(x, weight, bias, gamma, beta, mean, var, stride=stride, padding=padding,
                                                dilation=dilation, training=training, backend=backend,
                                                memory_efficient=memory_efficient)

        return fn, [x, weight, bias, gamma, beta]

    return build


def loss_case(*, dtype, c, shape, target_dtype, reduction, channels_last=False):
    def build(device, backend):
        import torch

        import slsdeep_kernels

        n, h, w = shape
        logits = (3 * torch.randn(n, c, h, w, dtype=torch.float64)).to(device, _dtype(dtype))
        if channels_last:
            logits = logits.to(memory_format=torch.channels_last)
        target = (torch.rand(n, h, w) < 0.4).to(device, _dtype(target_dtype))

        def fn(logits):
            return slsdeep_kernels.nll_epe_loss(logits, target, 0.5, reduction, backend=backend, check_target=False)

        return fn, [logits.requires_grad_()]

    return build


def pyramid_case(what, *, dtype, n, c, side, cb, out=64, channels_last=False, align_corners=False):
    def build(device, backend):
        import torch

        import slsdeep_kernels

        bins = slsdeep_kernels.PYRAMID_BINS
        dt = _dtype(dtype)
        x = torch.randn(n, c, *side, dtype=dt, device=device)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        branches = [torch.randn(n, cb, b, b, dtype=dt, device=device, requires_grad=True) for b in bins]
        weight = (torch.randn(out, c + len(bins) * cb, 3, 3, dtype=dt, device=device) / 40).requires_grad_()
        bias = torch.randn(out, dtype=dt, device=device, requires_grad=True)
        x.requires_grad_()
        if what == "pool":
            return (lambda x: slsdeep_kernels.pyramid_pool(x, bins, backend=backend)), [x]
        if what == "upsample_concat":
            return (lambda x, *b: slsdeep_kernels.upsample_concat(x, list(b), align_corners, backend=backend)), [x, *branches]
        return (lambda x, w, bias, *b: slsdeep_kernels.pyramid_conv3x3(x, list(b), w, bias, align_corners, backend=backend),
                [x, weight, bias, *branches])

    return build


# The GPU tests' shapes (tests/test_*.py), so the pinned kernels come from the Triton cache, plus
# one odd pyramid shape (bins that do not divide the image).
CASES = {
    "conv_bn_relu": [
        ("eval nchw fp16 3x3 stride 2 37x53", conv_case(dtype="float16", n=3, c_in=64, c_out=96, k=3, size=(37, 53), stride=2)),
        ("train nchw fp16 3x3 stride 2 37x53", conv_case(dtype="float16", n=3, c_in=64, c_out=96, k=3, size=(37, 53), stride=2, training=True)),
        ("train memory-efficient nchw fp16 37x53", conv_case(dtype="float16", n=3, c_in=64, c_out=96, k=3, size=(37, 53), stride=2,
                                                             training=True, memory_efficient=True)),
        ("eval channels_last bf16 3x3 dilation 2", conv_case(dtype="bfloat16", n=4, c_in=256, c_out=256, k=3, size=(48, 48), dilation=2,
                                                            channels_last=True)),
        ("train channels_last bf16 3x3 dilation 2", conv_case(dtype="bfloat16", n=4, c_in=256, c_out=256, k=3, size=(48, 48), dilation=2,
                                                             channels_last=True, training=True)),
        ("train channels_last fp32 1x1", conv_case(dtype="float32", n=4, c_in=1024, c_out=256, k=1, size=(48, 48), channels_last=True,
                                                  training=True)),
    ],
    "nll_epe_loss": [
        ("c2 fp32 int64 target 3x37x53 none", loss_case(dtype="float32", c=2, shape=(3, 37, 53), target_dtype="int64", reduction="none")),
        ("c1 bf16 uint8 target 4x384x384 mean", loss_case(dtype="bfloat16", c=1, shape=(4, 384, 384), target_dtype="uint8", reduction="mean")),
        ("c2 fp16 bool target 2x1x257 sum", loss_case(dtype="float16", c=2, shape=(2, 1, 257), target_dtype="bool", reduction="sum")),
        ("c2 fp32 channels_last float target 2x130x67 mean", loss_case(dtype="float32", c=2, shape=(2, 130, 67), target_dtype="float32",
                                                                       reduction="mean", channels_last=True)),
    ],
    "pyramid": [
        ("pool nchw bf16 4x256x48x48", pyramid_case("pool", dtype="bfloat16", n=4, c=256, side=(48, 48), cb=128)),
        ("pool channels_last fp32 4x256x48x48", pyramid_case("pool", dtype="float32", n=4, c=256, side=(48, 48), cb=128, channels_last=True)),
        ("upsample_concat nchw bf16", pyramid_case("upsample_concat", dtype="bfloat16", n=4, c=256, side=(48, 48), cb=128)),
        ("upsample_concat channels_last fp32 align_corners", pyramid_case("upsample_concat", dtype="float32", n=4, c=256, side=(48, 48),
                                                                          cb=128, channels_last=True, align_corners=True)),
        ("conv3x3 nchw bf16 bias", pyramid_case("conv3x3", dtype="bfloat16", n=4, c=256, side=(48, 48), cb=128)),
        ("conv3x3 channels_last fp32 bias align_corners", pyramid_case("conv3x3", dtype="float32", n=4, c=256, side=(48, 48), cb=128,
                                                                       channels_last=True, align_corners=True)),
        ("pool odd fp32 2x24x13x9", pyramid_case("pool", dtype="float32", n=2, c=24, side=(13, 9), cb=8, out=16)),
        ("upsample_concat odd fp32 2x24x13x9", pyramid_case("upsample_concat", dtype="float32", n=2, c=24, side=(13, 9), cb=8, out=16)),
        ("conv3x3 odd fp32 2x24x13x9", pyramid_case("conv3x3", dtype="float32", n=2, c=24, side=(13, 9), cb=8, out=16)),
    ],
}


def run_case(fn, inputs) -> None:
    """Forward, then the gradient of every differentiable input against a random cotangent."""
    import torch

    outputs = fn(*inputs)
    outputs = [o for o in (outputs if isinstance(outputs, (tuple, list)) else (outputs,)) if isinstance(o, torch.Tensor)]
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    differentiable = [o for o in outputs if o.requires_grad]
    if leaves and differentiable:
        torch.autograd.grad(differentiable, leaves, [torch.randn_like(o) for o in differentiable], allow_unused=True)


# ---- the processes -------------------------------------------------------------------------------


def _write(path: str | None, data: dict) -> None:
    if path:
        tmp = f"{path}.tmp"
        Path(tmp).write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)


def child(op: str, backend: str, json_path: str | None) -> int:
    """One op and backend, every case, on the GPU (under the sanitizer when --run started it)."""
    import torch

    import slsdeep_kernels
    from slsdeep_kernels import backend as backends

    entry: dict = {"op": op, "backend": backend, "cases": []}
    if backend not in slsdeep_kernels.available_backends():
        reason = {"triton": backends.triton_error, "cuda": backends.cuda_extension_error}[backend]()
        entry.update(status="unavailable", reason=reason)
        _write(json_path, entry)
        print(f"sanitize: {op} {backend}: unavailable ({reason})", flush=True)
        return 3
    for name, build in CASES[op]:
        start = time.time()
        try:
            torch.manual_seed(0)
            run_case(*build("cuda", backend))
            torch.cuda.synchronize()
            case = {"name": name, "status": "passed"}
        except Exception as error:  # noqa: BLE001 - recorded; after a sticky CUDA error the rest fail too
            case = {"name": name, "status": "error", "message": f"{type(error).__name__}: {str(error)[:300]}"}
        case["seconds"] = round(time.time() - start, 2)
        entry["cases"].append(case)
        _write(json_path, entry)
        print(f"sanitize case: {op} {backend} {name}: {case['status']} ({case['seconds']} s)"
              + (f" {case['message']}" if "message" in case else ""), flush=True)
    entry["status"] = "passed" if all(c["status"] == "passed" for c in entry["cases"]) else "error"
    _write(json_path, entry)
    return 0 if entry["status"] == "passed" else 1


def find_sanitizer() -> str | None:
    return shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)


def _verdict(rc: int | None, log: str, child_entry: dict | None, timed_out: bool) -> dict:
    summary = re.findall(r"ERROR SUMMARY: (\d+) error", log)
    errors = int(summary[-1]) if summary else None
    result: dict = {"rc": rc, "errors": errors}
    if errors or rc == 86:
        result["status"] = "failed"
    elif child_entry and child_entry.get("status") == "unavailable":
        result.update(status="unavailable", reason=child_entry.get("reason"))
    elif timed_out:
        result.update(status="timeout", reason="cut at the stage's time budget")
    elif errors is None:
        result.update(status="error", reason="no memcheck ERROR SUMMARY in the log (the sanitizer did not run the program)")
    elif rc != 0 or not child_entry or child_entry.get("status") != "passed":
        result.update(status="error", reason="a case raised or did not run (see cases and the log)")
    else:
        result["status"] = "passed"
    return result


def run_all(out_dir: str, jobs: int, timeout: float, sanitizer: str | None, json_path: str | None, ops=None, backends=None) -> int:
    """Every (op, backend) under memcheck, ``jobs`` at a time; the summary is rewritten as each ends."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(op, b) for op in (ops or CASES) for b in (backends or BACKENDS)]
    summary = {"tool": "memcheck", "sanitizer": sanitizer, "entries": []}
    if sanitizer is None:
        summary["entries"] = [{"op": op, "backend": b, "status": "error", "reason": "compute-sanitizer not found"} for op, b in pairs]
        _write(json_path, summary)
        print("sanitize: compute-sanitizer not found (PATH, /usr/local/cuda/bin)", flush=True)
        return 2
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "PYTHONUNBUFFERED": "1"}
    deadline = time.time() + timeout
    waiting, running = list(pairs), {}

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)

    def finish(pair, process, timed_out):
        op, backend = pair
        log_path, child_json, handle, start = running.pop(pair)[1:]
        handle.close()
        log = Path(log_path).read_text(errors="replace")
        child_entry = json.loads(Path(child_json).read_text()) if os.path.exists(child_json) else None
        entry = {"op": op, "backend": backend, **_verdict(process.returncode, log, child_entry, timed_out),
                 "seconds": round(time.time() - start, 1), "cases": (child_entry or {}).get("cases", []),
                 "log": Path(log_path).name, "log_tail": log[-3000:]}
        summary["entries"].append(entry)
        _write(json_path, summary)
        print(f"sanitize: {op} {backend}: {entry['status']} (memcheck errors: {entry['errors']}, rc {process.returncode}, "
              f"{entry['seconds']} s)", flush=True)

    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                op, backend = pair = waiting.pop(0)
                log_path, child_json = out / f"sanitize-{op}-{backend}.log", out / f"sanitize-{op}-{backend}.json"
                command = [sanitizer, "--tool", "memcheck", "--error-exitcode", "86", "--report-api-errors", "no",
                           "--print-limit", "30", "--target-processes", "application-only",
                           sys.executable, __file__, "--child", "--op", op, "--backend", backend, "--json", str(child_json)]
                handle = open(log_path, "w")
                process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                running[pair] = (process, str(log_path), str(child_json), handle, time.time())
            for pair, (process, *_rest) in list(running.items()):
                if process.poll() is not None:
                    finish(pair, process, False)
                elif time.time() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    finish(pair, process, True)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for pair, (process, *_rest) in list(running.items()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            finish(pair, process, True)
        for op, backend in waiting:
            summary["entries"].append({"op": op, "backend": backend, "status": "not run", "reason": "interrupted"})
        _write(json_path, summary)
        return 130
    return 0 if all(e["status"] == "passed" for e in summary["entries"]) else 1


def dry_run(json_path: str | None) -> int:
    """Every case built at its real shapes and dtypes and run, forward and backward, through the
    ``reference`` backend on fake tensors (no memory, no arithmetic): the driver and its cases work."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import slsdeep_kernels  # noqa: F401 - the import is part of what the dry run proves

    sanitizer = find_sanitizer()
    summary = {"tool": "memcheck", "sanitizer": sanitizer, "dry_run": True, "entries": []}
    failures = 0
    for op, cases in CASES.items():
        ran = []
        for name, build in cases:
            try:
                with FakeTensorMode(allow_non_fake_inputs=True):
                    run_case(*build("cpu", "reference"))
                ran.append({"name": name, "status": "dry-run"})
            except Exception as error:  # noqa: BLE001
                failures += 1
                ran.append({"name": name, "status": "error", "message": f"{type(error).__name__}: {str(error)[:300]}"})
        for backend in BACKENDS:
            status = "dry-run" if all(c["status"] == "dry-run" for c in ran) else "error"
            summary["entries"].append({"op": op, "backend": backend, "status": status, "cases": ran,
                                       "reason": "dry run: built and run through the reference on fake tensors"})
        print(f"sanitize dry run: {op}: {len(ran)} cases, {sum(c['status'] == 'error' for c in ran)} errors", flush=True)
    print(f"sanitize dry run: compute-sanitizer {'at ' + sanitizer if sanitizer else 'not found here (the GPU run needs it)'}; "
          f"torch {torch.__version__}", flush=True)
    _write(json_path, summary)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--run", action="store_true", help="every op and backend under compute-sanitizer memcheck")
    mode.add_argument("--dry-run", action="store_true", help="no GPU: build and run every case on fake tensors")
    mode.add_argument("--list", action="store_true")
    mode.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", action="append", choices=sorted(CASES))
    parser.add_argument("--backend", action="append", choices=BACKENDS)
    parser.add_argument("--json", help="write the summary (or, with --child, the one entry) here")
    parser.add_argument("--out-dir", default=".", help="--run: the per-process logs and JSON go here")
    parser.add_argument("--jobs", type=int, default=len(CASES) * len(BACKENDS))
    parser.add_argument("--timeout", type=float, default=600.0, help="--run: seconds before the processes still running are killed")
    parser.add_argument("--sanitizer", default=None, help="compute-sanitizer (default: PATH, then /usr/local/cuda/bin)")
    args = parser.parse_args(argv)
    if args.list:
        for op, cases in CASES.items():
            for name, _ in cases:
                print(f"{op}: {name}")
        return 0
    if args.dry_run:
        return dry_run(args.json)
    if args.child:
        return child(args.op[0], args.backend[0], args.json)
    return run_all(args.out_dir, args.jobs, args.timeout, args.sanitizer or find_sanitizer(), args.json, args.op, args.backend)


if __name__ == "__main__":
    sys.exit(main())

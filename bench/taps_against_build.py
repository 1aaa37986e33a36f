"""The pyramid conv's taps kernels of this build against another build of the extension, same machine,
same run: issue 14's compute-bound target compares the taps with the code of the day it was filed.

    git worktree add /tmp/then 34fdc9d   # the last commit before the instruction-set variants
    (cd /tmp/then && python setup.py build_ext --inplace)
    python bench/taps_against_build.py /tmp/then/slsdeep_kernels/_C*.so [--rounds 5] [--json OUT]

Each round times every build (the other one's automatic code; this one's automatic variant and
DEFAULT) in a process of its own, one after another, so the builds alternate through the run. A
process loads one ``_C`` (both register the same ops); each kernel is timed over 25 calls after 3,
its median kept. Shapes: ``test_bench_cpu_variants.py``'s (4, 128, 48, 48) conv output, bins 1, 2,
3, 6, fp32 (written out here: importing that module would load this build's _C). Prints per build and kernel the median of the rounds' medians, with their min-max.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BINS, N, C_OUT, H, W, CALLS, WARMUP = (1, 2, 3, 6), 4, 128, 48, 48, 25, 3


def _time_kernels(library, variant):
    """{kernel: median ms} for the _C at ``library`` (its variant ``variant`` where given)."""
    import torch

    torch.ops.load_library(library)
    kernels = torch.ops.slsdeep_kernels
    if variant:
        kernels._set_cpu_variant(variant)
    generator = torch.Generator().manual_seed(0)
    out = torch.randn(N, C_OUT, H, W, generator=generator)
    taps = [torch.randn(N, C_OUT, 3, 3, b, b, generator=generator) for b in BINS]
    grad = torch.randn(N, C_OUT, H, W, generator=generator)
    tap_sizes = [v for b in BINS for v in (b, b)]
    calls = {
        "pyramid_taps_add": lambda: kernels.pyramid_taps_add_kernel(out, taps, False),
        "pyramid_taps_backward": lambda: kernels.pyramid_taps_backward_kernel(grad, tap_sizes, 3, False),
    }
    medians = {}
    for name, call in calls.items():
        for _ in range(WARMUP):
            call()
        seconds = []
        for _ in range(CALLS):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        medians[name] = statistics.median(seconds) * 1e3
    return medians


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", help="the other build's _C shared library")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the rounds' medians here")
    parser.add_argument("--child", nargs=2, metavar=("LIBRARY", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_time_kernels(args.child[0], args.child[1] or None)))
        return
    import slsdeep_kernels

    this = str(next(Path(slsdeep_kernels.__file__).parent.glob("_C*.so")))
    builds = {"other build": (args.other, ""), "this build (automatic)": (this, ""), "this build (DEFAULT)": (this, "DEFAULT")}
    rounds = {name: [] for name in builds}
    for _ in range(args.rounds):
        for name, (library, variant) in builds.items():
            child = [sys.executable, __file__, args.other, "--child", library, variant]
            rounds[name].append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout))
    for name, results in rounds.items():
        for kernel in results[0]:
            values = [r[kernel] for r in results]
            print(f"{name:24s} {kernel:22s} {statistics.median(values):7.3f} ms ({min(values):.3f}-{max(values):.3f})")
    if args.json:
        args.json.write_text(json.dumps({"other": args.other, "rounds": rounds}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Other models' pyramid heads in eval: eager vs ``slsdeep_kernels.optimize`` vs ``torch.compile`` of
the eager head, on the encoder's output map (N, 2048, 48, 48). The heads are the faithful copies of
``tests/peer_heads.py``: CSAIL's PPM (4 × 512 branches, 3×3 conv to 512), segmentation_models_pytorch's
PSPDecoder (1×1 conv) and torchvision's ASPP (a bin-1 branch beside four full-resolution ones).

Targets (issue 17): CPU, the CSAIL head ≥ 1.8x eager (its FLOP ceiling is 2x: the 3×3 conv runs over
2048 of the concatenation's 4096 channels), the SMP and ASPP heads never slower than eager; GPU, the
same heads in bf16 ≥ 1.5x eager.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

from slsdeep_kernels import optimize
from slsdeep_kernels.benchmark import Case
from slsdeep_kernels.testing import BENCH_DEVICE, case_parameters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from peer_heads import ASPP, PPM, PSPDecoder  # noqa: E402 - the tests' copies of the peers' heads


def head_cases(device: torch.device) -> list[Case]:
    gpu = device.type == "cuda"
    dtype, n = (torch.bfloat16, 16) if gpu else (torch.float32, 2)
    shape = (n, 2048, 48, 48)
    pixels = n * 48 * 48
    heads = {  # name: (builder, takes the list of feature maps, the fused forward's conv FLOPs)
        "csail_ppm head": (lambda: PPM(num_class=2, fc_dim=2048, ppm_dim=512), True, 2 * pixels * 512 * 9 * 2048),
        "smp_psp_decoder head": (lambda: PSPDecoder(encoder_channels=[2048], out_channels=512), True, 2 * pixels * 512 * 2048),
        "torchvision_aspp head": (lambda: ASPP(2048, (12, 24, 36), out_channels=256), False,
                                  2 * pixels * 256 * 2048 * (1 + 3 * 9) + 2 * pixels * 256 * 1024),  # fmt: skip
    }
    cases = []
    for name, (build, takes_list, flops) in heads.items():
        torch.manual_seed(0)
        eager = build().to(device, dtype).eval()
        fused = optimize(copy.deepcopy(eager))

        def call(model, takes_list=takes_list):
            return (lambda x: model([x])) if takes_list else model

        def make_inputs(device):
            return [torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)]

        cases.append(Case(name, shape, dtype, make_inputs, call(fused), call(eager), flops={"forward": flops}, passes=("forward",)))
    return cases


@pytest.mark.parametrize("case,way,which", case_parameters(head_cases(BENCH_DEVICE)))
def test_head(run_case, case, way, which):
    run_case(case, way, which, rounds=5 if BENCH_DEVICE.type == "cpu" else None)

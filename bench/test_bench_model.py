"""The whole SLSDeep, fused vs unfused (eager) vs ``torch.compile`` of the unfused model: inference at
batch 1 and a large batch, and one training step. The cases live in :func:`slsdeep.benchmark.model_cases`,
shared with ``slsdeep bench``."""

import pytest

from slsdeep.benchmark import model_cases
from slsdeep_kernels.testing import BENCH_DEVICE, QUICK, case_parameters


@pytest.mark.parametrize("case,way,which", case_parameters(model_cases(BENCH_DEVICE, quick=QUICK)))
def test_model(run_case, case, way, which):
    run_case(case, way, which, rounds=5 if BENCH_DEVICE.type == "cpu" else None)

"""Every op, fused vs eager reference vs ``torch.compile(reference)`` (plus each case's extra ways),
forward / backward / both, at the shapes of its issue's targets. The cases live in
:func:`slsdeep_kernels.benchmark.op_cases`, shared with ``slsdeep bench``."""

import pytest

from slsdeep_kernels.benchmark import op_cases
from slsdeep_kernels.testing import BENCH_DEVICE, QUICK, case_parameters


@pytest.mark.parametrize("case,way,which", case_parameters(op_cases(BENCH_DEVICE, quick=QUICK)))
def test_op(run_case, case, way, which):
    run_case(case, way, which)

"""``slsdeep predict`` on CPU, as a user runs it: ``predict_probability`` of the paper-preset SLSDeep
on one 384 × 384 image (batch 1), three ways in one run:

* ``fused``: ``SLSDeep(fused=True)`` in fp32, the default;
* ``bf16``: the same model with ``precision="bf16"`` (bf16 autocast, channels_last image); skipped
  where the CPU has no native bf16 (``slsdeep.predict.supports_bf16``);
* ``eager``: ``SLSDeep(fused=False)`` in fp32 with the same weights.

Issue 14's targets: bf16 >= 1.6x fp32 fused with the masks equal on >= 99.5% of the pixels, and
fp32 fused >= 1.5x eager outside the spread. Each record's ``extra_info`` holds ``images_per_s`` and,
for the other two ways, ``mask_agreement``: the share of pixels whose mask (probability > 0.5)
equals the fused fp32 one's, and ``max_probability_difference``. The weights are the seeded random
initialisation (timing does not depend on them); the image is one of the synthetic data set's.
Skipped on CUDA.
"""

import functools

import numpy as np
import pytest
import torch

from slsdeep.data import ISICDataset, synthesize
from slsdeep.model import SLSDeep
from slsdeep.predict import predict_probability, supports_bf16
from slsdeep_kernels import backend as backends
from slsdeep_kernels.testing import BENCH_DEVICE

pytestmark = pytest.mark.skipif(BENCH_DEVICE.type != "cpu", reason="CPU inference")
SIZE = 384
WAYS = {"fused": (True, "fp32"), "bf16": (True, "bf16"), "eager": (False, "fp32")}  # way: (fused model, precision)


@functools.cache
def _image(folder: str):
    return ISICDataset(synthesize(folder, n=6, size=SIZE, seed=0), "test").load_original(0)[0]


@functools.cache
def _models() -> dict[bool, SLSDeep]:
    torch.manual_seed(0)
    fused, eager = SLSDeep(fused=True).eval(), SLSDeep(fused=False).eval()
    eager.load_state_dict(fused.state_dict())
    return {True: fused, False: eager}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return _image(str(tmp_path_factory.mktemp("predict")))


@pytest.fixture(scope="module")
def exact(image) -> np.ndarray:
    """The default way's probability, which the other ways' masks are compared with."""
    return predict_probability(_models()[True], image, SIZE)


@pytest.mark.parametrize("way", WAYS)
def test_predict(benchmark, image, exact, way):
    fused, precision = WAYS[way]
    if precision == "bf16" and not supports_bf16(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    model = _models()[fused]
    benchmark.group = f"slsdeep predict (1, 3, {SIZE}, {SIZE})"
    probability = benchmark.pedantic(
        predict_probability, args=(model, image, SIZE), kwargs={"precision": precision}, rounds=7, iterations=1,
        warmup_rounds=1,
    )
    benchmark.extra_info.update(op="slsdeep predict", way=way, which="forward", dtype=precision, shape=[1, 3, SIZE, SIZE],
                                device=f"cpu ({backends.cpu_variant()})",
                                images_per_s=1 / benchmark.stats.stats.median)  # fmt: skip
    if way != "fused":
        benchmark.extra_info["mask_agreement"] = float(((probability > 0.5) == (exact > 0.5)).mean())
        benchmark.extra_info["max_probability_difference"] = float(np.abs(probability - exact).max())

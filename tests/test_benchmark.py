"""The measuring harness shared by bench/ and `slsdeep bench`: passes, peak memory, one measurement."""

import pytest
import torch

from slsdeep_kernels import benchmark


def _two_temporaries(x):
    y = x * 2
    z = y + 1
    return z.sum()


def test_peak_memory_sees_live_temporaries():
    x = torch.randn(500, 400, requires_grad=True)
    step = benchmark.make_pass(_two_temporaries, [x], "forward")
    # y and z are alive together: two x-sized tensors, whatever the allocator keeps cached.
    assert benchmark.peak_memory(step, "cpu") >= 2 * x.numel() * x.element_size()


def test_backward_pass_drops_gradients_between_rounds():
    x = torch.randn(50, requires_grad=True)
    step = benchmark.make_pass(_two_temporaries, [x], "backward")
    step.run(step.setup())
    gradient = x.grad.clone()
    assert torch.all(gradient == gradient[0]) and gradient[0] != 0  # 2 × the random cotangent
    step.setup()
    assert x.grad is None  # no round pays for accumulating into the previous gradient


def test_both_pass_draws_its_cotangent_once():
    x = torch.randn(50, requires_grad=True)
    step = benchmark.make_pass(lambda x: x * 2, [x], "both")
    step.run(step.setup())
    first = x.grad.clone()
    step.run(step.setup())
    # the same random cotangent in every round: drawing it is not timed as part of the step
    assert torch.equal(x.grad, first) and first.std() > 0


def test_measure_reports_all_three_ways_and_the_floors():
    case = benchmark.Case(
        "scale", (64,), torch.float32,
        lambda device: [torch.randn(64, device=device, requires_grad=True)],
        lambda x: x * 3, lambda x: x.mul(3),
        bytes_moved={"forward": 2 * 64 * 4},
    )
    for way in case.ways:
        record = benchmark.measure(case, way, "forward", "cpu", repeat=2)
        assert record["way"] == way and record["median_s"] > 0
        assert record["gbytes_per_s"] == record["bytes_moved"] / record["median_s"] / 1e9


@pytest.mark.parametrize(
    "name, part",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 SXM5 80GB", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA H20", None),
    ],
)
def test_roofs_key_each_form_factor(name, part):
    found = benchmark.roof_of(name)
    assert (found and found[0]) == part

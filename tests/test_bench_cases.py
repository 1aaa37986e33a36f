"""The benchmark cases a GPU run times, listed on a CPU (listing builds no model and touches no GPU):
every memory-bound op case moves >= 100 MB in each pass it times, the loss's bytes are its kernels'
traffic, and the whole model's inference runs at batch 16 and 64 against
``torch.compile(mode="max-autotune")``, which only the compile stage that asks for it selects."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import slsdeep.benchmark as model_bench
from slsdeep.model import SLSDeep
from slsdeep_kernels.benchmark import op_cases

CUDA = torch.device("cuda")
ROOT = Path(__file__).resolve().parent.parent


def test_gpu_memory_bound_cases_move_at_least_100_mb_in_every_timed_pass():
    cases = [case for case in op_cases(CUDA) if case.bytes_moved]
    assert {case.op for case in cases} == {"nll_epe_loss", "pool_upsample_concat", "conv_bn_relu eval", "conv_bn_relu train"}
    for case in cases:
        for which in case.passes:
            assert case.bytes_moved[which] >= 1e8, (case.name, which, case.bytes_moved[which])


def test_loss_bytes_are_its_kernels_traffic():
    """Forward without grad reads logits (L) and target (T); with grad it also writes the gradient,
    which backward scales in place (read and write): forward L + T, backward 2L, both 4L + T."""
    cases = {case.dtype: case for case in op_cases(CUDA) if case.op == "nll_epe_loss"}
    assert set(cases) == {torch.float32, torch.bfloat16}
    for dtype, case in cases.items():
        n, c, h, w = case.shape
        logits, target = n * c * h * w * dtype.itemsize, n * h * w  # uint8 target
        assert case.bytes_moved == {"forward": logits + target, "backward": 2 * logits, "both": 4 * logits + target}


def test_gpu_model_cases_list_without_building_a_model(monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("listing the cases built a model")

    monkeypatch.setattr(model_bench, "_models", no_models)
    cases = model_bench.model_cases(CUDA)
    inference = [case for case in cases if case.op == "slsdeep inference"]
    assert [case.shape for case in inference] == [(16, 3, 384, 384), (64, 3, 384, 384)]
    assert all(case.dtype == torch.bfloat16 and case.compile_mode == "max-autotune" for case in inference)
    (training,) = [case for case in cases if case.op == "slsdeep training step"]
    assert training.compile_mode is None  # the default mode, as every op's compile
    assert all(case.images == case.shape[0] for case in cases)
    assert [case.shape[0] for case in model_bench.model_cases(CUDA, quick=True) if case.op == "slsdeep inference"] == [64]


def test_flops_counted_on_the_meta_device_match_a_real_forward():
    shape = (1, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        SLSDeep(fused=False).eval()(torch.randn(shape))
    assert model_bench._forward_flops(shape) == counter.get_total_flops() > 0


@pytest.mark.parametrize("mode, kept", [("", {"default", "max-autotune"}), ("default", {"default"}),
                                        ("max-autotune", {"max-autotune"})])
def test_compile_mode_setting_selects_compile_ways_by_mode(monkeypatch, mode, kept):
    """SLSDEEP_BENCH_COMPILE_MODE (bench/conftest.py): gpu_validate.sh's compile_bench and compile_full
    ask for the default mode, compile_model for max-autotune; other ways are never dropped by it."""
    monkeypatch.setenv("SLSDEEP_BENCH_COMPILE_MODE", mode)
    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "bench" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    monkeypatch.setattr(conftest, "QUICK", False)  # whatever this shell's SLSDEEP_BENCH_QUICK / _WAYS say
    monkeypatch.setattr(conftest, "WAYS", "")
    cases = model_bench.model_cases(CUDA, quick=True)
    params = [{"case": case, "way": way, "which": which} for case in cases for way in case.ways for which in case.passes]
    selected = [p for p in params if conftest.selected(p)]
    assert {p["case"].compile_mode or "default" for p in selected if p["way"] == "compile"} == kept
    assert [p for p in selected if p["way"] != "compile"] == [p for p in params if p["way"] != "compile"]

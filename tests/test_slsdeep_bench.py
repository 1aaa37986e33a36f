"""`slsdeep bench`: the table, the JSON (with images/s) and the bar chart, on a tiny case (the real cases take minutes)."""

import json

import torch

import slsdeep.benchmark as bench
from slsdeep.cli import main
from slsdeep_kernels.benchmark import Case


def tiny_cases(device, quick=False):
    def inputs(device):
        return [torch.randn(2, 1, 9, 11, device=device, requires_grad=True), torch.rand(2, 9, 11, device=device) > 0.5]

    from slsdeep_kernels import nll_epe_loss
    from slsdeep_kernels.ops.nll_epe_loss import nll_epe_loss_reference

    return [Case("nll_epe_loss", (2, 1, 9, 11), torch.float32, inputs, nll_epe_loss, nll_epe_loss_reference, images=2)]


def test_bench_command_prints_a_table_and_writes_json_and_a_chart(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "op_cases", tiny_cases)
    monkeypatch.setattr(bench, "model_cases", lambda device, quick=False, precision=None: [])
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "nll_epe_loss 2x1x9x11 float32" in table and "× compile" in table and "fused img/s" in table
    records = json.loads(out.read_text())["records"]
    assert {r["way"] for r in records} == {"fused", "eager", "compile"}
    assert all(r["which"] == "both" and r["median_s"] > 0 for r in records)
    assert all(r["images_per_s"] == 2 / r["median_s"] for r in records)  # images per call / seconds per call
    assert out.with_suffix(".png").stat().st_size > 0

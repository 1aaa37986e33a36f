"""Whole-model and per-op benchmarks, shared by ``slsdeep bench`` and the pytest-benchmark suites.

The whole SLSDeep is measured three ways, like every op: ``fused`` (``SLSDeep(fused=True)``),
``eager`` (``fused=False``, plain PyTorch) and ``compile`` (``torch.compile`` of the eager model),
for inference (``forward``, eval mode, no autograd) and a training step (``both``: forward, NLL+EPE
loss and backward, train mode). CPU: fp32 at 256 px, inference at batch 1 and 4. GPU: bf16
channels_last at 384 px, inference at batch 16 and 64, and autocast training at batch 16. On a GPU
the inference cases' ``compile`` way is ``torch.compile(eager_model, mode="max-autotune")``, the
issue's baseline (minutes of autotuning per batch size); the training step and every op keep the
default mode. Every model record carries ``images_per_s``. FLOPs come from ``FlopCounterMode`` on
the eager model, counted on the meta device. The models are built when a case is first measured, so
listing the cases (pytest's collection, a CPU test of the GPU cases) builds none and needs no GPU.
On CPU (not ``quick``) one more inference case, batch 1 at 384 px, adds a fourth way: the fused
model exported to ONNX and run by onnxruntime's CPU provider (when the ``export`` extra is
installed; its peak memory is onnxruntime's own, which the torch profiler does not see).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import tempfile
from pathlib import Path

import torch

import slsdeep_kernels
from slsdeep_kernels.benchmark import Case, Lazy, measure, op_cases
from slsdeep.export import OnnxModel, metadata, write_onnx
from slsdeep.model import SLSDeep

INFERENCE_BATCHES = {"cpu": (1, 4), "cuda": (16, 64)}
DEPLOYMENT_SIZE = 384  # the paper's input, for the onnxruntime-beside-PyTorch case
TRAINING_BATCH = {"cpu": 2, "cuda": 16}
IMAGE_SIZE = {"cpu": 256, "cuda": 384}
INFERENCE_COMPILE_MODE = {"cpu": None, "cuda": "max-autotune"}


def _models(device: torch.device, train: bool, dtype: torch.dtype = torch.float32) -> tuple[SLSDeep, SLSDeep]:
    """A fused model and an eager twin with the same weights, on ``device`` in ``dtype``
    (channels_last on CUDA)."""
    torch.manual_seed(0)
    eager = SLSDeep(fused=False)
    fused = SLSDeep(fused=True)
    fused.load_state_dict(eager.state_dict())
    for model in (eager, fused):
        model.to(device, dtype).train(train)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
    return fused, eager


def _autocast(model, dtype: torch.dtype):
    """``model`` called under ``dtype`` autocast, as ``slsdeep predict --precision bf16`` runs it."""

    def run(x):
        with torch.autocast(x.device.type, dtype=dtype):
            return model(x)

    return run


@functools.cache
def _meta_model() -> SLSDeep:
    """The paper-preset eager SLSDeep on the meta device: shapes without weights, for counting."""
    with torch.device("meta"):
        return SLSDeep(fused=False).eval()


@functools.cache
def _forward_flops(shape: tuple) -> int:
    """FLOPs of one forward of the eager SLSDeep on ``shape`` images (counted on the meta device:
    the count depends on the shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        _meta_model()(torch.empty(shape, device="meta"))
    return counter.get_total_flops()


def model_cases(device: torch.device | str, quick: bool = False, precision: str | None = None) -> list[Case]:
    """Inference at each batch size and one training step of the paper-preset SLSDeep. Inference runs
    bf16 channels_last models on CUDA and fp32 on CPU by default; ``precision="fp32"``: fp32 models;
    ``"bf16"``: fp32 models under bf16 autocast on channels_last images (what
    ``slsdeep predict --precision bf16`` runs). ``quick``: the largest inference batch only."""
    from slsdeep.predict import autocast_dtype  # checks precision and the device's bf16, warns as predict does

    device = torch.device(device)
    size = IMAGE_SIZE[device.type]
    autocast = precision is not None and autocast_dtype(_meta_model(), precision, device) is not None
    dtype = torch.bfloat16 if device.type == "cuda" and precision is None else torch.float32
    models = functools.cache(lambda: _models(device, train=False, dtype=dtype))

    def inference(model):
        return _autocast(model, torch.bfloat16) if autocast else model

    fused, eager = Lazy(lambda: inference(models()[0])), Lazy(lambda: inference(models()[1]))
    cases = []
    batches = INFERENCE_BATCHES[device.type][-1:] if quick else INFERENCE_BATCHES[device.type]
    for batch in batches:
        shape = (batch, 3, size, size)

        def inputs(device, shape=shape):
            x = torch.randn(shape, device=device, dtype=dtype)
            return [x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" or autocast else x]

        name = "slsdeep inference (bf16 autocast)" if autocast else "slsdeep inference"
        cases.append(Case(name, shape, torch.bfloat16 if autocast else dtype, inputs, fused, eager,
                          flops={"forward": _forward_flops(shape)}, passes=("forward",), images=batch,
                          compile_mode=INFERENCE_COMPILE_MODE[device.type]))  # fmt: skip

    if device.type == "cpu" and not quick and not autocast and _onnxruntime_installed():
        cases.append(_onnxruntime_case(fused, eager))

    train_models = functools.cache(lambda: _models(device, train=True))
    batch = TRAINING_BATCH[device.type]
    shape = (batch, 3, size, size)

    def step(model, fused_loss):
        def loss(x, target):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
                logits = model(x)
            return slsdeep_kernels.nll_epe_loss(logits.float(), target, backend=None if fused_loss else "reference")

        return loss

    def training_inputs(device, shape=shape):
        x = torch.randn(shape, device=device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return [x, (torch.rand(shape[0], *shape[2:], device=device) > 0.5).long()]

    cases.append(Case("slsdeep training step", shape, torch.float32, training_inputs,
                      Lazy(lambda: step(train_models()[0], True)), Lazy(lambda: step(train_models()[1], False)),
                      flops={"both": 3 * _forward_flops(shape)}, passes=("both",), images=batch))
    return cases


def _onnxruntime_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript", "onnxruntime"))


class _OnnxRuntime:
    """``model`` (built on first use) exported to ONNX for ``shape`` inputs and run by onnxruntime (CPU
    provider), exported on the first call (the benchmark's untimed warm-up)."""

    def __init__(self, model: Lazy, shape: tuple):
        self.model, self.shape, self.session = model, shape, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.session is None:
            model = self.model.resolve()
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "slsdeep.onnx"
                write_onnx(model, torch.zeros(self.shape), path, meta=metadata(model.config, self.shape[-1], False))
                self.session = OnnxModel(path, device="cpu")  # the session holds the graph; the file may go
        return self.session(x)


def _onnxruntime_case(fused: Lazy, eager: Lazy) -> Case:
    """Inference of the paper model at 384 px, batch 1: fused, eager, compile and onnxruntime."""
    shape = (1, 3, DEPLOYMENT_SIZE, DEPLOYMENT_SIZE)

    def inputs(device):
        return [torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)]

    return Case("slsdeep inference", shape, torch.float32, inputs, fused, eager, flops={"forward": _forward_flops(shape)},
                passes=("forward",), extra_ways={"onnxruntime": _OnnxRuntime(fused, shape)}, images=1)


def run(device: torch.device | str, quick: bool = False, out: str | os.PathLike | None = None, log=print,
        precision: str | None = None) -> list[dict]:  # fmt: skip
    """Measure every op and the whole model three ways; print one table (the model's cases with the
    fused model's images/s); write JSON and a bar chart. ``precision``: the whole model's inference
    cases (:func:`model_cases`)."""
    device = torch.device(device)
    repeat = 3 if quick else 10
    cases = op_cases(device, quick=quick) + model_cases(device, quick=quick, precision=precision)
    records = []
    log(f"device: {slsdeep_kernels.benchmark.device_name(device)}")
    log(f"{'case':<52} {'pass':<9} {'eager ms':>10} {'compile ms':>11} {'fused ms':>10} {'× eager':>8} {'× compile':>10} "
        f"{'fused img/s':>12}")
    for case in cases:
        for which in case.passes if not quick else case.passes[-1:]:
            row = {way: measure(case, way, which, device, repeat=repeat) for way in case.ways}
            records += row.values()
            times = {way: record.get("median_s", math.nan) for way, record in row.items()}
            images_per_s = f"{row['fused']['images_per_s']:.1f}" if "images_per_s" in row["fused"] else ""
            log(f"{case.name:<52} {which:<9} {times['eager'] * 1e3:>10.2f} {times['compile'] * 1e3:>11.2f} "
                f"{times['fused'] * 1e3:>10.2f} {times['eager'] / times['fused']:>8.2f} {times['compile'] / times['fused']:>10.2f} "
                f"{images_per_s:>12}")
            for way in case.extra_ways:
                log(f"{'':<52} {which:<9} {way}: {times[way] * 1e3:.2f} ms ({times[way] / times['fused']:.2f}× fused)")
    if out is not None:
        _write(Path(out), records)
        log(f"wrote {out} and {Path(out).with_suffix('.png')}")
    return records


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump({"torch": torch.__version__, "records": records}, handle, indent=1)
    os.replace(handle.name, path)
    _bar_chart(records, path.with_suffix(".png"))


def _bar_chart(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, eager_ratio, compile_ratio = [], [], []
    by_case: dict[tuple, dict] = {}
    for record in records:
        key = (record["op"], tuple(record["shape"]), record["dtype"], record["which"])
        by_case.setdefault(key, {})[record["way"]] = record.get("median_s", math.nan)
    for (op, shape, dtype, which), ways in by_case.items():
        labels.append(f"{op} {'x'.join(map(str, shape))} {dtype} {which}")
        eager_ratio.append(ways["eager"] / ways["fused"])
        compile_ratio.append(ways["compile"] / ways["fused"])
    figure, axis = plt.subplots(figsize=(10, 0.35 * len(labels) + 1.5))
    positions = range(len(labels))
    axis.barh([p + 0.2 for p in positions], eager_ratio, height=0.4, label="fused vs eager")
    axis.barh([p - 0.2 for p in positions], compile_ratio, height=0.4, label="fused vs torch.compile")
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_yticks(list(positions), labels, fontsize=7)
    axis.set_xlabel("speed-up (×, higher is better)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

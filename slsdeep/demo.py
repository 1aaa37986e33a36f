"""``slsdeep demo``: the whole system in one command, on the embedded synthetic data set.

Synthesises dermoscopy-like images in the ISIC 2017 layout, trains SLSDeep (the ``tiny`` preset at
128 px on CPU, the paper preset at 384 px on a GPU), evaluates the best checkpoint on the held-out
test split with the ISIC metrics at each image's original size, and writes the checkpoint, the
training curves and overlays of predictions against the truth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from slsdeep import checkpoint
from slsdeep.data import ISICDataset, synthesize
from slsdeep.evaluate import evaluate_model, format_scores
from slsdeep.predict import overlay, predict_probability
from slsdeep.train import TrainConfig, train


@dataclass(frozen=True)
class DemoSettings:
    images: int
    image_size: int
    preset: str
    epochs: int
    batch_size: int


CPU_DEMO = DemoSettings(images=240, image_size=128, preset="tiny", epochs=12, batch_size=8)
GPU_DEMO = DemoSettings(images=600, image_size=384, preset="paper", epochs=30, batch_size=16)
OVERLAYS = 8


def run_demo(out: str | Path, epochs: int | None = None, images: int | None = None, log=print) -> dict:
    """Run the demo into ``out``; returns the test scores."""
    out = Path(out)
    settings = GPU_DEMO if torch.cuda.is_available() else CPU_DEMO
    epochs = epochs or settings.epochs
    images = images or settings.images
    run = out / "run"
    if (run / "last.pt").exists():
        raise ValueError(f"{out} already holds a demo run; remove it or pass another --out")

    log(f"[1/3] synthesising {images} images of {settings.image_size} px into {out / 'data'}")
    data = synthesize(out / "data", n=images, size=settings.image_size, seed=0)

    log(f"[2/3] training SLSDeep ({settings.preset} preset) for {epochs} epochs into {run}")
    config = TrainConfig(
        data=str(data), out=str(run), epochs=epochs, batch_size=settings.batch_size,
        image_size=settings.image_size, preset=settings.preset, seed=0,
    )
    train(config, log=log)

    log("[3/3] evaluating the best checkpoint on the test split (ISIC scores at original size)")
    model = checkpoint.load_model(run / "best.pt", "cuda" if torch.cuda.is_available() else "cpu")
    test = ISICDataset(data, "test", image_size=settings.image_size)
    scores = evaluate_model(model, test, image_size=settings.image_size)
    (out / "scores.json").write_text(json.dumps(scores, indent=1))
    overlays = out / "overlays"
    overlays.mkdir(exist_ok=True)
    for index in range(min(OVERLAYS, len(test))):
        image, truth = test.load_original(index)
        prediction = predict_probability(model, image, image_size=settings.image_size) > 0.5
        overlay(image, prediction, truth).save(overlays / f"{test.ids[index]}_overlay.png")
    log(format_scores(scores))
    log(
        f"wrote {run / 'best.pt'}, {run / 'curves.png'}, {run / 'metrics.json'}, {out / 'scores.json'} and "
        f"{min(OVERLAYS, len(test))} overlays in {overlays} (green: predicted lesion, red: missed lesion)"
    )
    return scores

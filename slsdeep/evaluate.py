"""ISIC task-1 segmentation metrics, scored as the ISIC 2016-2018 challenges score them.

Every image is thresholded, its confusion counts taken, and accuracy, Dice, Jaccard, sensitivity
and specificity computed per image (a zero denominator scores 1.0), then averaged over images.
Papers also quote pooled-pixel figures (counts summed over the whole data set); both are
reported, under different names, so the two are never confused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

METRICS = ("accuracy", "dice", "jaccard", "sensitivity", "specificity")
JACCARD_THRESHOLD = 0.65  # ISIC 2018: a per-image Jaccard below this scores 0


def binarize(mask) -> np.ndarray:
    """A boolean foreground map from a mask or prediction (numpy array or torch tensor).

    bool: as is; float: probability > 0.5; integer holding only {0, 1}: a label map
    (foreground == 1); any other integer (a 0-255 mask): value > 128.
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu()
        mask = (mask.float() if mask.dtype == torch.bfloat16 else mask).numpy()
    a = np.asarray(mask)
    if a.dtype == np.bool_:
        return a
    if np.issubdtype(a.dtype, np.floating):
        if np.isnan(a).any():
            raise ValueError("mask contains NaN")
        return a > 0.5
    if np.issubdtype(a.dtype, np.integer):
        if a.size and a.min() >= 0 and a.max() <= 1:
            return a == 1
        return a > 128
    raise TypeError(f"unsupported mask dtype {a.dtype}")


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator elementwise, 1.0 where the denominator is 0 (ISIC's convention)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.ones_like(numerator), where=denominator > 0)


def _metrics(tp, fp, fn, tn) -> dict[str, np.ndarray]:
    """The five ISIC metrics from confusion counts (scalars or arrays, one entry per image)."""
    tp, fp, fn, tn = (np.asarray(c, dtype=np.int64) for c in (tp, fp, fn, tn))
    return {
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "jaccard": _ratio(tp, tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
    }


def confusion_counts(prediction, truth, index: int = 0) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) of one 2-D prediction against its truth; ``index`` names the pair in errors."""
    try:
        p, t = binarize(prediction), binarize(truth)
    except (ValueError, TypeError) as err:
        raise ValueError(f"pair {index}: {err}") from None
    if p.ndim != 2 or t.ndim != 2:
        raise ValueError(f"pair {index}: expected 2-D masks, got shapes {p.shape} and {t.shape}")
    if p.shape != t.shape:
        raise ValueError(f"pair {index}: prediction shape {p.shape} != truth shape {t.shape}")
    if p.size == 0:
        raise ValueError(f"pair {index}: empty mask of shape {p.shape}")
    tp = np.count_nonzero(p & t)
    fp = np.count_nonzero(p & ~t)
    fn = np.count_nonzero(~p & t)
    return tp, fp, fn, p.size - tp - fp - fn


def isic_scores(predictions: Sequence, truths: Sequence) -> dict[str, float]:
    """ISIC task-1 scores of predictions against truths (sequences of same-shape 2-D masks).

    Returns the per-image means (``accuracy``, ``dice``, ``jaccard``, ``sensitivity``,
    ``specificity``, ``threshold_jaccard``), the pooled-pixel figures (``<metric>_pooled``) and
    ``n_images``. Inputs are thresholded by :func:`binarize`.
    """
    predictions, truths = list(predictions), list(truths)
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions but {len(truths)} truths")
    return scores_from_confusion([confusion_counts(p, t, i) for i, (p, t) in enumerate(zip(predictions, truths))])


def scores_from_confusion(counts) -> dict[str, float]:
    """:func:`isic_scores`'s dictionary from per-image confusion counts (rows of tp, fp, fn, tn)."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1, 4)
    if not len(counts):
        raise ValueError("no images to score")
    per_image = _metrics(*counts.T)
    pooled = _metrics(*counts.sum(axis=0))
    scores = {name: float(values.mean()) for name, values in per_image.items()}
    jaccard = per_image["jaccard"]
    scores["threshold_jaccard"] = float(np.where(jaccard >= JACCARD_THRESHOLD, jaccard, 0.0).mean())
    scores.update({f"{name}_pooled": float(value) for name, value in pooled.items()})
    scores["n_images"] = len(counts)
    return scores


@torch.no_grad()
def evaluate_model(
    model,
    dataset,
    image_size: int = 384,
    tta: bool = False,
    masks_dir: str | os.PathLike | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """ISIC scores of ``model`` (an ``nn.Module`` or an :class:`slsdeep.export.OnnxModel`) on an
    ``ISICDataset``, at each image's original size.

    Each image is predicted as :func:`slsdeep.predict.predict_probability` does (resize to
    ``image_size``, probability resized back, > 0.5; ``tta``: scales and flips averaged). Only
    confusion counts are kept, so full-size ISIC test sets fit in memory. ``masks_dir``: also
    write every predicted mask there as ``<id>_segmentation.png`` (0/255). ``precision``: "fp32" or
    "bf16" (see :func:`slsdeep.predict.predict_probability`).
    """
    from slsdeep.predict import predict_probability  # here: predict imports data, which imports this module

    if masks_dir is not None:
        masks_dir = Path(masks_dir)
        masks_dir.mkdir(parents=True, exist_ok=True)
    module = model if isinstance(model, torch.nn.Module) else None  # else an OnnxModel: no modes
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    counts = []
    try:
        for index, image_id in enumerate(dataset.ids):
            image, truth = dataset.load_original(index)
            prediction = predict_probability(model, image, image_size=image_size, tta=tta, precision=precision) > 0.5
            counts.append(confusion_counts(prediction, truth, index))
            if masks_dir is not None:
                Image.fromarray(prediction.astype(np.uint8) * 255).save(masks_dir / f"{image_id}_segmentation.png")
    finally:
        if module is not None:
            module.train(was_training)
    return scores_from_confusion(counts)


def format_scores(scores: dict) -> str:
    """A printable table of :func:`isic_scores` output: per-image means beside pooled pixels."""
    lines = [
        f"ISIC task-1 scores over {scores['n_images']} images "
        "(per-image: mean over images, as the ISIC challenge; pooled: over all pixels)",
        f"{'metric':<18}{'per-image':>10}{'pooled':>10}",
    ]
    for name in (*METRICS, "threshold_jaccard"):
        pooled = scores.get(f"{name}_pooled")
        pooled_text = "-" if pooled is None else f"{pooled:.4f}"
        lines.append(f"{name:<18}{scores[name]:>10.4f}{pooled_text:>10}")
    return "\n".join(lines)

"""Prediction: foreground probabilities at an image's original size, masks and overlays.

As the paper: the image is resized to the model's square input size, the softmax (sigmoid for a
single-logit head) of the logits gives the lesion probability, which is resized back to the
original size and thresholded at 0.5. ``tta=True`` averages the paper's scales (0.5–1.5 of the
input size) and horizontal flips. The model may be a PyTorch module or an ONNX export run by
onnxruntime (:class:`slsdeep.export.OnnxModel`): same inputs, same logits.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from slsdeep.data import image_to_tensor
from slsdeep.model import PRECISIONS

TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) logits -> (N, H, W) probability of the lesion class (C = 2 softmax, C = 1 sigmoid)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=1)[:, 1]


def supports_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 convolutions natively (on CPU: oneDNN with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(model, precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype inference runs ``model`` in under autocast for ``precision`` ("fp32": None, no
    autocast). bf16 needs a PyTorch model (an ONNX export runs as exported) and a device with bf16
    support; without it a warning says so (once) and inference runs fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if precision == "fp32":
        return None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"precision={precision!r} needs a PyTorch model; {type(model).__name__} runs as exported (fp32)")
    if not supports_bf16(device):
        warnings.warn(f"precision='bf16': this {device.type} has no native bf16 support; running fp32", RuntimeWarning, stacklevel=3)
        return None
    return torch.bfloat16


@torch.no_grad()
def predict_probability(
    model, image: Image.Image, image_size: int = 384, tta: bool = False, precision: str = "fp32"
) -> np.ndarray:
    """Lesion probability (float32, the image's original height × width) for one RGB PIL image.

    ``model``: an ``nn.Module``, or any callable from normalised images to logits that names the
    device its inputs go to as ``input_device`` (:class:`slsdeep.export.OnnxModel`).
    ``precision="bf16"``: the model runs under bf16 autocast on channels_last images (BatchNorm
    statistics and the probability stay fp32); see :func:`autocast_dtype`.
    """
    device = getattr(model, "input_device", None) or next(model.parameters()).device
    dtype = autocast_dtype(model, precision, device)
    height, width = image.height, image.width
    scales = TTA_SCALES if tta else (1.0,)
    total = torch.zeros(1, 1, height, width, device=device)
    for scale in scales:
        side = max(8, int(round(image_size * scale)))
        x = image_to_tensor(image, side).unsqueeze(0).to(device)
        if dtype is not None:
            x = x.contiguous(memory_format=torch.channels_last)
        flips = (False, True) if tta else (False,)
        for flip in flips:
            with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                logits = model(x.flip(-1) if flip else x)
            probability = foreground_probability(logits)[:, None]
            probability = probability.flip(-1) if flip else probability
            total += F.interpolate(probability, size=(height, width), mode="bilinear", align_corners=False)
    return (total / (len(scales) * len(flips)))[0, 0].cpu().numpy()


def overlay(image: Image.Image, prediction: np.ndarray, truth: np.ndarray | None = None) -> Image.Image:
    """The image with the predicted lesion tinted green and, given the truth, missed lesion red."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    tint = np.zeros_like(pixels)
    weight = np.zeros(pixels.shape[:2], dtype=np.float32)
    predicted = prediction.astype(bool)
    tint[predicted] = (0, 255, 0)
    weight[predicted] = 0.4
    if truth is not None:
        missed = truth.astype(bool) & ~predicted
        tint[missed] = (255, 0, 0)
        weight[missed] = 0.5
    blended = pixels * (1 - weight[..., None]) + tint * weight[..., None]
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8))

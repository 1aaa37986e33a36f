"""Checkpoints: the model configuration with the weights, written atomically.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts) so it loads with
``torch.load(weights_only=True)``: ``config`` (the ``SLSDeep`` constructor arguments), ``model``
(the state dict) and, for training checkpoints, the optimizer, scheduler, epoch, history and RNG
states that ``--resume`` needs. ``evaluate`` and ``predict`` rebuild the model from ``config`` alone.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from slsdeep.model import SLSDeep


def save(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a run killed mid-write leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint (weights only: no code runs); a clear error names a missing or bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(f"checkpoint {path} is not a readable slsdeep checkpoint: {detail}") from error
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"checkpoint {path} has no model configuration and weights ('config', 'model')")
    return state


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", **overrides) -> SLSDeep:
    """The model stored in a checkpoint, in eval mode on ``device`` (``overrides`` e.g. ``fused=False``)."""
    state = load(path)
    model = SLSDeep(**{**state["config"], **overrides})
    model.load_state_dict(state["model"])
    return model.to(device).eval()

"""Training as the paper: Adam, poly learning rate per iteration, NLL + EPE loss, validation per epoch.

One code path for one process and for ``torchrun`` (DistributedDataParallel with a
DistributedSampler; gloo on CPU, nccl on GPU). Rank 0 alone validates and writes files:
``RUN/last.pt`` every epoch (with the optimizer, scheduler and RNG states ``--resume`` needs),
``RUN/best.pt`` by validation Jaccard, ``RUN/metrics.json`` and ``RUN/curves.png``; every file is
written atomically, so a run killed at any moment leaves the previous ones intact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import slsdeep_kernels
from slsdeep import checkpoint
from slsdeep.data import ISICDataset
from slsdeep.evaluate import isic_scores
from slsdeep.model import SLSDeep, load_imagenet_weights
from slsdeep.predict import foreground_probability


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on (the ``slsdeep train`` flags)."""

    data: str
    out: str
    epochs: int = 100
    batch_size: int = 16
    image_size: int = 384
    variant: str = "slsdeep"
    preset: str = "paper"
    stem: str = "deep"
    branch_channels: int | None = None
    device: str | None = None
    amp: bool = False
    channels_last: bool = False
    resume: bool = False
    encoder_weights: str | None = None
    fused: bool = True
    seed: int = 0
    sync_bn: bool = False
    workers: int = 0
    lr_encoder: float = 1e-3
    lr_decoder: float = 1e-2
    augment: bool = True
    progress: bool = True


def _atomic_write_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
    os.replace(handle.name, path)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Distributed:
    """Rank, world size and device of this process (one process = world of 1)."""

    def __init__(self, device: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")
        self.device = torch.device(kind, local_rank) if kind == "cuda" else torch.device(kind)
        if kind == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group("nccl" if kind == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def build_model(config: TrainConfig) -> SLSDeep:
    options = {"variant": config.variant, "stem": config.stem, "preset": config.preset, "fused": config.fused}
    if config.branch_channels is not None:
        options["branch_channels"] = config.branch_channels
    return SLSDeep(**options)


def _param_groups(model: SLSDeep, config: TrainConfig) -> list[dict]:
    encoder = {id(p) for p in model.encoder.parameters()}
    return [
        {"params": [p for p in model.parameters() if id(p) in encoder], "lr": config.lr_encoder, "name": "encoder"},
        {"params": [p for p in model.parameters() if id(p) not in encoder], "lr": config.lr_decoder, "name": "decoder"},
    ]


def _autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def loss_fn(model: SLSDeep, fused: bool):
    """The model's NLL + EPE loss (alpha from its variant); the reference backend for the unfused baseline.

    The {0, 1} check of the masks is not repeated every step (it syncs a GPU): ISICDataset makes its
    masks binary when it loads them (``binarize``), so the data is checked once, at load time.
    """
    backend = None if fused else "reference"

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return slsdeep_kernels.nll_epe_loss(logits, target, alpha=model.loss_alpha, backend=backend, check_target=False)

    return loss


@torch.no_grad()
def validate(model: nn.Module, loader, loss, device: torch.device, amp: bool, channels_last: bool) -> dict:
    """Validation loss and ISIC scores (at the training resolution) of ``model`` on ``loader``."""
    model.eval()
    total, count, predictions, truths = 0.0, 0, [], []
    for images, masks in loader:
        images, masks = images.to(device), masks.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = model(images)
        total += loss(logits.float(), masks).item() * images.shape[0]
        count += images.shape[0]
        predicted = foreground_probability(logits) > 0.5
        predictions += list(predicted.cpu().numpy())
        truths += list(masks.bool().cpu().numpy())
    return {"val_loss": total / max(count, 1), **isic_scores(predictions, truths)}


def _plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    left.set(xlabel="epoch", ylabel="NLL + EPE loss", title="Loss")
    left.legend()
    for key in ("jaccard", "dice", "accuracy"):
        right.plot(epochs, [h[key] for h in history], marker="o", label=key)
    right.set(xlabel="epoch", ylabel="score (validation, per image)", title="ISIC scores", ylim=(0, 1))
    right.legend()
    figure.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".png", delete=False) as handle:
        figure.savefig(handle.name, dpi=100)
    plt.close(figure)
    os.replace(handle.name, path)


def train(config: TrainConfig, log=print) -> list[dict]:
    """Train per ``config``; returns the per-epoch history (also in ``RUN/metrics.json``)."""
    if config.epochs < 1 or config.batch_size < 1 or config.image_size < 32:
        raise ValueError("epochs and batch size must be ≥ 1 and image size ≥ 32")
    out = Path(config.out)
    last_path = out / "last.pt"
    if config.resume and not last_path.is_file():
        raise FileNotFoundError(f"--resume: {last_path} does not exist")
    if not config.resume and last_path.exists():
        raise ValueError(f"{out} already holds a run ({last_path}); pass --resume to continue it or choose another --out")
    runtime = _Distributed(config.device)
    if config.sync_bn and runtime.device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation)")
    if config.sync_bn and config.fused:
        log("--sync-bn: using the unfused model (the fused BatchNorm has no cross-rank statistics)")
        config = dataclasses.replace(config, fused=False)
    try:
        return _train(config, runtime, out, log)
    finally:
        runtime.close()


def _train(config: TrainConfig, runtime: _Distributed, out: Path, log) -> list[dict]:
    _seed_everything(config.seed)
    device = runtime.device
    train_set = ISICDataset(config.data, "train", image_size=config.image_size, augment=config.augment)
    val_set = ISICDataset(config.data, "val", image_size=config.image_size)
    sampler = torch.utils.data.DistributedSampler(train_set, seed=config.seed, drop_last=True) if runtime.world > 1 else None
    generator = torch.Generator().manual_seed(config.seed)
    per_rank_batch = max(1, config.batch_size // runtime.world)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=per_rank_batch, shuffle=sampler is None, sampler=sampler, drop_last=len(train_set) > per_rank_batch,
        num_workers=config.workers, generator=generator, persistent_workers=config.workers > 0,
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=per_rank_batch, num_workers=config.workers)

    model = build_model(config)
    if config.encoder_weights:
        load_imagenet_weights(model, config.encoder_weights)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    loss = loss_fn(model, config.fused)
    optimizer = torch.optim.Adam(_param_groups(model, config))
    total_iterations = config.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_iterations, power=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")

    start_epoch, history, best = 0, [], -math.inf
    if config.resume:
        state = checkpoint.load(out / "last.pt", map_location=device)
        if state["config"] != model.config:
            raise ValueError(f"--resume: {out / 'last.pt'} holds a different model ({state['config']}) than requested ({model.config})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.total_iters = total_iterations  # --epochs may extend the run
        scaler.load_state_dict(state["scaler"])
        start_epoch, history, best = state["epoch"], state["history"], state["best_jaccard"]
        torch.set_rng_state(state["rng"].cpu())
        generator.set_state(state["loader_rng"])
        log(f"resuming {out} after epoch {start_epoch}")

    trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if runtime.world > 1 else model
    if runtime.main:
        out.mkdir(parents=True, exist_ok=True)
    for epoch in range(start_epoch, config.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        trained.train()
        loss_sum = images_seen = 0.0
        began = time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (config.progress and runtime.main), leave=False)
        for images, masks in bar:
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, config.amp):
                logits = trained(images)
            value = loss(logits.float(), masks)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += value.item() * images.shape[0]
            images_seen += images.shape[0]
            bar.set_postfix(loss=f"{value.item():.4f}", img_s=f"{images_seen * runtime.world / (time.perf_counter() - began):.1f}")
        loss_sum, images_seen = runtime.all_sum([loss_sum, images_seen])
        seconds = time.perf_counter() - began
        if runtime.main:
            scores = validate(model, val_loader, loss, device, config.amp, config.channels_last)
            record = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(images_seen, 1),
                "images_per_s": images_seen / seconds,
                "lr_encoder": optimizer.param_groups[0]["lr"],
                "lr_decoder": optimizer.param_groups[1]["lr"],
                **scores,
            }
            history.append(record)
            improved = record["jaccard"] > best
            best = max(best, record["jaccard"])
            state = {
                "config": model.config,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "best_jaccard": best,
                "rng": torch.get_rng_state(),
                "loader_rng": generator.get_state(),
                "image_size": config.image_size,
                "train_config": dataclasses.asdict(config),
            }
            checkpoint.save(out / "last.pt", state)
            if improved:
                checkpoint.save(out / "best.pt", {"config": model.config, "model": model.state_dict(), "epoch": epoch + 1, "image_size": config.image_size, "scores": scores})
            _atomic_write_text(out / "metrics.json", json.dumps({"history": history, "best_jaccard": best}, indent=1))
            _plot_curves(history, out / "curves.png")
            log(
                f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
                f"val Jaccard {record['jaccard']:.4f}, Dice {record['dice']:.4f}, {record['images_per_s']:.1f} img/s"
            )
        runtime.barrier()
    return history

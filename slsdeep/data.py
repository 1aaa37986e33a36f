"""ISIC skin-lesion data: the official 2016/2017/2018 task-1 folder layouts, the paper's
augmentation, and a generator of dermoscopy-like images written in the 2017 layout (the
embedded data set and the test data)."""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from slsdeep.evaluate import binarize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")

# year -> split -> (image folder, mask folder, mask name suffix). 2016 has no validation split.
LAYOUTS = {
    2016: {
        "train": ("ISBI2016_ISIC_Part1_Training_Data", "ISBI2016_ISIC_Part1_Training_GroundTruth", "_Segmentation.png"),
        "test": ("ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth", "_Segmentation.png"),
    },
    2017: {
        "train": ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth", "_segmentation.png"),
        "val": ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth", "_segmentation.png"),
        "test": ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth", "_segmentation.png"),
    },
    2018: {
        "train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth", "_segmentation.png"),
        "val": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth", "_segmentation.png"),
        "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth", "_segmentation.png"),
    },
}
VAL_FRACTION_2016 = 0.1
# Lesion images only: excludes the 2017 `*_superpixels.png` files and 2018's LICENSE/ATTRIBUTION.
_IMAGE_NAME = re.compile(r"^(ISIC_\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def _read_image(path: Path, mode: str, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` into ``mode``; any failure becomes a ValueError naming the file.

    ``draft``: a JPEG may be decoded at a reduced scale no smaller than this (width, height),
    several times faster for the large ISIC photographs that are resized down anyway.
    """
    try:
        with Image.open(path) as image:
            if draft is not None:
                image.draft(mode, draft)
            return image.convert(mode)
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... for bad content
        raise ValueError(f"cannot read {path}: {err}") from err


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """The model's input for an RGB PIL image: resized bilinearly to size x size, ImageNet-normalised,
    a float32 (3, size, size) tensor. Training and prediction share it, so they see the same pixels."""
    image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def random_affine(
    image: torch.Tensor,
    mask: torch.Tensor,
    scale: tuple[float, float] = (0.5, 1.5),
    degrees: float = 10.0,
    hflip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's augmentation on a (C, H, W) image and its (H, W) mask, identically.

    Random scale (then a random crop or zero pad back to H x W), rotation within +-degrees and
    a horizontal flip with probability 1/2, as one affine warp: bilinear for the image, nearest
    for the mask. Draws from torch's default generator, so ``torch.manual_seed`` and DataLoader
    worker seeding make it reproducible.
    """
    r = torch.rand(5, dtype=torch.float64).tolist()
    s = scale[0] + (scale[1] - scale[0]) * r[0]
    angle = math.radians(degrees * (2 * r[1] - 1))
    flip = -1.0 if hflip and r[2] < 0.5 else 1.0
    # The scaled image spans [-s, s] in normalised coordinates; a shift within |s - 1| keeps it
    # covering the output (s > 1: a random crop) or inside it (s < 1: a random pad).
    shift = torch.tensor([(2 * r[3] - 1) * abs(s - 1), (2 * r[4] - 1) * abs(s - 1)], dtype=torch.float64)
    cos, sin = math.cos(angle), math.sin(angle)
    # Output -> input coordinates: q = Flip . Rot(-angle) . (p - shift) / s.
    a = torch.tensor([[flip * cos, flip * sin], [-sin, cos]], dtype=torch.float64) / s
    theta = torch.cat([a, (-a @ shift)[:, None]], dim=1)[None].to(image.dtype)
    grid = F.affine_grid(theta, [1, 1, *image.shape[-2:]], align_corners=False)
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    mask = F.grid_sample(
        mask[None, None].to(image.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return image, mask[0, 0].to(torch.int64)


class ISICDataset(torch.utils.data.Dataset):
    """One split of an ISIC task-1 data set (2016, 2017 or 2018 layout, detected under ``root``).

    Items are ``(image, mask)``: a float32 (3, S, S) ImageNet-normalised image resized bilinearly
    to ``image_size`` and an int64 (S, S) mask of {0, 1} resized nearest. ISIC 2016 has no
    validation split: ``val`` is a fixed 10% of its training images (those whose ids hash
    lowest) and ``train`` the rest. Pairing (mask present, same size as the image) is checked at
    construction; unreadable content when an item is loaded. Bad items raise an error naming the
    file, or with ``skip_invalid`` are skipped with a warning naming it (an item found unreadable
    at load time yields the next readable one). ``year`` picks a layout when ``root`` holds several.

    For evaluation at the original size: ``items`` (image path, mask path), ``ids``,
    ``original_size(i)`` (height, width) and ``load_original(i)`` (PIL image, bool mask).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        image_size: int = 384,
        augment: bool = False,
        skip_invalid: bool = False,
        year: int | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root, self.split = Path(root), split
        self.image_size, self.augment, self.skip_invalid = int(image_size), augment, skip_invalid
        self.year = self._detect_year(year)
        folder_split = "train" if self.year == 2016 and split == "val" else split
        image_folder, mask_folder, mask_suffix = LAYOUTS[self.year][folder_split]
        image_dir, mask_dir = self.root / image_folder, self.root / mask_folder
        if not image_dir.is_dir():
            raise FileNotFoundError(f"no {split} split: {image_dir} not found (ISIC {self.year} layout)")
        images = {m.group(1): image_dir / m.group(0) for m in map(_IMAGE_NAME.match, os.listdir(image_dir)) if m}
        ids = sorted(images)
        if self.year == 2016 and split != "test":
            ids = self._split_2016(ids)
        self.items: list[tuple[Path, Path]] = []
        self._sizes: list[tuple[int, int]] = []
        self._warned: set[int] = set()  # unreadable items already reported
        for image_id in ids:
            pair = (images[image_id], mask_dir / f"{image_id}{mask_suffix}")
            try:
                self._sizes.append(self._check_pair(*pair))
            except (ValueError, FileNotFoundError) as err:
                self._invalid(err)
                continue
            self.items.append(pair)
        if not self.items:
            raise ValueError(f"no valid images in {image_dir}")

    def _detect_year(self, year: int | None) -> int:
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root {self.root} not found")
        found = [y for y, splits in LAYOUTS.items() if any((self.root / f[0]).is_dir() for f in splits.values())]
        if year is not None:
            if year not in found:
                raise ValueError(f"no ISIC {year} layout under {self.root} (found: {found or 'none'})")
            return year
        if not found:
            names = ", ".join(f[0] for splits in LAYOUTS.values() for f in splits.values())
            raise ValueError(f"no recognised ISIC layout under {self.root}; expected folders like {names}")
        if len(found) > 1:
            raise ValueError(f"several ISIC layouts under {self.root} ({found}); pass year=")
        return found[0]

    def _split_2016(self, ids: list[str]) -> list[str]:
        """2016's fixed validation split: the 10% of training ids with the lowest SHA-256."""
        n_val = max(1, round(VAL_FRACTION_2016 * len(ids))) if len(ids) > 1 else 0
        val = set(sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:n_val])
        return [i for i in ids if (i in val) == (self.split == "val")]

    @staticmethod
    def _check_pair(image_path: Path, mask_path: Path) -> tuple[int, int]:
        """(height, width) of a pair whose mask exists and matches the image's size."""
        if not mask_path.is_file():
            raise FileNotFoundError(f"missing mask {mask_path} for image {image_path}")
        image_size, mask_size = _header_size(image_path), _header_size(mask_path)
        if image_size != mask_size:
            raise ValueError(
                f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} "
                f"but image {image_path} is {image_size[0]}x{image_size[1]}"
            )
        return image_size[1], image_size[0]

    def _invalid(self, err: Exception) -> None:
        if not self.skip_invalid:
            raise err
        warnings.warn(f"skipping invalid item: {err}", stacklevel=3)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> list[str]:
        """Image ids (``ISIC_nnnnnnn``), in item order."""
        return [image_path.stem for image_path, _ in self.items]

    def original_size(self, index: int) -> tuple[int, int]:
        """(height, width) of item ``index``'s image and mask as stored on disk."""
        return self._sizes[index]

    def load_original(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """Item ``index`` at its original size: the RGB PIL image and the boolean mask."""
        return self._load(index)

    def _load(self, index: int, draft: tuple[int, int] | None = None) -> tuple[Image.Image, np.ndarray]:
        image_path, mask_path = self.items[index]
        image, mask = _read_image(image_path, "RGB", draft), _read_image(mask_path, "L")
        height, width = self._sizes[index]
        if mask.size != (width, height) or (draft is None and image.size != (width, height)):
            raise ValueError(f"{image_path} or {mask_path} changed size since the data set was opened")
        return image, binarize(np.asarray(mask))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        for attempt in range(n):  # with skip_invalid, an unreadable item yields the next readable one
            i = (index + attempt) % n
            try:
                image, mask = self._load(i, draft=(self.image_size, self.image_size))
            except ValueError as err:
                if not self.skip_invalid:
                    raise
                if i not in self._warned:
                    self._warned.add(i)
                    warnings.warn(f"skipping invalid item: {err}", stacklevel=2)
                continue
            return self._to_tensors(image, mask)
        raise ValueError(f"no readable items in the {self.split} split under {self.root}")

    def _to_tensors(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = image_to_tensor(image, self.image_size)
        size = (self.image_size, self.image_size)
        mask = Image.fromarray(mask.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
        y = torch.from_numpy(np.array(mask, dtype=np.int64))
        if self.augment:
            x, y = random_affine(x, y)
        return x.contiguous(), y


# ---------------------------------------------------------------------------------------------
# Synthetic dermoscopy-like data


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _hair_alpha(rng: np.random.Generator, size: int) -> np.ndarray:
    """Opacity (H, W) of a few thin dark hairs: quadratic Bezier curves stamped point by point."""
    alpha = np.zeros((size, size))
    for _ in range(rng.integers(0, 7)):
        start = rng.uniform(0, 1, 2)
        direction = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.3, 1.0)
        end = start + length * np.array([np.cos(direction), np.sin(direction)])
        bend = (start + end) / 2 + rng.uniform(-0.2, 0.2) * length * np.array([-np.sin(direction), np.cos(direction)])
        t = np.linspace(0, 1, 3 * size)[:, None]
        points = (1 - t) ** 2 * start + 2 * t * (1 - t) * bend + t**2 * end  # (P, 2) as (x, y)
        width = max(1, round(size * rng.uniform(0.002, 0.006)))
        offsets = np.stack(np.meshgrid(np.arange(width), np.arange(width)), -1).reshape(-1, 2)
        pixels = (np.floor(points * size).astype(np.int64)[:, None, :] + offsets).reshape(-1, 2)
        pixels = pixels[((pixels >= 0) & (pixels < size)).all(axis=1)]
        alpha[pixels[:, 1], pixels[:, 0]] = rng.uniform(0.6, 0.95)
    return alpha


def _draw_lesion_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One dermoscopy-like RGB image (uint8, H x W x 3) and its lesion mask (uint8 0/255)."""
    coords = (np.arange(size) + 0.5) / size
    y, x = coords[:, None], coords[None, :]

    # Skin: a base tone with low-frequency shading.
    skin = np.array([rng.uniform(190, 235), rng.uniform(135, 180), rng.uniform(105, 150)])
    freq, phase = rng.uniform(0.3, 1.5, (3, 2)), rng.uniform(0, 2 * np.pi, 3)
    shading = 1 + sum(rng.uniform(0, 0.04) * np.cos(2 * np.pi * (f[0] * x + f[1] * y) + p) for f, p in zip(freq, phase))
    image = skin * shading[..., None]

    # Lesion: a star-shaped region r < r0 (1 + sum_k a_k cos(k phi + p_k)) of 10-45% of the area,
    # kept inside the image and inside the vignette.
    k = np.arange(2, 8)[:, None, None]
    area = rng.uniform(0.11, 0.44)
    amp = rng.uniform(0, 1, len(k)) / k.ravel() ** 0.7
    amp *= min(rng.uniform(0.1, 0.35), 0.47 / np.sqrt(area / np.pi) - 1) / amp.sum()
    harmonic_phase = rng.uniform(0, 2 * np.pi, len(k))[:, None, None]
    r0 = np.sqrt(area / (np.pi * (1 + np.sum(amp**2) / 2)))  # the area of a polar curve
    r_max = r0 * (1 + amp.sum())
    vignette_radius = rng.uniform(0.55, 0.7)
    room = max(0.0, min(0.48 - r_max, vignette_radius - 0.05 - r_max))
    offset_angle = rng.uniform(0, 2 * np.pi)
    cx, cy = 0.5 + room * np.sqrt(rng.uniform()) * np.array([np.cos(offset_angle), np.sin(offset_angle)])
    rho, phi = np.hypot(x - cx, y - cy), np.arctan2(y - cy, x - cx)
    radius = r0 * (1 + np.sum(amp[:, None, None] * np.cos(k * phi + harmonic_phase), axis=0))
    mask = rho < radius
    alpha = _sigmoid((radius - rho) / rng.uniform(0.004, 0.015))  # fuzzy border

    # Lesion colour: a darker, browner skin tone, darker still towards the centre, with patches.
    lesion = skin * rng.uniform(0.35, 0.65) * np.array([1.0, rng.uniform(0.75, 0.9), rng.uniform(0.65, 0.85)])
    depth = np.clip(1 - rho / radius, 0, 1)
    lesion = lesion * (1 - rng.uniform(0.1, 0.35) * depth)[..., None]
    n_patches = rng.integers(2, 6)
    patch_r = r0 * 0.6 * np.sqrt(rng.uniform(0, 1, n_patches))[:, None, None]
    patch_a = rng.uniform(0, 2 * np.pi, n_patches)[:, None, None]
    patch_sigma = r0 * rng.uniform(0.15, 0.4, n_patches)[:, None, None]
    patch_x, patch_y = cx + patch_r * np.cos(patch_a), cy + patch_r * np.sin(patch_a)
    blobs = np.exp(-((x - patch_x) ** 2 + (y - patch_y) ** 2) / (2 * patch_sigma**2))
    patch = np.clip(np.sum(rng.uniform(0.3, 0.7, n_patches)[:, None, None] * blobs, axis=0), 0, 0.8)
    patch_colour = np.array([[60, 35, 25], [90, 95, 110]])[rng.integers(0, 2)]
    lesion = lesion * (1 - patch[..., None]) + patch_colour * patch[..., None]
    image = image * (1 - alpha[..., None]) + lesion * alpha[..., None]

    # Hairs over everything, then the dark circular vignette, then sensor noise.
    hair = _hair_alpha(rng, size)[..., None]
    image = image * (1 - hair) + np.array([35.0, 25.0, 20.0]) * rng.uniform(0.6, 1.3) * hair
    darkness, softness = rng.uniform(0.75, 0.97), rng.uniform(0.01, 0.04)
    vignette = 1 - darkness * _sigmoid((np.hypot(x - 0.5, y - 0.5) - vignette_radius) / softness)
    image = image * vignette[..., None] + rng.normal(0, 2.5, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def _split_counts(n: int, splits) -> list[int]:
    """Split ``n`` by the fractions ``splits`` (largest remainders get the leftover items)."""
    fractions = np.asarray(splits, dtype=np.float64)
    if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"splits must be three non-negative fractions (train, val, test), got {splits}")
    exact = n * fractions / fractions.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _save_atomic(image: Image.Image, path: Path, **options) -> None:
    """Write to a temporary name then rename, so an interrupted run leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, **options)
    os.replace(tmp, path)


def synthesize(out_dir: str | os.PathLike, n: int, size: int = 384, seed: int = 0, splits=(0.7, 0.15, 0.15)) -> Path:
    """Write ``n`` dermoscopy-like images and 0/255 lesion masks in the ISIC 2017 layout.

    Images ``ISIC_0000000`` ... are numbered across the train/val/test splits (in that order,
    sized by ``splits``); image ``i`` depends only on ``(seed, i, size)``, so equal arguments give
    identical bytes. Files of this layout left from an earlier run that this run does not write
    (e.g. a larger ``n``) are removed, so splits never mix. Returns ``out_dir`` as a Path.
    """
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    out = Path(out_dir)
    start = 0
    for split, count in zip(SPLITS, _split_counts(n, splits)):
        image_folder, mask_folder, mask_suffix = LAYOUTS[2017][split]
        image_dir, mask_dir = out / image_folder, out / mask_folder
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        written = set()
        for index in range(start, start + count):
            image, mask = _draw_lesion_image(np.random.default_rng([seed, index]), size)
            name = f"ISIC_{index:07d}"
            _save_atomic(Image.fromarray(image), image_dir / f"{name}.jpg", format="JPEG", quality=90)
            _save_atomic(Image.fromarray(mask), mask_dir / f"{name}{mask_suffix}", format="PNG")
            written |= {f"{name}.jpg", f"{name}{mask_suffix}"}
        start += count
        stale = re.compile(rf"^\.?ISIC_\d{{7}}(?:\.jpg|{mask_suffix})(?:\.tmp)?$")
        for folder in (image_dir, mask_dir):
            for name in os.listdir(folder):
                if stale.match(name) and name not in written:
                    os.remove(folder / name)
    return out

"""ISIC data: the synthetic generator, the three official layouts, bad input, augmentation."""

import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from slsdeep.data import IMAGENET_MEAN, IMAGENET_STD, LAYOUTS, ISICDataset, random_affine, synthesize

SIZE = 64


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """A small synthetic ISIC 2017 tree: 20 images of 64 x 64 (14 train, 3 val, 3 test)."""
    return synthesize(tmp_path_factory.mktemp("syn"), 20, size=SIZE, seed=0)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _relayout(syn, dst, year):
    """Copy the synthetic 2017 tree into ``year``'s layout (2016: train+val become Training)."""
    for split, (image_folder, mask_folder, suffix) in LAYOUTS[2017].items():
        target = "train" if year == 2016 and split == "val" else split
        dst_images, dst_masks, dst_suffix = LAYOUTS[year][target]
        (dst / dst_images).mkdir(parents=True, exist_ok=True)
        (dst / dst_masks).mkdir(parents=True, exist_ok=True)
        for image in (syn / image_folder).glob("*.jpg"):
            shutil.copy(image, dst / dst_images / image.name)
            shutil.copy(syn / mask_folder / f"{image.stem}{suffix}", dst / dst_masks / f"{image.stem}{dst_suffix}")
    return dst


def _copy_2017(syn, dst):
    shutil.copytree(syn, dst)
    return dst


# --- synthesize -------------------------------------------------------------------------------


def test_synthesize_is_deterministic_per_seed(syn, tmp_path):
    again = _files(synthesize(tmp_path / "a", 20, size=SIZE, seed=0))
    assert again == _files(syn)
    other = _files(synthesize(tmp_path / "b", 20, size=SIZE, seed=1))
    assert other.keys() == again.keys()
    assert all(other[name] != again[name] for name in again)


def test_synthesize_layout_and_splits(syn):
    expected = {"train": range(0, 14), "val": range(14, 17), "test": range(17, 20)}
    for split, (image_folder, mask_folder, suffix) in LAYOUTS[2017].items():
        images = sorted(p.name for p in (syn / image_folder).iterdir())
        masks = sorted(p.name for p in (syn / mask_folder).iterdir())
        assert images == [f"ISIC_{i:07d}.jpg" for i in expected[split]]
        assert masks == [f"ISIC_{i:07d}{suffix}" for i in expected[split]]


def test_synthesize_split_fractions(tmp_path):
    root = synthesize(tmp_path, 10, size=32, splits=(0.5, 0.5, 0.0))
    counts = [len(list((root / LAYOUTS[2017][s][0]).iterdir())) for s in ("train", "val", "test")]
    assert counts == [5, 5, 0]
    with pytest.raises(ValueError, match="splits"):
        synthesize(tmp_path, 10, splits=(0.5, 0.5))


def test_synthesize_rerun_removes_stale_files(tmp_path):
    synthesize(tmp_path, 20, size=32)
    (tmp_path / LAYOUTS[2017]["train"][0] / ".ISIC_0000099.jpg.tmp").write_bytes(b"half")  # an interrupted run
    synthesize(tmp_path, 10, size=32)
    names = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert len(names) == 20 and "ISIC_0000015.jpg" not in names and not any(n.endswith(".tmp") for n in names)


def test_synthetic_masks_and_lesion_contrast(syn):
    for split, (image_folder, mask_folder, suffix) in LAYOUTS[2017].items():
        for image_path in (syn / image_folder).iterdir():
            mask = np.asarray(Image.open(syn / mask_folder / f"{image_path.stem}{suffix}"))
            image = np.asarray(Image.open(image_path).convert("L"), dtype=np.float64)
            assert mask.shape == image.shape == (SIZE, SIZE)
            assert set(np.unique(mask)) == {0, 255}
            lesion = mask == 255
            assert 0.10 <= lesion.mean() <= 0.45
            # Clearly darker than the skin around it (the vignette corners excluded).
            yy, xx = np.mgrid[:SIZE, :SIZE]
            central = np.hypot(yy - SIZE / 2, xx - SIZE / 2) < 0.45 * SIZE
            assert np.median(image[lesion]) < np.median(image[~lesion & central]) - 25


# --- ISICDataset on the three layouts ----------------------------------------------------------


def test_reads_2017_items(syn):
    ds = ISICDataset(syn, "val", image_size=48)
    assert ds.year == 2017 and len(ds) == 3 and ds.ids == ["ISIC_0000014", "ISIC_0000015", "ISIC_0000016"]
    image, mask = ds[1]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert mask.shape == (48, 48) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) == {0, 1}
    image_path, mask_path = ds.items[1]
    pil = Image.open(image_path).convert("RGB").resize((48, 48), Image.Resampling.BILINEAR)
    expected = torch.from_numpy(np.asarray(pil, np.float32) / 255).permute(2, 0, 1)
    expected = (expected - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(image, expected)
    png = Image.open(mask_path).resize((48, 48), Image.Resampling.NEAREST)
    assert torch.equal(mask, torch.from_numpy((np.asarray(png) > 128).astype(np.int64)))
    assert ds.original_size(1) == (SIZE, SIZE)
    original, original_mask = ds.load_original(1)
    assert original.size == (SIZE, SIZE) and original.mode == "RGB"
    assert original_mask.dtype == bool and np.array_equal(original_mask, np.asarray(Image.open(mask_path)) > 128)
    assert len(pickle.loads(pickle.dumps(ds))) == 3  # DataLoader workers need a picklable dataset
    assert [len(ISICDataset(syn, s, image_size=32)) for s in ("train", "test")] == [14, 3]


def test_large_jpeg_decoded_at_reduced_scale_matches_full_decode(syn, tmp_path):
    root = _copy_2017(syn, tmp_path / "r")
    image_path = root / LAYOUTS[2017]["test"][0] / "ISIC_0000017.jpg"
    mask_path = root / LAYOUTS[2017]["test"][1] / "ISIC_0000017_segmentation.png"
    Image.open(image_path).resize((640, 448)).save(image_path, quality=90)
    Image.open(mask_path).resize((640, 448), Image.Resampling.NEAREST).save(mask_path)
    ds = ISICDataset(root, "test", image_size=32)
    assert ds.original_size(0) == (448, 640) and ds.load_original(0)[0].size == (640, 448)
    full = Image.open(image_path).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    full = (np.asarray(full, np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    assert np.abs(ds[0][0].permute(1, 2, 0).numpy() - full).mean() < 0.03  # about 2 grey levels


def test_reads_2016_with_fixed_val_split(syn, tmp_path):
    root = _relayout(syn, tmp_path, 2016)
    train, val = ISICDataset(root, "train", image_size=32), ISICDataset(root, "val", image_size=32)
    assert train.year == 2016 and len(val) == 2 and len(train) == 15
    assert set(train.ids).isdisjoint(val.ids) and sorted(train.ids + val.ids) == [f"ISIC_{i:07d}" for i in range(17)]
    assert ISICDataset(root, "val", image_size=32).ids == val.ids
    assert train.items[0][1].name.endswith("_Segmentation.png")
    test = ISICDataset(root, "test", image_size=32)
    assert test.ids == [f"ISIC_{i:07d}" for i in range(17, 20)]
    assert test[0][0].shape == (3, 32, 32)


def test_reads_2018_and_ignores_other_files(syn, tmp_path):
    root = _relayout(syn, tmp_path, 2018)
    (root / LAYOUTS[2018]["train"][0] / "LICENSE.txt").write_text("CC-BY-NC")
    (root / LAYOUTS[2018]["train"][0] / "ATTRIBUTION.txt").write_text("ISIC")
    ds = ISICDataset(root, "train", image_size=32)
    assert ds.year == 2018 and len(ds) == 14
    assert [len(ISICDataset(root, s, image_size=32)) for s in ("val", "test")] == [3, 3]
    assert ds[13][1].shape == (32, 32)


def test_superpixels_skipped(syn, tmp_path):
    root = _copy_2017(syn, tmp_path / "r")
    image_dir = root / LAYOUTS[2017]["train"][0]
    mask = root / LAYOUTS[2017]["train"][1] / "ISIC_0000000_segmentation.png"
    shutil.copy(mask, image_dir / "ISIC_0000000_superpixels.png")
    ds = ISICDataset(root, "train", image_size=32)
    assert len(ds) == 14 and all("superpixels" not in p.name for pair in ds.items for p in pair)


def test_layout_detection_errors(syn, tmp_path):
    with pytest.raises(ValueError, match="no recognised ISIC layout"):
        ISICDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        ISICDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be"):
        ISICDataset(syn, "validation")
    both = _relayout(syn, _copy_2017(syn, tmp_path / "both"), 2016)
    with pytest.raises(ValueError, match="several ISIC layouts"):
        ISICDataset(both)
    assert ISICDataset(both, "train", image_size=32, year=2016).year == 2016
    only_train = tmp_path / "only_train"
    shutil.copytree(syn / LAYOUTS[2017]["train"][0], only_train / LAYOUTS[2017]["train"][0])
    with pytest.raises(FileNotFoundError, match="ISIC-2017_Test_v2_Data"):
        ISICDataset(only_train, "test")


# --- bad items ---------------------------------------------------------------------------------


def _train_mask(root, image_id):
    folder, suffix = LAYOUTS[2017]["train"][1:]
    return root / folder / f"{image_id}{suffix}"


def test_missing_mask(syn, tmp_path):
    root = _copy_2017(syn, tmp_path / "r")
    _train_mask(root, "ISIC_0000003").unlink()
    with pytest.raises(FileNotFoundError, match="ISIC_0000003_segmentation.png"):
        ISICDataset(root, "train")
    with pytest.warns(UserWarning, match="ISIC_0000003_segmentation.png") as record:
        ds = ISICDataset(root, "train", image_size=32, skip_invalid=True)
    assert len(record) == 1 and len(ds) == 13 and "ISIC_0000003" not in ds.ids


def test_mask_size_mismatch(syn, tmp_path):
    root = _copy_2017(syn, tmp_path / "r")
    path = _train_mask(root, "ISIC_0000005")
    Image.open(path).resize((SIZE, SIZE + 1)).save(path)
    with pytest.raises(ValueError, match="ISIC_0000005_segmentation.png"):
        ISICDataset(root, "train")
    with pytest.warns(UserWarning, match="ISIC_0000005"):
        ds = ISICDataset(root, "train", image_size=32, skip_invalid=True)
    assert len(ds) == 13


def test_unreadable_header_fails_at_construction(syn, tmp_path):
    root = _copy_2017(syn, tmp_path / "r")
    (root / LAYOUTS[2017]["train"][0] / "ISIC_0000002.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="ISIC_0000002.jpg"):
        ISICDataset(root, "train")


def test_corrupt_jpeg_fails_at_load_time(syn, tmp_path):
    root = _copy_2017(syn, tmp_path / "r")
    path = root / LAYOUTS[2017]["train"][0] / "ISIC_0000004.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda") + 64])  # the header survives, the pixels do not
    ds = ISICDataset(root, "train", image_size=32)
    assert len(ds) == 14  # construction reads headers only
    with pytest.raises(ValueError, match="ISIC_0000004.jpg"):
        ds[4]
    with pytest.raises(ValueError, match="ISIC_0000004.jpg"):
        ds.load_original(4)
    ds = ISICDataset(root, "train", image_size=32, skip_invalid=True)
    with pytest.warns(UserWarning, match="ISIC_0000004.jpg"):
        image, mask = ds[4]
    assert torch.equal(mask, ISICDataset(root, "train", image_size=32)[5][1])  # the next readable item
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[4]  # warned once per file
    with pytest.raises(IndexError):
        ds[14]


# --- augmentation ------------------------------------------------------------------------------


@pytest.fixture
def coded(tmp_path):
    """A 2017 tree of PNG images whose pixels encode their masks: white lesion on black."""
    rng = np.random.default_rng(4)
    image_folder, mask_folder, suffix = LAYOUTS[2017]["train"]
    (tmp_path / image_folder).mkdir()
    (tmp_path / mask_folder).mkdir()
    for i in range(3):
        blocks = rng.random((6, 6)) < 0.5
        mask = np.kron(blocks, np.ones((8, 8), bool))  # 48 x 48, asymmetric blocks
        Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB").save(tmp_path / image_folder / f"ISIC_{i:07d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / mask_folder / f"ISIC_{i:07d}{suffix}")
    return tmp_path


def test_augmentation_keeps_image_and_mask_aligned(coded):
    plain = ISICDataset(coded, "train", image_size=48)
    augmented = ISICDataset(coded, "train", image_size=48, augment=True)
    white = (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    black = -IMAGENET_MEAN[0] / IMAGENET_STD[0]
    changed = 0
    for trial in range(12):
        image, mask = augmented[trial % 3]
        assert image.shape == (3, 48, 48) and mask.dtype == torch.int64 and set(mask.unique().tolist()) <= {0, 1}
        red = image[0]
        # Where bilinear sampling saw only lesion (only skin), nearest must pick lesion (skin).
        assert (mask[red > white - 0.01] == 1).all()
        assert (mask[red < black + 0.01] == 0).all()
        assert (red > white - 0.01).any() and (red < black + 0.01).any()
        changed += not torch.equal(mask, plain[trial % 3][1])
    assert changed >= 10


def test_augmentation_reproducible_under_manual_seed(coded):
    ds = ISICDataset(coded, "train", image_size=48, augment=True)
    torch.manual_seed(7)
    first = [ds[i] for i in range(3)]
    torch.manual_seed(7)
    second = [ds[i] for i in range(3)]
    torch.manual_seed(8)
    third = [ds[i] for i in range(3)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert any(not torch.equal(a[1], c[1]) for a, c in zip(first, third))


def test_random_affine_identity_limits_and_flip():
    image = torch.randn(3, 10, 12)
    mask = (torch.rand(10, 12) < 0.5).long()
    out_image, out_mask = random_affine(image, mask, scale=(1.0, 1.0), degrees=0.0, hflip=False)
    torch.testing.assert_close(out_image, image, rtol=0, atol=1e-5)
    assert torch.equal(out_mask, mask)
    flips = [random_affine(image, mask, scale=(1.0, 1.0), degrees=0.0) for _ in range(20)]
    assert all(torch.equal(m, mask) or torch.equal(m, mask.flip(-1)) for _, m in flips)
    assert any(torch.equal(m, mask.flip(-1)) for _, m in flips) and any(torch.equal(m, mask) for _, m in flips)

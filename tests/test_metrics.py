"""ISIC task-1 metrics: hand-computed cases, zero-denominator rules, input conventions, errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from slsdeep.evaluate import (
    binarize,
    confusion_counts,
    evaluate_model,
    format_scores,
    isic_scores,
    scores_from_confusion,
)

PER_IMAGE = ("accuracy", "dice", "jaccard", "sensitivity", "specificity")


def _check(scores, expected):
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-12), name


def test_two_images_by_hand():
    # Image 1: tp=1 (0,0), fn=1 (0,1), fp=1 (1,0), tn=3.
    t1 = np.array([[1, 1, 0], [0, 0, 0]], dtype=bool)
    p1 = np.array([[1, 0, 0], [1, 0, 0]], dtype=bool)
    # Image 2: tp=4, fp=1 (1,1), fn=0, tn=1.
    t2 = np.array([[1, 1, 1], [1, 0, 0]], dtype=bool)
    p2 = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)
    scores = isic_scores([p1, p2], [t1, t2])
    _check(
        scores,
        {
            # per image: acc 4/6, 5/6; dice 2/4, 8/9; jac 1/3, 4/5; sen 1/2, 1; spe 3/4, 1/2
            "accuracy": (4 / 6 + 5 / 6) / 2,
            "dice": (2 / 4 + 8 / 9) / 2,
            "jaccard": (1 / 3 + 4 / 5) / 2,
            "sensitivity": (1 / 2 + 1) / 2,
            "specificity": (3 / 4 + 1 / 2) / 2,
            "threshold_jaccard": (0 + 4 / 5) / 2,  # 1/3 < 0.65 counts 0
            # pooled: tp=5, fp=2, fn=1, tn=4
            "accuracy_pooled": 9 / 12,
            "dice_pooled": 10 / 13,
            "jaccard_pooled": 5 / 8,
            "sensitivity_pooled": 5 / 6,
            "specificity_pooled": 4 / 6,
            "n_images": 2,
        },
    )
    assert "threshold_jaccard_pooled" not in scores


def test_three_images_of_different_sizes_by_hand():
    # A small image segmented badly and a large one well: the per-image mean weighs both
    # equally, pooling is dominated by the large image.
    t1 = np.zeros((2, 2), bool)
    t1[0, 0] = True
    p1 = np.zeros((2, 2), bool)
    p1[1, 1] = True  # tp=0 fp=1 fn=1 tn=2
    t2 = np.zeros((10, 10), bool)
    t2[:5] = True
    p2 = np.zeros((10, 10), bool)
    p2[:6] = True  # tp=50 fp=10 fn=0 tn=40
    t3 = np.ones((1, 4), bool)
    p3 = np.array([[1, 1, 1, 0]], bool)  # tp=3 fp=0 fn=1 tn=0 -> specificity 0/0 = 1
    scores = isic_scores([p1, p2, p3], [t1, t2, t3])
    _check(
        scores,
        {
            "accuracy": (2 / 4 + 90 / 100 + 3 / 4) / 3,
            "dice": (0 + 100 / 110 + 6 / 7) / 3,
            "jaccard": (0 + 50 / 60 + 3 / 4) / 3,
            "sensitivity": (0 + 1 + 3 / 4) / 3,
            "specificity": (2 / 3 + 40 / 50 + 1) / 3,
            "threshold_jaccard": (0 + 50 / 60 + 3 / 4) / 3,
            # pooled: tp=53 fp=11 fn=2 tn=42
            "accuracy_pooled": 95 / 108,
            "dice_pooled": 106 / 119,
            "jaccard_pooled": 53 / 66,
            "sensitivity_pooled": 53 / 55,
            "specificity_pooled": 42 / 53,
        },
    )
    assert scores["dice"] < scores["dice_pooled"] - 0.2


def test_empty_truth_and_empty_prediction():
    truth = np.zeros((4, 4), bool)
    pred = np.zeros((4, 4), bool)
    pred[0, :3] = True  # tp=0 fp=3 fn=0 tn=13
    _check(
        isic_scores([pred], [truth]),
        {"accuracy": 13 / 16, "dice": 0.0, "jaccard": 0.0, "sensitivity": 1.0, "specificity": 13 / 16},
    )
    # Empty prediction of a lesion: tp=0 fp=0 fn=3 tn=13.
    _check(
        isic_scores([truth], [pred]),
        {"accuracy": 13 / 16, "dice": 0.0, "jaccard": 0.0, "sensitivity": 0.0, "specificity": 1.0},
    )


def test_both_empty_and_both_full_score_one():
    empty, full = np.zeros((3, 5), bool), np.ones((3, 5), bool)
    for mask in (empty, full):
        scores = isic_scores([mask], [mask])
        for name in (*PER_IMAGE, "threshold_jaccard"):
            assert scores[name] == 1.0, name
            assert scores.get(f"{name}_pooled", 1.0) == 1.0, name


def test_input_conventions_agree():
    rng = np.random.default_rng(1)
    truth = rng.random((3, 17, 23)) < 0.4
    pred = rng.random((3, 17, 23)) < 0.5
    expected = isic_scores(list(pred), list(truth))
    as_255 = [m.astype(np.uint8) * 255 for m in pred]
    grey = [np.where(m, rng.integers(129, 256, m.shape), rng.integers(0, 129, m.shape)).astype(np.uint8) for m in pred]
    label_map = [m.astype(np.uint8) for m in pred]
    int_label_map = [m.astype(np.int64) for m in pred]
    probability = [np.where(m, rng.uniform(0.5001, 1, m.shape), rng.uniform(0, 0.5, m.shape)) for m in pred]
    for form in (as_255, grey, label_map, int_label_map, probability, [p.astype(np.float32) for p in probability]):
        assert isic_scores(form, [t.astype(np.uint8) * 255 for t in truth]) == expected
        assert isic_scores(form, [t.astype(np.uint8) for t in truth]) == expected


def test_binarize_boundaries():
    assert binarize(np.array([[0, 128, 129, 255]], np.uint8)).tolist() == [[False, False, True, True]]
    assert binarize(np.array([[0, 1, 1, 0]], np.uint8)).tolist() == [[False, True, True, False]]
    assert binarize(np.array([[0.0, 0.5, 0.51, 1.0]])).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match="NaN"):
        binarize(np.array([[0.0, np.nan]]))


def test_threshold_jaccard_at_and_below_threshold():
    truth = np.zeros((5, 5), bool)
    truth.flat[:20] = True
    at = truth.copy()
    at.flat[13:20] = False  # tp=13 fn=7 fp=0: Jaccard 13/20 = 0.65 exactly, kept
    below = np.zeros((5, 5), bool)
    below.flat[:16] = True
    truth_below = np.ones((5, 5), bool)  # tp=16 fn=9: Jaccard 16/25 = 0.64, counts 0
    scores = isic_scores([at, below], [truth, truth_below])
    assert scores["jaccard"] == pytest.approx((0.65 + 0.64) / 2)
    assert scores["threshold_jaccard"] == pytest.approx(0.65 / 2)


def test_matches_naive_loop_on_random_masks():
    rng = np.random.default_rng(2)
    preds, truths, expected = [], [], {name: [] for name in PER_IMAGE}
    for _ in range(6):
        shape = tuple(rng.integers(1, 9, 2))
        p, t = rng.random(shape) < rng.random(), rng.random(shape) < rng.random()
        tp = fp = fn = tn = 0
        for pv, tv in zip(p.ravel().tolist(), t.ravel().tolist()):
            tp += pv and tv
            fp += pv and not tv
            fn += tv and not pv
            tn += not pv and not tv
        ratio = lambda a, b: a / b if b else 1.0  # noqa: E731
        expected["accuracy"].append((tp + tn) / (tp + fp + fn + tn))
        expected["dice"].append(ratio(2 * tp, 2 * tp + fp + fn))
        expected["jaccard"].append(ratio(tp, tp + fp + fn))
        expected["sensitivity"].append(ratio(tp, tp + fn))
        expected["specificity"].append(ratio(tn, tn + fp))
        preds.append(p)
        truths.append(t)
    scores = isic_scores(preds, truths)
    for name, values in expected.items():
        assert scores[name] == pytest.approx(sum(values) / len(values), abs=1e-12), name


def test_torch_tensors_accepted():
    rng = np.random.default_rng(3)
    truth = rng.random((2, 9, 11)) < 0.3
    prob = rng.random((2, 9, 11), dtype=np.float32)
    expected = isic_scores(list(prob), list(truth))
    tensors = torch.from_numpy(prob).requires_grad_()
    assert isic_scores(tensors, torch.from_numpy(truth)) == pytest.approx(expected)
    assert isic_scores(list(torch.from_numpy(prob).to(torch.bfloat16)), list(torch.from_numpy(truth).to(torch.uint8)))[
        "n_images"
    ] == 2


def test_errors():
    a, b = np.zeros((4, 4), bool), np.zeros((4, 5), bool)
    with pytest.raises(ValueError, match=r"pair 1\b.*\(4, 4\).*\(4, 5\)"):
        isic_scores([a, a, a], [a, b, a])
    with pytest.raises(ValueError, match="2 predictions but 1 truths"):
        isic_scores([a, a], [a])
    with pytest.raises(ValueError, match="no images"):
        isic_scores([], [])
    with pytest.raises(ValueError, match="pair 0: expected 2-D"):
        isic_scores([np.zeros((1, 4, 4), bool)], [np.zeros((1, 4, 4), bool)])
    with pytest.raises(ValueError, match="pair 0: expected 2-D"):
        isic_scores([np.zeros(4, bool)], [np.zeros(4, bool)])
    with pytest.raises(ValueError, match="pair 0: empty"):
        isic_scores([np.zeros((0, 4), bool)], [np.zeros((0, 4), bool)])
    with pytest.raises(ValueError, match="pair 1: mask contains NaN"):
        isic_scores([a, np.full((4, 4), np.nan)], [a, a])


def test_format_scores_table():
    truth = np.zeros((4, 4), bool)
    truth[:2] = True
    text = format_scores(isic_scores([truth, ~truth], [truth, truth]))
    assert "per-image" in text and "pooled" in text and "2 images" in text
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]}
    assert lines["dice"] == ["0.5000", "0.5000"]
    assert lines["threshold_jaccard"] == ["0.5000", "-"]
    assert lines["specificity"] == ["0.5000", "0.5000"]


def test_scores_from_confusion_matches_isic_scores():
    rng = np.random.default_rng(5)
    preds, truths = list(rng.random((4, 6, 7)) < 0.5), list(rng.random((4, 6, 7)) < 0.5)
    counts = [confusion_counts(p, t) for p, t in zip(preds, truths)]
    assert scores_from_confusion(counts) == isic_scores(preds, truths)
    assert counts[0] == (
        int((preds[0] & truths[0]).sum()),
        int((preds[0] & ~truths[0]).sum()),
        int((~preds[0] & truths[0]).sum()),
        int((~preds[0] & ~truths[0]).sum()),
    )


def test_evaluate_model_at_original_size(tmp_path):
    """A 1x1-conv "model" that finds white lesions on black images: scored at the original size."""
    from slsdeep.data import LAYOUTS, ISICDataset

    rng = np.random.default_rng(6)
    image_folder, mask_folder, suffix = LAYOUTS[2017]["test"]
    (tmp_path / image_folder).mkdir()
    (tmp_path / mask_folder).mkdir()
    truths = []
    for i in range(3):
        truth = np.kron(rng.random((5, 7)) < 0.5, np.ones((8, 8), bool))  # 40 x 56
        truths.append(truth)
        Image.fromarray(truth.astype(np.uint8) * 255).convert("RGB").save(tmp_path / image_folder / f"ISIC_{i:07d}.png")
        Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / mask_folder / f"ISIC_{i:07d}{suffix}")
    model = torch.nn.Conv2d(3, 1, 1)
    torch.nn.init.ones_(model.weight)
    torch.nn.init.zeros_(model.bias)
    model.train()
    dataset = ISICDataset(tmp_path, "test", image_size=32)
    scores = evaluate_model(model, dataset, image_size=32, masks_dir=tmp_path / "masks")
    assert model.training  # restored
    written = [np.asarray(Image.open(tmp_path / "masks" / f"ISIC_{i:07d}_segmentation.png")) for i in range(3)]
    assert all(w.shape == (40, 56) and set(np.unique(w)) <= {0, 255} for w in written)
    assert scores == isic_scores(written, truths)
    assert scores["n_images"] == 3 and scores["dice"] > 0.9
    assert evaluate_model(model, dataset, image_size=32, tta=True)["dice"] > 0.9

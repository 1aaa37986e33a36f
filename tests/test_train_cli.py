"""Training, resume, prediction, evaluation and the command line, on tiny synthetic data."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from slsdeep import checkpoint
from slsdeep.cli import main
from slsdeep.data import ISICDataset, synthesize
from slsdeep.predict import predict_probability, supports_bf16
from slsdeep.train import TrainConfig, train

SIZE = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("data"), n=30, size=SIZE, seed=3)


def tiny(data, out, **overrides):
    options = dict(data=str(data), out=str(out), epochs=1, batch_size=4, image_size=SIZE, preset="tiny", seed=0, progress=False)
    return TrainConfig(**{**options, **overrides})


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_two_epochs_improve_the_validation_loss_and_write_the_run(data, tmp_path):
    history = train(tiny(data, tmp_path / "run", epochs=2), log=lambda *_: None)
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["val_loss"] < history[0]["val_loss"]
    for name in ("last.pt", "best.pt", "metrics.json", "curves.png"):
        assert (tmp_path / "run" / name).is_file(), name
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["config"]["preset"] == "tiny"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["history"] == history


def test_resume_continues_the_epoch_count_and_restores_the_optimizer(data, tmp_path):
    run = tmp_path / "run"
    train(tiny(data, run, epochs=1), log=lambda *_: None)
    steps_after_one = torch.load(run / "last.pt", weights_only=True)["optimizer"]["state"][0]["step"]
    history = train(tiny(data, run, epochs=2, resume=True), log=lambda *_: None)
    assert [h["epoch"] for h in history] == [1, 2]
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["optimizer"]["state"][0]["step"] == 2 * steps_after_one
    with pytest.raises(ValueError, match="pass --resume"):
        train(tiny(data, run, epochs=3), log=lambda *_: None)


def test_the_same_seed_gives_the_same_first_epoch_loss(data, tmp_path):
    first = train(tiny(data, tmp_path / "a"), log=lambda *_: None)[0]["train_loss"]
    second = train(tiny(data, tmp_path / "b"), log=lambda *_: None)[0]["train_loss"]
    other = train(tiny(data, tmp_path / "c", seed=1), log=lambda *_: None)[0]["train_loss"]
    assert first == second
    assert first != other


def test_a_killed_run_resumes_to_the_same_epoch_count(data, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "slsdeep", "train", "--data", str(data), "--out", str(run), "--preset", "tiny",
               "--image-size", str(SIZE), "--batch-size", "4", "--epochs", "3"]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(run / "last.pt", weights_only=True)["epoch"]  # intact: written atomically
    assert 1 <= killed_at <= 3
    done = subprocess.run(command + ["--resume"], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    history = torch.load(run / "last.pt", weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_torchrun_with_two_cpu_processes_trains_one_epoch(data, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "slsdeep",
               "train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--image-size", str(SIZE),
               "--batch-size", "4", "--epochs", "1", "--device", "cpu"]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 1


def test_fused_and_unfused_training_track_each_other(data):
    from slsdeep.model import SLSDeep
    from slsdeep.train import loss_fn

    torch.manual_seed(0)
    unfused = SLSDeep(preset="tiny", fused=False)
    fused = SLSDeep(preset="tiny", fused=True)
    fused.load_state_dict(unfused.state_dict())
    images = torch.randn(4, 3, SIZE, SIZE)
    masks = (torch.rand(4, SIZE, SIZE) > 0.5).long()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (unfused, fused)]
    for step in range(3):
        losses = []
        for model, optimizer, is_fused in zip((unfused, fused), optimizers, (False, True)):
            model.train()
            torch.manual_seed(step)  # the same dropout masks in both models
            optimizer.zero_grad()
            loss = loss_fn(model, is_fused)(model(images), masks)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4), f"step {step}"
    for (name, a), b in zip(unfused.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained")
    train(tiny(data, run), log=lambda *_: None)
    return run / "best.pt"


def test_predict_writes_original_size_masks_and_reports_a_corrupt_image(trained, tmp_path, capsys):
    good = tmp_path / "lesion.png"
    Image.fromarray((np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8)).save(good)
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    status = main(["predict", "--checkpoint", str(trained), str(corrupt), str(good), "--out", str(out)])
    assert status != 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "Traceback" not in err
    mask = np.asarray(Image.open(out / "lesion_segmentation.png"))
    assert mask.shape == (37, 53)
    assert set(np.unique(mask)) <= {0, 255}
    assert (out / "lesion_overlay.png").is_file()
    assert not (out / "broken_segmentation.png").exists()


def test_evaluate_prints_and_writes_the_scores(trained, data, tmp_path, capsys):
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(trained), "--out", str(tmp_path)]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n_images"] == len(list((data / "ISIC-2017_Test_v2_Data").glob("*.jpg")))
    assert 0 <= scores["jaccard"] <= 1
    assert "jaccard" in capsys.readouterr().out
    assert len(list((tmp_path / "masks").glob("*_segmentation.png"))) == scores["n_images"]


class ConvDtypes(TorchDispatchMode):
    """The dtypes of every convolution ATen runs (whatever path: oneDNN, the fused ops' ATen conv)."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "conv" in func.__name__ and isinstance(args[0], torch.Tensor):
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not supports_bf16(torch.device("cpu")), reason="this CPU has no native bf16")
def test_bf16_inference_runs_the_convs_in_bf16_and_keeps_the_masks(trained, data):
    model = checkpoint.load_model(trained, torch.device("cpu"))
    image, _ = ISICDataset(data, "test").load_original(0)
    exact = predict_probability(model, image, image_size=SIZE)
    with ConvDtypes() as seen:
        low = predict_probability(model, image, image_size=SIZE, precision="bf16")
    assert seen.dtypes == {torch.bfloat16}
    assert low.dtype == np.float32 and low.shape == exact.shape
    assert np.abs(low - exact).max() < 0.05  # bf16's 8 bits of mantissa through the tiny network
    assert ((low > 0.5) == (exact > 0.5)).mean() >= 0.99


def test_bf16_without_native_support_warns_and_runs_fp32(trained, data, monkeypatch):
    import slsdeep.predict

    monkeypatch.setattr(slsdeep.predict, "supports_bf16", lambda device: False)
    model = checkpoint.load_model(trained, torch.device("cpu"))
    image, _ = ISICDataset(data, "test").load_original(0)
    with pytest.warns(RuntimeWarning, match="no native bf16 support; running fp32"):
        low = predict_probability(model, image, image_size=SIZE, precision="bf16")
    np.testing.assert_array_equal(low, predict_probability(model, image, image_size=SIZE))


def test_precision_is_checked(trained, data):
    model = checkpoint.load_model(trained, torch.device("cpu"))
    image, _ = ISICDataset(data, "test").load_original(0)
    with pytest.raises(ValueError, match="precision must be one of"):
        predict_probability(model, image, image_size=SIZE, precision="fp16")


def test_predict_and_evaluate_take_precision(trained, data, tmp_path):
    image = tmp_path / "lesion.png"
    Image.fromarray((np.random.default_rng(1).random((40, 31, 3)) * 255).astype(np.uint8)).save(image)
    assert main(["predict", "--checkpoint", str(trained), str(image), "--out", str(tmp_path / "p"), "--precision", "bf16"]) == 0
    assert np.asarray(Image.open(tmp_path / "p" / "lesion_segmentation.png")).shape == (40, 31)
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(trained), "--out", str(tmp_path / "e"),
                 "--precision", "bf16"]) == 0  # fmt: skip
    assert 0 <= json.loads((tmp_path / "e" / "scores.json").read_text())["jaccard"] <= 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--data", "nowhere", "--checkpoint", "missing.pt"], "missing.pt"),
        (["train", "--data", "nowhere", "--out", "x", "--preset", "tiny"], "nowhere"),
        (["predict", "--checkpoint", "missing.pt", "a.png", "--out", "o"], "missing.pt"),
    ],
)
def test_expected_errors_print_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_a_bad_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.pt"):
        checkpoint.load(bad)


def test_demo_writes_every_artefact(tmp_path, capsys):
    # The README's main job, shortened: one epoch on a few images.
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--images", "24"]) == 0
    out = tmp_path / "demo"
    for name in ("run/best.pt", "run/last.pt", "run/curves.png", "run/metrics.json", "scores.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "overlays").glob("*_overlay.png"))) >= 1
    assert "jaccard" in capsys.readouterr().out
    assert main(["demo", "--out", str(out), "--epochs", "1", "--images", "24"]) == 2  # never overwrites a run


def test_training_loss_does_not_recheck_the_masks_every_step(data, monkeypatch):
    # The {0, 1} check syncs a GPU; ISICDataset's masks are binary by construction, checked at load.
    from slsdeep.data import ISICDataset
    from slsdeep.model import SLSDeep
    from slsdeep.train import loss_fn
    from slsdeep_kernels.ops import nll_epe_loss as loss_op

    masks = torch.stack([ISICDataset(data, "train", image_size=SIZE, augment=True)[i][1] for i in range(4)])
    assert set(masks.unique().tolist()) <= {0, 1}

    def refuse(target):
        raise AssertionError("the training loss re-checked the target values")

    monkeypatch.setattr(loss_op, "_check_target_values", refuse)
    logits = torch.randn(4, 2, SIZE, SIZE, requires_grad=True)
    for fused in (True, False):
        loss_fn(SLSDeep(preset="tiny"), fused)(logits, masks).backward()
    with pytest.raises(AssertionError, match="re-checked"):  # the public default still checks
        loss_op.nll_epe_loss(logits, masks)

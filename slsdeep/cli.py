"""The ``slsdeep`` command line (also ``python -m slsdeep``).

    slsdeep demo [--out DIR]                 synthesise data, train, evaluate, write figures
    slsdeep synth OUT --n N [--size S] [--seed K]
    slsdeep train --data ROOT --out RUN [...]
    slsdeep evaluate --data ROOT --checkpoint CK [--split test] [--out DIR]
    slsdeep predict --checkpoint CK IMAGES... --out DIR [--tta]
    slsdeep export --checkpoint CK --format {onnx,pt2} --out FILE [--image-size S] [--opset N] [--dynamic-size]
    slsdeep bench [--device cpu|cuda] [--quick] [--out FILE.json]

``evaluate`` and ``predict`` take a ``.pt`` checkpoint or an ``.onnx`` export (run by onnxruntime).
Expected errors (a missing file, a bad argument, an unreadable image) print one line and exit 2
(an export that does not match PyTorch: 1); a traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from slsdeep.model import PRECISIONS

EXIT_ERROR = 2
PRECISION_HELP = "bf16: autocast on channels_last images where the device supports bf16 (else fp32, with a warning)"
EXIT_MISMATCH = 1


class CommandError(Exception):
    """An expected failure, reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse's own prints the usage too)."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="ISIC 2016/2017/2018 folder (or `slsdeep synth` output)")
    parser.add_argument("--out", required=True, help="run folder: last.pt, best.pt, metrics.json, curves.png")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--variant", choices=("slsdeep", "slsdeep-epe", "slsdeep+asc"), default="slsdeep")
    parser.add_argument("--preset", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--stem", choices=("deep", "torchvision"), default="deep")
    parser.add_argument("--branch-channels", type=int, default=None, help="pyramid branch width (paper 1024)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--amp", action="store_true", help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue from RUN/last.pt")
    parser.add_argument("--encoder-weights", default=None, help="ImageNet ResNet-50 checkpoint (local file)")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True, help="use the fused kernels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across torchrun ranks (CUDA)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes")
    parser.add_argument("--lr-encoder", type=float, default=1e-3)
    parser.add_argument("--lr-decoder", type=float, default=1e-2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slsdeep", description="SLSDeep skin-lesion segmentation.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="synthesise data, train, evaluate and draw the results")
    demo.add_argument("--out", default="slsdeep-demo", help="output folder (default ./slsdeep-demo)")
    demo.add_argument("--epochs", type=int, default=None, help="override the demo's epoch count")
    demo.add_argument("--images", type=int, default=None, help="override the number of synthetic images")

    synth = commands.add_parser("synth", help="write a synthetic data set in the ISIC 2017 layout")
    synth.add_argument("out")
    synth.add_argument("--n", type=int, required=True)
    synth.add_argument("--size", type=int, default=384)
    synth.add_argument("--seed", type=int, default=0)

    _add_train_arguments(commands.add_parser("train", help="train a model"))

    evaluate = commands.add_parser("evaluate", help="ISIC scores of a checkpoint on a split")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--checkpoint", required=True, help="a .pt checkpoint or an .onnx export")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test")
    evaluate.add_argument("--out", default=None, help="folder for scores.json and the predicted masks")
    evaluate.add_argument("--image-size", type=int, default=None, help="input size (default: the training size)")
    evaluate.add_argument("--tta", action="store_true", help="average scales 0.5–1.5 and flips")
    evaluate.add_argument("--device", choices=("cpu", "cuda"), default=None)
    evaluate.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)

    predict = commands.add_parser("predict", help="segment images")
    predict.add_argument("--checkpoint", required=True, help="a .pt checkpoint or an .onnx export")
    predict.add_argument("images", nargs="+")
    predict.add_argument("--out", required=True)
    predict.add_argument("--image-size", type=int, default=None)
    predict.add_argument("--tta", action="store_true")
    predict.add_argument("--device", choices=("cpu", "cuda"), default=None)
    predict.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)

    export = commands.add_parser("export", help="export a checkpoint to ONNX or torch.export, checked against PyTorch")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--format", required=True, choices=("onnx", "pt2"))
    export.add_argument("--out", required=True, help="the file to write (.onnx or .pt2)")
    export.add_argument("--image-size", type=int, default=None, help="input side (default: the training size)")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset, 18 or later (default 18)")
    export.add_argument("--dynamic-size", action="store_true", help="height and width dynamic too (needed by --tta)")

    bench = commands.add_parser("bench", help="every op and the whole model: fused vs eager vs torch.compile")
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None)
    bench.add_argument("--quick", action="store_true", help="forward+backward only, the largest shapes, fewer repeats")
    bench.add_argument("--out", default=None, help="JSON file for the figures (a PNG bar chart is written beside it)")
    bench.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="the whole model's inference cases: fp32 or bf16 (default: fp32 on CPU, bf16 on CUDA)")
    return parser


def _device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is visible")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _training_image_size(state: dict, requested: int | None) -> int:
    return requested or state.get("image_size") or 384


def cmd_synth(args) -> int:
    from slsdeep.data import synthesize

    root = synthesize(args.out, n=args.n, size=args.size, seed=args.seed)
    print(f"wrote {args.n} synthetic images ({args.size}×{args.size}) to {root}")
    return 0


def cmd_train(args) -> int:
    from slsdeep.train import TrainConfig, train

    options = {field: getattr(args, field) for field in TrainConfig.__dataclass_fields__ if hasattr(args, field)}
    train(TrainConfig(**options))
    return 0


def _inference_model(args):
    """(model, input size) of ``--checkpoint``: a PyTorch checkpoint, or an ``.onnx`` export run by
    onnxruntime (whose fixed size, unless exported with --dynamic-size, must fit --image-size and --tta)."""
    from slsdeep import checkpoint

    if Path(args.checkpoint).suffix == ".onnx":
        from slsdeep.export import MissingDependency, OnnxModel

        try:
            model = OnnxModel(args.checkpoint, args.device)
        except MissingDependency as error:
            raise CommandError(str(error)) from None
        image_size = args.image_size or model.image_size
        model.check_size(image_size, multi_scale=args.tta)
        return model, image_size
    state = checkpoint.load(args.checkpoint)
    return checkpoint.load_model(args.checkpoint, _device(args.device)), _training_image_size(state, args.image_size)


def cmd_evaluate(args) -> int:
    from slsdeep.data import ISICDataset
    from slsdeep.evaluate import evaluate_model, format_scores

    model, image_size = _inference_model(args)
    dataset = ISICDataset(args.data, args.split)
    masks = Path(args.out) / "masks" if args.out else None
    scores = evaluate_model(model, dataset, image_size=image_size, tta=args.tta, masks_dir=masks, precision=args.precision)
    print(format_scores(scores))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "scores.json").write_text(json.dumps(scores, indent=1))
    return 0


def cmd_predict(args) -> int:
    import numpy as np
    from PIL import Image

    from slsdeep.predict import overlay, predict_probability

    model, image_size = _inference_model(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for name in args.images:
        path = Path(name)
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as error:  # missing, unreadable or corrupt: report, go on
            print(f"slsdeep predict: {path}: cannot read image: {error}", file=sys.stderr)
            failures += 1
            continue
        mask = predict_probability(model, image, image_size=image_size, tta=args.tta, precision=args.precision) > 0.5
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{path.stem}_segmentation.png")
        overlay(image, mask).save(out / f"{path.stem}_overlay.png")
        print(f"{path} -> {out / (path.stem + '_segmentation.png')}")
    if failures:
        print(f"slsdeep predict: {failures} of {len(args.images)} images could not be read", file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    from slsdeep.export import MissingDependency, VerificationError, export_checkpoint

    try:
        difference = export_checkpoint(args.checkpoint, args.format, args.out, args.image_size, args.opset, args.dynamic_size)
    except MissingDependency as error:
        raise CommandError(str(error)) from None
    except VerificationError as error:
        print(f"slsdeep export: {error}", file=sys.stderr)
        return EXIT_MISMATCH
    print(f"wrote {args.out} ({args.format}); max probability difference to PyTorch on a random batch: {difference:.2e}")
    return 0


def cmd_demo(args) -> int:
    from slsdeep.demo import run_demo

    run_demo(args.out, epochs=args.epochs, images=args.images)
    return 0


def cmd_bench(args) -> int:
    from slsdeep.benchmark import run

    run(_device(args.device), quick=args.quick, out=args.out, precision=args.precision)
    return 0


COMMANDS = {"bench": cmd_bench, "demo": cmd_demo, "synth": cmd_synth, "train": cmd_train, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "export": cmd_export}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    began = time.perf_counter()
    try:
        status = COMMANDS[args.command](args)
    except (CommandError, ValueError, OSError) as error:
        print(f"slsdeep {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"slsdeep {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.command in ("demo", "train"):
        print(f"done in {time.perf_counter() - began:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())

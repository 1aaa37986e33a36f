"""Deployment: a checkpoint exported to ONNX or to a ``torch.export`` program, and ONNX models served.

* ``onnx``: the fused model through ``torch.onnx.export(dynamo=True)`` with
  ``slsdeep_kernels.onnx_translations`` (opset >= 18), parameter-only subgraphs folded, input
  ``image`` (N, 3, S, S) with a dynamic batch (and dynamic H, W with ``dynamic_size``), output
  ``logits``. The model's configuration rides along as metadata (:data:`METADATA_KEYS`), which
  :class:`OnnxModel` (``predict``/``evaluate``) reads.
* ``pt2``: ``torch.export`` of the same model, ``torch.export.save``'d with the same metadata as the
  extra file ``slsdeep.json``. Loading it needs ``import slsdeep_kernels`` first (the custom ops);
  ``import slsdeep`` does that.

The model is always the fused one in eval mode (same weights whatever the checkpoint's ``fused``), so
the exported graph keeps the fused model's low-resolution pyramid conv. The file is written to a
temporary file beside ``out``, loaded back (onnxruntime on CPU, or ``torch.export.load``), run on a
random batch beside PyTorch, and moved to ``out`` only when the probabilities agree within
:data:`TOLERANCE`: nothing half-written, nothing unchecked.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

import slsdeep_kernels
from slsdeep import checkpoint
from slsdeep.data import IMAGENET_MEAN, IMAGENET_STD
from slsdeep.model import SLSDeep
from slsdeep.predict import foreground_probability

FORMATS = ("onnx", "pt2")
MIN_IMAGE_SIZE = 32  # the encoder's 1/8 map needs a few pixels a side
TOLERANCE = 1e-4  # max |Δ probability| between the exported model and PyTorch
CHECK_BATCH = 3  # not the export's example batch (2): the check exercises the dynamic batch
INPUT_NAME, OUTPUT_NAME = "image", "logits"
METADATA_KEYS = ("slsdeep.variant", "slsdeep.image_size", "slsdeep.num_classes", "slsdeep.head",
                 "slsdeep.normalization", "slsdeep.dynamic_size", "slsdeep.config")
EXPORT_DEPENDENCIES = "pip install -e '.[export]' (or: pip install onnx onnxscript onnxruntime)"


class MissingDependency(ImportError):
    """onnx / onnxscript / onnxruntime are not installed; the message says what to install."""


class VerificationError(Exception):
    """The exported model does not match PyTorch; nothing was written."""


def _require(*modules: str):
    """Import ``modules`` or raise :class:`MissingDependency` naming what to install."""
    try:
        return [importlib.import_module(name) for name in modules]
    except ImportError as error:
        names = ", ".join(modules)
        raise MissingDependency(f"this needs {names} ({error.name} is missing): {EXPORT_DEPENDENCIES}") from None


def metadata(config: dict, image_size: int, dynamic_size: bool) -> dict[str, str]:
    """The exported model's description, as string key/values (ONNX ``metadata_props``)."""
    normalization = {"layout": "NCHW", "channels": "RGB", "scale": 1 / 255, "mean": list(IMAGENET_MEAN),
                     "std": list(IMAGENET_STD), "resize": "bilinear to image_size x image_size"}
    values = {
        "slsdeep.variant": config["variant"],
        "slsdeep.image_size": image_size,
        "slsdeep.num_classes": config["num_classes"],
        "slsdeep.head": "sigmoid" if config["num_classes"] == 1 else "softmax",
        "slsdeep.normalization": normalization,
        "slsdeep.dynamic_size": dynamic_size,
        "slsdeep.config": config,
    }
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}


def _fused_model(state: dict) -> SLSDeep:
    model = SLSDeep(**{**state["config"], "fused": True})
    model.load_state_dict(state["model"])
    return model.eval()


def _dynamic_shapes(dynamic_size: bool):
    dims = {0: torch.export.Dim("batch", min=1)}
    if dynamic_size:
        dims |= {2: torch.export.Dim("height", min=MIN_IMAGE_SIZE), 3: torch.export.Dim("width", min=MIN_IMAGE_SIZE)}
    return (dims,)


@contextlib.contextmanager
def _quiet():
    """The exporters' progress notes and warnings (e.g. "torchvision is not installed") off the CLI's output."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def write_onnx(model: SLSDeep, example: torch.Tensor, path: str | os.PathLike, opset: int = 18,
               dynamic_size: bool = False, meta: dict[str, str] | None = None) -> None:
    """``model`` (fused, eval) exported to ONNX at ``path`` for inputs shaped like ``example``, with
    ``meta`` (:func:`metadata`) as the file's metadata; unchecked (:func:`export_checkpoint` checks)."""
    table = slsdeep_kernels.onnx_translations(opset)
    with _quiet():
        program = torch.onnx.export(model, (example,), dynamo=True, custom_translation_table=table, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], optimize=False,
                                    dynamic_shapes=_dynamic_shapes(dynamic_size), verbose=False)
        slsdeep_kernels.onnx.fold_constants(program)  # the exporter's optimisation, without its size limit
    program.model.metadata_props.update(meta or {})
    program.save(str(path), external_data=False)


def _write_pt2(model: SLSDeep, example: torch.Tensor, path: Path, dynamic_size: bool, meta: dict) -> None:
    with _quiet():
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(dynamic_size))
    torch.export.save(program, str(path), extra_files={"slsdeep.json": json.dumps(meta)})


def load_program(path: str | os.PathLike) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """A ``.pt2`` written by :func:`export_checkpoint` and its metadata (``slsdeep_kernels`` is imported
    here, as any process loading such a program must do first: the graph calls its custom ops)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"program {path} does not exist")
    extra = {"slsdeep.json": ""}
    try:
        with _quiet():
            program = torch.export.load(str(path), extra_files=extra)
    except Exception as error:
        raise ValueError(f"{path} is not a loadable torch.export program: {str(error).splitlines()[0]}") from error
    return program, json.loads(extra["slsdeep.json"]) if extra["slsdeep.json"] else {}


def _exported_probability(fmt: str, path: Path, batch: torch.Tensor) -> torch.Tensor:
    """The foreground probability of the file at ``path``, loaded back, on ``batch``."""
    if fmt == "onnx":
        return foreground_probability(OnnxModel(path, device="cpu")(batch))
    program, _ = load_program(path)
    with torch.no_grad():
        return foreground_probability(program.module()(batch))


def _fp32_error(state: dict, batch: torch.Tensor, probability: torch.Tensor) -> float:
    """max |Δp| of PyTorch's fp32 ``probability`` from the fp64 model: how far rounding alone moves this
    model (an untrained one's huge logits move it past any fp32 check), for a failed check's message."""
    exact = SLSDeep(**{**state["config"], "fused": False})
    exact.load_state_dict(state["model"])
    with torch.no_grad():
        return float((foreground_probability(exact.double().eval()(batch.double())) - probability).abs().max())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_arguments(fmt: str, out: Path, image_size: int, opset: int | None) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if out.suffix != f".{fmt}":
        raise ValueError(f"--out {out} must end in .{fmt} for --format {fmt} (predict and evaluate go by the suffix)")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"--image-size {image_size}: the model needs images of at least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE}")
    if fmt == "pt2" and opset is not None:
        raise ValueError("--opset applies to --format onnx only")
    minimum = slsdeep_kernels.onnx.MIN_OPSET
    if opset is not None and opset < minimum:
        raise ValueError(f"--opset {opset}: the export needs ONNX opset {minimum} or later (Resize with axes)")


def export_checkpoint(checkpoint_path: str | os.PathLike, fmt: str, out: str | os.PathLike, image_size: int | None = None,
                      opset: int | None = None, dynamic_size: bool = False, seed: int = 0) -> float:
    """Export the model of ``checkpoint_path`` to ``out`` (``fmt`` ``onnx`` or ``pt2``) and return the max
    probability difference to PyTorch on a random batch. ``image_size``: the input side (default: the
    checkpoint's training size); ``opset``: ONNX opset (default 18); ``dynamic_size``: H and W dynamic
    too (then any input size, e.g. multi-scale prediction). Raises :class:`VerificationError`, and
    writes nothing, when the difference exceeds :data:`TOLERANCE`."""
    state = checkpoint.load(checkpoint_path)
    out = Path(out)
    image_size = image_size if image_size is not None else state.get("image_size") or 384
    _check_arguments(fmt, out, image_size, opset)
    if fmt == "onnx":
        _require("onnx", "onnxscript", "onnxruntime")
    opset = opset or slsdeep_kernels.onnx.MIN_OPSET
    model = _fused_model(state)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, 3, image_size, image_size, generator=generator)
    batch = torch.randn(CHECK_BATCH, 3, image_size, image_size, generator=generator)
    meta = metadata(model.config, image_size, dynamic_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=f".tmp{out.suffix}")
    os.close(handle)
    temporary = Path(name)
    try:
        if fmt == "onnx":
            write_onnx(model, example, temporary, opset, dynamic_size, meta)
        else:
            _write_pt2(model, example, temporary, dynamic_size, meta)
        with torch.no_grad():
            expected = foreground_probability(model(batch))
        difference = float((_exported_probability(fmt, temporary, batch) - expected).abs().max())
        if not difference <= TOLERANCE:
            raise VerificationError(
                f"the exported model's probabilities differ from PyTorch's by {difference:.2e} > {TOLERANCE:.0e} on a "
                f"random batch (PyTorch's own fp32 ones are {_fp32_error(state, batch, expected):.1e} from its fp64 "
                f"ones); nothing written to {out}")
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would keep a deployed model from its server
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return difference


class OnnxModel:
    """An exported SLSDeep served by onnxruntime: ``model(x)`` maps a normalised batch (N, 3, S, S) to
    logits, as the PyTorch model does. ``device``: ``"cpu"``, ``"cuda"`` (CUDA provider) or None
    (CUDA when onnxruntime and torch both see one). Reads the metadata :func:`export_checkpoint` writes."""

    input_device = torch.device("cpu")  # tensors cross into onnxruntime through numpy

    def __init__(self, path: str | os.PathLike, device: str | torch.device | None = None):
        (ort,) = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist")
        available = ort.get_available_providers()
        kind = None if device is None else torch.device(device).type
        if kind == "cuda" and "CUDAExecutionProvider" not in available:
            raise ValueError(f"{self.path}: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
        cuda = kind == "cuda" or (kind is None and "CUDAExecutionProvider" in available and torch.cuda.is_available())
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as error:  # onnxruntime raises its own types for foreign or truncated files
            raise ValueError(f"{self.path} is not a loadable ONNX model: {str(error).splitlines()[0]}") from error
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in METADATA_KEYS if key not in meta]
        if missing:
            raise ValueError(f"{self.path} has no slsdeep metadata ({', '.join(missing)}): export it with `slsdeep export`")
        try:
            self.image_size = int(meta["slsdeep.image_size"])
            self.dynamic_size = bool(json.loads(meta["slsdeep.dynamic_size"]))
            self.config = json.loads(meta["slsdeep.config"])
            normalization = json.loads(meta["slsdeep.normalization"])
        except (ValueError, TypeError) as error:
            raise ValueError(f"{self.path} has malformed slsdeep metadata: {error}") from None
        if normalization.get("mean") != list(IMAGENET_MEAN) or normalization.get("std") != list(IMAGENET_STD):
            raise ValueError(f"{self.path} expects an input normalisation other than ImageNet's, which prediction applies")

    def check_size(self, image_size: int, multi_scale: bool = False) -> None:
        """Raise ValueError unless the model takes ``image_size`` (and other sizes when ``multi_scale``)."""
        if self.dynamic_size:
            return
        if multi_scale:
            raise ValueError(f"{self.path} was exported for {self.image_size}×{self.image_size} inputs only; "
                             "--tta runs other scales: export with --dynamic-size")
        if image_size != self.image_size:
            raise ValueError(f"{self.path} was exported for {self.image_size}×{self.image_size} inputs; got --image-size "
                             f"{image_size} (export with --dynamic-size for any size)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.path}: input must be (N, 3, H, W); got {tuple(x.shape)}")
        if not self.dynamic_size and tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"{self.path} was exported for {self.image_size}×{self.image_size} inputs; got "
                             f"{x.shape[2]}×{x.shape[3]} (export with --dynamic-size for any size)")
        image = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: image})
        return torch.from_numpy(logits)

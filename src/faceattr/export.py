"""Deployment: the fold models as ONNX files, and an ensemble that runs them with onnxruntime.

`faceattr export RUN --onnx DIR` writes `fold_K.onnx` (input `images`: float32 (N, 3, 64, 64) RGB
in [0, 1]; output `logits`: (N,), the log-odds of label 1; normalisation is inside the graph) and
`ensemble.json`, which says how to prepare images and how the run decides. `faceattr predict
--onnx DIR` then needs onnxruntime and nothing of the training code's models.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from faceattr.checkpoints import (
    check_digests,
    checked_settings,
    load_ensemble_settings,
    load_fold_models,
    weights_digest,
)
from faceattr.ensemble import batches_side_by_side, inference_batch_size
from faceattr.errors import FaceAttrError, first_line
from faceattr.outputs import atomic_path, ensure_writable_dir, write_json
from faceattr.runfolder import fold_files

PREPROCESSING = {
    "input": "images",
    "layout": "NCHW",
    "dtype": "float32",
    "channels": "RGB",
    "size": 64,
    "range": "pixel values / 255, in [0, 1]; the graph normalises them itself",
    "resize": "other sizes: centre-crop to a square, then bicubic resize to 64x64",
    "output": "logits: log-odds of label 1, one per image; probability = sigmoid(logit)",
    "tta": "when true, also score the image mirrored left-right and average the probabilities",
    "vote": "soft: mean probability of the fold models, label 1 where it reaches the threshold; "
    "majority: label 1 where most fold models' probabilities reach it (a tie: the soft vote's)",
}


def export_onnx(models_dir: str | Path, out: str | Path, opset: int = 17) -> list[Path]:
    """Write one ONNX model per fold and ensemble.json (preprocessing and decision) into `out`."""
    models = load_fold_models(models_dir)
    settings = load_ensemble_settings(models_dir, models)
    if Path(out).resolve() == Path(models_dir).resolve():  # its ensemble.json is the run's own
        raise FaceAttrError(f"--onnx {out} is the run's models folder; choose another")
    if fold_files(Path(out), ".safetensors") or (Path(out) / "run.json").exists():
        raise FaceAttrError(
            f"--onnx {out} holds a run or its models, whose ensemble.json the export's would "
            "replace; choose another folder"
        )
    out = ensure_writable_dir(out)
    folds = {m.fold for m in models}
    stale = [p.name for fold, p in fold_files(out, ".onnx") if fold not in folds]
    if stale:  # another export's: predict --onnx would refuse the mixture
        raise FaceAttrError(f"{out} holds {stale[0]} from another export; choose an empty folder")
    paths = [out / f"fold_{m.fold}.onnx" for m in models]
    example = torch.rand(2, 3, 64, 64)
    with contextlib.ExitStack() as stack:  # every model is written before any replaces a file
        for m, path in zip(models, paths, strict=True):
            tmp = stack.enter_context(atomic_path(path))
            with warnings.catch_warnings():
                # The TorchScript-based exporter works from torch 2.4 on and needs no onnxscript.
                warnings.simplefilter("ignore")
                torch.onnx.export(m.model.eval(), (example,), str(tmp), input_names=["images"],
                                  output_names=["logits"], opset_version=opset, dynamo=False,
                                  dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}})  # fmt: skip
        # An earlier export's settings go before its models are replaced, these come after: an
        # export stopped between leaves a folder predict --onnx refuses, not one mixing two runs.
        (out / "ensemble.json").unlink(missing_ok=True)
    digests = {
        str(m.fold): weights_digest(p.read_bytes()) for m, p in zip(models, paths, strict=True)
    }
    write_json(out / "ensemble.json", {
        "folds": [m.fold for m in models], "arch": models[0].config.get("arch"),
        "threshold": settings["threshold"], "tta": settings["tta"],
        "vote": settings["vote"],
        "sha256": digests,  # predict --onnx refuses a model from another export
        "preprocessing": PREPROCESSING,
    })  # fmt: skip
    return paths


class OnnxEnsemble:
    """The exported fold models, run by onnxruntime on the CPU."""

    def __init__(self, folder: str | Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise FaceAttrError("--onnx needs onnxruntime: pip install onnxruntime") from None
        folder = Path(folder)
        try:
            settings = json.loads((folder / "ensemble.json").read_text())
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            raise FaceAttrError(f"{folder} is not a faceattr ONNX export ({e})") from None
        files = fold_files(folder, ".onnx")
        if not files:
            raise FaceAttrError(f"{folder} holds no fold_K.onnx model")
        if not isinstance(settings, dict):
            raise FaceAttrError(f"{folder / 'ensemble.json'} does not hold the ensemble's settings")
        self.folds = [fold for fold, _ in files]
        path = folder / "ensemble.json"
        self.settings = checked_settings(settings, path, self.folds, ".onnx")
        try:  # read once: the bytes digested are the bytes run
            raw = {fold: p.read_bytes() for fold, p in files}
        except OSError as e:
            raise FaceAttrError(f"cannot read {e.filename}: {e.strerror}") from None
        digests = {fold: weights_digest(b) for fold, b in raw.items()}
        check_digests(folder, digests, ".onnx", self.settings.get("sha256"), path)
        options = ort.SessionOptions()
        # One thread a session: batches run side by side instead (see `scores`).
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.sessions = []
        for fold, path in files:
            try:
                session = ort.InferenceSession(
                    raw[fold], options, providers=["CPUExecutionProvider"]
                )
            except Exception as e:  # onnxruntime's own errors: a truncated or foreign file
                raise FaceAttrError(f"cannot load {path}: {first_line(e)}") from None
            self.sessions.append(session)

    def scores(
        self, images: np.ndarray, batch_size: int | None = None, tta: bool = False
    ) -> np.ndarray:
        """Probability of label 1 from every model for uint8 (N, 64, 64, 3) images: (models, N).

        As with torch on a CPU, a thread per batch (`batches_side_by_side`) beats each batch split
        across the threads: 2.5-3x for the simple CNN on two cores, to the same scores.
        """
        batch_size = batch_size or inference_batch_size(torch.device("cpu"))

        def score(start: int) -> list[np.ndarray]:
            x = np.ascontiguousarray(
                images[start : start + batch_size].transpose(0, 3, 1, 2), dtype=np.float32
            ) / np.float32(255)
            mirrored = np.ascontiguousarray(x[..., ::-1]) if tta else None
            scores = []
            for session in self.sessions:
                p = _sigmoid(session.run(None, {"images": x})[0])
                if mirrored is not None:
                    p = (p + _sigmoid(session.run(None, {"images": mirrored})[0])) / 2
                scores.append(p)
            return scores

        out = np.empty((len(self.sessions), len(images)))
        starts = range(0, len(images), batch_size)
        with batches_side_by_side(torch.device("cpu")) as map_in_order:
            for start, scores in zip(starts, map_in_order(score, starts), strict=True):
                out[:, start : start + len(scores[0])] = scores
        return out


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-logits.astype(np.float64)))

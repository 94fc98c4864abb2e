"""Fold models on disk: weights as safetensors, settings and metrics as JSON beside them.

Nothing is ever unpickled, so loading a model someone hands you cannot run their code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from faceattr.errors import FaceAttrError
from faceattr.models import create_model
from faceattr.outputs import atomic_path, write_json


@dataclass
class FoldModel:
    """One trained fold model and the JSON that describes it."""

    fold: int
    model: nn.Module
    config: dict


def save_fold_model(models_dir: str | Path, fold: int, model: nn.Module, config: dict) -> Path:
    """Write `fold_K.safetensors` and `fold_K.json`; K counts from 1 as people do."""
    models_dir = Path(models_dir)
    weights = models_dir / f"fold_{fold}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes several in no fixed order, and the same training
    # must give byte-identical files.
    meta = {"faceattr": json.dumps({"arch": config["arch"], "fold": fold}, sort_keys=True)}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata=meta)
    write_json(models_dir / f"fold_{fold}.json", {"fold": fold, **config})
    return weights


def load_fold_models(models_dir: str | Path) -> list[FoldModel]:
    """Every fold model of a run's models folder, in fold order, in eval mode on the CPU."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise FaceAttrError(f"model folder {models_dir} does not exist")
    found = sorted(
        (int(m.group(1)), p)
        for p in models_dir.glob("fold_*.safetensors")
        if (m := re.fullmatch(r"fold_(\d+)\.safetensors", p.name))
    )
    if not found:
        raise FaceAttrError(f"{models_dir} holds no fold_K.safetensors model")
    loaded = []
    for fold, weights in found:
        config_path = weights.with_suffix(".json")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FaceAttrError(f"cannot read {config_path}: {e}") from None
        model = create_model(config.get("arch", "?"))
        try:
            model.load_state_dict(load_file(str(weights)))
        except Exception as e:  # a corrupt or mismatched file is the user's to fix
            raise FaceAttrError(f"cannot load {weights}: {str(e).splitlines()[0]}") from None
        loaded.append(FoldModel(fold, model.eval(), config))
    return loaded


def load_ensemble_settings(models_dir: str | Path, models: list[FoldModel]) -> dict:
    """The ensemble's decision settings: models/ensemble.json, written by train once it chose them.

    A folder without one (an older or hand-assembled run) votes at its models' own threshold
    (0.5 unless they say otherwise), without test-time augmentation.
    """
    path = Path(models_dir) / "ensemble.json"
    settings = {"threshold": float(models[0].config.get("threshold", 0.5)), "tta": False}
    if path.exists():
        try:
            settings.update(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise FaceAttrError(f"cannot read {path}: {e}") from None
    return settings

"""Fold models on disk: weights as safetensors, settings and metrics as JSON beside them, and
ensemble.json, how they decide together.

Nothing is ever unpickled, so loading a model someone hands you cannot run their code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file
from torch import nn

from faceattr.ensemble import VOTES
from faceattr.errors import FaceAttrError, first_line
from faceattr.models import create_model
from faceattr.outputs import atomic_path, write_json
from faceattr.runfolder import check_whole, finished_run, fold_files

log = logging.getLogger("faceattr")


@dataclass
class FoldModel:
    """One trained fold model and the JSON that describes it."""

    fold: int
    model: nn.Module
    config: dict
    sha256: str  # of the file's bytes the model was loaded from


def save_fold_model(models_dir: str | Path, fold: int, model: nn.Module, config: dict) -> Path:
    """Write `fold_K.safetensors` and `fold_K.json`; K counts from 1 as people do."""
    models_dir = Path(models_dir)
    weights = models_dir / f"fold_{fold}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes several in no fixed order, and the same training
    # must give byte-identical files.
    meta = {"faceattr": json.dumps({"arch": config["arch"], "fold": fold}, sort_keys=True)}
    with atomic_path(weights) as tmp:
        _save_file(state, tmp, weights, meta)
    write_json(models_dir / f"fold_{fold}.json", {"fold": fold, **config})
    return weights


def weights_digest(raw: bytes) -> str:
    """The sha256 of a fold model's file: ensemble.json holds each, so that a fold model from
    another run (of the same model or not) cannot join this run's ensemble unseen."""
    return hashlib.sha256(raw).hexdigest()


def _save_file(tensors: dict, tmp: Path, target: Path, meta: dict) -> None:
    """safetensors' save_file, whose I/O errors (a full disk) are SafetensorErrors, not OSErrors."""
    try:
        save_file(tensors, str(tmp), metadata=meta)
    except SafetensorError as e:
        raise FaceAttrError(f"cannot write {target}: {first_line(e)}") from None


def load_fold_models(models_dir: str | Path) -> list[FoldModel]:
    """Every fold model of a run's models folder, in fold order, in eval mode on the CPU."""
    models_dir = Path(models_dir)
    run = models_dir.parent
    check_whole(run)
    found = fold_files(models_dir, ".safetensors")
    if not found:
        finished_run(run, [])  # a run before its first fold: say so
        if not models_dir.is_dir():
            raise FaceAttrError(f"model folder {models_dir} does not exist")
        inner = models_dir / "models"  # a run folder given for its models/
        if fold_files(inner, ".safetensors"):
            raise FaceAttrError(
                f"{models_dir} holds no fold_K.safetensors model, but its models/ does: it is a "
                f"run folder, which predict reads as --run {models_dir}"
            )
        raise FaceAttrError(f"{models_dir} holds no fold_K.safetensors model")
    described = {fold for fold, _ in fold_files(models_dir, ".json")}
    missing = sorted(described - {fold for fold, _ in found})
    if missing:
        raise FaceAttrError(f"{models_dir}: fold_{missing[0]}.safetensors is missing")
    loaded = []
    for fold, weights in found:
        config_path = weights.with_suffix(".json")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            raise FaceAttrError(f"cannot read {config_path}: {e}") from None
        if not isinstance(config, dict):
            raise FaceAttrError(f"{config_path} does not hold a fold's settings")
        arch = config.get("arch", "?")
        try:
            model = create_model(arch)
        except FaceAttrError as e:
            raise FaceAttrError(f"{config_path}: {e}") from None
        try:  # the bytes read once: the digest checked is that of the weights loaded
            raw = weights.read_bytes()
            state = load(raw)
        except Exception as e:  # a truncated or foreign file is the user's to fix
            raise FaceAttrError(f"cannot load {weights}: {first_line(e)}") from None
        try:
            model.load_state_dict(state)
        except RuntimeError:  # torch's message lists every tensor; its first line names none
            raise FaceAttrError(
                f"cannot load {weights}: its tensors are not those of the {arch} model "
                f"{config_path.name} names"
            ) from None
        loaded.append(FoldModel(fold, model.eval(), config, weights_digest(raw)))
    return loaded


def save_ensemble_settings(models_dir: Path, folds: int, threshold: float, tta: bool) -> None:
    """models/ensemble.json: how the `folds` fold models decide together (the soft vote at the
    threshold train chose), and each one's sha256, so that no other model joins them unseen."""
    write_json(
        models_dir / "ensemble.json",
        {
            "threshold": threshold,
            "vote": "soft",
            "tta": tta,
            "folds": list(range(1, folds + 1)),
            "sha256": {
                str(k): weights_digest((models_dir / f"fold_{k}.safetensors").read_bytes())
                for k in range(1, folds + 1)
            },
        },
    )


def load_ensemble_settings(models_dir: str | Path, models: list[FoldModel]) -> dict:
    """The ensemble's decision settings: models/ensemble.json, written by train once it chose them.

    A folder without one (an older or hand-assembled run) votes at its models' own threshold
    (0.5 unless they say otherwise), without test-time augmentation. In a finished run from
    before ensemble.json listed the folds, its run.json says how many were trained; a run that
    has not finished (still training, or interrupted) is refused: its fold models so far, at
    0.5, would be a different ensemble from the one its train will choose a threshold for. So
    is a finished run's models/ whose run.json holds the threshold train chose: it lost the file.
    """
    path = Path(models_dir) / "ensemble.json"
    settings = {"threshold": models[0].config.get("threshold", 0.5), "tta": False}
    folds = [m.fold for m in models]
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FaceAttrError(f"cannot read {path}: {e}") from None
        if not isinstance(saved, dict):
            raise FaceAttrError(f"{path} does not hold the ensemble's settings")
        settings.update(saved)
    else:
        path = Path(models_dir) / f"fold_{models[0].fold}.json"
        run = Path(models_dir).parent
        summary = finished_run(run, folds)
        own = Path(models_dir).resolve() == (run / "models").resolve()  # not a copy beside them
        if summary is not None and own and "threshold" in summary:  # train chose it: wrote it
            raise FaceAttrError(
                f"{Path(models_dir) / 'ensemble.json'} is missing (its threshold, and the fold "
                f"models' sha256), which {run / 'run.json'} says train wrote: faceattr train "
                f"DATA --out {run} --resume writes it again"
            )
        if summary is not None:
            trained = list(range(1, summary["config"]["folds"] + 1))
            check_folds(trained, folds, ".safetensors", f"{run / 'run.json'} trained folds")
        elif any(run.glob("fold_*/checkpoint.json")):  # a fold half-trained, its run.json lost
            raise FaceAttrError(
                f"{run} holds a run that has not finished (a fold's checkpoint is there) and "
                f"its run.json is missing or damaged: train DATA --out {run} --overwrite again"
            )
    checked = checked_settings(settings, path, folds, ".safetensors")
    if path.name == "ensemble.json":  # its folds checked first: a model gone is named as such
        found = {m.fold: m.sha256 for m in models}
        check_digests(Path(models_dir), found, ".safetensors", checked.get("sha256"), path)
    if path.name != "ensemble.json":
        log.warning(
            "%s holds no ensemble.json (train writes it when a run finishes): voting with its "
            "%d fold model(s) at threshold %.4f, without test-time augmentation",
            *(models_dir, len(folds), checked["threshold"]),
        )
    return checked


def check_digests(
    folder: Path, found: dict[int, str], suffix: str, digests: object, path: Path
) -> None:
    """Refuse a fold model that is not the one the run trained or exported: `found` maps the
    folds in `folder` to the sha256 of their `fold_K{suffix}` files, `digests` is what `path`
    (an ensemble.json) holds; a run from before they were kept has none."""
    if digests is None:
        return
    if not (
        isinstance(digests, dict)
        and all(isinstance(d, str) for d in digests.values())
        and all(k.isdigit() for k in digests)
    ):
        raise FaceAttrError(f"{path}: sha256 must map folds to digests, got {digests!r}")
    # Each fold trained has a digest: one whose model is gone is a smaller ensemble.
    trained = sorted(int(k) for k in digests)
    check_folds(trained, sorted(found), suffix, f"{path} holds digests of folds")
    made = "this run trained" if suffix == ".safetensors" else "this export wrote"
    for fold, digest in found.items():
        if digest != digests.get(str(fold)):
            raise FaceAttrError(
                f"{folder / f'fold_{fold}{suffix}'} is not the model {made} (its sha256 is not "
                f"the one {path} holds): a fold model from another run, or one changed since"
            )


def check_folds(expected: object, found: list[int], suffix: str, source: str) -> None:
    """Refuse fold models numbered `found` unless they are the folds `expected` (`source`
    says where those come from), naming the first one missing."""
    if expected != found:
        missing = [f for f in expected if f not in found] if isinstance(expected, list) else []
        what = f"fold_{missing[0]}{suffix} is missing" if missing else f"found {found}"
        raise FaceAttrError(f"{source} {expected}: {what}")


def checked_settings(settings: dict, path: Path, folds: list[int], suffix: str) -> dict:
    """`settings` (read from `path`) if they can decide for the fold models `folds` found.

    Train and export list their folds: one missing would make a smaller ensemble than the
    one whose threshold was chosen. A hand-edited file fails here, in one line, not mid-way.
    """
    check_folds(settings.get("folds", folds), folds, suffix, f"{path} lists folds")
    threshold, tta = settings.get("threshold"), settings.get("tta")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise FaceAttrError(f"{path}: threshold must be a number, got {threshold!r}")
    if not 0 <= threshold <= 1:
        raise FaceAttrError(f"{path}: threshold must be in [0, 1], got {threshold}")
    if not isinstance(tta, bool):
        raise FaceAttrError(f"{path}: tta must be true or false, got {tta!r}")
    vote = settings.get("vote", "soft")  # the rule the threshold was chosen for
    if vote not in VOTES:
        raise FaceAttrError(f"{path}: vote must be one of {', '.join(VOTES)}, got {vote!r}")
    return {**settings, "threshold": float(threshold), "vote": vote}


# --- epoch checkpoints: everything needed to continue a fold exactly where it stopped ----------


def save_training_state(path: str | Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Write a fold's training state: tensors as `path`.safetensors, the rest as `path`.json.

    The JSON is written last and names the epoch of the tensors beside it, so a state interrupted
    half-way is recognised as such and not loaded.
    """
    path = Path(path)
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path.with_suffix(".safetensors")) as tmp:
        _save_file(flat, tmp, path.with_suffix(".safetensors"), {"epoch": str(info["epoch"])})
    write_json(path.with_suffix(".json"), info)


def load_training_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The state saved by `save_training_state`, or None when there is none or it is incomplete."""
    path = Path(path)
    weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not (weights.exists() and meta.exists()):
        return None
    try:
        info = json.loads(meta.read_text())
        with safe_open(str(weights), framework="pt") as f:
            if (f.metadata() or {}).get("epoch") != str(info["epoch"]):  # none: not ours
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None
    return tensors, info


def remove_training_state(path: str | Path) -> None:
    for suffix in (".json", ".safetensors"):
        Path(path).with_suffix(suffix).unlink(missing_ok=True)


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as named tensors plus a JSON-able remainder."""
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of `flatten_optimizer`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in rest["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}

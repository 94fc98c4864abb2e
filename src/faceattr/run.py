"""A training run: every fold trained (or resumed, or left to another process), then the run folder.

The run folder holds `folds.csv`, `models/fold_K.safetensors` (+ `.json`, + `ensemble.json`),
`fold_K/` (history, curves, the fold's result, while it trains its epoch checkpoint), `oof.csv`
(every training image scored by the model that did not see it), `run.json` (options, versions,
data identity, folds, metrics, timings), the pictures and `report.html`. Everything is checked
and decoded before the folder is touched, so bad input leaves nothing behind; a fold counts as
finished once its result is written. A run that replaces another (--overwrite) is trained in
OUT/.replacement/ and renamed into place once it has finished (see runfolder.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from faceattr import plots
from faceattr.batches import DeviceImages
from faceattr.cache import Loaded, load_images
from faceattr.checkpoints import remove_training_state, save_ensemble_settings, save_fold_model
from faceattr.data import Dataset, ImageSet
from faceattr.distributed import SINGLE, Ranks
from faceattr.ensemble import decision_rule
from faceattr.errors import FaceAttrError, percent, plural, some
from faceattr.folds import load_folds, make_folds, save_folds
from faceattr.metrics import scores_to_labels
from faceattr.models import count_parameters, create_model, weights_file
from faceattr.outputs import (
    check_writable,
    refuse_inside,
    stale_temporaries,
    within,
    write_csv,
    write_json,
)
from faceattr.report import build_report
from faceattr.runfolder import (
    REPLACEMENT,
    RUN_FOLDERS,
    check_unlocked,
    finish_replacing,
    put_in_place,
    remains,
    run_paths,
    runs_in,
    where_to_train,
    writing,
)
from faceattr.runtime import check_compiler, cpu_cores, describe, seed_everything
from faceattr.train import HISTORY_COLUMNS, FoldResult, TrainConfig, fold_seed, train_fold

log = logging.getLogger("faceattr")
SKIP_HINT = "; --skip-bad leaves such images out of training"  # ends an undecodable image's error


def train_run(
    dataset: Dataset,
    cfg: TrainConfig,
    out: str | Path,
    device: torch.device,
    resume: bool = False,
    overwrite: bool = False,
    ranks: Ranks = SINGLE,
    given: Iterable[str] = (),
) -> dict | None:
    """Train one model per fold and write the whole run folder (see the module's docstring);
    returns the run summary.

    `resume` continues the unfinished run in `out` with its own settings: finished folds are
    kept, the running one continues from its last epoch. The options the user `given` must
    agree with them, but for how the work runs (workers, cache, saves). A folder that already
    holds a run is otherwise left alone unless `overwrite` is given; the new run is then trained
    in OUT/.replacement/ (`work`), and takes the old one's place once it has finished, so a run
    that fails or is interrupted leaves the old one as it was (and --resume continues the new
    one). Under torchrun (`ranks`), each process trains its share of the folds and rank 0
    writes everything else; the others return None.
    """
    out, given = Path(out), list(given)  # looked through twice
    if resume and overwrite:
        raise FaceAttrError(
            "--resume continues the run in --out, --overwrite starts it again: give one"
        )
    check_unlocked(out)
    if ranks.main:
        finish_replacing(out)
    ranks.barrier()  # the others look once that is done
    seen = runs_in(out, overwrite)
    work, previous = where_to_train(out, *seen, resume, overwrite)
    left = [] if resume or work != out else remains(out)  # a run's, its run.json gone
    if left and not overwrite:
        _refuse_remains(out, left)
    cfg = _checked_config(cfg, previous["config"] if resume else None, given, work, ranks)
    train_images, labels = dataset.require_train()
    fold_of = make_folds(labels, cfg.folds, cfg.seed)  # checks the labels and --folds first
    check_writable(out)
    _check_folders(out, cfg.folds)
    _check_apart(out, dataset)
    if cfg.cache is not None:  # the training images' cache among the test images, say
        refuse_inside(cfg.cache, dataset.image_folders(), "--cache")
    create_model(cfg.arch, cfg.pretrained)  # a missing or wrong weights file fails here, not later
    if cfg.compile:
        check_compiler(device)
    started = time.perf_counter()
    identity = data_identity(train_images, labels)
    if resume and previous.get("data_identity", identity) != identity:
        # Its finished folds were split and trained on other labels or images.
        raise FaceAttrError(
            f"--resume: the labels or images changed since {work} was started; "
            "--overwrite starts it again"
        )
    weights = "" if cfg.pretrained is None else f" from {cfg.pretrained} weights"
    log.info(  # once the labels are checked: an error in them is the only line, as others are
        "training %s%s, %d folds x %s on %s",
        *(cfg.arch, weights, cfg.folds, plural(cfg.epochs, "epoch"), device),
    )
    loaded = _decode_training_set(train_images, labels, cfg, ranks)
    array, names = loaded.array, train_images.names
    digest = pixel_digest(array)
    if loaded.audit.bad:  # --skip-bad: leave them out
        array, labels, names, fold_of = _without_undecodable(
            loaded.audit.bad, array, labels, names, cfg
        )
    if resume:
        _check_resumable(work, previous, digest, len(labels), fold_of)
    ranks.barrier()  # every process has checked the input: only now is the folder touched
    summary: dict = {
        "status": "running",
        "data": dataset.where,
        "config": asdict(cfg),
        "environment": describe(device),
        # Which file `--pretrained imagenet` found (a package's, or a copy in torch's hub cache).
        "pretrained_file": str(weights_file(cfg.arch, cfg.pretrained)) if cfg.pretrained else None,
        "n_train": len(labels),
        "data_identity": identity,
        "pixel_digest": digest,
        "class_counts": {str(c): int((labels == c).sum()) for c in (0, 1)},
        "audit": loaded.audit.to_dict(),
        "decode": loaded.summary(),
        "resumed": previous.get("resumed", 0) + 1 if resume else 0,
    }
    with writing(out, ranks.main, seen, overwrite):
        if ranks.main:
            _clear_leftovers(out, work, resume, left)
            if work != out:
                log.info("the run in %s stays there until this one has finished", out)
            save_folds(work / "folds.csv", names, labels, fold_of)
            # A finished run resumed is finished again (its report rebuilt), but stays marked
            # finished meanwhile: a kill then leaves it as it was, not "running".
            if not (resume and previous.get("status") == "complete"):
                write_json(work / "run.json", summary)
            plots.training_set(array, labels, work / "data")  # what explore draws of it too
            plots.image_audit({"train": summary["audit"]}, work / "data" / "audit.png")
        ranks.barrier()
        _train_folds(work, cfg, array, labels, fold_of, device, ranks)
        ranks.barrier()
        if not ranks.main:
            return None
        summary = _finish_run(
            work, cfg, summary, array, labels, names, fold_of, loaded.seconds, started, out
        )
        if work != out:
            put_in_place(work, out)
            log.info("replaced the run in %s", out)
        return summary


def _refuse_remains(out: Path, left: list[Path]) -> None:
    names = [str(p.relative_to(out)) for p in left]
    raise FaceAttrError(
        f"{out} holds what a run left without its run.json ({some(names, 3)}), which this run "
        "would take for its own: --overwrite clears it, or choose another --out"
    )


def _checked_config(
    cfg: TrainConfig, saved: dict | None, given: list[str], work: Path, ranks: Ranks
) -> TrainConfig:
    """The run's settings, once they are known to make sense: a resumed run's are its `saved`
    ones, which the options `given` must agree with."""
    if saved is not None:  # checks both: the options given and those saved
        cfg = _resumed_config(cfg, saved, given, work)
    else:
        cfg.check()
    if "mix_alpha" in given and cfg.mix == "none":  # it would shape nothing, without a word
        raise FaceAttrError(
            f"--mix-alpha {cfg.mix_alpha} shapes the blends of --mix mixup or cutmix, and this "
            "run blends none"
        )
    if cfg.ddp and ranks.world == 1:  # kept in run.json all the same: a torchrun --resume uses it
        log.warning(
            "--ddp trains each fold across torchrun's processes, and this one runs alone, "
            "outside torchrun: it trains as without --ddp"
        )
    return cfg


def _decode_training_set(
    images: ImageSet, labels: np.ndarray, cfg: TrainConfig, ranks: Ranks
) -> Loaded:
    """The decoded training images. Under torchrun one process per machine decodes into the
    cache, on all its cores, and the others then read the cache: G processes decoding the same
    images would do G times the work. Without a cache each decodes its own copy, on its share of
    the cores."""
    leader = ranks.local_rank == 0
    if cfg.cache is not None and not leader:
        ranks.barrier()
    workers = cfg.workers or max(1, cpu_cores() // (ranks.world if cfg.cache is None else 1))
    loaded = load_images(images, cfg.cache, workers, labels.tobytes(), cfg.skip_bad, SKIP_HINT)
    if cfg.cache is not None and leader:
        ranks.barrier()
    return loaded


def _without_undecodable(
    bad: dict[int, str], array: np.ndarray, labels: np.ndarray, names: list[str], cfg: TrainConfig
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """The training set without the images --skip-bad leaves out (`bad`), and its folds."""
    if len(bad) == len(labels):
        raise FaceAttrError(
            f"--skip-bad: none of the {len(labels)} training images could be decoded"
        )
    keep = np.setdiff1d(np.arange(len(labels)), sorted(bad))
    array, labels, names = array[keep], labels[keep], [names[i] for i in keep]
    dropped = plural(len(bad), "image")
    try:
        fold_of = make_folds(labels, cfg.folds, cfg.seed)
    except FaceAttrError as e:  # the labels were fine: the images left out made it so
        raise FaceAttrError(
            f"--skip-bad left out {dropped} that cannot be decoded, and then {e}"
        ) from None
    if len(bad) > 1:  # the warning named one
        log.warning("run.json's audit.bad names all %s left out, and why", dropped)
    return array, labels, names, fold_of


def _check_resumable(
    work: Path, previous: dict, digest: str, n_train: int, fold_of: np.ndarray
) -> None:
    """Refuse to resume a run on other data than it was started on, as decoding shows it (the
    names, sizes and labels were compared before): its finished folds' scores would be another
    data's."""
    if previous.get("pixel_digest", digest) != digest:
        # Same names and sizes, other pixels: an image edited, two swapped, or a new decoder.
        raise FaceAttrError(
            f"--resume: the images decode to other pixels than when {work} was started (a file "
            "changed, or pillow or torchvision did); --overwrite starts it again"
        )
    if previous.get("n_train") != n_train:  # --skip-bad left out other images
        raise FaceAttrError(
            f"--resume: {work} was trained on {previous.get('n_train')} images, "
            f"this data has {n_train}"
        )
    if not (work / "folds.csv").is_file():
        raise FaceAttrError(
            f"--resume: {work / 'folds.csv'} is missing, so its finished folds' images are not "
            "known; --overwrite starts it again"
        )
    if not _same_folds(work / "folds.csv", fold_of):
        # The finished folds' scores would land on other images: scikit-learn's shuffle changed?
        raise FaceAttrError(
            f"--resume: this data splits into other folds than {work / 'folds.csv'} holds; "
            "--overwrite starts it again"
        )


def _clear_leftovers(out: Path, work: Path, resume: bool, left: list[Path]) -> None:
    """Delete what is not this run's: a resumed run's temporaries, which a killed train was
    writing when it died; else an interrupted replacement's work, and the files `left` by a run
    whose run.json is gone (--overwrite)."""
    if resume:
        for path in stale_temporaries(work):
            path.unlink(missing_ok=True)
        return
    shutil.rmtree(out / REPLACEMENT, ignore_errors=True)
    for path in left:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _train_folds(
    work: Path,
    cfg: TrainConfig,
    array: np.ndarray,
    labels: np.ndarray,
    fold_of: np.ndarray,
    device: torch.device,
    ranks: Ranks,
) -> None:
    """Train and save every fold this process trains that is not finished yet, one after the
    other on one copy of the images on the device."""
    images = DeviceImages(array, device)
    labels_t = torch.from_numpy(labels).to(device)
    for k in range(cfg.folds):
        fold = k + 1
        if not (cfg.ddp or ranks.mine(k)):
            continue  # another process trains this fold
        if _finished_fold(work, fold) is not None:
            log.info("fold %d/%d: finished before, kept", fold, cfg.folds)
            continue
        train_idx, val_idx = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        model = fold_model(cfg, fold, device)
        log.info(
            "fold %d/%d: %d training, %d validation images",
            *(fold, cfg.folds, len(train_idx), len(val_idx)),
        )
        checkpoint = work / f"fold_{fold}" / "checkpoint"
        result = train_fold(
            model, images, labels_t, train_idx, val_idx, cfg, fold, checkpoint, ranks
        )
        if cfg.ddp and not ranks.main:
            continue  # rank 0 writes the fold trained by all
        _save_fold(work, fold, model, result, cfg)


def _save_fold(
    out: Path, fold: int, model: torch.nn.Module, result: FoldResult, cfg: TrainConfig
) -> None:
    """Write a trained fold: its model, history, curves, and last its result, which marks it done."""
    fold_dir = out / f"fold_{fold}"
    model.load_state_dict(result.state)
    best = result.history[result.best_epoch - 1]
    metrics = {key: best[key] for key in ("val_hter", "val_far", "val_frr", "val_loss")}
    fold_summary = {
        "fold": fold,
        "best_epoch": result.best_epoch,
        "train_seconds": result.seconds,
        **metrics,
    }
    save_fold_model(
        out / "models",
        fold,
        model,
        {
            "arch": cfg.arch,
            "epoch": result.best_epoch,
            "threshold": cfg.threshold,
            "parameters": count_parameters(model),
            **metrics,
        },
    )
    write_csv(
        fold_dir / "history.csv",
        HISTORY_COLUMNS,
        [[row[c] for c in HISTORY_COLUMNS] for row in result.history],
    )
    plots.training_curves(result.history, fold_dir / "curves.png", result.best_epoch)
    # The fold's result is written last: its presence marks the fold as finished.
    write_json(
        fold_dir / "result.json",
        {"summary": fold_summary, "val_scores": result.val_scores.tolist()},
    )
    remove_training_state(fold_dir / "checkpoint")
    log.info(
        "fold %d: best epoch %d, val HTER %.2f%%", fold, result.best_epoch, 100 * best["val_hter"]
    )


def _finish_run(
    out: Path,
    cfg: TrainConfig,
    summary: dict,
    array: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    fold_of: np.ndarray,
    decode_seconds: float,
    started: float,
    final: Path,
) -> dict:
    """Once every fold is done: the out-of-fold scores, the decision rule and the run's files,
    written in `out` (the report names `final`, where the run goes once it has replaced another)."""
    # Every fold's result is on disk, whichever process (or earlier invocation) trained it.
    oof = np.full(len(labels), np.nan)
    folds_summary = []
    for k in range(cfg.folds):
        done = _finished_fold(out, k + 1)
        if done is None:
            raise FaceAttrError(f"fold {k + 1} of {out} has no result; was a process killed?")
        oof[fold_of == k] = done["val_scores"]
        folds_summary.append(done["summary"])

    decision = decision_rule(labels, oof, fold_of)
    oof_labels = scores_to_labels(oof, decision["threshold"])
    save_ensemble_settings(out / "models", cfg.folds, decision["threshold"], cfg.tta)
    write_csv(
        out / "oof.csv",
        ["image", "label", "fold", "score", "prediction"],
        [
            [n, int(y), int(f) + 1, float(s), int(p)]
            for n, y, f, s, p in zip(names, labels, fold_of, oof, oof_labels, strict=True)
        ],
    )
    summary.update(
        status="complete",
        folds=folds_summary,
        **decision,
        timings={
            "decode_s": decode_seconds,
            "total_s": time.perf_counter() - started,
            "folds_s": [f["train_seconds"] for f in folds_summary],
        },
    )
    write_json(out / "run.json", summary)
    plots.evaluation(labels, oof, decision["threshold"], out / "evaluation", array, names)
    build_report(out, final)
    return summary


def fold_model(cfg: TrainConfig, fold: int, device: torch.device) -> torch.nn.Module:
    """Fold `fold`'s freshly initialised model, every generator seeded for that fold (see
    `fold_seed`)."""
    seed_everything(fold_seed(cfg.seed, fold))
    model = create_model(cfg.arch, cfg.pretrained).to(device)
    return model.to(memory_format=torch.channels_last)


def data_identity(images: ImageSet, labels: np.ndarray) -> str:
    """What a resumed run must find unchanged, told before any decoding: the labels and every
    image's name and size (`pixel_digest` checks the pixels once they are decoded).

    Unlike the cache's fingerprint it leaves out where the data is and when it was written, so
    a run still resumes on the same data moved or copied.
    """
    h = hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes())
    for name, rel in zip(images.names, images.paths(), strict=True):
        h.update(f"{name} {images.source.stat(rel)[0]}\n".encode())
    return h.hexdigest()[:32]


def pixel_digest(array: np.ndarray, chunk: int = 4096) -> str:
    """A hash of the decoded images, for what `data_identity` cannot see: a file edited or two
    swapped, their sizes unchanged. 0.2 s for celeba64's 20,000 faces, read in chunks so that a
    memory-mapped array larger than RAM is never loaded whole."""
    h = hashlib.sha256(str(array.shape).encode())
    for start in range(0, len(array), chunk):
        h.update(np.ascontiguousarray(array[start : start + chunk]).data)
    return h.hexdigest()[:32]


def _check_folders(out: Path, folds: int) -> None:
    """Refuse a file where the run writes a folder: found after the training, it cost the run."""
    for name in (*RUN_FOLDERS, *(f"fold_{k}" for k in range(1, folds + 1))):
        if (out / name).exists() and not (out / name).is_dir():
            raise FaceAttrError(f"cannot write the run into {out}: {out / name} is not a folder")


def _check_apart(out: Path, dataset: Dataset) -> None:
    """Refuse an `out` whose run folders would hold the data itself: the run writes pictures into
    `data/`, and --overwrite replaces `data/`, `models/`, `fold_K/`... (and clears .replacement/);
    nor one in an image folder, whose images its files would join."""
    refuse_inside(out, dataset.image_folders(), "--out")
    for where in dataset.locations():
        for part in run_paths(out):
            if within(where, part):
                raise FaceAttrError(
                    f"--out {out} would put the run's {part.name}/ where the data is ({where}); "
                    "choose another --out"
                )


RUNTIME_OPTIONS = ("workers", "cache", "save_every")  # how the work runs, not what it trains


def _resumed_config(
    asked: TrainConfig, saved: dict, given: Iterable[str], out: Path
) -> TrainConfig:
    """The saved run's settings; only how the work runs may change. An option `given` that
    differs is refused rather than dropped: `--resume --epochs 30` does not train longer."""

    def shown(value: object) -> str:
        return ("on" if value else "off") if isinstance(value, bool) else str(value)

    changed = [
        f"--{k.replace('_', '-')} {shown(getattr(asked, k))} (the run's: {shown(saved.get(k))})"
        for k in given
        if k not in RUNTIME_OPTIONS and getattr(asked, k) != saved.get(k)
    ]
    if changed:
        raise FaceAttrError(
            f"--resume continues {out} with its own settings, not {', '.join(changed)}: "
            "drop them, or --overwrite starts it again with them"
        )
    unknown = sorted(saved.keys() - {f.name for f in fields(TrainConfig)})
    if unknown:  # a later faceattr's run, or a hand-edited one
        raise FaceAttrError(
            f"--resume: {out / 'run.json'} has options this faceattr does not know: "
            f"{', '.join(unknown)}"
        )
    asked.check()  # the options given: their errors are the user's
    resumed = TrainConfig(**{**saved, **{k: getattr(asked, k) for k in RUNTIME_OPTIONS}})
    try:
        resumed.check()
    except FaceAttrError as e:  # a hand-edited or damaged run.json
        raise FaceAttrError(
            f"--resume: {out / 'run.json'} holds a setting that cannot be: {e}"
        ) from None
    return resumed


def _same_folds(path: Path, fold_of: np.ndarray) -> bool:
    """Whether the run's folds.csv (missing or unreadable: no) holds the folds `fold_of`."""
    try:
        return np.array_equal(load_folds(path), fold_of)
    except (OSError, ValueError, IndexError):
        return False


def _finished_fold(out: Path, fold: int) -> dict | None:
    """A finished fold's summary and validation scores, read back from its result.json: one an
    earlier, interrupted invocation trained, or this one (None: not finished, or damaged)."""
    result = out / f"fold_{fold}" / "result.json"
    if not (result.exists() and (out / "models" / f"fold_{fold}.safetensors").exists()):
        return None
    try:
        done = json.loads(result.read_text())
        return {"summary": done["summary"], "val_scores": np.asarray(done["val_scores"])}
    except (OSError, ValueError, KeyError, TypeError):  # damaged: the fold trains again
        return None


def format_run(summary: dict, out: str | Path) -> str:
    """The run's result as the lines `train` prints."""
    oof, nested = summary["oof"], summary["oof_nested"]
    low, high = oof["hter_ci"]
    resumed = " (this invocation: the run was resumed)" if summary["resumed"] else ""
    return "\n".join([
        f"out-of-fold HTER {percent(oof['hter'])} (95 % CI {percent(low)} to {percent(high)}; "
        f"FAR {percent(oof['far'])}, FRR {percent(oof['frr'])}) at threshold "
        f"{summary['threshold']:.4f} over {oof['n']:,} images",
        f"  {percent(nested['hter'])} with each fold's threshold chosen on the other folds; "
        f"{percent(summary['oof_at_0.5']['hter'])} at 0.5; EER {percent(summary['eer'])}, "
        f"AUC {summary['auc']:.4f}; {summary['timings']['total_s']:.1f}s{resumed}",
        f"wrote {out}/: models/, oof.csv, folds.csv, run.json, fold_K/, evaluation/",
        f"report: {Path(out) / 'report.html'}",
    ])  # fmt: skip

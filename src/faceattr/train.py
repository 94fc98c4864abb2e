"""Training: one model per stratified fold, each kept at its epoch with the lowest validation HTER.

The whole training set sits in one uint8 tensor on the training device; batches are index lookups
into it, augmented on the device (see `augment`). No DataLoader and no per-image Python work.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceattr import reports
from faceattr.augment import augment
from faceattr.batches import DeviceImages
from faceattr.cache import load_images
from faceattr.checkpoints import save_fold_model
from faceattr.data import Dataset
from faceattr.ensemble import decision_rule, model_scores, to_model_input
from faceattr.errors import FaceAttrError
from faceattr.folds import make_folds, save_folds
from faceattr.metrics import error_rates, scores_to_labels
from faceattr.models import count_parameters, create_model
from faceattr.outputs import ensure_writable_dir, write_csv, write_json
from faceattr.runtime import describe, seed_everything

log = logging.getLogger("faceattr")

HISTORY_COLUMNS = [
    "epoch",
    "lr",
    "train_loss",
    "train_far",
    "train_frr",
    "train_hter",
    "val_loss",
    "val_far",
    "val_frr",
    "val_hter",
    "train_seconds",
    "seconds",
]


@dataclass
class TrainConfig:
    """Every option of a training run; recorded whole in run.json."""

    arch: str = "simple"
    folds: int = 5
    epochs: int = 15
    lr: float = 1e-3
    step: int = 5  # StepLR: multiply the learning rate by `gamma` every `step` epochs (the seed's)
    gamma: float = 0.7
    batch_size: int = 128
    seed: int = 0
    threshold: float = 0.5  # for choosing each fold's best epoch; the ensemble's is tuned after
    tta: bool = True  # score validation (and later test) images mirrored too, and average
    pretrained: str | None = None
    workers: int | None = None  # image-decoding processes; None = one per core
    cache: str | None = None  # folder of decoded-image caches; None = decode in memory every time
    compile: bool = False  # torch.compile the training step

    def check(self) -> None:
        """Reject impossible settings before any work starts."""
        for name, value, low in (
            ("epochs", self.epochs, 1),
            ("batch-size", self.batch_size, 2),
            ("step", self.step, 1),
        ):
            if value < low:
                raise FaceAttrError(f"--{name} must be at least {low}, got {value}")
        if not (self.lr > 0 and self.gamma > 0):
            raise FaceAttrError(
                f"--lr and --gamma must be positive, got {self.lr} and {self.gamma}"
            )


@dataclass
class FoldResult:
    """What training one fold leaves: the best epoch's weights, scores and the full history."""

    fold: int
    best_epoch: int
    state: dict[str, torch.Tensor]
    val_scores: np.ndarray
    history: list[dict]
    seconds: float


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-class loss weights n / (2 n_c): both classes weigh the same in the loss, as in HTER."""
    counts = torch.bincount(labels.long(), minlength=2).clamp(min=1).float()
    return counts.sum() / (2 * counts)


def weighted_bce(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with each example weighted by its class weight."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none")
    return (loss * weights[y.long()]).mean()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch (bf16 autocast on CUDA); returns the loss and the logits."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        logits = model(x)
    loss = weighted_bce(logits, y, weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def train_fold(
    model: nn.Module,
    images: DeviceImages | torch.Tensor,
    labels: torch.Tensor,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    cfg: TrainConfig,
    fold: int,
) -> FoldResult:
    """Train `model` on `train_idx` of `images`; keep its best epoch on `val_idx`.

    `images[idx]` must give a uint8 batch on the device of `labels` and of the model.

    The best epoch is the one with the lowest validation HTER (ties go to the earlier epoch).
    """
    device = labels.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + fold)
    order_gen = torch.Generator().manual_seed(cfg.seed * 1000 + fold)
    train_t = torch.as_tensor(train_idx, device=device)
    val_t = torch.as_tensor(val_idx, device=device)
    y_val = labels[val_t]
    weights = class_weights(labels[train_t])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step, gamma=cfg.gamma)
    # Compiled, the step sees one batch shape only (a remainder batch is dropped): no recompiles.
    step_model = torch.compile(model) if cfg.compile else model
    usable = len(train_idx) // cfg.batch_size * cfg.batch_size if cfg.compile else len(train_idx)

    best_hter, best_epoch, best_state, best_scores = math.inf, 0, {}, np.empty(0)
    history: list[dict] = []
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        order = train_t[torch.randperm(len(train_t), generator=order_gen).to(device)][:usable]
        if len(order) % cfg.batch_size == 1:  # BatchNorm cannot train on a batch of one image
            order = order[:-1]
        loss_sum = torch.zeros((), device=device)
        predicted = torch.empty(len(order), dtype=torch.bool, device=device)
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            x = augment(to_model_input(images[idx]), gen)
            y = labels[idx]
            loss, logits = train_step(step_model, optimizer, x, y, weights)
            loss_sum += loss * len(idx)
            predicted[s : s + len(idx)] = torch.sigmoid(logits.float()) >= cfg.threshold
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so that train_seconds is the work, not its queueing
        train_seconds = time.perf_counter() - t0

        train_rates = error_rates(labels[order].cpu().numpy(), predicted.cpu().numpy())
        val_scores = model_scores(model, images[val_t], tta=cfg.tta)
        val_logits = torch.logit(torch.as_tensor(val_scores, device=device), eps=1e-7)
        val_rates = error_rates(y_val.cpu().numpy(), scores_to_labels(val_scores, cfg.threshold))
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": loss_sum.item() / len(order),
            "train_far": train_rates["far"],
            "train_frr": train_rates["frr"],
            "train_hter": train_rates["hter"],
            "val_loss": weighted_bce(val_logits, y_val, weights).item(),
            "val_far": val_rates["far"],
            "val_frr": val_rates["frr"],
            "val_hter": val_rates["hter"],
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        improved = row["val_hter"] < best_hter
        if improved:
            best_hter, best_epoch, best_scores = row["val_hter"], epoch, val_scores
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        log.info(
            "fold %d epoch %2d/%d  loss %.4f  val loss %.4f  val HTER %5.2f%% (FAR %.2f%% FRR %.2f%%)"
            "  %.1fs%s",
            fold,
            epoch,
            cfg.epochs,
            row["train_loss"],
            row["val_loss"],
            100 * row["val_hter"],
            100 * row["val_far"],
            100 * row["val_frr"],
            row["seconds"],
            "  *" if improved else "",
        )
    seconds = time.perf_counter() - start
    return FoldResult(fold, best_epoch, best_state, best_scores, history, seconds)


def train_run(dataset: Dataset, cfg: TrainConfig, out: str | Path, device: torch.device) -> dict:
    """Train one model per fold and write the whole run folder; returns the run summary.

    The run folder holds `folds.csv`, `models/fold_K.safetensors` (+ `.json`), `fold_K/history.csv`
    and its curves, `oof.csv` (every training image scored by the model that did not see it) and
    `run.json` (options, versions, folds, metrics, timings).
    """
    cfg.check()
    out = ensure_writable_dir(out)
    started = time.perf_counter()
    train_images, labels = dataset.require_train()
    fold_of = make_folds(labels, cfg.folds, cfg.seed)  # checks the labels before the long work

    loaded = load_images(train_images, cfg.cache, cfg.workers, extra=labels.tobytes())

    names = train_images.names
    save_folds(out / "folds.csv", names, labels, fold_of)
    summary: dict = {
        "status": "running",
        "data": dataset.where,
        "config": asdict(cfg),
        "environment": describe(device),
        "n_train": len(labels),
        "class_counts": {str(c): int((labels == c).sum()) for c in (0, 1)},
        "audit": loaded.audit.to_dict(),
        "decode": loaded.summary(),
    }
    write_json(out / "run.json", summary)

    seed_everything(cfg.seed)
    images = DeviceImages(loaded.array, device)
    labels_t = torch.from_numpy(labels).to(device)
    oof = np.full(len(labels), np.nan)
    folds_summary = []
    for k in range(cfg.folds):
        fold = k + 1
        seed_everything(cfg.seed * 1000 + fold)
        model = (
            create_model(cfg.arch, cfg.pretrained).to(device).to(memory_format=torch.channels_last)
        )
        train_idx, val_idx = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        log.info(
            "fold %d/%d: %d training, %d validation images",
            fold,
            cfg.folds,
            len(train_idx),
            len(val_idx),
        )
        result = train_fold(model, images, labels_t, train_idx, val_idx, cfg, fold)
        model.load_state_dict(result.state)
        oof[val_idx] = result.val_scores
        best = result.history[result.best_epoch - 1]
        metrics = {key: best[key] for key in ("val_hter", "val_far", "val_frr", "val_loss")}
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
        fold_dir = out / f"fold_{fold}"
        write_csv(
            fold_dir / "history.csv",
            HISTORY_COLUMNS,
            [[row[c] for c in HISTORY_COLUMNS] for row in result.history],
        )
        reports.training_curves(result.history, fold_dir / "curves.png", result.best_epoch)
        folds_summary.append(
            {
                "fold": fold,
                "best_epoch": result.best_epoch,
                "train_seconds": result.seconds,
                **metrics,
            }
        )
        log.info(
            "fold %d: best epoch %d, val HTER %.2f%%",
            fold,
            result.best_epoch,
            100 * best["val_hter"],
        )

    decision = decision_rule(labels, oof, fold_of)
    oof_labels = scores_to_labels(oof, decision["threshold"])
    write_json(
        out / "models" / "ensemble.json",
        {"threshold": decision["threshold"], "vote": "soft", "tta": cfg.tta},
    )
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
            "decode_s": loaded.seconds,
            "total_s": time.perf_counter() - started,
            "folds_s": [f["train_seconds"] for f in folds_summary],
        },
    )
    write_json(out / "run.json", summary)
    return summary

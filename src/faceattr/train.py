"""Training one fold: loss, optimiser, schedule, the step, and the epoch loop with its checkpoints.

The fold's model (or, with `ema`, the moving average of its weights) is kept at its epoch with the
lowest validation HTER. The whole training set is one uint8 array, on the training device where it
fits (see `batches`); batches are index lookups into it, augmented on the device (see `augment`):
no DataLoader and no per-image Python work. `run` trains all the folds.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from faceattr import progress
from faceattr.augment import MIXES, POLICIES, augment, mix
from faceattr.batches import DeviceImages
from faceattr.checkpoints import (
    flatten_optimizer,
    load_training_state,
    save_training_state,
    unflatten_optimizer,
)
from faceattr.distributed import SINGLE, Ranks
from faceattr.ensemble import model_scores, to_model_input
from faceattr.errors import FaceAttrError, first_line
from faceattr.metrics import error_rates, scores_to_labels
from faceattr.models import IMAGENET
from faceattr.runtime import autocast

log = logging.getLogger("faceattr")

FLOAT32_MAX = float(np.finfo(np.float32).max)
RETRY = "try a lower --lr, with --overwrite: the stopped run is not resumable with another"

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
    optimizer: str = "adam"  # adam (the seed's), adamw or sgd
    schedule: str = "step"  # step (the seed's StepLR), cosine or onecycle
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    augment: str = "light"  # augmentation policy: none, light (the seed's) or strong
    mix: str = "none"  # none, mixup or cutmix: blend pairs of training images and their labels
    mix_alpha: float = 0.2  # the mixing shares are drawn from Beta(mix_alpha, mix_alpha)
    # Decay of an exponential moving average of the weights, the one judged and kept; 0: off.
    ema: float = 0.0
    workers: int | None = None  # image-decoding processes; None = one per core
    cache: str | None = None  # folder of decoded-image caches; None = decode in memory every time
    compile: bool = False  # torch.compile the training step
    # Seconds between two saves of a fold's training state (see train_fold); 0: every epoch.
    save_every: float = 30.0
    skip_bad: bool = False  # leave images that cannot be decoded out, instead of stopping
    ddp: bool = False  # under torchrun: train each fold data-parallel across all processes

    def check(self) -> None:
        """Reject impossible settings before any work starts."""
        self._check_types()
        for name, value, low in (
            ("epochs", self.epochs, 1),
            ("batch-size", self.batch_size, 2),
            ("step", self.step, 1),
            ("save-every", self.save_every, 0),
        ):
            if value < low:
                raise FaceAttrError(f"--{name} must be at least {low}, got {value}")
        for name, value, known in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("schedule", self.schedule, SCHEDULES),
            ("augment", self.augment, POLICIES),
            ("mix", self.mix, MIXES),
        ):
            if value not in known:  # the command line's choices are; a run.json's may not be
                raise FaceAttrError(f"unknown --{name} {value!r}: one of {', '.join(known)}")
        numbers = {
            "lr": self.lr,
            "gamma": self.gamma,
            "weight-decay": self.weight_decay,
            "label-smoothing": self.label_smoothing,
            "ema": self.ema,
            "mix-alpha": self.mix_alpha,
            "save-every": self.save_every,
        }
        for name, value in numbers.items():
            if not math.isfinite(value):
                raise FaceAttrError(f"--{name} must be a finite number, got {value}")
            if abs(value) > FLOAT32_MAX:  # the optimiser's and sampler's tensors are float32
                raise FaceAttrError(f"--{name} must be at most {FLOAT32_MAX:.3g}, got {value}")
        if not 0 <= self.seed < 2**32:  # scikit-learn's and numpy's seeds are 32-bit
            raise FaceAttrError(f"--seed must be in 0..{2**32 - 1}, got {self.seed}")
        for name, value, ok, bound in (
            ("label-smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("ema", self.ema, 0 <= self.ema < 1, "in [0, 1)"),
            ("weight-decay", self.weight_decay, self.weight_decay >= 0, "at least 0"),
            ("lr", self.lr, self.lr > 0, "positive"),
            ("gamma", self.gamma, self.gamma > 0, "positive"),
            ("mix-alpha", self.mix_alpha, self.mix_alpha > 0, "positive"),
        ):
            if not ok:
                raise FaceAttrError(f"--{name} must be {bound}, got {value}")

    def _check_types(self) -> None:
        """Each setting of its field's type: the command line's always are, a hand-edited
        run.json's (--resume) may not be ("epochs": "40")."""
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            value = getattr(self, f.name)
            allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
            if isinstance(value, bool):  # an int to Python, not to a user
                ok = bool in allowed
            else:  # and a path, from code, where text is asked for
                ok = isinstance(value, allowed) or (float in allowed and isinstance(value, int))
                ok = ok or (str in allowed and isinstance(value, os.PathLike))
            if not ok:
                names = " or ".join(_TYPE_NAMES[a] for a in allowed)
                raise FaceAttrError(f"--{f.name.replace('_', '-')} must be {names}, got {value!r}")


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               type(None): "null"}  # fmt: skip


# Fine-tuning EfficientNet-Lite0 from ImageNet, the recipe both devices share.
_LITE0_IMAGENET = {
    "pretrained": IMAGENET,
    "optimizer": "adamw",
    "schedule": "cosine",
    "weight_decay": 0.05,
}

# What `train` trains by default, by device: chosen by cross-validation on celeba64 (README,
# "Measured"). Options given override their part; an --arch other than the recipe's starts from
# TrainConfig's own defaults (the seed's settings) instead.
DEFAULT_RECIPES: dict[str, dict] = {
    # With a stride-1 stem (4x4 features at the end, 4x the compute): on a CPU, 5 folds x 6
    # epochs, an out-of-fold HTER of 3.23 % (95 % CI 2.76-3.72) against the stride-2 stem's
    # 4.35 % (3.80-4.92). 15 epochs, as a GPU affords (its time there unmeasured): on fold 1,
    # validation HTER 1.80 % against 6 epochs' 1.89 %, AUC 0.9982 against 0.9974.
    "cuda": {**_LITE0_IMAGENET, "arch": "efficientnet_lite0_s1", "epochs": 15},
    # The stride-2 stem: on 2 CPU cores, 5 folds x 6 epochs in 29 minutes, an out-of-fold HTER
    # of 4.35 % (95 % CI 3.80-4.92) against the seed CNN's 6.98 % (6.34-7.63) for 15 epochs in
    # 23 minutes.
    "cpu": {**_LITE0_IMAGENET, "arch": "efficientnet_lite0", "epochs": 6},
}


def fold_seed(seed: int, fold: int) -> int:
    """Where every generator of fold `fold` starts: seeded per fold, so that the fold trains
    alike after the others, resumed, or alone (torchrun, `benchmarks/screen.py`)."""
    return seed * 1000 + fold


def config_for(device: torch.device, given: dict) -> TrainConfig:
    """The device's default recipe with the `given` options over it (`pretrained="none"`: none)."""
    recipe = DEFAULT_RECIPES["cuda" if device.type == "cuda" else "cpu"]
    if given.get("arch", recipe["arch"]) != recipe["arch"]:
        recipe = {}
    cfg = TrainConfig(**{**recipe, **given})
    if cfg.pretrained == "none":
        cfg.pretrained = None
    if ({"step", "gamma"} & given.keys()) and cfg.schedule != "step":  # the seed's command has both
        log.warning(
            "--step and --gamma shape the step schedule only, and this run's is %s: they do "
            "nothing (add --schedule step, or --arch simple for the seed's settings)",
            cfg.schedule,
        )
    return cfg


@dataclass
class FoldResult:
    """What training one fold leaves: the best epoch's weights, scores and the full history."""

    best_epoch: int
    state: dict[str, torch.Tensor]
    val_scores: np.ndarray
    history: list[dict]
    seconds: float


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-class loss weights n / (2 n_c): both classes weigh the same in the loss, as in HTER."""
    counts = torch.bincount(labels.long(), minlength=2).clamp(min=1).float()
    return counts.sum() / (2 * counts)


def weighted_bce(
    logits: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    smoothing: float = 0.0,
    mixed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Binary cross-entropy with each example weighted by its class weight.

    `smoothing` pulls the targets towards 0.5 (label smoothing): a hedge against noisy labels.
    `mixed` = (partner labels, lam) for mixed images (see `augment.mix`): each image's loss is
    then lam times that for its own label plus 1 - lam times that for its partner's.
    """

    def loss(labels: torch.Tensor) -> torch.Tensor:
        target = labels.float() * (1 - smoothing) + 0.5 * smoothing
        bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        return bce * weights[labels.long()]

    if mixed is None:
        return loss(y).mean()
    partner, lam = mixed
    return (lam * loss(y) + (1 - lam) * loss(partner)).mean()


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("step", "cosine", "onecycle")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the seed's), AdamW, or SGD with Nesterov momentum."""
    params, lr, wd = model.parameters(), cfg.lr, cfg.weight_decay
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


def lr_factor(i: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """The learning rate at optimiser step `i`, as a multiple of --lr, by `cfg.schedule`:

    - step: the seed's StepLR, times `gamma` every `step` epochs;
    - cosine: one epoch of linear warm-up, then a cosine down to zero at the last step;
    - onecycle: up linearly over the first 30 % of the steps, then a cosine down to zero.
    """
    schedule, total = cfg.schedule, max(1, cfg.epochs * steps_per_epoch)
    if schedule == "step":
        return cfg.gamma ** ((i // steps_per_epoch) // cfg.step)
    warm = steps_per_epoch if schedule == "cosine" else int(0.3 * total)
    warm = max(1, min(warm, total - 1))
    if i < warm:
        return (i + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, total - warm)))


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics.

    Updated after every optimiser step, it averages away the noise of the last steps; the averaged
    copy (`module`) is the one validated and kept. The decay warms up as (1 + t) / (10 + t) after
    t updates, so that the random initial weights do not linger in a short run (0.999 alone would
    still give them 88 % of the average after 125 steps). The step count lives on the host: no
    device sync per step.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0
        # Both state dicts hold the live tensors (updated in place by the optimiser and by
        # load_state_dict), so the pairs are found once, not on every step.
        pairs = list(
            zip(self.module.state_dict().values(), model.state_dict().values(), strict=True)
        )
        self._mine = [a for a, _ in pairs if a.is_floating_point()]
        self._theirs = [b for a, b in pairs if a.is_floating_point()]
        self._counted = [a for a, _ in pairs if not a.is_floating_point()]
        self._counts = [b for a, b in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's current weights (after an optimiser step)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._mine, self._theirs, 1 - decay)
        if self._counted:  # such as BatchNorm's num_batches_tracked: copied, in one launch
            torch._foreach_copy_(self._counted, self._counts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.module.state_dict(), "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.updates = int(state.pop("updates"))
        self.module.load_state_dict(state)


@dataclass
class FoldState:
    """A fold's training between two epochs: all that a checkpoint saves and a resume restores.

    Restored, training continues as if it had not stopped (bit for bit on a CPU; on a GPU as
    closely as cuDNN's autotuned, not deterministic, kernels allow): the weights (and their
    average), the optimiser's moments, the schedule, the three random generators (batch order,
    augmentation, torch's own) and the best epoch so far with its weights and validation scores.
    """

    model: nn.Module
    ema: WeightAverage | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    order_gen: torch.Generator
    augment_gen: torch.Generator
    epoch: int = 0  # the last epoch finished
    seconds: float = 0.0  # spent training this fold before this process took over
    best_hter: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    best_scores: np.ndarray = field(default_factory=lambda: np.empty(0))
    history: list[dict] = field(default_factory=list)

    def keep_best(self, epoch: int, hter: float, scores: np.ndarray, judged: nn.Module) -> None:
        """Make `epoch` the best so far: its HTER, validation scores and a copy of the weights."""
        self.best_hter, self.best_epoch, self.best_scores = hter, epoch, scores
        self.best_state = {k: v.detach().clone() for k, v in judged.state_dict().items()}

    def save(self, path: Path, seconds: float) -> None:
        """Write the state after `self.epoch`, `seconds` into the fold (see save_training_state)."""
        optim_tensors, optim_rest = flatten_optimizer(self.optimizer.state_dict())
        ema = self.ema.state_dict() if self.ema is not None else {}
        tensors = {
            **{f"model.{k}": v for k, v in self.model.state_dict().items()},
            **{f"ema.{k}": v for k, v in ema.items()},
            **{f"best.{k}": v for k, v in self.best_state.items()},
            **optim_tensors,
            "best_scores": torch.from_numpy(np.asarray(self.best_scores, dtype=np.float64)),
            "rng.torch": torch.get_rng_state(),
            "rng.order": self.order_gen.get_state(),
            "rng.augment": self.augment_gen.get_state(),
        }
        device = self.augment_gen.device
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        info = {
            "epoch": self.epoch,
            "best_epoch": self.best_epoch,
            "best_hter": self.best_hter,
            "history": self.history,
            "optimizer": optim_rest,
            "scheduler": self.scheduler.state_dict(),
            "seconds": seconds,
        }
        save_training_state(path, tensors, info)

    def restore(self, tensors: dict[str, torch.Tensor], info: dict, reseed: int | None) -> None:
        """Continue from a saved state; `reseed`: seed the augmentation afresh from it instead."""

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.model.load_state_dict(part("model."))
        if self.ema is not None:
            self.ema.load_state_dict(part("ema."))
        self.optimizer.load_state_dict(unflatten_optimizer(tensors, info["optimizer"]))
        self.scheduler.load_state_dict(info["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        self.order_gen.set_state(tensors["rng.order"])
        device = self.augment_gen.device
        if reseed is not None:
            self.augment_gen.manual_seed(reseed + 104729 * info["epoch"])
        else:
            self.augment_gen.set_state(tensors["rng.augment"])
        if device.type == "cuda" and "rng.cuda" in tensors:  # not when saved on a CPU
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        self.epoch, self.seconds, self.history = info["epoch"], info["seconds"], info["history"]
        self.best_hter, self.best_epoch = info["best_hter"], info["best_epoch"]
        self.best_state = {k: v.to(device) for k, v in part("best.").items()}
        self.best_scores = tensors["best_scores"].numpy()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    smoothing: float = 0.0,
    mixed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch (bf16 autocast on CUDA); returns the loss and the logits."""
    with autocast(x.device):
        logits = model(x)
    loss = weighted_bce(logits, y, weights, smoothing, mixed)
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
    checkpoint: Path | None = None,
    ranks: Ranks = SINGLE,
) -> FoldResult:
    """Train `model` on `train_idx` of `images`; keep its best epoch on `val_idx`.

    `images[idx]` must give a uint8 batch on the device of `labels` and of the model. The best
    epoch is the one with the lowest validation HTER (ties go to the earlier epoch). With
    `checkpoint`, the whole training state (model, optimiser, schedule, random generators, best
    epoch so far) is saved there after an epoch once `cfg.save_every` seconds have passed since
    the fold started or was last saved, and training continues from it when it is already there:
    an interrupted fold resumes exactly where it stopped. Not after every epoch: a state is some
    50 MB (EfficientNet-Lite0's weights, their best copy and AdamW's two moments), 0.1 to 0.25 s
    to write on a 2-core CPU, which a GPU's short epochs would pay 15 times a fold; the CPU
    default's epochs on celeba64 take a minute, so there each is saved.

    With `cfg.ddp` under torchrun, all `ranks` train this fold together (DistributedDataParallel):
    each takes its shard of every epoch's order and `batch_size / world` images a step, and rank
    0 alone saves the state. A resumed data-parallel fold continues from its last epoch, with
    fresh augmentation draws.
    """
    device = labels.device
    parallel = cfg.ddp and ranks.world > 1
    world = ranks.world if parallel else 1
    batch = max(2, cfg.batch_size // world) if parallel else cfg.batch_size
    per_epoch = images_per_epoch(len(train_idx), batch, cfg.compile, world)
    if per_epoch == 0:
        raise FaceAttrError(
            f"fold {fold}: its {len(train_idx)} training images are too few to share among "
            f"{ranks.world} processes (each needs 2); use fewer processes, or no --ddp"
        )
    augment_seed = fold_seed(cfg.seed, fold) + (7919 * ranks.rank if parallel else 0)
    gen = torch.Generator(device=device).manual_seed(augment_seed)
    order_gen = torch.Generator().manual_seed(fold_seed(cfg.seed, fold))
    train_t = torch.as_tensor(train_idx, device=device)
    val_t = torch.as_tensor(val_idx, device=device)
    y_val = labels[val_t]
    weights = class_weights(labels[train_t])
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(per_epoch / batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, steps_per_epoch=steps_per_epoch, cfg=cfg)
    )  # stepped after every optimiser step
    ema = WeightAverage(model, cfg.ema) if cfg.ema else None
    judged = ema.module if ema is not None else model  # the weights validated and kept
    net = model
    if parallel:
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # Compiled, the step sees one batch shape only (see images_per_epoch): no recompiles.
    step_model = compile_model(net) if cfg.compile else net

    state = FoldState(model, ema, optimizer, scheduler, order_gen, gen)
    if checkpoint is not None:
        _resume(state, checkpoint, device, augment_seed, parallel, fold)

    start = time.perf_counter() - state.seconds
    saved_at = time.perf_counter()
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        order = _epoch_order(train_t, order_gen, ranks if parallel else SINGLE, batch, cfg.compile)
        # Host-kept images gather from a host copy of the order, made once an epoch.
        gather = order.to(getattr(images, "index_device", device))
        loss_sum = torch.zeros((), device=device)
        first_bad = torch.full((), -1, device=device)  # first step whose loss was not finite
        predicted = torch.empty(len(order), dtype=torch.bool, device=device)
        shown = progress.bar(len(order), f"fold {fold} epoch {epoch}/{cfg.epochs}")
        with _step_errors(cfg, fold, epoch):
            for step, s in enumerate(range(0, len(order), batch), start=1):
                idx = order[s : s + batch]
                batch_images = images[gather[s : s + batch]]
                x = augment(to_model_input(batch_images), gen, POLICIES[cfg.augment])
                y = labels[idx]
                mixed = None
                if cfg.mix != "none":  # train error rates stay against each image's own label
                    x, y_partner, lam = mix(x, y, gen, cfg.mix, cfg.mix_alpha)
                    mixed = (y_partner, lam)
                loss, logits = train_step(
                    step_model, optimizer, x, y, weights, cfg.label_smoothing, mixed
                )
                scheduler.step()
                if ema is not None:
                    ema.update()
                # Checked on the device and read once per epoch: no host sync in the loop.
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
                loss_sum += loss * len(idx)
                predicted[s : s + len(idx)] = torch.sigmoid(logits.float()) >= cfg.threshold
                shown.update(len(idx))
        shown.close()
        if parallel:
            dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
            for buffer in judged.buffers():  # BatchNorm statistics: rank 0's, so all validate alike
                dist.broadcast(buffer, 0)
        if first_bad.item() >= 0:
            raise FaceAttrError(
                f"fold {fold}: the loss became infinite or NaN at epoch {epoch}, step "
                f"{first_bad.item()}; training stopped ({RETRY})"
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so that train_seconds is the work, not its queueing
        train_seconds = time.perf_counter() - t0

        train_rates = error_rates(labels[order].cpu().numpy(), predicted.cpu().numpy())
        val_scores = model_scores(judged, images[val_t], tta=cfg.tta)
        if not np.isfinite(val_scores).all():
            raise FaceAttrError(
                f"fold {fold}: the model's outputs became infinite or NaN at epoch {epoch} "
                f"(after step {step}); training stopped ({RETRY})"
            )
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": loss_sum.item() / len(order),
            **{f"train_{k}": train_rates[k] for k in ("far", "frr", "hter")},
            **_validation_row(val_scores, y_val, weights, cfg.threshold),
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0,
        }
        state.history.append(row)
        improved = row["val_hter"] < state.best_hter
        if improved:
            state.keep_best(epoch, row["val_hter"], val_scores, judged)
        log.info("fold %d epoch %2d/%d  %s%s", fold, epoch, cfg.epochs, _epoch_line(row),
                 "  *" if improved else "")  # fmt: skip
        state.epoch = epoch
        due = time.perf_counter() - saved_at >= cfg.save_every
        if checkpoint is not None and epoch < cfg.epochs and due and (ranks.main or not parallel):
            state.save(checkpoint, time.perf_counter() - start)
            saved_at = time.perf_counter()
            log.debug("fold %d: epoch %d state saved to %s", fold, epoch, checkpoint)
    seconds = time.perf_counter() - start
    return FoldResult(state.best_epoch, state.best_state, state.best_scores, state.history, seconds)


def _resume(
    state: FoldState,
    checkpoint: Path,
    device: torch.device,
    augment_seed: int,
    parallel: bool,
    fold: int,
) -> None:
    """Continue the fold from `checkpoint`, if a state was saved there. Data-parallel, only rank
    0's augmentation generator was saved: the others draw afresh, from `augment_seed`. So does a
    fold saved on a GPU and resumed on a CPU, or the other way round: the two generators' states
    do not convert."""
    saved = load_training_state(checkpoint)
    if saved is None:
        return
    moved = ("rng.cuda" in saved[0]) != (device.type == "cuda")
    state.restore(*saved, reseed=augment_seed if parallel or moved else None)
    log.info("fold %d: resuming after epoch %d", fold, state.epoch)
    if moved:
        log.warning("fold %d was saved on another kind of device: it resumes with fresh "
                    "augmentation draws, not bit for bit", fold)  # fmt: skip


def _epoch_order(
    train_idx: torch.Tensor, gen: torch.Generator, ranks: Ranks, batch: int, compiled: bool
) -> torch.Tensor:
    """The training images of an epoch, in the order they are trained on: a fresh shuffle, the
    same on every rank of a data-parallel fold, of which each takes every world-th image."""
    order = train_idx[torch.randperm(len(train_idx), generator=gen).to(train_idx.device)]
    order = order[: len(order) // ranks.world * ranks.world][ranks.rank :: ranks.world]
    return order[: images_per_epoch(len(order), batch, compiled)]


def _validation_row(
    scores: np.ndarray, labels: torch.Tensor, weights: torch.Tensor, threshold: float
) -> dict:
    """An epoch's validation figures: the loss of its `scores`, and the error rates at
    `threshold`."""
    logits = torch.logit(torch.as_tensor(scores, device=labels.device), eps=1e-7)
    rates = error_rates(labels.cpu().numpy(), scores_to_labels(scores, threshold))
    return {
        "val_loss": weighted_bce(logits, labels, weights).item(),
        **{f"val_{k}": rates[k] for k in ("far", "frr", "hter")},
    }


@contextmanager
def _step_errors(cfg: TrainConfig, fold: int, epoch: int) -> Iterator[None]:
    """Training steps' errors a user can cause, as one line each: a compiler that fails under
    --compile, a setting beyond float32. Any other is a bug, with its traceback."""
    try:
        yield
    except RuntimeError as e:
        if cfg.compile and _compiler_failed(e):  # a missing header, a broken toolchain...
            cause = getattr(e, "inner_exception", None) or e
            raise FaceAttrError(
                f"--compile failed ({type(cause).__name__}: {first_line(cause)}); train "
                "without --compile"
            ) from None
        if "without overflow" not in str(e):
            raise
        raise FaceAttrError(  # a setting beyond float32 (Adam's first step at --lr 3e38)
            f"fold {fold}: a setting overflowed float32 at epoch {epoch} ({first_line(e)}); "
            f"training stopped ({RETRY})"
        ) from None


def _epoch_line(row: dict) -> str:
    """An epoch's history row as the log shows it."""
    return (
        f"loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  val HTER "
        f"{100 * row['val_hter']:5.2f}% (FAR {100 * row['val_far']:.2f}% "
        f"FRR {100 * row['val_frr']:.2f}%)  {row['seconds']:.1f}s"
    )


def _compiler_failed(e: RuntimeError) -> bool:
    """Whether torch.compile's backend failed: BackendCompilerFailed, or inductor's own subclass
    of it (InductorError, torch 2.7 on): isinstance catches both. Asked only with --compile:
    torch.compile has imported dynamo already."""
    from torch._dynamo.exc import BackendCompilerFailed

    return isinstance(e, BackendCompilerFailed)


def compile_model(net: nn.Module) -> nn.Module:
    """`torch.compile`, one graph for every fold's model. Before 2.5, dynamo guarded on each module
    object unless told to inline them (the default since, and the flag deprecated), so each new
    fold model compiled afresh: a minute of a GPU's time per fold."""
    if torch.__version__ < (2, 5):
        torch._dynamo.config.inline_inbuilt_nn_modules = True
    if next(net.parameters()).device.type != "cuda":
        # Inductor's C++ build warns "No CUDA runtime is found" on a machine without CUDA: true,
        # and nothing to do with compiling for a CPU.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(net)


def images_per_epoch(n: int, batch: int, compiled: bool, world: int = 1) -> int:
    """Images one of `world` processes trains on per epoch of `n`.

    Compiled, the step sees one batch shape only, so a remainder batch is dropped (fewer images
    than a batch are one smaller batch: dropped, the epoch trained nothing); and BatchNorm
    cannot train on a batch of one image, so such a remainder loses its image.
    """
    n = n // world
    if compiled and n >= batch:
        n = n // batch * batch
    return n - 1 if n % batch == 1 else n

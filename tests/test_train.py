import itertools
import logging
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from faceattr import train as train_module
from faceattr.batches import DeviceImages
from faceattr.checkpoints import load_training_state
from faceattr.ensemble import model_scores
from faceattr.errors import FaceAttrError
from faceattr.metrics import error_rates
from faceattr.models import create_model
from faceattr.train import (
    DEFAULT_RECIPES,
    FoldState,
    TrainConfig,
    WeightAverage,
    class_weights,
    config_for,
    fold_seed,
    images_per_epoch,
    lr_factor,
    train_fold,
    weighted_bce,
)


def test_each_device_has_its_default_recipe_and_given_options_win():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    default = config_for(cpu, {})
    assert (default.arch, default.pretrained, default.epochs) == (
        "efficientnet_lite0",
        "imagenet",
        6,
    )
    assert (default.optimizer, default.schedule, default.weight_decay) == ("adamw", "cosine", 0.05)
    gpu = config_for(cuda, {})  # the same recipe with a stride-1 stem, trained longer
    assert (gpu.arch, gpu.pretrained, gpu.epochs, gpu.schedule) == (
        "efficientnet_lite0_s1",
        "imagenet",
        15,
        "cosine",
    )
    shorter = config_for(cpu, {"epochs": 3, "arch": "efficientnet_lite0"})  # same model: recipe
    assert (shorter.epochs, shorter.pretrained, shorter.optimizer) == (3, "imagenet", "adamw")
    seed = config_for(cpu, {"arch": "simple"})  # another model: the seed's settings
    assert seed == TrainConfig(arch="simple")
    assert config_for(cpu, {"pretrained": "none"}).pretrained is None
    for recipe in DEFAULT_RECIPES.values():
        TrainConfig(**recipe).check()


def test_step_and_gamma_without_the_step_schedule_are_a_warning(caplog):
    cpu = torch.device("cpu")
    with caplog.at_level("WARNING", logger="faceattr"):
        config_for(cpu, {"step": 5, "gamma": 0.7})  # the seed's flags over the cosine recipe
    assert "they do nothing" in caplog.text and "cosine" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="faceattr"):
        config_for(cpu, {"arch": "simple", "step": 5, "gamma": 0.7})  # the seed's StepLR
        config_for(cpu, {"step": 5, "schedule": "step"})
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("epochs", 0, "--epochs must be at least 1"),
        ("batch_size", 1, "--batch-size must be at least 2"),
        ("lr", -0.1, "--lr must be positive, got -0.1"),  # it alone named, not three
        ("gamma", 0.0, "--gamma must be positive, got 0.0"),
        ("mix_alpha", 0.0, "--mix-alpha must be positive, got 0.0"),
        ("weight_decay", -1.0, "--weight-decay must be at least 0, got -1.0"),
        ("weight_decay", float("nan"), "--weight-decay must be a finite number, got nan"),
        ("lr", float("inf"), "--lr must be a finite number"),
        ("ema", float("nan"), "--ema must be a finite number"),
        ("mix_alpha", 1e39, "--mix-alpha must be at most 3.4e+38, got 1e+39"),  # float32's max
        ("gamma", 1e308, "--gamma must be at most 3.4e+38"),
        ("epochs", "40", "--epochs must be an integer, got '40'"),  # a hand-edited run.json's
        ("tta", 1, "--tta must be true or false, got 1"),
        ("label_smoothing", 1.0, "--label-smoothing must be in [0, 1), got 1.0"),
        ("ema", 1.0, "--ema must be in [0, 1), got 1.0"),
        ("seed", -1, "--seed must be in 0..4294967295, got -1"),
        ("seed", 2**32, "--seed must be in 0..4294967295"),
        ("optimizer", "lion", "unknown --optimizer 'lion': one of adam, adamw, sgd"),
        ("mix", "blend", "unknown --mix 'blend': one of none, mixup, cutmix"),
        ("save_every", -1.0, "--save-every must be at least 0"),
        ("save_every", float("nan"), "--save-every must be a finite number"),
    ],
)
def test_impossible_settings_are_refused_before_any_work(option, value, message):
    with pytest.raises(FaceAttrError) as e:
        TrainConfig(**{option: value}).check()
    assert message in str(e.value)
    TrainConfig(seed=2**32 - 1).check()  # the largest seed scikit-learn takes
    TrainConfig(cache=Path("cache"), pretrained=Path("w.pth")).check()  # paths, from code


def test_class_weights_balance_the_classes():
    w = class_weights(torch.tensor([0, 1, 1, 1]))
    assert w.tolist() == pytest.approx([2.0, 2 / 3])
    assert (w[0] * 1).item() == pytest.approx((w[1] * 3).item())  # same total weight per class


def test_a_fold_learns_an_easy_rule_and_keeps_its_best_epoch():
    images, labels = easy_data()  # a few epochs must separate bright from dark
    train_idx, val_idx = np.arange(64), np.arange(64, 96)
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=4, batch_size=16, lr=1e-3)
    result = train_fold(create_model("simple"), images, labels, train_idx, val_idx, cfg, fold=1)
    assert len(result.history) == 4
    best = min(result.history, key=lambda r: r["val_hter"])
    assert result.best_epoch == best["epoch"]
    assert best["val_hter"] <= 0.1
    assert result.val_scores.shape == (32,)
    assert (
        error_rates(labels[val_idx].numpy(), result.val_scores >= 0.5)["hter"] == best["val_hter"]
    )
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_learning_rate_schedules():
    def factors(schedule):
        cfg = TrainConfig(epochs=10, step=5, gamma=0.7, schedule=schedule)
        return [lr_factor(i, 4, cfg) for i in range(40)]

    step = factors("step")
    assert step[:20] == [1.0] * 20 and step[20:] == [0.7] * 20  # StepLR: x0.7 after 5 epochs
    cosine = factors("cosine")
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0]  # one epoch of warm-up
    assert all(a >= b for a, b in itertools.pairwise(cosine[3:])) and cosine[-1] < 0.01
    onecycle = factors("onecycle")
    assert max(onecycle) == onecycle[11] == 1.0 and onecycle[0] < 0.1 and onecycle[-1] < 0.01


def test_label_smoothing_pulls_targets_to_the_middle():
    logits, y, w = torch.tensor([8.0, -8.0]), torch.tensor([1, 0]), torch.ones(2)
    assert weighted_bce(logits, y, w) < 0.001
    assert weighted_bce(logits, y, w, smoothing=0.2) > 0.5  # confident answers now cost


def test_mixed_loss_weighs_both_labels_by_their_shares():
    logits, y, w = torch.tensor([2.0, -1.0]), torch.tensor([1, 0]), torch.tensor([3.0, 1.0])
    partner, lam = torch.tensor([0, 1]), torch.tensor([0.7, 0.9])
    mixed = weighted_bce(logits, y, w, mixed=(partner, lam))
    own = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float(), reduction="none")
    other = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, partner.float(), reduction="none"
    )
    expected = (lam * own * w[y] + (1 - lam) * other * w[partner]).mean()
    assert mixed.item() == pytest.approx(expected.item())
    assert weighted_bce(logits, y, w, mixed=(partner, torch.ones(2))) == weighted_bce(logits, y, w)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_a_fold_still_learns_with_mixed_images(kind):
    images, labels = easy_data()
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=4, batch_size=16, mix=kind, mix_alpha=0.4)
    result = train_fold(
        create_model("simple"), images, labels, np.arange(64), np.arange(64, 96), cfg, 1
    )
    assert min(r["val_hter"] for r in result.history) <= 0.1


def easy_data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright images are label 1, dark ones label 0 (a quarter of them)."""
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(n, generator=g) > 0.25).long()
    level = torch.where(labels.bool(), 200, 40).view(-1, 1, 1, 1)
    return (level + torch.randint(0, 40, (n, 64, 64, 3), generator=g)).to(torch.uint8), labels


def test_the_recipe_reaches_every_step_of_the_loop(monkeypatch):
    """Each option is used where it acts: policy, mixing, smoothing, class weights, mirroring."""
    from faceattr.augment import POLICIES

    seen: dict[str, list] = {"policy": [], "mix": [], "step": [], "tta": []}

    def spy(name, real, record):
        def wrapped(*args, **kwargs):
            seen[name].append(record(*args, **kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(train_module, real.__name__, wrapped)

    spy("policy", train_module.augment, lambda x, gen, policy: policy)
    spy("mix", train_module.mix, lambda x, y, gen, kind, alpha: (kind, alpha))
    spy("step", train_module.train_step, lambda m, o, x, y, w, smoothing, mixed: (w, smoothing))
    spy("tta", train_module.model_scores, lambda model, images, tta: tta)
    images, labels = easy_data()
    cfg = TrainConfig(epochs=2, batch_size=32, augment="strong", mix="cutmix", mix_alpha=0.7,
                      label_smoothing=0.1, tta=False)  # fmt: skip
    train_fold(create_model("simple"), images, labels, np.arange(64), np.arange(64, 96), cfg, 1)
    assert seen["policy"] == [POLICIES["strong"]] * 4  # 2 epochs x 2 batches
    assert seen["mix"] == [("cutmix", 0.7)] * 4
    weights = class_weights(labels[:64])
    assert all(torch.equal(w, weights) and smoothing == 0.1 for w, smoothing in seen["step"])
    assert not torch.equal(weights, torch.ones(2))  # imbalanced: the weights differ
    assert seen["tta"] == [False, False]  # validation, once an epoch
    cfg = TrainConfig(epochs=1, batch_size=32)  # mirrored validation, the default
    train_fold(create_model("simple"), images, labels, np.arange(64), np.arange(64, 96), cfg, 1)
    assert seen["tta"][-1] is True and seen["policy"][-1] == POLICIES["light"]


def test_ema_keeps_and_judges_the_averaged_weights():
    images, labels = easy_data()
    torch.manual_seed(0)
    model = create_model("simple")
    cfg = TrainConfig(epochs=1, batch_size=16, ema=0.5, tta=False)
    result = train_fold(model, images, labels, np.arange(64), np.arange(64, 96), cfg, fold=1)
    raw = model.state_dict()
    assert any(not torch.equal(raw[k], v) for k, v in result.state.items())  # not the raw weights
    kept = create_model("simple")
    kept.load_state_dict(result.state)
    np.testing.assert_allclose(model_scores(kept, images[64:]), result.val_scores, atol=1e-6)


@pytest.mark.parametrize("where", ["device", "host"])
def test_a_fold_trains_alike_wherever_its_images_are_kept(where):
    """Host-kept images are gathered by a host copy of the order: the same batches, in turn."""
    images, labels = easy_data()
    cfg = TrainConfig(epochs=1, batch_size=16, tta=False)
    kept = DeviceImages(images.numpy(), torch.device("cpu"), where=where)
    results = []
    for data in (images, kept):
        torch.manual_seed(0)
        results.append(
            train_fold(
                create_model("simple"), data, labels, np.arange(64), np.arange(64, 96), cfg, 1
            )
        )
    np.testing.assert_array_equal(results[0].val_scores, results[1].val_scores)
    assert results[0].history[0]["train_loss"] == results[1].history[0]["train_loss"]


def kill_after_epoch_2(monkeypatch, run, saved_as=lambda tensors: tensors) -> None:
    """Run `run()` as if the process were killed right after epoch 2's state was saved (as
    `saved_as` rewrites it); later saves are real."""
    real_save = train_module.save_training_state

    def save_then_stop(path, tensors, info):
        real_save(path, saved_as(tensors), info)
        if info["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_training_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(train_module, "save_training_state", real_save)


def test_an_interrupted_fold_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    images, labels = easy_data()
    # mixup draws its shares from the global generator: the saved state must restore it too.
    cfg = TrainConfig(
        epochs=3, batch_size=16, ema=0.9, schedule="onecycle", mix="mixup", save_every=0
    )
    split = np.arange(64), np.arange(64, 96)

    def fold(checkpoint):
        torch.manual_seed(0)
        return train_fold(create_model("simple"), images, labels, *split, cfg, 1, checkpoint)

    whole = fold(None)
    kill_after_epoch_2(monkeypatch, lambda: fold(tmp_path / "state"))
    torch.manual_seed(123)  # the resumed run must not depend on the process's generator
    resumed = fold(tmp_path / "state")
    assert resumed.best_epoch == whole.best_epoch
    assert all(torch.equal(resumed.state[k], v) for k, v in whole.state.items())
    np.testing.assert_array_equal(resumed.val_scores, whole.val_scores)
    drop = ("seconds", "train_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.history] == [
        {k: v for k, v in r.items() if k not in drop} for r in whole.history
    ]


def test_a_fold_saved_on_a_gpu_resumes_on_a_cpu(tmp_path, monkeypatch, caplog):
    images, labels = easy_data()
    cfg = TrainConfig(epochs=3, batch_size=16, save_every=0)
    split = np.arange(64), np.arange(64, 96)
    # A CUDA generator's state is 16 bytes (seed and offset), and there is the CUDA one too.
    gpu = {k: torch.zeros(16, dtype=torch.uint8) for k in ("rng.augment", "rng.cuda")}
    kill_after_epoch_2(
        monkeypatch,
        lambda: train_fold(
            create_model("simple"), images, labels, *split, cfg, 1, tmp_path / "state"
        ),
        saved_as=lambda tensors: {**tensors, **gpu},
    )
    with caplog.at_level("WARNING", logger="faceattr"):
        result = train_fold(
            create_model("simple"), images, labels, *split, cfg, 1, tmp_path / "state"
        )
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert "saved on another kind of device" in caplog.text


def test_the_state_is_saved_once_save_every_seconds_have_passed(tmp_path, monkeypatch):
    images, labels = easy_data()
    split = np.arange(64), np.arange(64, 96)
    now = [0.0]  # a clock for the fold that moves 10 s an epoch, when the epoch is validated
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    scores = train_module.model_scores

    def ten_seconds_later(*args, **kwargs):
        now[0] += 10
        return scores(*args, **kwargs)

    monkeypatch.setattr(train_module, "model_scores", ten_seconds_later)
    saved: list[int] = []
    monkeypatch.setattr(
        train_module, "save_training_state", lambda path, t, info: saved.append(info["epoch"])
    )
    for every, expected in ((0, [1, 2, 3, 4]), (15, [2, 4]), (25, [3]), (1e9, [])):
        saved.clear()
        cfg = TrainConfig(epochs=5, batch_size=32, tta=False, save_every=every)
        train_fold(create_model("simple"), images, labels, *split, cfg, 1, tmp_path / "state")
        assert saved == expected, every  # never after the last epoch: the fold's result follows


def test_fold_state_round_trips_and_reseeds_augmentation_on_request(tmp_path):
    def fresh(seed: int) -> FoldState:
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5**i)
        gens = [torch.Generator().manual_seed(seed + k) for k in (1, 2)]
        return FoldState(model, WeightAverage(model, 0.9), optimizer, scheduler, *gens)

    state = fresh(0)
    state.model(torch.ones(4, 3)).sum().backward()
    state.optimizer.step()
    state.scheduler.step()
    state.ema.update()
    torch.rand(5, generator=state.augment_gen)
    state.epoch, state.history = 1, [{"epoch": 1, "val_hter": 0.25}]
    state.keep_best(1, 0.25, np.array([0.1, 0.9]), state.ema.module)
    state.save(tmp_path / "state", seconds=12.5)
    saved = load_training_state(tmp_path / "state")

    again = fresh(7)  # other weights, moments, schedule and generators: all replaced
    again.restore(*saved, reseed=None)
    for a, b in ((again.model, state.model), (again.ema.module, state.ema.module)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert again.optimizer.state_dict()["state"][0]["exp_avg"].equal(
        state.optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert again.scheduler.get_last_lr() == state.scheduler.get_last_lr() == [0.05]
    assert (again.epoch, again.seconds, again.history) == (1, 12.5, state.history)
    assert (again.best_epoch, again.best_hter, again.ema.updates) == (1, 0.25, 1)
    assert all(torch.equal(again.best_state[k], v) for k, v in state.best_state.items())
    np.testing.assert_array_equal(again.best_scores, [0.1, 0.9])
    for gen in ("order_gen", "augment_gen"):  # they go on as the saved ones would
        expected = torch.rand(3, generator=getattr(state, gen))
        assert torch.equal(torch.rand(3, generator=getattr(again, gen)), expected)

    # Data-parallel ranks other than 0 saved no generator: theirs is seeded from the epoch.
    reseeded, other = fresh(7), fresh(7)
    reseeded.restore(*saved, reseed=42)
    other.augment_gen.manual_seed(42 + 104729 * 1)
    assert torch.equal(
        torch.rand(3, generator=reseeded.augment_gen), torch.rand(3, generator=other.augment_gen)
    )


def test_images_per_epoch_trims_as_the_loop_does():
    assert images_per_epoch(100, 32, compiled=False) == 100
    assert images_per_epoch(97, 32, compiled=False) == 96  # no batch of one for BatchNorm
    assert images_per_epoch(100, 32, compiled=True) == 96  # compiled: whole batches only
    assert images_per_epoch(75, 128, compiled=True) == 75  # or the one batch there is
    assert images_per_epoch(101, 32, compiled=False, world=2) == 50
    assert images_per_epoch(7, 32, compiled=False, world=4) == 0  # one each: none to train on


def test_a_fold_too_small_to_share_among_the_processes_is_refused():
    from faceattr.distributed import Ranks

    images, labels = easy_data()
    cfg = TrainConfig(epochs=1, batch_size=16, ddp=True)
    with pytest.raises(FaceAttrError, match="its 7 training images are too few to share among 4"):
        # Refused before any process group is needed: all four ranks stop alike.
        train_fold(create_model("simple"), images, labels, np.arange(7), np.arange(64, 70), cfg,
                   fold=1, ranks=Ranks(rank=1, world=4))  # fmt: skip


def test_weight_average_warms_up_then_decays_slowly():
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    torch.nn.init.zeros_(model[0].weight)
    average = WeightAverage(model, decay=0.999)
    for t in (1, 2):
        torch.nn.init.constant_(model[0].weight, float(t))
        model[1].num_batches_tracked += 1
        before = average.module[0].weight.clone()
        average.update()
        decay = (1 + t) / (10 + t)  # warm-up: far below 0.999 at first
        expected = decay * before + (1 - decay) * t
        assert torch.allclose(average.module[0].weight, expected)
    assert average.module[1].num_batches_tracked == 2  # counters are copied, not averaged
    state = average.state_dict()
    again = WeightAverage(model, decay=0.999)
    again.load_state_dict(state)
    assert again.updates == 2 and torch.equal(again.module[0].weight, average.module[0].weight)
    average.updates = 10_000  # later the decay is the one asked for
    before = average.module[0].weight.clone()
    torch.nn.init.constant_(model[0].weight, 100.0)
    average.update()
    assert torch.allclose(average.module[0].weight, 0.999 * before + 0.001 * 100.0)


def test_compiling_for_a_cpu_leaves_out_the_warning_that_cuda_is_missing(monkeypatch):
    """Inductor's C++ build logs "No CUDA runtime is found" on such a machine: noise there."""
    cpp = logging.getLogger("torch.utils.cpp_extension")
    monkeypatch.setattr(cpp, "level", cpp.level)  # put back after the test
    train_module.compile_model(torch.nn.Linear(2, 1))  # lazy: nothing compiles until the first call
    assert not cpp.isEnabledFor(logging.WARNING) and cpp.isEnabledFor(logging.ERROR)


def test_label_smoothing_targets_are_pulled_half_way_to_the_middle():
    """smoothing s: targets 1 - s/2 and s/2 (not 1 and s)."""
    logits, y, w = torch.tensor([2.0, -1.0]), torch.tensor([1, 0]), torch.ones(2)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.tensor([0.9, 0.1])
    )
    assert weighted_bce(logits, y, w, smoothing=0.2).item() == pytest.approx(expected.item())


def test_class_weights_stay_finite_for_a_class_the_fold_lacks():
    w = class_weights(torch.tensor([1, 1, 1]))
    assert torch.isfinite(w).all() and w.tolist() == pytest.approx([2.0, 2 / 3])


def test_validation_loss_is_class_weighted_like_the_training_loss():
    scores = np.array([0.9, 0.2, 0.6, 0.3])
    labels, weights = torch.tensor([1, 0, 0, 1]), torch.tensor([3.0, 0.5])
    row = train_module._validation_row(scores, labels, weights, 0.5)
    logits = torch.logit(torch.as_tensor(scores), eps=1e-7)
    assert row["val_loss"] == pytest.approx(weighted_bce(logits, labels, weights).item())
    assert row["val_loss"] != pytest.approx(weighted_bce(logits, labels, torch.ones(2)).item())


def test_the_configured_threshold_judges_training_and_validation():
    """cfg.threshold (0: every image is called 1) is the one the epoch's error rates use."""
    images, labels = easy_data()
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, batch_size=16, tta=False, threshold=0.0)
    result = train_fold(
        create_model("simple"), images, labels, np.arange(64), np.arange(64, 96), cfg, 1
    )
    (row,) = result.history
    assert (row["train_far"], row["train_frr"]) == (1.0, 0.0)
    assert (row["val_far"], row["val_frr"]) == (1.0, 0.0)


def test_fold_seeds_of_different_run_seeds_never_collide():
    seeds = {fold_seed(seed, fold) for seed in range(10) for fold in range(1, 21)}
    assert len(seeds) == 200

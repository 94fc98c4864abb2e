"""Face-safe augmentation applied to a whole batch at once, on the batch's device.

Each image gets its own random shift, rotation (at most 5 degrees), horizontal flip and, in the
`strong` policy, zoom, folded into one affine transform and applied by a single `grid_sample`;
`strong` then jitters brightness, contrast and saturation and erases a small patch per image. No
per-image Python work, so it costs next to nothing beside the model on a GPU. `mix` (mixup or
cutmix, off by default) then blends pairs of images and, through the loss, their labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Policy:
    """How hard to augment. Every range is symmetric and drawn independently per image."""

    max_shift: float = 4 / 64  # fraction of the image side: 4/64 is up to 4 pixels each way
    max_degrees: float = 5.0
    flip: bool = True
    max_zoom: float = 0.0  # scale by a factor in [1 - z, 1 + z]
    jitter: float = 0.0  # brightness, contrast and saturation each times a factor in [1 - j, 1 + j]
    erase: float = 0.0  # probability of blanking one patch of 2-8 % of the image with noise


POLICIES = {
    "none": Policy(max_shift=0.0, max_degrees=0.0, flip=False),
    "light": Policy(),  # the seed's: shifts, small rotations, mirror images
    "strong": Policy(max_zoom=0.1, jitter=0.2, erase=0.25),
}


def _uniform(n: int, generator: torch.Generator, device: torch.device, low: float, high: float):
    r = torch.rand(n, generator=generator, device=generator.device).to(device)
    return low + (high - low) * r


def random_affine(
    n: int, generator: torch.Generator, device: torch.device, policy: Policy = POLICIES["light"]
) -> torch.Tensor:
    """(n, 2, 3) affine matrices for `affine_grid`: flip, then rotate and zoom, then shift."""

    def uniform(low: float, high: float) -> torch.Tensor:
        return _uniform(n, generator, device, low, high)

    shift, zoom_range, ones = policy.max_shift, policy.max_zoom, torch.ones(n, device=device)
    angle = uniform(-policy.max_degrees, policy.max_degrees) * (math.pi / 180)
    # affine_grid's coordinates span [-1, 1], so a shift of s image sides is 2s there.
    tx, ty = uniform(-2 * shift, 2 * shift), uniform(-2 * shift, 2 * shift)
    sign = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if policy.flip else ones
    # The matrix maps output to input coordinates: dividing by the zoom enlarges the face.
    zoom = 1 / uniform(1 - zoom_range, 1 + zoom_range) if zoom_range else ones
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    row0 = torch.stack([cos * sign, -sin, tx], dim=1)
    row1 = torch.stack([sin * sign, cos, ty], dim=1)
    return torch.stack([row0, row1], dim=1)


def color_jitter(x: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Scale each image's brightness, contrast and saturation by its own factors in [1 ± s]."""
    n = x.shape[0]

    def factor() -> torch.Tensor:
        return _uniform(n, generator, x.device, 1 - strength, 1 + strength).view(n, 1, 1, 1)

    def gray(x: torch.Tensor) -> torch.Tensor:
        # The luma, from the channels alone: a tensor of the three weights would be copied to
        # the GPU at every call, and the CPU would wait for the copy.
        return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]

    x = x * factor()  # brightness
    x = torch.lerp(gray(x).mean((2, 3), keepdim=True), x, factor())  # contrast
    x = torch.lerp(gray(x), x, factor())  # saturation
    return x.clamp(0, 1)


def random_erase(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """With probability `p` per image, replace one rectangle (2-8 % of the area) by noise."""
    n, _, h, w = x.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return _uniform(n, generator, x.device, low, high).view(n, 1, 1)

    area, aspect = uniform(0.02, 0.08), torch.exp(uniform(math.log(0.5), math.log(2)))
    eh, ew = (area * aspect).sqrt() * h, (area / aspect).sqrt() * w
    top, left = uniform(0, 1) * (h - eh), uniform(0, 1) * (w - ew)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    inside &= uniform(0, 1) < p
    noise = torch.rand(x.shape, generator=generator, device=generator.device).to(x)
    return torch.where(inside.unsqueeze(1), noise, x)


def augment(
    x: torch.Tensor, generator: torch.Generator, policy: Policy | None = None, **kwargs
) -> torch.Tensor:
    """Augment each image of a float batch (N, C, H, W) in [0, 1] by `policy` (default light).

    Keyword arguments override the policy's fields. Pixels pulled in from outside the frame repeat
    the border (`padding_mode='border'`) rather than black, which would be a cue the model could
    learn.
    """
    policy = policy or POLICIES["light"]
    if kwargs:
        policy = replace(policy, **kwargs)
    if policy == POLICIES["none"]:
        return x
    theta = random_affine(x.shape[0], generator, x.device, policy).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if policy.jitter:
        x = color_jitter(x, generator, policy.jitter)
    if policy.erase:
        x = random_erase(x, generator, policy.erase)
    return x


MIXES = ("none", "mixup", "cutmix")


def mix(
    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, kind: str, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix each image of a batch with its partner in the reversed batch (mixup or cutmix).

    Returns the mixed images, the partners' labels and `lam`, each image's own share (>= 0.5, so
    that its own label dominates): the loss weighs the two labels by `lam` and `1 - lam`.
    mixup blends the whole images; cutmix pastes a box of the partner covering `1 - lam` of the
    image. The shares are drawn per image from Beta(alpha, alpha) with the global generator
    (torch.distributions takes no other); the cutmix boxes' places with `generator`.
    """
    n, _, h, w = x.shape
    partner, y_partner = x.flip(0), y.flip(0)
    # A fill, not a copy from the host, and no argument check (its .all() would wait for the GPU).
    concentration = torch.full((n,), float(alpha), device=x.device)
    lam = torch.distributions.Beta(concentration, concentration, validate_args=False).sample()
    lam = torch.maximum(lam, 1 - lam)
    if kind == "mixup":
        share = lam.to(x.dtype).view(n, 1, 1, 1)
        return torch.lerp(partner, x, share), y_partner, lam
    if kind != "cutmix":
        raise ValueError(f"unknown mix {kind!r}")
    # A box of sides sqrt(1 - lam) times the image's, centred anywhere, cut at the border; whole
    # pixels inside it, so that `lam` is then exactly the share of the image's own pixels, and
    # never below the one drawn (rounded outwards, a box could take over half the image).
    side = (1 - lam).sqrt()
    cy, cx = _uniform(n, generator, x.device, 0, h), _uniform(n, generator, x.device, 0, w)
    top, bottom = (cy - side * h / 2).clamp(0, h).ceil(), (cy + side * h / 2).clamp(0, h).floor()
    left, right = (cx - side * w / 2).clamp(0, w).ceil(), (cx + side * w / 2).clamp(0, w).floor()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (
        (rows >= top.view(n, 1, 1))
        & (rows < bottom.view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < right.view(n, 1, 1))
    )
    # Under a pixel, a box cut inwards ends before it starts: nothing pasted.
    lam = 1 - (bottom - top).clamp(min=0) * (right - left).clamp(min=0) / (h * w)
    return torch.where(inside.unsqueeze(1), partner, x), y_partner, lam

"""Light, face-safe augmentation applied to a whole batch at once, on the batch's device.

Each image gets its own random shift, rotation (at most 5 degrees) and horizontal flip, folded into
one affine transform and applied by a single `grid_sample`: no per-image Python work, so it costs
next to nothing beside the model on a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(
    n: int,
    generator: torch.Generator,
    device: torch.device,
    max_shift: float = 4 / 64,
    max_degrees: float = 5.0,
    flip: bool = True,
) -> torch.Tensor:
    """(n, 2, 3) affine matrices for `affine_grid`: flip, then rotate, then shift.

    `max_shift` is a fraction of the image side (4/64: up to 4 pixels each way).
    """

    def uniform(low: float, high: float) -> torch.Tensor:
        r = torch.rand(n, generator=generator, device=generator.device).to(device)
        return low + (high - low) * r

    angle = uniform(-max_degrees, max_degrees) * (math.pi / 180)
    # affine_grid's coordinates span [-1, 1], so a shift of s image sides is 2s there.
    tx, ty = uniform(-2 * max_shift, 2 * max_shift), uniform(-2 * max_shift, 2 * max_shift)
    sign = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    row0 = torch.stack([cos * sign, -sin, tx], dim=1)
    row1 = torch.stack([sin * sign, cos, ty], dim=1)
    return torch.stack([row0, row1], dim=1)


def augment(x: torch.Tensor, generator: torch.Generator, **kwargs) -> torch.Tensor:
    """Randomly shift, rotate and flip each image of a float batch (N, C, H, W).

    Pixels pulled in from outside the frame repeat the border (`padding_mode='border'`) rather than
    black, which would be a cue the model could learn.
    """
    theta = random_affine(x.shape[0], generator, x.device, **kwargs).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

import math

import torch

from faceattr.augment import augment, random_affine


def test_shape_dtype_and_range_are_kept():
    x = torch.rand(16, 3, 64, 64)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1


def test_rotation_never_exceeds_five_degrees_and_shift_four_pixels():
    theta = random_affine(10_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    linear = theta[:, :, :2]
    # Each matrix is a rotation times an optional flip: |det| = 1, angle from the second row.
    assert torch.allclose(linear.det().abs(), torch.ones(10_000), atol=1e-5)
    angles = torch.atan2(linear[:, 1, 0] * linear[:, 0, 0].sign(), linear[:, 1, 1]).abs()
    assert angles.max() <= math.radians(5) + 1e-6
    assert angles.max() > math.radians(4.5)  # the whole range is used
    assert theta[:, :, 2].abs().max() <= 2 * 4 / 64 + 1e-6
    flips = (linear.det() < 0).float().mean()
    assert 0.45 < flips < 0.55


def test_each_image_gets_its_own_transform():
    x = torch.rand(1, 3, 64, 64).repeat(8, 1, 1, 1)
    y = augment(x, torch.Generator().manual_seed(1))
    diffs = [(y[i] - y[j]).abs().max() for i in range(8) for j in range(i + 1, 8)]
    assert min(diffs) > 1e-3


def test_same_generator_state_repeats_exactly():
    x = torch.rand(4, 3, 64, 64)
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_without_shift_or_rotation_it_only_flips():
    x = torch.rand(32, 3, 64, 64)
    y = augment(x, torch.Generator().manual_seed(2), max_shift=0.0, max_degrees=0.0)
    for xi, yi in zip(x, y, strict=True):
        assert torch.allclose(yi, xi, atol=1e-5) or torch.allclose(yi, xi.flip(-1), atol=1e-5)

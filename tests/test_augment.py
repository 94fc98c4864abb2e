import math

import pytest
import torch

from faceattr.augment import (
    POLICIES,
    Policy,
    augment,
    color_jitter,
    mix,
    random_affine,
    random_erase,
)


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
    angles = torch.atan2(linear[:, 1, 0] * linear[:, 0, 0].sign(), linear[:, 1, 1])
    assert angles.abs().max() <= math.radians(5) + 1e-6
    assert angles.min() < -math.radians(4.5) and angles.max() > math.radians(4.5)  # both ways
    limit = 2 * 4 / 64  # 4 pixels, in affine_grid's [-1, 1]
    assert theta[:, :, 2].abs().max() <= limit + 1e-6
    for shift in (theta[:, 0, 2], theta[:, 1, 2]):  # across and down, each way, all of it
        assert shift.min() < -0.95 * limit and shift.max() > 0.95 * limit
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


def test_strong_policy_zooms_by_at_most_ten_percent():
    theta = random_affine(
        10_000, torch.Generator().manual_seed(0), torch.device("cpu"), POLICIES["strong"]
    )
    scale = theta[:, :, :2].det().abs().sqrt()  # output-to-input: 1 / zoom
    assert scale.min() >= 1 / 1.1 - 1e-5 and scale.max() <= 1 / 0.9 + 1e-5
    assert scale.min() < 1 / 1.09 and scale.max() > 1 / 0.91  # the whole range is used


def test_colour_jitter_is_per_image_bounded_and_off_at_zero():
    x = torch.rand(1, 3, 64, 64).repeat(8, 1, 1, 1)
    y = color_jitter(x, torch.Generator().manual_seed(0), 0.2)
    assert y.min() >= 0 and y.max() <= 1
    assert min((y[i] - y[j]).abs().max() for i in range(8) for j in range(i + 1, 8)) > 1e-3
    assert torch.allclose(color_jitter(x, torch.Generator().manual_seed(0), 0.0), x, atol=1e-6)
    gray = torch.full((4, 3, 8, 8), 0.5)  # no colour and no contrast: only brightness moves it
    out = color_jitter(gray, torch.Generator().manual_seed(1), 0.2)
    assert torch.allclose(out, out[:, :1, :1, :1].expand_as(out))
    assert out.min() >= 0.4 - 1e-6 and out.max() <= 0.6 + 1e-6


def test_colour_jitter_moves_contrast_and_saturation_too():
    g = torch.Generator().manual_seed(0)
    # Grey, half 0.25 and half 0.75: brightness b and contrast c give levels b/2 (1 -+ c/2).
    two = torch.full((256, 3, 8, 8), 0.25)
    two[..., 4:] = 0.75
    out = color_jitter(two, g, 0.2)
    low, high = out[:, 0, 0, 0], out[:, 0, 0, 7]
    contrast = 2 * (high - low) / (high + low)
    assert contrast.min() < 0.82 and contrast.max() > 1.18 and contrast.max() <= 1.2 + 1e-5
    # One colour: contrast and saturation both scale its distance from its grey, by c times s.
    colour = torch.tensor([0.6, 0.4, 0.2]).view(1, 3, 1, 1).expand(256, 3, 4, 4)
    out = color_jitter(colour, g, 0.2)
    luma = torch.tensor([0.299, 0.587, 0.114])
    spread = (out[:, 0, 0, 0] - out[:, 2, 0, 0]) / (out[:, :, 0, 0] @ luma)
    spread /= 0.4 / (torch.tensor([0.6, 0.4, 0.2]) @ luma)  # its share before jitter
    assert spread.min() < 0.75 and spread.max() > 1.25  # beyond either factor's [0.8, 1.2]


def test_policies_apply_their_jitter_and_erasing_and_repeat_the_border():
    still = {"max_shift": 0.0, "max_degrees": 0.0, "max_zoom": 0.0, "flip": False}
    x = torch.full((8, 3, 64, 64), 0.5)
    g = torch.Generator().manual_seed(0)
    jittered = augment(x, g, POLICIES["strong"], **still, erase=0.0)
    assert (jittered - x).abs().flatten(1).amax(1).min() > 1e-3  # every image
    erased = augment(x, g, POLICIES["strong"], **still, jitter=0.0, erase=1.0)
    assert ((erased != x).flatten(1).float().mean(1) > 0.015).all()  # a rectangle of noise each
    # Shifted, rotated and zoomed, a white image stays white: the border is repeated, not black.
    white = augment(torch.ones(64, 3, 64, 64), g, POLICIES["strong"], jitter=0.0, erase=0.0)
    assert torch.allclose(white, torch.ones_like(white), atol=1e-5)


def test_random_erase_blanks_one_small_rectangle_per_chosen_image():
    x = torch.full((64, 3, 64, 64), -1.0)  # noise is in [0, 1): erased pixels are easy to see
    y = random_erase(x, torch.Generator().manual_seed(0), 1.0)
    for img in y:
        mask = (img >= 0).all(0)
        rows, cols = mask.nonzero(as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert mask.sum() == box  # a rectangle
        assert 0.01 * 64 * 64 <= box <= 0.1 * 64 * 64
    assert torch.equal(random_erase(x, torch.Generator().manual_seed(0), 0.0), x)
    some = random_erase(x, torch.Generator().manual_seed(0), 0.25)
    erased = (some >= 0).flatten(1).any(1).float().mean()
    assert 0.05 < erased < 0.5


def test_policies():
    x = torch.rand(8, 3, 64, 64)
    assert augment(x, torch.Generator(), POLICIES["none"]) is x
    light = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(light, augment(x, torch.Generator().manual_seed(3), POLICIES["light"]))
    strong = augment(x, torch.Generator().manual_seed(3), POLICIES["strong"])
    assert strong.shape == x.shape and strong.min() >= 0 and strong.max() <= 1
    assert not torch.allclose(strong, light)


def test_mixup_blends_each_image_with_its_partner_by_its_own_share():
    torch.manual_seed(0)
    x, y = torch.rand(9, 3, 8, 8), torch.tensor([0, 1, 1, 1, 0, 1, 1, 1, 1])
    mixed, y_partner, lam = mix(x, y, torch.Generator().manual_seed(0), "mixup", 0.4)
    assert torch.equal(y_partner, y.flip(0))  # partners: the batch reversed
    assert lam.shape == (9,) and (lam >= 0.5).all() and (lam <= 1).all()
    assert len(set(lam.tolist())) == 9  # a share per image
    share = lam.view(9, 1, 1, 1)
    assert torch.allclose(mixed, share * x + (1 - share) * x.flip(0), atol=1e-6)


def test_cutmix_pastes_one_box_of_the_partner_covering_one_minus_lam():
    torch.manual_seed(0)
    x = torch.arange(64, dtype=torch.float).view(64, 1, 1, 1).expand(64, 3, 32, 32)
    y = torch.arange(64) % 2
    mixed, y_partner, lam = mix(x, y, torch.Generator().manual_seed(0), "cutmix", 1.0)
    assert torch.equal(y_partner, y.flip(0)) and (lam >= 0.5).all()
    pasted = mixed != x  # each image is a constant: its partner's pixels differ
    for i in range(64):
        assert pasted[i].all(0).eq(pasted[i].any(0)).all()  # whole pixels: all channels
        rows, cols = pasted[i][0].nonzero(as_tuple=True)
        own = 1 - pasted[i][0].float().mean()
        assert own.item() == pytest.approx(lam[i].item())
        if len(rows):  # a rectangle
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert pasted[i][0].sum() == box
            assert (mixed[i][:, rows, cols] == 63 - i).all()
    assert (lam < 1).float().mean() > 0.9  # nearly every image got a box
    assert lam.min() < 0.65  # and some boxes cover nearly half of it
    # Never more than half: of 4,096 boxes rounded to the nearest pixel, 13 had been.
    x, y = torch.rand(4096, 1, 16, 16), torch.zeros(4096, dtype=torch.long)
    lam = mix(x, y, torch.Generator().manual_seed(0), "cutmix", 1.0)[2]
    assert lam.min() >= 0.5 and lam.min() < 0.55
    # Boxes under a pixel paste nothing, and say so: lam 1, not 1 - 1/256.
    mixed, _, lam = mix(x, y, torch.Generator().manual_seed(0), "cutmix", 0.05)
    own = (mixed == x).all(1).flatten(1).float().mean(1)
    assert torch.equal(own, lam) and (lam == 1).sum() > 1000


def test_mixing_shares_are_reproducible_from_the_seeds():
    x, y = torch.rand(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)

    def run():
        torch.manual_seed(5)
        return mix(x, y, torch.Generator().manual_seed(5), "cutmix", 0.2)

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_shifts_across_and_down_are_drawn_independently():
    theta = random_affine(10_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    corr = torch.corrcoef(theta[:, :, 2].T)[0, 1]
    assert abs(corr) < 0.05


def test_random_erase_boxes_cover_2_to_8_percent_with_aspect_half_to_two():
    x = torch.full((512, 3, 256, 256), -1.0)  # large images: whole-pixel rounding is small
    y = random_erase(x, torch.Generator().manual_seed(0), 1.0)
    mask = (y >= 0).all(1)
    rows, cols = mask.any(2).sum(1).float(), mask.any(1).sum(1).float()
    area = rows * cols / (256 * 256)
    assert area.min() >= 0.02 * 0.9 and area.max() <= 0.08 * 1.1
    assert area.min() < 0.025 and area.max() > 0.07  # the whole range is used
    aspect = rows / cols
    assert aspect.min() >= 0.5 * 0.9 and aspect.max() <= 2 * 1.1
    assert aspect.min() < 0.6 and aspect.max() > 1.7


def test_strong_policy_values():
    assert POLICIES["strong"] == Policy(max_zoom=0.1, jitter=0.2, erase=0.25)
    assert POLICIES["strong"].max_shift == 4 / 64 and POLICIES["strong"].max_degrees == 5.0


def test_colour_jitter_keeps_a_colour_as_bright_as_the_grey_of_its_luma():
    """Contrast keeps the mean luma, saturation each pixel's: a colour beside the grey of its
    own (BT.601) luma stays as bright as that grey, whatever the factors."""
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    colour = torch.tensor([0.6, 0.4, 0.2]).view(1, 3, 1, 1)
    x = torch.empty(64, 3, 8, 8)
    x[..., :4] = colour
    x[..., 4:] = (colour * luma).sum(1, keepdim=True)
    out = color_jitter(x, torch.Generator().manual_seed(0), 0.2)
    y = (out * luma).sum(1)
    assert torch.allclose(y, y[..., 4:5].expand_as(y), atol=1e-5)

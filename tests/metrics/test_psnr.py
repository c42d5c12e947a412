"""PSNR (uint8, data range 255, per frame, averaged over frames) on hand-computed cases."""
import math

import pytest
import torch

from wmfast.metrics.psnr import psnr, psnr_per_frame, to_uint8


def test_hand_computed_single_frame():
    # 2x2 RGB frame; one value off by 10, another by 20, the other 10 exact: MSE = (100 + 400) / 12.
    target = torch.full((3, 2, 2), 100, dtype=torch.uint8)
    pred = target.clone()
    pred[0, 0, 0] = 110
    pred[2, 1, 1] = 80
    expected = 10 * math.log10(255**2 / (500 / 12))  # = 31.9329 dB
    assert psnr(pred, target) == pytest.approx(expected, abs=1e-9)
    assert psnr(pred, target) == pytest.approx(31.9329, abs=1e-4)


def test_mean_of_per_frame_psnr_not_psnr_of_mean_mse():
    target = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)  # layout [H, W, C]: same result, all values averaged
    pred = target.clone()
    pred[0] += 1  # frame 0: MSE 1 -> 48.1308 dB
    pred[1] += 16  # frame 1: MSE 256 -> 24.0654 dB
    per = psnr_per_frame(pred, target)
    assert per.tolist() == pytest.approx([20 * math.log10(255), 20 * math.log10(255 / 16)])
    assert psnr(pred, target) == pytest.approx((per[0] + per[1]).item() / 2)
    assert psnr(pred, target) != pytest.approx(10 * math.log10(255**2 / ((1 + 256) / 2)))


def test_no_uint8_overflow_and_identical_is_inf():
    a = torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 2)
    b = torch.tensor([255, 0], dtype=torch.uint8).reshape(1, 1, 2)
    assert psnr(a, b) == pytest.approx(0.0)  # MSE = 255^2: a wrapping uint8 subtraction would not give this
    assert psnr(a, a) == math.inf


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-1.0, 0.0, 0.5, 0.499 / 255, 0.501 / 255, 0.999, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 0, 1, 255, 255, 255]


@pytest.mark.parametrize("bad, match", [
    ((torch.zeros(3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.uint8)), "pred must be a uint8"),
    ((torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(3, 4, 5, dtype=torch.uint8)), "pred shape"),
    ((torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(4, 4, dtype=torch.uint8)), "pred must be"),
])
def test_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        psnr(*bad)

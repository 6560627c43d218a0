import numpy as np
import pytest
import torch

from lib.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from lib.train.losses import alpha_l1, composite_gt, mouth_weight, photometric, ssim
from lib.train.schedule import lr_factor, progress


def test_ssim_is_one_for_equal_images_and_lower_for_noise():
    a = torch.rand(1, 32, 32, 3)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim(a, (a + 0.2 * torch.randn_like(a)).clamp(0, 1)).item() < 0.9


def test_the_photometric_terms_of_several_views_are_the_mean_of_each_views():
    """train.views_per_step: a step's loss over n views is the mean of n one-view losses, so the terms keep
    their scale (and their weights their meaning) whatever the number of views."""
    g = torch.Generator().manual_seed(3)
    render, gt = torch.rand(3, 24, 20, 3, generator=g), torch.rand(3, 24, 20, 3, generator=g)
    weight = mouth_weight((torch.rand(3, 24, 20, generator=g) > 0.8).float(), 10.0, 2)
    together = photometric(render, gt, weight, 0.4, 0.8)
    alone = [photometric(render[i:i + 1], gt[i:i + 1], weight[i:i + 1], 0.4, 0.8) for i in range(3)]
    for term in ("l1", "ssim"):
        mean = sum(a[term] for a in alone) / 3
        assert together[term].item() == pytest.approx(mean.item(), rel=1e-5)
        assert max(abs(a[term].item() - mean.item()) for a in alone) > 1e-4  # views that differ


def test_mouth_weight_is_one_outside_and_raised_inside_the_mouth():
    mouth = torch.zeros(1, 40, 40)
    mouth[:, 18:22, 15:25] = 1
    w = mouth_weight(mouth, 150.0, 3)
    assert w[0, 0, 0] == pytest.approx(1.0) and w[0, 20, 20] > 50


def test_the_alpha_term_is_the_weighted_mean_distance_to_the_heads_alpha_and_absent_at_weight_zero():
    alpha = torch.tensor([[[[1.0], [0.25]], [[0.0], [0.5]]]])  # [1, 2, 2, 1], the render's
    fg = torch.tensor([[[1.0, 0.75], [1.0, 0.5]]])  # soft foreground alpha
    keep = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # the neck pixel is removed: its target is 0
    # |1 - 1| + |0.25 - 0.75| + |0 - 0| + |0.5 - 0.5| = 0.5 over 4 pixels
    assert alpha_l1(alpha, fg * keep, 0.4)["alpha"].item() == pytest.approx(0.4 * 0.5 / 4)
    assert alpha_l1(alpha, fg * keep, 0.0) == {}


def test_ground_truth_recomposites_the_kept_foreground_on_the_background_with_soft_edges_exact():
    # Hand-made pixels of an export composited on white: I = F·a + (1 - a).
    F = torch.tensor([[[[0.1, 0.1, 0.1],    # dark hair, half transparent, kept
                        [0.8, 0.3, 0.1]],   # opaque skin, kept
                       [[0.6, 0.5, 0.4],    # opaque neck, removed
                        [0.0, 0.0, 0.0]]]])  # background (a = 0) above the cut, kept
    a = torch.tensor([[[0.5, 1.0], [1.0, 0.0]]])
    k = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    image = F * a[..., None] + (1 - a[..., None])
    bg = torch.tensor([0.2, 0.4, 0.6])
    gt = composite_gt(image, a, k, bg[None])[0]
    torch.testing.assert_close(gt[0, 0], torch.tensor([0.15, 0.25, 0.35]))  # F·a + bg·(1 - a)
    torch.testing.assert_close(gt[0, 1], F[0, 0, 1])
    torch.testing.assert_close(gt[1, 0], bg)
    torch.testing.assert_close(gt[1, 1], bg)
    # the former image·(a·k) + bg·(1 - a·k) is off by a(1 - a)(1 - F) = 0.225 on the hair pixel
    former = image * (a * k)[..., None] + bg * (1 - (a * k)[..., None])
    torch.testing.assert_close(former[0, 0, 0] - gt[0, 0], torch.full((3,), 0.225))
    # on white: the export's image where kept, white elsewhere
    white = composite_gt(image, a, k, torch.ones(1, 3))[0]
    torch.testing.assert_close(white[0], image[0, 0])
    torch.testing.assert_close(white[1, 0], torch.ones(3))
    torch.testing.assert_close(white[1, 1], torch.ones(3))


def _ssim_direct(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM as 3DGS reports it, written out independently: a 2-D Gaussian window (11 px, sigma 1.5)
    correlated with each zero-padded channel in float64, the map averaged over the full image.
    a, b [H, W, 3]"""
    x = np.arange(11) - 5.0
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    g /= g.sum()
    window = np.outer(g, g)
    H, W = a.shape[:2]

    def filt(img):  # zero padding, output the image's size
        padded = np.zeros((H + 10, W + 10))
        padded[5:5 + H, 5:5 + W] = img
        out = np.zeros((H, W))
        for i in range(11):
            for j in range(11):
                out += window[i, j] * padded[i:i + H, j:j + W]
        return out

    maps = []
    for c in range(3):
        p, q = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        mp, mq = filt(p), filt(q)
        vp, vq, cov = filt(p * p) - mp ** 2, filt(q * q) - mq ** 2, filt(p * q) - mp * mq
        maps.append((2 * mp * mq + 0.01 ** 2) * (2 * cov + 0.03 ** 2)
                    / ((mp ** 2 + mq ** 2 + 0.01 ** 2) * (vp + vq + 0.03 ** 2)))
    return float(np.mean(maps))


def test_zero_padded_ssim_matches_a_direct_float64_window_and_differs_from_the_valid_one():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 23, 31, 3, generator=gen)
    b = (a + 0.15 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    zero = ssim(a, b, padding="zero").item()
    assert zero == pytest.approx(_ssim_direct(a[0].numpy(), b[0].numpy()), abs=1e-5)
    assert abs(zero - ssim(a, b).item()) > 1e-3  # the training loss's 'valid' border is another figure
    assert ssim(a, a, padding="zero").item() == pytest.approx(1.0, abs=1e-5)


def test_schedules_follow_the_progress_of_the_run():
    assert lr_factor(0.349, "multistep", [0.35, 0.7], 0.33, 0.05) == 1.0
    assert lr_factor(0.35, "multistep", [0.35, 0.7], 0.33, 0.05) == pytest.approx(0.33)
    assert lr_factor(0.999, "multistep", [0.35, 0.7], 0.33, 0.05) == pytest.approx(0.33 ** 2)
    assert lr_factor(0.0, "exponential", [], 0.33, 0.05) == 1.0
    assert lr_factor(1.0, "exponential", [], 0.33, 0.05) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0.0, "cosine", [], 0.33, 0.05)


def test_a_time_limit_takes_over_the_progress_when_it_is_further_along():
    assert progress(50, 100, 1e6, 0.0) == 0.5  # no limit: steps only
    assert progress(50, 100, 30.0, 2.0) == 0.5
    assert progress(50, 100, 90.0, 2.0) == 0.75
    assert progress(10, 100, 600.0, 2.0) == 1.0


def test_checkpoints_keep_the_newest_and_a_truncated_one_is_a_clear_error(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint({"model": {"w": torch.ones(3) * step}, "step": step}, tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000010.pt", "step_00000015.pt"]
    assert not list(tmp_path.glob(".*partial*"))
    path = list_checkpoints(tmp_path)[-1]
    assert load_checkpoint(path)["step"] == 15
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{path.name} is corrupt"):
        load_checkpoint(path)

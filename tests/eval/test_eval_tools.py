import math

import cv2
import pytest
import torch

from lib.dataset.cameras import Camera
from lib.eval.curve import plot_curve, read_curve
from lib.eval.evaluate import orbit_viewmats
from lib.eval.lpips import load_lpips
from lib.models.vgg import VggFeatures, VggUnavailable
from lib.train.losses import ssim
from lib.train.metrics import image_metrics, psnr


def test_psnr_full_frame_and_inside_the_mask():
    gt = torch.ones(20, 20, 3)
    pred = gt.clone()
    pred[:10] -= 0.1  # error only in the top half
    mask = torch.zeros(20, 20)
    mask[:10] = 1
    assert psnr(pred, gt) == pytest.approx(-10 * math.log10(0.01 / 2))
    assert psnr(pred, gt, mask) == pytest.approx(20.0)
    m = image_metrics(pred, gt, mask)
    assert m["ssim"] < 1 and m["l1"] == pytest.approx(0.05)
    # the reported SSIM is the zero-padded one of 3DGS / GaussianAvatars, not the loss's 'valid' one
    assert m["ssim"] == pytest.approx(ssim(pred[None], gt[None], padding="zero").item())
    assert m["ssim"] != pytest.approx(ssim(pred[None], gt[None]).item())


def test_orbit_keeps_the_distance_to_the_centre_and_spans_the_yaw():
    cam = Camera.look_at([0.0, 0.0, 1.0], [0.0, 0.0, 0.0], torch.eye(3), 10, 10)
    centre = torch.tensor([0.0, 0.02, 0.05])
    views = orbit_viewmats(cam.viewmat, centre, 100, 20.0)
    eyes = torch.stack([-v[:3, :3].T @ v[:3, 3] for v in views])
    dist = (eyes - centre).norm(dim=1)
    assert torch.allclose(dist, dist[0].expand_as(dist), atol=1e-5)
    rel = eyes - centre
    yaw = torch.rad2deg(torch.atan2(rel[:, 0], rel[:, 2]))
    assert yaw.max() == pytest.approx(20.0, abs=0.1) and yaw.min() == pytest.approx(-20.0, abs=0.1)
    assert torch.allclose(views[0], cam.viewmat, atol=1e-6)


def test_curve_csv_plots_to_a_png(tmp_path):
    csv = tmp_path / "curve.csv"
    csv.write_text("minutes,step,val_psnr,val_psnr_masked\n0,0,12.0,10.0\n1.5,100,25.0,23.5\n3,200,30.1,28.2\n")
    assert read_curve(csv)["val_psnr"].tolist() == [12.0, 25.0, 30.1]
    img = cv2.imread(str(plot_curve(csv, tmp_path / "curve.png")))
    assert img.shape == (400, 640, 3) and (img != 255).any()


def test_lpips_without_weights_says_why(tmp_path):
    with pytest.raises(VggUnavailable, match="not configured"):
        load_lpips("", "")
    with pytest.raises(VggUnavailable, match="not found"):
        load_lpips(str(tmp_path / "vgg16.pth"), str(tmp_path / "lin.pth"))
    torch.save({"classifier.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(VggUnavailable, match="not a torchvision VGG16"):
        VggFeatures.from_file(tmp_path / "bad.pth", 16)


def test_lpips_loads_torchvision_layout_weights_and_is_zero_for_equal_images(tmp_path):
    torch.manual_seed(0)
    torch.save(VggFeatures(16).state_dict(), tmp_path / "vgg16.pth")  # layout only: random values
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
               tmp_path / "lin.pth")
    lpips = load_lpips(str(tmp_path / "vgg16.pth"), str(tmp_path / "lin.pth"))
    a, b = torch.rand(1, 32, 32, 3), torch.rand(1, 32, 32, 3)
    assert lpips(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert lpips(a, b).item() > 0

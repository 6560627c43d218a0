import math

import numpy as np
import pytest
import torch

from lib.dataset.cameras import Camera, stack_cameras


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_vhap_fields_round_trip_through_opencv_camera():
    rng = np.random.default_rng(0)
    for _ in range(5):
        c2w = np.eye(4)
        c2w[:3, :3] = _random_rotation(rng)
        c2w[:3, 3] = rng.normal(size=3)
        fields = {"transform_matrix": c2w.tolist(), "fl_x": 1234.5, "fl_y": 1230.25, "cx": 270.75,
                  "cy": 390.5, "w": 550, "h": 802}
        back = Camera.from_vhap_fields(**fields).to_vhap_fields()
        np.testing.assert_allclose(back["transform_matrix"], c2w, atol=1e-6)
        for key in ("fl_x", "fl_y", "cx", "cy"):
            assert back[key] == pytest.approx(fields[key], rel=1e-6)
        assert (back["w"], back["h"]) == (550, 802)
        assert back["camera_angle_x"] == pytest.approx(2 * math.atan(550 / (2 * 1234.5)))


def test_opencv_camera_round_trips_through_vhap_fields():
    K = torch.tensor([[100.0, 0.0, 30.0], [0.0, 90.0, 12.0], [0.0, 0.0, 1.0]])
    cam = Camera.look_at((0.4, -0.2, 1.3), (0.0, 0.05, 0.0), K, 64, 48, camera_index=3)
    fields = cam.to_vhap_fields()
    del fields["camera_angle_x"], fields["camera_angle_y"]  # redundant with fl_x, fl_y
    again = Camera.from_vhap_fields(**fields, camera_index=3)
    torch.testing.assert_close(again.viewmat, cam.viewmat, atol=1e-6, rtol=0)
    torch.testing.assert_close(again.K, cam.K)
    assert (again.width, again.height, again.camera_index) == (64, 48, 3)


def test_gl_camera_on_z_axis_gives_hand_computed_viewmat_and_pixel():
    # OpenGL camera at (0, 0, 2) looking down -z (towards the origin), y up; OpenCV principal
    # point (40, 25) in a 80x60 image, so the export stores cy = 60 - 25 = 35.
    c2w = np.eye(4)
    c2w[2, 3] = 2.0
    cam = Camera.from_vhap_fields(c2w, fl_x=100.0, fl_y=100.0, cx=40.0, cy=35.0, w=80, h=60)
    expected_w2c = torch.tensor([[1.0, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 2], [0, 0, 0, 1]])
    torch.testing.assert_close(cam.viewmat, expected_w2c)
    assert cam.K[1, 2] == 25.0
    # World (0.1, 0.2, 0) is (0.1, -0.2, 2) in OpenCV camera space:
    # u = 100 * 0.1 / 2 + 40 = 45, v = 100 * -0.2 / 2 + 25 = 15 (above the centre: world y is up).
    uv, depth = cam.project(torch.tensor([[0.1, 0.2, 0.0]]))
    torch.testing.assert_close(uv, torch.tensor([[45.0, 15.0]]))
    torch.testing.assert_close(depth, torch.tensor([2.0]))
    torch.testing.assert_close(cam.centre, torch.tensor([0.0, 0.0, 2.0]))


def test_look_at_matches_the_equivalent_gl_camera_and_keeps_world_up_up():
    K = torch.tensor([[100.0, 0.0, 40.0], [0.0, 100.0, 30.0], [0.0, 0.0, 1.0]])
    cam = Camera.look_at((0.0, 0.0, 2.0), (0.0, 0.0, 0.0), K, 80, 60)
    c2w = np.eye(4)
    c2w[2, 3] = 2.0
    gl = Camera.from_vhap_fields(c2w, fl_x=100.0, fl_y=100.0, cx=40.0, cy=30.0, w=80, h=60)
    torch.testing.assert_close(cam.viewmat, gl.viewmat)

    orbit = Camera.look_at((1.0, 0.3, 1.5), (0.0, 0.0, 0.0), K, 80, 60)
    uv, depth = orbit.project(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.1, 0.0]]))
    torch.testing.assert_close(uv[0], torch.tensor([40.0, 30.0]), atol=1e-4, rtol=0)
    assert uv[1, 1] < uv[0, 1]  # a point above the target appears higher in the image
    torch.testing.assert_close(orbit.centre, torch.tensor([1.0, 0.3, 1.5]), atol=1e-6, rtol=0)
    assert depth[0] == pytest.approx(math.sqrt(1 + 0.09 + 2.25), rel=1e-6)


def test_look_at_refuses_a_view_direction_parallel_to_up():
    with pytest.raises(ValueError, match="parallel"):
        Camera.look_at((0.0, 2.0, 0.0), (0.0, 0.0, 0.0), torch.eye(3), 8, 8)


def test_resized_scales_intrinsics_like_cv2_inter_area():
    K = torch.tensor([[100.0, 0.0, 31.0], [0.0, 101.0, 22.0], [0.0, 0.0, 1.0]])
    cam = Camera(torch.eye(4), K, 64, 48)
    half = cam.resized(2)
    assert (half.width, half.height) == (32, 24)
    torch.testing.assert_close(half.K, torch.tensor([[50.0, 0.0, 15.5], [0.0, 50.5, 11.0], [0.0, 0.0, 1.0]]))

    # 550 // 4 = 137 columns stretch the full width: factor 137 / 550, not 1 / 4.
    odd = Camera(torch.eye(4), K, 550, 802).resized(4)
    assert (odd.width, odd.height) == (137, 200)
    assert odd.K[0, 0].item() == pytest.approx(100.0 * 137 / 550, rel=1e-6)
    assert odd.K[1, 2].item() == pytest.approx(22.0 * 200 / 802, rel=1e-6)
    assert cam.resized(1) is cam
    with pytest.raises(ValueError):
        cam.resized(0)


def test_stack_cameras_batches_viewmats_and_intrinsics():
    K = torch.tensor([[100.0, 0.0, 32.0], [0.0, 100.0, 24.0], [0.0, 0.0, 1.0]])
    cams = [Camera.look_at((x, 0.0, 2.0), (0.0, 0.0, 0.0), K, 64, 48, camera_index=i)
            for i, x in enumerate((-0.5, 0.0, 0.5))]
    viewmats, Ks = stack_cameras(cams, dtype=torch.float64)
    assert viewmats.shape == (3, 4, 4) and Ks.shape == (3, 3, 3)
    assert viewmats.dtype == torch.float64
    torch.testing.assert_close(viewmats[2], cams[2].viewmat.double())
    with pytest.raises(ValueError, match="sizes"):
        stack_cameras([cams[0], cams[1].resized(2)])

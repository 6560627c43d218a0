"""Component sweeps: renders along one component, PNG strips and MP4 videos."""
import cv2
import imageio.v2 as imageio
import torch

from lib.dataset.cameras import Camera
from lib.viewer import sweeps
from lib.viewer.sweeps import render_sweep, sweep_targets, write_sweeps

WHITE = torch.ones(3)
IDENTITY = (torch.eye(3)[None], torch.zeros(1, 3))


def small_camera(width=64, height=48) -> Camera:
    K = torch.tensor([[110.0, 0, width / 2], [0, 110.0, height / 2], [0, 0, 1]])
    return Camera.look_at((0.0, 0.02, 0.6), (0.0, 0.02, 0.0), K, width, height)


def test_sweep_targets_name_the_first_components_of_every_attribute(small_head_gem):
    targets = sweep_targets(small_head_gem, 2)
    assert [stem for _, _, stem in targets] == [
        "positions_00", "positions_01", "rotations_00", "rotations_01", "scales_00", "scales_01",
        "opacities_00", "opacities_01"]


def test_a_sweep_moves_the_head_away_from_its_mean_image(small_head_gem):
    images = render_sweep(small_head_gem, "positions", 0, torch.tensor([-3.0, 0.0, 3.0]), small_camera(), *IDENTITY, WHITE)
    assert images.shape == (3, 48, 64, 3)
    mean = render_sweep(small_head_gem, "positions", 1, torch.tensor([0.0]), small_camera(), *IDENTITY, WHITE)[0]
    assert torch.allclose(images[1], mean, atol=1e-6)  # coefficient 0 is the mean, whatever the component
    assert (images[0] - images[1]).abs().mean() > 1e-3 and (images[2] - images[1]).abs().mean() > 1e-3
    assert (images[1] < 0.9).any()  # the head is in view, not only background


def test_write_sweeps_writes_a_strip_and_a_video_per_component(small_head_gem, tmp_path):
    written = write_sweeps(small_head_gem, small_camera(63, 47), *IDENTITY, tmp_path, components=1, sigma=3.0,
                           strip_steps=3, video_frames=4, fps=10, background=WHITE, log=lambda *a: None)
    assert len(written) == 8 and all(p.is_file() for p in written)
    strip = cv2.imread(str(tmp_path / "positions_00.png"))
    assert strip.shape == (47, 3 * 63, 3)
    frames = imageio.mimread(tmp_path / "scales_00.mp4")
    assert len(frames) == 4 and frames[0].shape == (48, 64, 3)  # odd sizes padded to even


def test_sweep_videos_are_encoded_while_rendering(small_head_gem, tmp_path, render_log):
    render_log.watch(sweeps, "render_gem")
    write_sweeps(small_head_gem, small_camera(), *IDENTITY, tmp_path, components=1, sigma=3.0, strip_steps=3,
                 video_frames=8, fps=10, background=WHITE, log=lambda *a: None)
    assert render_log.frames("positions_00.mp4") == 8
    assert render_log.renders_in_a_row() <= 3 + 1  # a strip's tiles, then one video frame at a time

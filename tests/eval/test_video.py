"""Videos and PNGs of the evaluations, written frame by frame and atomically."""
import imageio.v2 as imageio
import numpy as np
import pytest

from lib.eval.video import VideoWriter, write_png


def _frame(i: int, h: int = 15, w: int = 21) -> np.ndarray:
    return np.full((h, w, 3), 20 * i, dtype=np.uint8)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


def test_video_of_odd_sized_frames_reads_back_with_every_frame_padded_to_even(tmp_path):
    with VideoWriter(tmp_path / "v.mp4", 25) as video:
        for i in range(5):
            video.append(_frame(i))
            assert not (tmp_path / "v.mp4").exists()  # only the partial file while frames come in
    assert video.frames == 5
    frames = imageio.mimread(tmp_path / "v.mp4")
    assert len(frames) == 5 and frames[0].shape == (16, 22, 3)
    assert abs(int(frames[3][:15, :21].mean()) - 60) <= 3  # H.264 is lossy, but not that lossy
    assert _leftovers(tmp_path) == []


def test_a_failed_video_leaves_no_partial_file_and_keeps_the_previous_one(tmp_path):
    with VideoWriter(tmp_path / "v.mp4", 25) as video:
        video.append(_frame(1))
    before = (tmp_path / "v.mp4").read_bytes()
    with pytest.raises(RuntimeError, match="render failed"):
        with VideoWriter(tmp_path / "v.mp4", 25) as video:
            video.append(_frame(2))
            video.append(_frame(3))
            raise RuntimeError("render failed")
    assert _leftovers(tmp_path) == []
    assert (tmp_path / "v.mp4").read_bytes() == before


def test_a_video_without_frames_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="no frame was appended to the video .*v.mp4"):
        with VideoWriter(tmp_path / "v.mp4", 25):
            pass
    assert list(tmp_path.iterdir()) == []


def test_png_is_written_atomically_and_reads_back(tmp_path):
    rgb = np.zeros((5, 7, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    write_png(tmp_path / "sub" / "a.png", rgb)
    assert (imageio.imread(tmp_path / "sub" / "a.png")[..., :3] == rgb).all()
    assert _leftovers(tmp_path / "sub") == []

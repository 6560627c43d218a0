"""The web viewer, driven by headless Chromium (Debian's chromium through Python playwright).

Chromium renders viser's WebGL splats through SwiftShader (software), so no GPU is needed; CI
installs chromium in .ci/run. The test is skipped only where /usr/bin/chromium is missing.
"""
import io
import socket
import time
from pathlib import Path

import numpy as np
import pytest

import torch

from lib.gaussians.ply import read_ply
from lib.viewer.web import GemViewer

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 900, "height": 600}
# The scene's middle, left of the GUI panel (which sits at the right edge from x ~ 565).
CENTRE = (slice(150, 450), slice(250, 550))

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="/usr/bin/chromium not installed (apt-get install chromium; .ci/run does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot(page) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(np.int16)


def head_pixels(image: np.ndarray) -> int:
    """Pixels of the scene's middle that differ from the background (taken at a corner of it)."""
    centre = image[CENTRE]
    background = image[CENTRE][0, 0]
    return int((np.abs(centre - background).sum(-1) > 30).sum())


def changed_pixels(a: np.ndarray, b: np.ndarray) -> int:
    return int((np.abs(a[CENTRE] - b[CENTRE]).sum(-1) > 30).sum())


def wait_for(condition, timeout: float = 15.0, step: float = 0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


@needs_chromium
def test_web_viewer_shows_the_head_and_a_slider_moves_it(head_gem):
    from playwright.sync_api import sync_playwright

    viewer = GemViewer(head_gem, port=free_port(), sliders=3)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(f"http://127.0.0.1:{viewer.port}")
                page.get_by_text("Connected").first.wait_for(timeout=20_000)
                assert wait_for(lambda: head_pixels(screenshot(page)) > 5000), "no head in the middle of the canvas"
                time.sleep(0.5)  # let the splats' sort settle before the reference image
                before = screenshot(page)

                slider = page.locator("[role=slider]").nth(1)  # after Playback's frame: positions 0
                slider.focus()
                page.keyboard.press("End")  # to +sigma
                assert wait_for(lambda: float(viewer.coefficients["positions"][0, 0]) == 3.0, timeout=5)
                changed = wait_for(lambda: changed_pixels(screenshot(page), before) > 500)
                assert changed, "moving the slider did not change the rendered head"
            finally:
                browser.close()
    finally:
        viewer.stop()


def test_export_writes_the_viewers_current_gaussians_to_ply(head_gem, tmp_path):
    viewer = GemViewer(head_gem, port=free_port(), sliders=2, export_dir=tmp_path)
    try:
        viewer.sliders[("positions", 0)].value = 2.0  # as if moved in the browser
        viewer.show_frame(3)  # playback position: every coefficient from fitted frame 3
        expected = head_gem.reconstruct({a: c[3:4] for a, c in head_gem.coefficients.items()})
        assert torch.allclose(viewer.coefficients["positions"], head_gem.coefficients["positions"][3:4])
        assert viewer.sliders[("positions", 0)].value == pytest.approx(float(head_gem.coefficients["positions"][3, 0]))
        path = viewer.export_ply()
    finally:
        viewer.stop()
    written = read_ply(path)
    assert torch.allclose(written.means, expected.means[0], atol=1e-7)
    assert torch.allclose(written.scales, expected.scales[0], rtol=1e-5)
    assert torch.allclose(written.opacities, expected.opacities[0], atol=1e-5)
    assert torch.allclose(written.colors, expected.colors[0], atol=1e-5)


def test_a_taken_port_is_an_error_naming_it_not_a_silent_move(head_gem):
    from lib.viewer.web import ViewerError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ViewerError, match=f"port {port} on 127.0.0.1 is in use"):
            GemViewer(head_gem, port=port, sliders=1)

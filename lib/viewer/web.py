"""Interactive GEM viewer in the browser (viser): a slider per component, an orbit camera, playback
of the fitted sequence, and export of the current Gaussians to PLY.

The server evaluates the coefficients into Gaussians and sends them; the browser renders them with
viser's WebGL Gaussian splatting, so no server GPU is needed. The head is shown in GEM space (the
head's own frame, FLAME axes: y up, face towards +z), scaled by ``SCENE_SCALE``: viser sends
covariances as float16, whose normal range starts at 6e-5, and a millimetre Gaussian's variance
in metres (1e-6) would lose its precision.

    viewer = GemViewer(model, port=8080)   # serves http://127.0.0.1:8080 until viewer.stop()
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch
import viser

from lib.errors import ProjectError
from lib.gaussians.ply import write_ply
from lib.geometry.rotations import quat_to_matrix
from lib.models.gem import ATTRIBUTES, GaussianEigenModel, GaussianSet

SCENE_SCALE = 10.0  # viewer units per metre (see the module docstring)


def splat_arrays(g: GaussianSet, scale: float = SCENE_SCALE) -> dict[str, np.ndarray]:
    """One set (batch 1) as viser's splat arrays: centers [N, 3], covariances [N, 3, 3], rgbs [N, 3],
    opacities [N, 1]; lengths multiplied by ``scale``."""
    R = quat_to_matrix(g.quats[0].float())
    M = R * (g.scales[0].float() * scale)[:, None, :]  # R diag(s)
    return {
        "centers": (g.means[0].float() * scale).cpu().numpy(),
        "covariances": (M @ M.transpose(-1, -2)).cpu().numpy(),
        "rgbs": g.colors[0].float().clamp(0, 1).cpu().numpy(),
        "opacities": g.opacities[0].float().clamp(0, 1)[:, None].cpu().numpy(),
    }


class ViewerError(ProjectError):
    """The web viewer cannot start as configured (e.g. its port is taken)."""


class GemViewer:
    """A viser server showing one GEM; GUI callbacks edit ``self.coefficients`` and a worker thread
    pushes the re-evaluated Gaussians to the browsers (the newest state wins while sliders move)."""

    def __init__(self, model: GaussianEigenModel, host: str = "127.0.0.1", port: int = 8080, sliders: int = 10,
                 sigma: float = 3.0, fps: int = 25, export_dir: Path | None = None,
                 camera_position: np.ndarray | None = None, camera_fov: float | None = None):
        self.model = model
        self.fps = fps
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.coefficients = model.zero_coefficients()
        self.sequence = model.coefficients  # attribute -> [T, K], the fitted frames
        self._lock = threading.Lock()
        self._dirty = True
        self._running = True

        self.server = viser.ViserServer(host=host, port=port, verbose=False)
        if port != 0 and self.server.get_port() != port:  # viser silently moves on to the next free port
            taken = self.server.get_port()
            self.server.stop()
            raise ViewerError(f"port {port} on {host} is in use (another viewer or program; port {taken} was "
                              f"free); stop that program or choose another port, e.g. viewer.port={taken}")
        self.server.scene.set_up_direction("+y")
        centre = model.reconstruct(model.zero_coefficients()).means[0].mean(0).cpu().numpy() * SCENE_SCALE
        eye = (np.asarray(camera_position, dtype=np.float64) * SCENE_SCALE if camera_position is not None
               else centre + np.array([0.0, 0.0, 6.0]))
        self.server.initial_camera.position = tuple(eye)
        self.server.initial_camera.look_at = tuple(centre)
        self.server.initial_camera.up = (0.0, 1.0, 0.0)
        if camera_fov is not None:
            self.server.initial_camera.fov = camera_fov
        self._build_gui(sliders, sigma)
        self._worker = threading.Thread(target=self._loop, name="gem-viewer", daemon=True)
        self._worker.start()

    @property
    def port(self) -> int:
        return self.server.get_port()

    # ---- GUI ----

    def _build_gui(self, sliders: int, sigma: float) -> None:
        gui = self.server.gui
        T = next(iter(self.sequence.values())).shape[0]
        gui.add_markdown(f"**GEM** · {self.model.n_gaussians} Gaussians · parts: {', '.join(self.model.parts)}")
        with gui.add_folder("Playback"):
            self.play = gui.add_checkbox("Play", False)
            self.frame = gui.add_slider("Frame", 0, max(T - 1, 0), 1, 0)
            self.frame.on_update(lambda _: self.show_frame(int(self.frame.value)))
            gui.add_button("Mean (all zero)").on_click(lambda _: self.reset())
            if self.export_dir is not None:
                self.export_button = gui.add_button("Export PLY")
                self.export_button.on_click(lambda _: self.export_ply())
                self.export_status = gui.add_markdown("")
        self.sliders: dict[tuple[str, int], object] = {}
        for attr in ATTRIBUTES:
            with gui.add_folder(attr.capitalize(), expand_by_default=attr == "positions"):
                for index, (part, k) in enumerate(self.model.component_labels(attr)):
                    if k >= sliders:
                        continue
                    label = f"{k}" if part == "all" else f"{part} {k}"
                    handle = gui.add_slider(label, -sigma, sigma, 0.01, 0.0)
                    handle.on_update(self._slider_callback(attr, index, handle))
                    self.sliders[(attr, index)] = handle

    def _slider_callback(self, attr: str, index: int, handle):
        def update(_):
            with self._lock:
                self.coefficients[attr][0, index] = float(handle.value)
                self._dirty = True
        return update

    def _sync_sliders(self) -> None:
        """Move the sliders to the current coefficients (their callbacks write back the same values)."""
        for (attr, index), handle in self.sliders.items():
            handle.value = float(self.coefficients[attr][0, index])

    # ---- state ----

    def show_frame(self, i: int) -> None:
        """Coefficients of the i-th fitted frame."""
        with self._lock:
            for attr, seq in self.sequence.items():
                self.coefficients[attr] = seq[i:i + 1].to(self.coefficients[attr]).clone()
            self._dirty = True
        self._sync_sliders()

    def reset(self) -> None:
        with self._lock:
            self.coefficients = self.model.zero_coefficients()
            self._dirty = True
        self._sync_sliders()

    def gaussians(self) -> GaussianSet:
        """The current state's Gaussians (GEM space, metres)."""
        with self._lock:
            coefficients = {a: c.clone() for a, c in self.coefficients.items()}
        with torch.no_grad():
            return self.model.reconstruct(coefficients)

    def export_ply(self) -> Path:
        """Write the current Gaussians (GEM space, metres) to ``export_dir/gem_<time>.ply``."""
        g = self.gaussians()
        path = self.export_dir / f"gem_{time.strftime('%Y%m%d-%H%M%S')}.ply"
        # The file stores log(scale) and logit(opacity): keep both finite at the clamped ends.
        write_ply(path, g.means[0], g.quats[0], g.scales[0].clamp_min(1e-9), g.opacities[0].clamp(1e-6, 1 - 1e-6),
                  g.colors[0])
        self.export_status.content = f"saved `{path}`"
        return path

    # ---- worker ----

    def _loop(self) -> None:
        T = next(iter(self.sequence.values())).shape[0]
        while self._running:
            start = time.perf_counter()
            if self.play.value and T > 1:
                self.frame.value = (int(self.frame.value) + 1) % T  # its callback loads the frame
            if self._dirty:
                with self._lock:
                    self._dirty = False
                self.server.scene.add_gaussian_splats("/gem", **splat_arrays(self.gaussians()))
            time.sleep(max(0.0, 1.0 / self.fps - (time.perf_counter() - start)))

    def stop(self) -> None:
        self._running = False
        self._worker.join(timeout=5.0)
        self.server.stop()


def serve(model: GaussianEigenModel, host: str, port: int, sliders: int, sigma: float, fps: int,
          export_dir: Path, camera_position: np.ndarray | None = None, camera_fov: float | None = None,
          log=print) -> None:
    """Run the viewer until Ctrl-C. camera_position: GEM space, metres; camera_fov: vertical, radians."""
    viewer = GemViewer(model, host, port, sliders, sigma, fps, export_dir, camera_position, camera_fov)
    log(f"GEM viewer on http://{host}:{viewer.port} (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        viewer.stop()

"""Pinhole cameras in the project's one convention, and the conversion from VHAP's.

Convention inside the code (OpenCV, what gsplat takes):
    viewmat  world-to-camera 4x4; camera axes x right, y down, z forward (into the scene).
    K        3x3 intrinsics in pixels: u = fx * x / z + cx, v = fy * y / z + cy.
    Pixel (row i, col j) covers [j, j+1] x [i, i+1], so its centre is (j + 0.5, i + 0.5) and the
    image spans [0, W] x [0, H]. No half-pixel offsets appear anywhere below because of this.

VHAP / GaussianAvatars export convention (what ``transforms_*.json`` stores):
    transform_matrix  camera-to-world 4x4 with OpenGL camera axes (x right, y up, z backwards).
    fl_x, fl_y, cx    as in the OpenCV K.
    cy                H - cy_opencv (the principal point measured from the image's bottom edge).
    w, h              image size; camera_angle_x = 2 atan(w / (2 fl_x)) (redundant).

How this was established (read in ShenhanQian/VHAP, not copied):
  * ``vhap/util/camera.py::convert_camera_convention`` ("opencv->opengl", the default of
    ``DataConfig.camera_convention_conversion`` in ``vhap/config/base.py``) negates the y and z
    columns of the camera-to-world rotation and sets ``K[1, 2] = H - K[1, 2]``. cx is left as is.
    The flip is ``H - cy``, not ``H - 1 - cy``: VHAP treats the image as the continuous extent
    [0, H], i.e. pixel centres at i + 0.5, the same convention as gsplat. Its nvdiffrast projection
    (``vhap/util/render_nvdiffrast.py::projection_from_intrinsics``, NDC x = 2 u / w - 1 with
    nvdiffrast sampling pixel centres at NDC 2 (j + 0.5) / w - 1) agrees.
  * ``vhap/data/video_dataset.py::apply_scale_factor`` scales K[:2] by the image scale with no
    offset, which is exact only in this edge-origin convention.
  * ``vhap/export_as_nerf_dataset.py`` writes the converted K entries unchanged as fl_x, fl_y, cx,
    cy and the camera-to-world matrix as ``transform_matrix``; it later left-multiplies that matrix
    by a translation that moves the mean FLAME translation to the origin (still camera-to-world).
  * GaussianAvatars (``scene/dataset_readers.py``) negates the same two columns to get OpenCV
    axes, then inverts; it reads only camera_angle_x and assumes a centred principal point.
So GL -> CV is: negate columns 1 and 2 of the rotation, invert the rigid transform, cy -> h - cy.
No 0.5-pixel shift is involved in either direction.

Downsampling: ``Camera.resized(ds)`` describes the image ``cv2.resize(img, (W // ds, H // ds),
interpolation=cv2.INTER_AREA)``. That call maps the full extent [0, W] onto [0, W // ds], so
in the edge-origin convention K's first row scales by exactly (W // ds) / W and its second row by
(H // ds) / H: 1 / ds when ds divides the size, slightly more otherwise (550 // 4 = 137 columns
stretch 550 by 0.2491, not 0.25, which would be half a pixel off at the far edge).

Tensors are float32 (what every consumer renders with); conversions are computed in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

# Negating the y and z camera axes turns OpenGL camera axes into OpenCV ones and back.
_GL_TO_CV_AXES = np.diag([1.0, -1.0, -1.0, 1.0])


def _rigid_inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 rotation + translation, without a general matrix inverse."""
    out = np.eye(4)
    out[:3, :3] = m[:3, :3].T
    out[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return out


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields have no truth value; compare by identity
class Camera:
    """One calibrated pinhole camera, OpenCV convention (see the module docstring)."""

    viewmat: Tensor  # [4, 4] world-to-camera, float32
    K: Tensor  # [3, 3] pixels, float32
    width: int
    height: int
    camera_index: int = -1  # the export's camera index; -1 for cameras made in code

    @classmethod
    def from_vhap_fields(cls, transform_matrix, fl_x: float, fl_y: float, cx: float, cy: float,
                         w: int, h: int, camera_index: int = -1) -> "Camera":
        """From an export frame's fields: OpenGL camera-to-world, cy measured from the bottom."""
        c2w_gl = np.asarray(transform_matrix, dtype=np.float64).reshape(4, 4)
        w2c_cv = _rigid_inverse(c2w_gl @ _GL_TO_CV_AXES)
        K = np.array([[fl_x, 0.0, cx], [0.0, fl_y, h - cy], [0.0, 0.0, 1.0]], dtype=np.float64)
        return cls(torch.as_tensor(w2c_cv, dtype=torch.float32), torch.as_tensor(K, dtype=torch.float32),
                   int(w), int(h), int(camera_index))

    def to_vhap_fields(self) -> dict:
        """The export's camera fields (plain Python numbers), inverse of ``from_vhap_fields``."""
        w2c_cv = self.viewmat.detach().cpu().double().numpy()
        c2w_gl = _rigid_inverse(w2c_cv) @ _GL_TO_CV_AXES
        K = self.K.detach().cpu().double().numpy()
        fl_x, fl_y = float(K[0, 0]), float(K[1, 1])
        return {
            "transform_matrix": c2w_gl.tolist(),
            "fl_x": fl_x,
            "fl_y": fl_y,
            "cx": float(K[0, 2]),
            "cy": float(self.height - K[1, 2]),
            "w": self.width,
            "h": self.height,
            "camera_angle_x": 2.0 * math.atan(self.width / (2.0 * fl_x)),
            "camera_angle_y": 2.0 * math.atan(self.height / (2.0 * fl_y)),
        }

    @classmethod
    def look_at(cls, eye, target, K: Tensor, width: int, height: int, up=(0.0, 1.0, 0.0),
                camera_index: int = -1) -> "Camera":
        """A camera at ``eye`` looking at ``target``, image "up" towards world ``up`` (y down).

        eye, target, up: [3] world points / direction; K: [3, 3].
        """
        eye, target, up = (np.asarray(a, dtype=np.float64) for a in (eye, target, up))
        forward = target - eye
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, up)
        norm = np.linalg.norm(right)
        if norm < 1e-9:
            raise ValueError(f"look_at: viewing direction {forward} is parallel to up {up}; choose another up")
        right /= norm
        down = np.cross(forward, right)
        c2w = np.eye(4)
        c2w[:3, :3] = np.stack([right, down, forward], axis=1)
        c2w[:3, 3] = eye
        return cls(torch.as_tensor(_rigid_inverse(c2w), dtype=torch.float32),
                   torch.as_tensor(K, dtype=torch.float32).clone(), int(width), int(height), camera_index)

    def resized(self, ds_rate: int) -> "Camera":
        """The camera of the image downsampled by ``ds_rate`` to (W // ds, H // ds) with INTER_AREA."""
        if int(ds_rate) != ds_rate or ds_rate < 1:
            raise ValueError(f"ds_rate must be a positive integer, got {ds_rate!r}")
        if ds_rate == 1:
            return self
        width, height = self.width // ds_rate, self.height // ds_rate
        if width < 1 or height < 1:
            raise ValueError(f"ds_rate {ds_rate} leaves no pixels of a {self.width}x{self.height} image")
        scale = torch.tensor([[width / self.width], [height / self.height], [1.0]], dtype=self.K.dtype)
        return replace(self, K=self.K * scale, width=width, height=height)

    @property
    def centre(self) -> Tensor:
        """Camera centre in world coordinates. -> [3]"""
        R, t = self.viewmat[:3, :3], self.viewmat[:3, 3]
        return -R.T @ t

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """World points to image coordinates (pixel (j, i) centre at (j+0.5, i+0.5)) and depth.

        points: [N, 3] -> (uv [N, 2], depth [N])
        """
        cam = points @ self.viewmat[:3, :3].T.to(points) + self.viewmat[:3, 3].to(points)
        depth = cam[:, 2]
        uv = (cam @ self.K.T.to(points))[:, :2] / depth[:, None]
        return uv, depth


def stack_cameras(cameras: list[Camera], device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Batch cameras of one image size for rendering. -> (viewmats [C, 4, 4], Ks [C, 3, 3])"""
    if not cameras:
        raise ValueError("stack_cameras needs at least one camera")
    sizes = {(c.width, c.height) for c in cameras}
    if len(sizes) > 1:
        # One render call has one image size; mixing sizes would mis-scale some K silently.
        raise ValueError(f"stack_cameras got cameras of different image sizes (W, H) {sorted(sizes)}")
    viewmats = torch.stack([c.viewmat for c in cameras]).to(device=device, dtype=dtype)
    Ks = torch.stack([c.K for c in cameras]).to(device=device, dtype=dtype)
    return viewmats, Ks

"""Alpha masks without neck and torso, and mouth masks, rendered from the tracked FLAME mesh.

The avatar models the head (with its hair) but not the neck or the body, so its training target is
the export's foreground mask with the neck and everything below it removed. The tracked mesh
alone cannot give that mask: hair stands out of it by centimetres. The rule, per pixel:

    alpha = fg_mask * keep,   keep = the nearest tracked face there is a head (non-neck) face
                                     or: no tracked face there and the pixel lies above the cut

  * neck faces: faces whose three vertices are all in FLAME_masks' 'neck' region. Pixels whose
    visible tracked face is a neck face are removed, whatever the images show there.
  * the cut: the plane through the lowest vertex outside 'neck' and 'boundary' (the chin),
    perpendicular to the head's up axis (the posed neck joint's y axis, so the cut follows
    the head). A pixel off the tracked mesh is lifted onto its ray at the depth of the head's
    centroid and kept if that point lies above the plane. Hair (above the chin line) is kept;
    torso, shoulders and any neck outside the tracked silhouette (below it) are removed.
  Limits: hair falling below the chin line (long hair on the shoulders) is removed, and hair
  seen in front of tracked neck faces goes with them.

mouth mask = pixels whose visible tracked face is a lips or mouth face (all three vertices in
'lips' or in 'mouth' where the regions file has it), dilated by ``MOUTH_DILATION`` of the image
height: the training loss weights this region up.

Masks are uint8 PNGs (0-255) at the export's native size, written next to each sequence's
``images/`` folder (``mask_paths``, the one place that names them); a frame whose two masks
exist is skipped, and every file is written to a temporary name and renamed, so an interrupted
run leaves no partial file.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from lib.atomic import write_bytes
from lib.dataset.cameras import Camera, stack_cameras
from lib.dataset.vhap import Frame, VhapExport
from lib.flame.model import FlameFormatError, FlameModel
from lib.geometry.rasterize import rasterize_camera
from lib.lock import locked, remove_partials

ALPHA_DIR, MOUTH_DIR = "alpha_masks", "mouth_masks"
MOUTH_DILATION = 0.01  # of the image height, at least one pixel
PIXELS_PER_CALL = 4_000_000  # images rasterized together, bounding memory (about 200 bytes per pixel)


@dataclass(frozen=True)
class MaskPaths:
    alpha: Path
    mouth: Path


def mask_paths(image_path: str | Path) -> MaskPaths:
    """Where the masks of the image at `image_path` (``<seq>/images/<name>``) live:
    ``<seq>/alpha_masks/<name>`` and ``<seq>/mouth_masks/<name>``."""
    image_path = Path(image_path)
    folder = image_path.parent.parent
    return MaskPaths(folder / ALPHA_DIR / image_path.name, folder / MOUTH_DIR / image_path.name)


def region_faces(faces: Tensor, vertices: np.ndarray) -> Tensor:
    """Faces [F, 3] with all three corners among `vertices` (indices). -> [F] bool"""
    member = torch.zeros(int(faces.max()) + 1, dtype=torch.bool)
    vertices = np.asarray(vertices, dtype=np.int64)
    member[torch.as_tensor(vertices[vertices < len(member)])] = True
    return member[faces].all(dim=1)


@dataclass(frozen=True)
class MaskRegions:
    """What the masks need from FLAME_masks, as face sets of the model."""

    neck_faces: Tensor  # [F] bool
    mouth_faces: Tensor  # [F] bool
    head_vertices: Tensor  # [V] bool, outside neck and boundary (the cut passes through their lowest)

    @classmethod
    def from_masks(cls, faces: Tensor, n_verts: int, masks: dict) -> "MaskRegions":
        for name in ("neck", "lips"):
            if name not in masks:
                raise FlameFormatError(f"the FLAME masks file has no '{name}' region (it has {sorted(masks)}); "
                               "use FLAME's FLAME_masks.pkl or the synthetic head's")
        mouth = region_faces(faces, masks["lips"])
        if "mouth" in masks:
            mouth |= region_faces(faces, masks["mouth"])
        head = torch.ones(n_verts, dtype=torch.bool)
        for name in ("neck", "boundary"):  # FLAME's 'boundary' is the neck's open bottom rim
            below = np.asarray(masks.get(name, []), dtype=np.int64)
            head[torch.as_tensor(below[below < n_verts])] = False
        return cls(region_faces(faces, masks["neck"]), mouth, head)


def cut_plane(verts: Tensor, joint_transforms: Tensor, head_vertices: Tensor) -> tuple[Tensor, Tensor]:
    """The neck cut of one posed mesh: (point [3], unit up normal [3]).

    verts [V, 3]; joint_transforms [J, 4, 4] (joint 1 = neck); head_vertices [V] bool.
    """
    up = joint_transforms[1, :3, 1]
    height = verts[head_vertices] @ up
    return verts[head_vertices][height.argmin()], up / up.norm()


def above_cut(cameras: list[Camera], anchor: Tensor, point: Tensor, up: Tensor) -> Tensor:
    """Whether each pixel's ray, lifted to the depth of `anchor` [3] (world), lies above the
    plane (point [3], up [3]). Cameras share one image size. -> [C, H, W] bool"""
    viewmats, Ks = stack_cameras(cameras)
    H, W = cameras[0].height, cameras[0].width
    j = torch.arange(W, dtype=torch.float32) + 0.5
    i = torch.arange(H, dtype=torch.float32) + 0.5
    pix = torch.stack([j[None].expand(H, W), i[:, None].expand(H, W), torch.ones(H, W)], dim=-1)  # [H, W, 3]
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    depth = (R @ anchor + t)[:, 2]  # [C]
    rays = pix[None] @ torch.linalg.inv(Ks).transpose(-1, -2)[:, None]  # [C, H, W, 3], z = 1
    cam_points = rays * depth[:, None, None, None]
    world = (cam_points - t[:, None, None]) @ R[:, None]  # R^T (x - t), row-vector form
    return (world - point) @ up > 0


def frame_masks(verts: Tensor, joint_transforms: Tensor, faces: Tensor, regions: MaskRegions,
                cameras: list[Camera], fg: Tensor) -> tuple[Tensor, Tensor]:
    """Alpha and mouth masks of one timestep in cameras of one image size.

    verts [V, 3], joint_transforms [J, 4, 4] (the tracked mesh); fg [C, H, W] in [0, 1].
    -> (alpha [C, H, W] in [0, 1], mouth [C, H, W] bool)
    """
    viewmats, Ks = stack_cameras(cameras)
    H, W = cameras[0].height, cameras[0].width
    face = rasterize_camera(verts[None], faces, viewmats, Ks, H, W).pix_to_face
    on_mesh = face >= 0
    visible = face.clamp(min=0)
    point, up = cut_plane(verts, joint_transforms, regions.head_vertices)
    off_mesh_kept = ~on_mesh & above_cut(cameras, verts.mean(0), point, up)
    keep = (on_mesh & ~regions.neck_faces[visible]) | off_mesh_kept
    mouth = on_mesh & regions.mouth_faces[visible]
    radius = max(1, round(MOUTH_DILATION * H))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    mouth = torch.stack([torch.from_numpy(cv2.dilate(m.numpy().astype(np.uint8), kernel)) > 0 for m in mouth])
    return fg * keep, mouth


def _write_atomic(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode a mask for {path}")
    write_bytes(path, data.tobytes())


def render_masks(export: VhapExport, model: FlameModel, masks: dict, log=print) -> dict:
    """Write the alpha and mouth masks of every frame of the export's three splits.

    `export` should be read at ds_rate 1 (masks are written at the images' size). One process at a
    time per export (``.masks.lock`` in its folder); the partial masks of a killed run are removed
    first. -> a summary dict: frames, written, skipped, seconds, kept (mean alpha / mean fg over
    written frames)
    """
    with locked(export.root, "the masks of the export", export.root / ".masks.lock", clean=False):
        return _render_masks(export, model, masks, log)


def _render_masks(export: VhapExport, model: FlameModel, masks: dict, log) -> dict:
    start = time.time()
    faces = model.faces
    regions = MaskRegions.from_masks(faces, model.v_template.shape[0], masks)
    frames: dict[Path, Frame] = {}
    for split in ("train", "val", "test"):
        for frame in export.split(split):
            frames.setdefault(frame.image_path, frame)
    folders = {p.parent for image in frames for p in (mask_paths(image).alpha, mask_paths(image).mouth)}
    for folder in folders:
        if folder.is_dir():
            remove_partials(folder)
    todo: dict[tuple, list[Frame]] = defaultdict(list)
    for frame in frames.values():
        paths = mask_paths(frame.image_path)
        if not (paths.alpha.is_file() and paths.mouth.is_file()):
            key = (frame.timestep_index, frame.flame_param_path, frame.camera.width, frame.camera.height)
            todo[key].append(frame)

    fg_total = alpha_total = 0.0
    written = 0
    for (_, _, width, height), group in sorted(todo.items(), key=lambda kv: kv[0][:1] + kv[0][2:]):
        with torch.no_grad():
            verts, joints = model(**export.load_flame(group[0]))
        per_call = max(1, PIXELS_PER_CALL // (width * height))
        for i in range(0, len(group), per_call):
            chunk = group[i:i + per_call]
            fg = torch.stack([export.load_mask(f) for f in chunk])
            alpha, mouth = frame_masks(verts[0], joints[0], faces, regions, [f.camera for f in chunk], fg)
            for frame, a, m in zip(chunk, alpha, mouth):
                paths = mask_paths(frame.image_path)
                _write_atomic(paths.alpha, (a * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).numpy())
                _write_atomic(paths.mouth, m.to(torch.uint8).numpy() * 255)
            fg_total += float(fg.sum())
            alpha_total += float(alpha.sum())
            written += len(chunk)
    summary = {"frames": len(frames), "written": written, "skipped": len(frames) - written,
               "seconds": round(time.time() - start, 1),
               "kept": round(alpha_total / fg_total, 3) if fg_total > 0 else None}
    log(f"render_masks: {summary['frames']} frames, {written} written, {summary['skipped']} already there, "
        f"{summary['seconds']} s" + (f"; alpha keeps {summary['kept']:.1%} of the foreground" if written else ""))
    return summary

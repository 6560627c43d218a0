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

Masks are uint8 PNGs (0-255) at the export's native size, written outside the dataset (which may be
a read-only mount) into the export's masks folder (``VhapExport.masks_dir``: ``data.masks_dir``, by
default ``<actor.experiments_dir>/<actor.name>/masks/``, shared by the actor's runs since masks depend
only on the data and FLAME):

    <masks_dir>/<sequence>/alpha_masks/<name>     <sequence>/: the folder holding the image's folder,
    <masks_dir>/<sequence>/mouth_masks/<name>     relative to the export's parent folder

``mask_paths`` is the one place that names them. A frame is skipped when its two masks exist and
are not older than its foreground mask and FLAME parameter file (a regenerated or re-tracked export
gets new masks); every file is written to a temporary name and renamed, so an interrupted run leaves
no partial file, and a rerun continues where it stopped. The masks render on the device of the FLAME
model they are given.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from lib.atomic import write_bytes
from lib.cli import progress_bar
from lib.dataset.cameras import Camera, stack_cameras
from lib.dataset.vhap import DatasetError, Frame, VhapExport
from lib.flame.model import FlameFormatError, FlameModel
from lib.geometry.mouth import mouth_faces
from lib.geometry.rasterize import rasterize_camera
from lib.lock import locked, remove_partials

ALPHA_DIR, MOUTH_DIR = "alpha_masks", "mouth_masks"
MOUTH_DILATION = 0.01  # of the image height, at least one pixel
PIXELS_PER_CALL = 4_000_000  # images rasterized together, bounding memory (about 200 bytes per pixel)


@dataclass(frozen=True)
class MaskPaths:
    alpha: Path
    mouth: Path


def mask_paths(image_path: str | Path, export_root: str | Path, masks_dir: str | Path | None,
               fallback: bool = True) -> MaskPaths:
    """Where the masks of the image at ``image_path`` (a frame of the export at ``export_root``) live:
    ``<masks_dir>/<sequence>/alpha_masks/<name>`` and ``.../mouth_masks/<name>``, where ``<sequence>``
    is the folder holding the image's folder, relative to the export's parent folder: ``<export>`` for
    ``<export>/images/<name>``, ``<sequence>`` for a union export's ``../<sequence>/images/<name>``, so
    the sequences of a union export keep their masks apart.

    fallback: an export whose masks an earlier version wrote next to its images
    (``<sequence>/alpha_masks/<name>``, ``<sequence>/mouth_masks/<name>``) keeps working: when
    ``masks_dir`` has no alpha mask of the image and both old masks exist, those are returned. Readers
    use it; ``render_masks`` writes with ``fallback=False``, always under ``masks_dir``.
    """
    if masks_dir is None:
        raise ValueError(f"no masks folder given for the export {export_root}; build the export with "
                         "VhapExport.from_config (data.masks_dir) or VhapExport(..., masks_dir=...)")
    image = Path(os.path.abspath(image_path))
    base = Path(os.path.abspath(export_root)).parent
    try:
        sequence = image.parent.parent.relative_to(base)
    except ValueError:
        raise DatasetError(f"image {image} of the export {export_root} lies outside {base}, the export's parent "
                           "folder, so it has no place in the masks folder; keep a union export's sequence "
                           "folders next to it (file_path ../<sequence>/images/...)") from None
    folder = Path(masks_dir) / sequence
    paths = MaskPaths(folder / ALPHA_DIR / image.name, folder / MOUTH_DIR / image.name)
    if fallback and not paths.alpha.is_file():
        old = MaskPaths(image.parent.parent / ALPHA_DIR / image.name, image.parent.parent / MOUTH_DIR / image.name)
        if old.alpha.is_file() and old.mouth.is_file():
            return old
    return paths


def region_faces(faces: Tensor, vertices: np.ndarray) -> Tensor:
    """Faces [F, 3] with all three corners among `vertices` (indices). -> [F] bool"""
    member = torch.zeros(int(faces.max()) + 1, dtype=torch.bool, device=faces.device)
    vertices = np.asarray(vertices, dtype=np.int64)
    member[torch.as_tensor(vertices[vertices < len(member)], device=faces.device)] = True
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
        head = torch.ones(n_verts, dtype=torch.bool, device=faces.device)
        for name in ("neck", "boundary"):  # FLAME's 'boundary' is the neck's open bottom rim
            below = np.asarray(masks.get(name, []), dtype=np.int64)
            head[torch.as_tensor(below[below < n_verts], device=faces.device)] = False
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
    plane (point [3], up [3]). Cameras share one image size. On the device of ``anchor``. -> [C, H, W] bool"""
    device = anchor.device
    viewmats, Ks = stack_cameras(cameras, device)
    H, W = cameras[0].height, cameras[0].width
    j = torch.arange(W, dtype=torch.float32, device=device) + 0.5
    i = torch.arange(H, dtype=torch.float32, device=device) + 0.5
    ones = torch.ones(H, W, device=device)
    pix = torch.stack([j[None].expand(H, W), i[:, None].expand(H, W), ones], dim=-1)  # [H, W, 3]
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    depth = (R @ anchor + t)[:, 2]  # [C]
    rays = pix[None] @ torch.linalg.inv(Ks).transpose(-1, -2)[:, None]  # [C, H, W, 3], z = 1
    cam_points = rays * depth[:, None, None, None]
    world = (cam_points - t[:, None, None]) @ R[:, None]  # R^T (x - t), row-vector form
    return (world - point) @ up > 0


def frame_masks(verts: Tensor, joint_transforms: Tensor, faces: Tensor, regions: MaskRegions,
                cameras: list[Camera], fg: Tensor) -> tuple[Tensor, Tensor]:
    """Alpha and mouth masks of one timestep in cameras of one image size.

    verts [V, 3], joint_transforms [J, 4, 4] (the tracked mesh); fg [C, H, W] in [0, 1]; all on one device,
    faces and regions too. -> (alpha [C, H, W] in [0, 1], mouth [C, H, W] bool), on that device
    """
    viewmats, Ks = stack_cameras(cameras, verts.device)
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
    mouth = torch.stack([torch.from_numpy(cv2.dilate(m.cpu().numpy().astype(np.uint8), kernel)) > 0
                         for m in mouth]).to(verts.device)
    return fg * keep, mouth


def _write_atomic(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode a mask for {path}")
    write_bytes(path, data.tobytes())


def render_masks(export: VhapExport, model: FlameModel, masks: dict, log=print, close_mouth: bool = False) -> dict:
    """Write the alpha and mouth masks of every frame of the export's three splits into
    ``export.masks_dir`` (``mask_paths``), on the device of ``model``. close_mouth: the mesh has the
    faces closing the hole between the lips (``actor.close_mouth``, ``lib.geometry.mouth``), so what
    is seen through an open mouth is labelled mouth and kept.

    `export` should be read at ds_rate 1 (masks are written at the images' size). One process at a
    time per masks folder (``.masks.lock`` in it); the partial masks of a killed run are removed
    first; nothing is written into the export. -> a summary dict: frames, written, skipped, seconds,
    kept (mean alpha / mean fg over written frames), masks_dir
    """
    if export.masks_dir is None:
        raise ValueError(f"the export {export.root} has no masks folder to write to; build it with "
                         "VhapExport.from_config (data.masks_dir) or VhapExport(..., masks_dir=...)")
    folder = Path(export.masks_dir)
    with locked(folder, "the masks folder", folder / ".masks.lock", clean=False):
        return _render_masks(export, model, masks, log, close_mouth)


def _up_to_date(paths: MaskPaths, frame: Frame) -> bool:
    """Both masks exist and neither is older than the files they are made from."""
    try:
        made = min(os.stat(paths.alpha).st_mtime_ns, os.stat(paths.mouth).st_mtime_ns)
    except FileNotFoundError:
        return False
    inputs = [p for p in (frame.mask_path, frame.flame_param_path) if p is not None and p.is_file()]
    return all(made >= os.stat(p).st_mtime_ns for p in inputs)


def _render_masks(export: VhapExport, model: FlameModel, masks: dict, log, close_mouth: bool) -> dict:
    start = time.time()
    device = model.v_template.device
    faces = model.faces
    if close_mouth:
        closure = mouth_faces(model.v_template.cpu().numpy(), faces.cpu().numpy(), masks).faces
        faces = torch.cat([faces, torch.as_tensor(closure, device=faces.device)])
    regions = MaskRegions.from_masks(faces, model.v_template.shape[0], masks)
    frames: dict[Path, Frame] = {}
    for split in ("train", "val", "test"):
        for frame in export.split(split):
            frames.setdefault(frame.image_path, frame)
    targets = {image: mask_paths(image, export.root, export.masks_dir, fallback=False) for image in frames}
    for folder in {p.parent for paths in targets.values() for p in (paths.alpha, paths.mouth)}:
        if folder.is_dir():
            remove_partials(folder)
    todo: dict[tuple, list[Frame]] = defaultdict(list)
    for image, frame in frames.items():
        if not _up_to_date(mask_paths(image, export.root, export.masks_dir), frame):
            key = (frame.timestep_index, frame.flame_param_path, frame.camera.width, frame.camera.height)
            todo[key].append(frame)

    fg_total = alpha_total = 0.0
    written = 0
    with progress_bar(sum(len(group) for group in todo.values()), desc="masks", unit="frame") as bar:
        for (_, _, width, height), group in sorted(todo.items(), key=lambda kv: kv[0][:1] + kv[0][2:]):
            with torch.no_grad():
                params = {k: None if v is None else v.to(device) for k, v in export.load_flame(group[0]).items()}
                verts, joints = model(**params)
            per_call = max(1, PIXELS_PER_CALL // (width * height))
            for i in range(0, len(group), per_call):
                chunk = group[i:i + per_call]
                fg = torch.stack([export.load_mask(f) for f in chunk]).to(device)
                alpha, mouth = frame_masks(verts[0], joints[0], faces, regions, [f.camera for f in chunk], fg)
                alpha, mouth = alpha.cpu(), mouth.cpu()
                for frame, a, m in zip(chunk, alpha, mouth):
                    paths = targets[frame.image_path]
                    _write_atomic(paths.alpha, (a * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).numpy())
                    _write_atomic(paths.mouth, m.to(torch.uint8).numpy() * 255)
                fg_total += float(fg.sum())
                alpha_total += float(alpha.sum())
                written += len(chunk)
                bar.update(len(chunk))
    summary = {"frames": len(frames), "written": written, "skipped": len(frames) - written,
               "seconds": round(time.time() - start, 1),
               "kept": round(alpha_total / fg_total, 3) if fg_total > 0 else None,
               "masks_dir": str(export.masks_dir)}
    log(f"render_masks: {summary['frames']} frames, {written} written, {summary['skipped']} already there, "
        f"{summary['seconds']} s" + (f"; alpha keeps {summary['kept']:.1%} of the foreground" if written else "")
        + f" -> {export.masks_dir}")
    return summary

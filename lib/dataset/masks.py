"""Keep masks (the head without neck and torso) and mouth masks, rendered from the tracked FLAME mesh.

The avatar models the head (with its hair) but not the neck or the body, so its training target is
the export's foreground with the neck and everything below it removed. The tracked mesh alone cannot
give that mask: hair stands out of it by centimetres. The rule, per pixel:

    keep = the front-most tracked face there is a head (non-neck) face
           or: no tracked face there and the pixel lies above the cut

  * front-most face: the nearest face along the pixel's ray (the rasterizer's z-buffer), on the
    tracked mesh with its open rims capped: FLAME is open at the mouth and at the bottom of the neck,
    and through an open mouth the nearest face would otherwise be the inside of the head or neck
    behind it (a back face) and decide the label. Each boundary loop of the mesh whose vertices are
    mostly in 'lips'/'mouth' gets a fan of faces to the loop's centroid labelled head and mouth (what
    the image shows there is the mouth's inside); one mostly in 'neck'/'boundary' gets a fan labelled
    neck. Other loops are left open.
  * neck faces: faces whose three vertices are all in FLAME_masks' 'neck' region. Pixels whose
    front-most tracked face is a neck face are removed, whatever the images show there.
  * the cut: the plane through the lowest vertex outside 'neck' and 'boundary' (the chin),
    perpendicular to the head's up axis (the posed neck joint's y axis, so the cut follows
    the head). A pixel off the tracked mesh is lifted onto its ray at the depth of the head's
    centroid and kept if that point lies above the plane. Hair (above the chin line) is kept;
    torso, shoulders and any neck outside the tracked silhouette (below it) are removed.
  Limits: hair falling below the chin line (long hair on the shoulders) is removed, and hair
  seen in front of tracked neck faces goes with them.

The keep mask is binary and stored without the foreground alpha: the ground truth needs both apart
(``lib.train.losses.composite_gt``: the export's image is composited on white with its alpha a, so
re-compositing on another background must undo (1 - a) · white exactly, soft hair edges included), and
the training data reads a from the export's own ``fg_mask_path``.

mouth mask = pixels whose front-most face is a lips or mouth face (all three vertices in 'lips' or in
'mouth' where the regions file has it) or a mouth cap, dilated by ``MOUTH_DILATION`` of the image
height: the training loss weights this region up.

Masks are uint8 PNGs (0 or 255) at the export's native size, written outside the dataset (which may
be a read-only mount) into the export's masks folder (``VhapExport.masks_dir``: ``data.masks_dir``, by
default ``<actor.experiments_dir>/<actor.name>/masks/``, shared by the actor's runs since masks depend
only on the data and FLAME):

    <masks_dir>/<sequence>/keep_masks/<name>      <sequence>/: the folder holding the image's folder,
    <masks_dir>/<sequence>/mouth_masks/<name>     relative to the export's parent folder

``mask_paths`` is the one place that names them. Earlier versions wrote ``alpha_masks/`` (foreground
times keep, next to the images or in the masks folder) with mouth masks from the nearest face of the
open mesh: those are never read. A reader that finds no keep mask says so and names an old folder if
there is one; ``render_masks`` finds no keep masks and writes both masks of every frame anew.

A frame is skipped when its two masks exist and are not older than its foreground mask and FLAME
parameter file (a regenerated or re-tracked export gets new masks); every file is written to a
temporary name and renamed, the mouth mask before the keep mask, so an interrupted run leaves no
partial file and no frame whose keep mask is newer than its mouth mask, and a rerun continues where
it stopped. The masks render on the device of the FLAME model they are given. With train.refine_flame
and train.refine_masks, training renders its images' masks at each step from the corrected mesh
instead (``frame_masks`` through ``lib.train.data.remasked``); the evaluations read these files.
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
from lib.geometry.mouth import boundary_loops
from lib.geometry.rasterize import rasterize_camera
from lib.lock import locked, remove_partials

KEEP_DIR, MOUTH_DIR = "keep_masks", "mouth_masks"
OLD_ALPHA_DIR = "alpha_masks"  # fg x keep, written by earlier versions: never read
MOUTH_DILATION = 0.01  # of the image height, at least one pixel
PIXELS_PER_CALL = 4_000_000  # images rasterized together, bounding memory (about 200 bytes per pixel)


@dataclass(frozen=True)
class MaskPaths:
    keep: Path
    mouth: Path


def mask_paths(image_path: str | Path, export_root: str | Path, masks_dir: str | Path | None) -> MaskPaths:
    """Where the masks of the image at ``image_path`` (a frame of the export at ``export_root``) live:
    ``<masks_dir>/<sequence>/keep_masks/<name>`` and ``.../mouth_masks/<name>``, where ``<sequence>``
    is the folder holding the image's folder, relative to the export's parent folder: ``<export>`` for
    ``<export>/images/<name>``, ``<sequence>`` for a union export's ``../<sequence>/images/<name>``, so
    the sequences of a union export keep their masks apart.
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
    return MaskPaths(folder / KEEP_DIR / image.name, folder / MOUTH_DIR / image.name)


def missing_masks_message(paths: MaskPaths, frame: Frame) -> str:
    """What a reader says when a frame has no keep mask, naming masks of an earlier version if any."""
    message = (f"keep mask {paths.keep} not found (timestep {frame.timestep_index}, camera {frame.camera_index}); "
               "run `python render_masks.py CONFIG` first")
    old = [folder / OLD_ALPHA_DIR / frame.image_path.name
           for folder in (paths.keep.parent.parent, frame.image_path.parent.parent)]
    old = [p for p in old if p.is_file()]
    if old:
        message += (f". {old[0]} is an alpha mask of an earlier version (foreground x keep, mouth labels from "
                    "the open mesh), which cannot give the soft-edged ground truth and is not read: "
                    f"render_masks.py writes keep_masks/ into {paths.keep.parent.parent} (alpha_masks/ can then be deleted)")
    return message


def region_faces(faces: Tensor, vertices: np.ndarray) -> Tensor:
    """Faces [F, 3] with all three corners among `vertices` (indices). -> [F] bool"""
    member = torch.zeros(int(faces.max()) + 1, dtype=torch.bool, device=faces.device)
    vertices = np.asarray(vertices, dtype=np.int64)
    member[torch.as_tensor(vertices[vertices < len(member)], device=faces.device)] = True
    return member[faces].all(dim=1)


def head_vertices(n_verts: int, masks: dict) -> Tensor:
    """[V] bool: the vertices outside 'neck' and 'boundary' (FLAME's 'boundary' is the neck's open bottom
    rim); the cut passes through the lowest of them (``cut_plane``)."""
    head = torch.ones(n_verts, dtype=torch.bool)
    for name in ("neck", "boundary"):
        below = np.asarray(masks.get(name, []), dtype=np.int64)
        head[torch.as_tensor(below[below < n_verts])] = False
    return head


@dataclass(frozen=True)
class MaskRegions:
    """What the masks need from FLAME_masks, as face sets of the model with its mouth and neck rims
    capped (module docstring). Cap j's centre is vertex V + j: the centroid of ``rims[j]``."""

    faces: Tensor  # [F + Fc, 3] the model's faces, then the caps' fans
    rims: tuple[Tensor, ...]  # vertex indices [n_j] of each capped rim
    neck_faces: Tensor  # [F + Fc] bool
    mouth_faces: Tensor  # [F + Fc] bool
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
        head = head_vertices(n_verts, masks).to(faces.device)
        member = lambda names: np.isin(np.arange(n_verts),  # noqa: E731
                                       np.concatenate([np.asarray(masks.get(n, []), dtype=np.int64) for n in names]))
        in_mouth, in_neck = member(("lips", "mouth")), member(("neck", "boundary"))
        rims, fans, neck_cap, mouth_cap = [], [], [], []
        for loop in boundary_loops(faces.cpu().numpy()):
            is_mouth, is_neck = in_mouth[loop].mean() > 0.5, in_neck[loop].mean() > 0.5
            if not (is_mouth or is_neck):
                continue
            centre = n_verts + len(rims)
            fans.append(np.stack([loop, np.roll(loop, -1), np.full_like(loop, centre)], 1))
            rims.append(torch.as_tensor(loop, device=faces.device))
            neck_cap += [not is_mouth] * len(loop)
            mouth_cap += [bool(is_mouth)] * len(loop)
        caps = torch.as_tensor(np.concatenate(fans) if fans else np.zeros((0, 3), np.int64), device=faces.device)
        flags = lambda values: torch.tensor(values, dtype=torch.bool, device=faces.device)  # noqa: E731
        return cls(torch.cat([faces.long(), caps]), tuple(rims),
                   torch.cat([region_faces(faces, masks["neck"]), flags(neck_cap)]),
                   torch.cat([mouth, flags(mouth_cap)]), head)

    @classmethod
    def of_model(cls, model: FlameModel, masks: dict) -> "MaskRegions":
        """``from_masks`` for a FLAME model's faces and vertex count."""
        return cls.from_masks(model.faces, model.v_template.shape[0], masks)

    def capped(self, verts: Tensor) -> Tensor:
        """Posed vertices [V, 3] with the caps' centres appended. -> [V + n_rims, 3]"""
        if not self.rims:
            return verts
        return torch.cat([verts, torch.stack([verts[r].mean(0) for r in self.rims])])


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


def frame_masks(verts: Tensor, joint_transforms: Tensor, regions: MaskRegions,
                cameras: list[Camera]) -> tuple[Tensor, Tensor]:
    """Keep and mouth masks of one timestep in cameras of one image size.

    verts [V, 3], joint_transforms [J, 4, 4] (the tracked mesh), on the device of regions.
    -> (keep [C, H, W] bool, mouth [C, H, W] bool), on that device
    """
    viewmats, Ks = stack_cameras(cameras, verts.device)
    H, W = cameras[0].height, cameras[0].width
    face = rasterize_camera(regions.capped(verts)[None], regions.faces, viewmats, Ks, H, W).pix_to_face
    on_mesh = face >= 0
    visible = face.clamp(min=0)  # the front-most face: the z-buffer's nearest
    point, up = cut_plane(verts, joint_transforms, regions.head_vertices)
    off_mesh_kept = ~on_mesh & above_cut(cameras, verts.mean(0), point, up)
    keep = (on_mesh & ~regions.neck_faces[visible]) | off_mesh_kept
    mouth = on_mesh & regions.mouth_faces[visible]
    radius = max(1, round(MOUTH_DILATION * H))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    mouth = torch.stack([torch.from_numpy(cv2.dilate(m.cpu().numpy().astype(np.uint8), kernel)) > 0
                         for m in mouth]).to(verts.device)
    return keep, mouth


def _write_atomic(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode a mask for {path}")
    write_bytes(path, data.tobytes())


def render_masks(export: VhapExport, model: FlameModel, masks: dict, log=print) -> dict:
    """Write the keep and mouth masks of every frame of the export's three splits into
    ``export.masks_dir`` (``mask_paths``), on the device of ``model``.

    `export` should be read at ds_rate 1 (masks are written at the images' size). One process at a
    time per masks folder (``.masks.lock`` in it); the partial masks of a killed run are removed
    first; nothing is written into the export. -> a summary dict: frames, written, skipped, seconds,
    kept (the share of the foreground alpha the keep masks keep, over written frames with a foreground
    mask), masks_dir
    """
    if export.masks_dir is None:
        raise ValueError(f"the export {export.root} has no masks folder to write to; build it with "
                         "VhapExport.from_config (data.masks_dir) or VhapExport(..., masks_dir=...)")
    folder = Path(export.masks_dir)
    with locked(folder, "the masks folder", folder / ".masks.lock", clean=False):
        return _render_masks(export, model, masks, log)


def _up_to_date(paths: MaskPaths, frame: Frame) -> bool:
    """Both masks exist and neither is older than the files they are made from."""
    try:
        made = min(os.stat(paths.keep).st_mtime_ns, os.stat(paths.mouth).st_mtime_ns)
    except FileNotFoundError:
        return False
    inputs = [p for p in (frame.mask_path, frame.flame_param_path) if p is not None and p.is_file()]
    return all(made >= os.stat(p).st_mtime_ns for p in inputs)


def _render_masks(export: VhapExport, model: FlameModel, masks: dict, log) -> dict:
    start = time.time()
    device = model.v_template.device
    regions = MaskRegions.of_model(model, masks)
    frames: dict[Path, Frame] = {}
    for split in ("train", "val", "test"):
        for frame in export.split(split):
            frames.setdefault(frame.image_path, frame)
    targets = {image: mask_paths(image, export.root, export.masks_dir) for image in frames}
    for folder in {p.parent for paths in targets.values() for p in (paths.keep, paths.mouth)}:
        if folder.is_dir():
            remove_partials(folder)
    todo: dict[tuple, list[Frame]] = defaultdict(list)
    for image, frame in frames.items():
        if not _up_to_date(targets[image], frame):
            key = (frame.timestep_index, frame.flame_param_path, frame.camera.width, frame.camera.height)
            todo[key].append(frame)

    fg_total = kept_total = 0.0
    written = 0
    with progress_bar(sum(len(group) for group in todo.values()), desc="masks", unit="frame") as bar:
        for (_, _, width, height), group in sorted(todo.items(), key=lambda kv: kv[0][:1] + kv[0][2:]):
            with torch.no_grad():
                params = {k: None if v is None else v.to(device) for k, v in export.load_flame(group[0]).items()}
                verts, joints = model(**params)
            per_call = max(1, PIXELS_PER_CALL // (width * height))
            for i in range(0, len(group), per_call):
                chunk = group[i:i + per_call]
                keep, mouth = frame_masks(verts[0], joints[0], regions, [f.camera for f in chunk])
                keep, mouth = keep.cpu(), mouth.cpu()
                for frame, k, m in zip(chunk, keep, mouth):
                    paths = targets[frame.image_path]
                    _write_atomic(paths.mouth, m.to(torch.uint8).numpy() * 255)  # the keep mask last: it
                    _write_atomic(paths.keep, k.to(torch.uint8).numpy() * 255)  # marks the frame done
                    if frame.mask_path is not None:
                        fg = export.load_mask(frame)
                        fg_total += float(fg.sum())
                        kept_total += float((fg * k).sum())
                written += len(chunk)
                bar.update(len(chunk))
    summary = {"frames": len(frames), "written": written, "skipped": len(frames) - written,
               "seconds": round(time.time() - start, 1),
               "kept": round(kept_total / fg_total, 3) if fg_total > 0 else None,
               "masks_dir": str(export.masks_dir)}
    log(f"render_masks: {summary['frames']} frames, {written} written, {summary['skipped']} already there, "
        f"{summary['seconds']} s" + (f"; the keep masks keep {summary['kept']:.1%} of the foreground" if summary["kept"] is not None else "")
        + f" -> {export.masks_dir}")
    return summary

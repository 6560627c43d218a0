"""Stage 4's image-encoder driving signal: a user's frozen face encoder, relative to the identity frame.

The method drives the mapping network with frozen DECA / EMOCA image features. This project runs any
encoder the user exports as TorchScript (``torch.jit.script`` or ``torch.jit.trace``, then
``.save(path)``; set ``mapping.encoder`` to that file). Its contract:

    face crops [B, 3, S, S]  RGB float32 in [0, 1]  ->  features [B, F]  (trailing dims are flattened)

S = ``mapping.encoder_crop``; any normalisation (mean / std, BGR order) lives inside the module.

A timestep's crop is taken from the image of camera ``actor.identity_camera`` (the frontal one):
the face region (``actor.flame_masks``' "face": forehead to chin, like the landmark boxes DECA and
EMOCA crop to) of the tracked FLAME mesh in world space is projected into that camera (OpenCV camera,
pixel (i, j) covering [j, j+1] x [i, i+1], see ``lib.dataset.cameras``), and a square box of ``margin``
times the larger side of the vertices' bounding box, centred on it, is resampled bilinearly to S x S.
Where the box leaves the image the crop is white, the colour the exports are composited on.

The signal of timestep t is

    z(t) = clamp(P (f(t) - f(identity)) / sqrt(lambda), -2.9, 2.9)

with f the features, P the per-actor PCA components (rows) and lambda their variances. The PCA is
fitted to the relative features without subtracting their mean, so that the identity (neutral) frame
maps to exactly zero for every actor and a source actor's neutral drives a target's neutral
(cross-identity reenactment projects the source's relative features on the target's PCA). Each
component's coefficient then has a root-mean-square of 1 (one sigma) over the frames it was fitted to;
a component without variance gives 0.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lib.atomic import atomic_path
from lib.dataset.vhap import SPLITS, DatasetError, Frame, VhapExport
from lib.errors import ProjectError
from lib.flame.model import load_regions
from lib.paths import resolve

BOUND = 2.9  # sigma: the clamp of every signal value (METHOD.md, stage 4)
_EXPORT_HINT = ("export the encoder with torch.jit.script(model).save(path) or "
                "torch.jit.trace(model, example_crops).save(path) and set mapping.encoder to that file")


class EncoderError(ProjectError, ValueError):
    """An encoder or feature-PCA file that cannot be used; the message names the file and what to do."""


def load_encoder(path: str | Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript encoder saved at ``path``, on ``device``, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"image encoder not found at {path}; {_EXPORT_HINT}")
    try:
        encoder = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError, OSError) as e:
        raise EncoderError(f"{path} is not a TorchScript module ({_what_file(path)}; torch: {str(e).split('. ')[0]}); "
                           f"{_EXPORT_HINT}") from None
    return encoder.eval()


def _what_file(path: Path) -> str:
    """A guess at what a non-TorchScript file is, for the error message."""
    if not zipfile.is_zipfile(path):
        return "not a torch archive at all"
    with zipfile.ZipFile(path) as archive:
        names = [Path(n).name for n in archive.namelist()]
    if "data.pkl" in names and "constants.pkl" not in names:
        return "a torch.save file such as a state_dict, which holds weights but no code"
    return "a zip archive without TorchScript code"


def face_box(verts: Tensor, viewmat: Tensor, K: Tensor, margin: float = 1.25) -> Tensor:
    """Square pixel box around the projected mesh. -> [4] (x0, y0, x1, y1), image coordinates

    verts: [V, 3] world; viewmat: [4, 4] world-to-camera; K: [3, 3]. The box is centred on the
    projected vertices' bounding box, its side ``margin`` times that box's larger side.
    """
    cam = verts @ viewmat[:3, :3].T + viewmat[:3, 3]
    if not bool((cam[:, 2] > 0).all()):
        raise EncoderError("face_box: part of the mesh is behind the camera; the camera does not see the head")
    uv = (cam @ K.T)[:, :2] / cam[:, 2:3]
    lo, hi = uv.min(0).values, uv.max(0).values
    centre = (lo + hi) / 2
    half = margin * (hi - lo).max() / 2
    return torch.cat([centre - half, centre + half])


def crop_faces(image: Tensor, box: Tensor, size: int) -> Tensor:
    """Bilinear resampling of the box of an image to size x size. -> [3, size, size]

    image: [H, W, 3]; box: [4] (x0, y0, x1, y1) in image coordinates. Output pixel (i, j) samples the
    image at x0 + (j + 0.5) (x1 - x0) / size (likewise y), so a box of the whole image at its own
    size returns the image. Outside the image is white (1.0).
    """
    H, W = image.shape[:2]
    steps = (torch.arange(size, dtype=image.dtype, device=image.device) + 0.5) / size
    box = box.to(image)
    xs = box[0] + steps * (box[2] - box[0])
    ys = box[1] + steps * (box[3] - box[1])
    # align_corners=False: normalised -1 / +1 are the image's outer edges, x = 0 and x = W.
    gx, gy = 2 * xs / W - 1, 2 * ys / H - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]  # [1, size, size, 2]
    # Sampling (image - 1) with zero padding, then adding 1, pads with white, blended bilinearly at the border.
    crop = F.grid_sample((image - 1).permute(2, 0, 1)[None], grid, mode="bilinear",
                         padding_mode="zeros", align_corners=False)
    return crop[0] + 1


def encode(encoder: torch.jit.ScriptModule, crops: Tensor, path_for_errors: str | Path,
           batch: int = 16) -> Tensor:
    """Features of face crops [B, 3, S, S], ``batch`` crops per call. -> [B, F] float32 on the CPU"""
    out = []
    with torch.no_grad():
        for chunk in crops.split(batch):
            try:
                features = encoder(chunk)
            except RuntimeError as e:
                raise EncoderError(f"image encoder {path_for_errors} failed on crops {tuple(chunk.shape)} "
                                   f"({str(e).strip().splitlines()[-1]}); check that mapping.encoder_crop is the "
                                   "crop size it was exported for") from None
            if not isinstance(features, Tensor) or features.ndim < 2 or features.shape[0] != chunk.shape[0]:
                got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
                raise EncoderError(f"image encoder {path_for_errors} returned {got} for crops "
                                   f"{tuple(chunk.shape)}; it must return one tensor [B, F]; {_EXPORT_HINT}")
            features = features.reshape(chunk.shape[0], -1).float().cpu()
            if not bool(torch.isfinite(features).all()):
                raise EncoderError(f"image encoder {path_for_errors} returned non-finite features (NaN or inf); "
                                   "check its weights and that it takes RGB crops in [0, 1]")
            out.append(features)
    return torch.cat(out)


class FeaturePCA:
    """PCA of relative encoder features about zero (see the module docstring).

    components: [n, F] orthonormal rows; variances: [n] mean square of each coefficient over the fitted
    frames, descending (0 for a component without variance).
    """

    def __init__(self, components: Tensor, variances: Tensor):
        self.components = components
        self.variances = variances

    @property
    def n_features(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, features: Tensor, n: int) -> "FeaturePCA":
        """Fitted to relative features [T, F]; keeps min(n, T - 1, F) components."""
        T, n_features = features.shape
        if n < 1:
            raise EncoderError(f"the feature PCA needs at least 1 component, got {n}")
        if T < 2:
            raise EncoderError(f"the feature PCA needs at least 2 frames, got {T}")
        k = min(n, T - 1, n_features)
        _, s, vh = torch.linalg.svd(features.double(), full_matrices=False)
        s = s[:k]
        # Directions SVD returns beyond the features' rank carry rounding noise, not variance.
        s = torch.where(s > s[0] * 1e-7, s, torch.zeros_like(s))
        return cls(vh[:k].float(), (s ** 2 / T).float())

    def project(self, features: Tensor) -> Tensor:
        """Sigma-unit coefficients of relative features [T, F], clamped to +-2.9. -> [T, n]"""
        z = features.float() @ self.components.T
        live = self.variances > 0
        z = torch.where(live, z / self.variances.clamp_min(1e-30).sqrt(), torch.zeros_like(z))
        return z.clamp(-BOUND, BOUND)

    def save(self, path: str | Path) -> Path:
        """Write components and variances as .npz, atomically."""
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, components=self.components.numpy(), variances=self.variances.numpy())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeaturePCA":
        path = Path(path)
        if not path.is_file():
            raise EncoderError(f"encoder feature PCA not found at {path}; it is written when the actor's mapping "
                               "network is trained with mapping.signal = encoder (python train.py CONFIG)")
        try:
            with np.load(path, allow_pickle=False) as data:
                components, variances = (torch.as_tensor(data[k], dtype=torch.float32)
                                         for k in ("components", "variances"))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise EncoderError(f"cannot read the encoder feature PCA {path} ({e}); delete it and retrain the "
                               "actor's mapping network with mapping.signal = encoder") from None
        if components.ndim != 2 or variances.shape != components.shape[:1]:
            raise EncoderError(f"encoder feature PCA {path} holds components {tuple(components.shape)} and "
                               f"variances {tuple(variances.shape)}, expected [n, F] and [n]; delete it and "
                               "retrain the actor's mapping network with mapping.signal = encoder")
        return cls(components, variances)


def encoder_features(cfg, export: VhapExport, data, timesteps: list[int]) -> Tensor:
    """Encoder features of the identity camera's image at each timestep. -> [T, F]

    cfg: mapping.encoder / encoder_crop, actor.identity_camera and actor.flame_masks of the actor whose
    export (images, any split) and ``data`` (``lib.train.data.ActorData``: its tracked meshes) are read.
    """
    if not cfg.mapping.encoder:
        raise EncoderError(f"mapping.signal = encoder needs mapping.encoder, the TorchScript encoder file; "
                           f"{_EXPORT_HINT}")
    path = resolve(cfg.mapping.encoder)
    encoder = load_encoder(path, data.device)
    masks_path = resolve(cfg.actor.flame_masks)
    regions = load_regions(masks_path, data.flame.v_template.shape[0])
    if "face" not in regions:
        raise DatasetError(f"{masks_path} has no 'face' region (it has {sorted(regions)}); the encoder signal "
                           "crops to it: point actor.flame_masks at FLAME_masks.pkl")
    face = torch.as_tensor(np.asarray(regions["face"], dtype=np.int64), device=data.device)
    camera, size = cfg.actor.identity_camera, cfg.mapping.encoder_crop
    frames: dict[int, Frame] = {}
    for split in SPLITS:
        for frame in export.split(split):
            if frame.camera_index == camera:
                frames.setdefault(frame.timestep_index, frame)
    missing = [t for t in timesteps if t not in frames]
    if missing:
        raise DatasetError(f"{export.root} has no image of camera {camera} (actor.identity_camera) at timestep(s) "
                           f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; the encoder signal reads that "
                           "camera at every timestep: set actor.identity_camera to a camera every timestep has")

    batch = 16  # crops held at once: 224 x 224 crops of a long sequence would not fit in memory together
    features = []
    for start in range(0, len(timesteps), batch):
        crops = []
        for t in timesteps[start:start + batch]:
            verts_head, R, trans, _ = data.driving(t)
            verts = verts_head[0, face] @ R[0].T + trans[0]  # world = head @ R^T + t (split_global_pose)
            cam = frames[t].camera
            image = export.load_image(frames[t]).to(data.device)
            try:
                box = face_box(verts, cam.viewmat.to(verts), cam.K.to(verts))
            except ValueError as e:
                raise DatasetError(f"timestep {t}, camera {camera} of {export.root}: {e}; check the tracking of "
                                   "that timestep or choose another actor.identity_camera") from None
            crops.append(crop_faces(image, box, size))
        features.append(encode(encoder, torch.stack(crops), path, batch))
    return torch.cat(features)


def encoder_signal(cfg, export: VhapExport, data, timesteps: list[int], identity_timestep: int,
                   pca_path: str | Path, fit: bool) -> Tensor:
    """The encoder driving signal of timesteps. -> [T, n] sigma units in [-2.9, 2.9]

    Features relative to those of ``identity_timestep``, projected on the per-actor PCA: fitted to
    these timesteps and written to ``pca_path`` when ``fit``, else read from it (e.g. the target
    actor's PCA driven by a source actor's export, data and identity timestep).
    """
    steps = list(timesteps)
    # The identity frame is encoded once, so its own relative features are exactly zero.
    steps += [] if identity_timestep in steps else [identity_timestep]
    features = encoder_features(cfg, export, data, steps)
    relative = features[:len(timesteps)] - features[steps.index(identity_timestep)]
    if fit:
        pca = FeaturePCA.fit(relative, cfg.mapping.encoder_components)
        pca.save(pca_path)
    else:
        pca = FeaturePCA.load(pca_path)
        if pca.n_features != relative.shape[1]:
            raise EncoderError(f"encoder feature PCA {pca_path} was fitted to {pca.n_features} features, the "
                               f"encoder {resolve(cfg.mapping.encoder)} gives {relative.shape[1]}; use the "
                               "encoder the PCA's actor was trained with, or retrain that actor's mapping")
    return pca.project(relative)

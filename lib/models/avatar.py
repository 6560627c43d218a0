"""The avatar of stage 2: a tracked FLAME mesh in, one 3D Gaussian per valid UV texel out.

    head space   the FLAME mesh with rotation = 0 and translation = 0 (neck, jaw, eyes, expression
                 kept); the global pose is applied last, to the Gaussians.
    canonical    the actor's canonical mesh (``canonical_mesh``); canonical Gaussians sit on its
                 surface: position = canonical position map, rotation = the texel's (tangent,
                 bitangent, normal) frame, scale = isotropic RMS distance to the 3 nearest
                 neighbours, opacity = 0.7.

Per frame (METHOD.md, stage 2): the generator maps the UV normal map of the posed head-space mesh,
projected onto the first ``n_pca`` mesh-PCA components, to 11 residual channels (position 3,
rotation 4, scale 3, opacity 1); a colour head maps the canonical position map to RGB. Then, with
F = [R | o] the rigid texel frame (rotation, surface point) on the posed mesh and F_c on the
canonical one:

    position = F · F_c^-1 · (canonical position + Δposition)  = o + R R_c^T Δposition
    rotation = (R R_c^T) ⊗ normalise(q0 + Δq)
    scale    = exp(s0 + Δs),  opacity = sigmoid(o0 + Δo),  colour = sigmoid(rgb)

and finally the head's global rotation and translation. The texel frames F are taken on the tracked
head-space mesh (``regressor.deform: tracked``) or on its projection onto the first ``n_pca`` mesh-PCA
components, the mesh the network sees (``pca``, as the published method drives them: frame-to-frame
tracking jitter outside the PCA's span does not reach the Gaussians). Texels of the neck region carry no
Gaussian (the ground-truth masks exclude neck and torso). With ``actor.close_mouth`` the hole between
the lips is closed by faces with a UV chart of their own (``lib.geometry.mouth``), whose texels carry
Gaussians like the rest.

The neck cut follows the tracking (``regressor.cut_band``). The keep masks cut the head from the neck where
the export's tracked mesh puts the cut (``lib.dataset.masks``), so when the global pose is corrected
(``train.refine_flame``, test.py's refit) the ground truth's cut still jitters with the tracker while the
Gaussians would follow the corrections. Gaussians within ``cut_band`` of the cut on the canonical mesh (the
neck region, and the chin's plane for the hair) therefore keep the tracked global pose, fading to the
corrected one across the band (``cut_weights``, ``follow_tracking``); only their positions move, by the
correction (about a millimetre), their rotations keep the corrected pose. Conventions: metres, quaternions
wxyz.
"""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from lib.config import ConfigError
from lib.dataset.masks import head_vertices
from lib.errors import check_finite
from lib.flame.model import FlameModel, load_regions
from lib.geometry import uv
from lib.geometry.mouth import mouth_faces
from lib.geometry.obj_io import ObjFormatError, read_obj
from lib.geometry.rotations import axis_angle_to_matrix, matrix_to_quat, normalize_quat, quat_multiply
from lib.models.flame_refinement import refinement_from_state
from lib.models.mesh_pca import MeshPCA, MeshPcaError
from lib.models.texture_unet import ColourHead, TextureUNet
from lib.paths import resolve
from lib.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_into

GEOMETRY_CHANNELS = 11  # Δposition 3, Δrotation 4, Δscale 3, Δopacity 1
# The network's position output is in centimetres: an output unit of 1 m would let one Adam step of
# the last layer move Gaussians by centimetres.
POSITION_UNIT = 0.01
INITIAL_OPACITY = 0.7
DEFORMS = ("tracked", "pca")  # regressor.deform: the mesh the Gaussians ride


class TexelOutputs(NamedTuple):
    """What the avatar's networks give per Gaussian (``GaussianAvatar.texel_outputs``)."""

    residual: Tensor  # [B, N, 11] Δposition (cm), Δrotation, Δscale (log), Δopacity (logit)
    colour: Tensor  # [1, N, 3] RGB logits


@dataclass
class Gaussians:
    """A batch of Gaussian sets (world space, activated attributes)."""

    means: Tensor  # [B, N, 3]
    quats: Tensor  # [B, N, 4] wxyz, unit
    scales: Tensor  # [B, N, 3] linear
    opacities: Tensor  # [B, N]
    colors: Tensor  # [B, N, 3] RGB in [0, 1]
    position_residual: Tensor  # [B, N, 3] Δposition in metres (for the regulariser)


def split_global_pose(flame: FlameModel, params: dict[str, Tensor | None]) -> tuple[Tensor, Tensor, Tensor]:
    """Head-space mesh and the global rigid pose of FLAME parameters ([B, ...] tensors as VHAP writes).

    FLAME's root rotation turns every vertex about the rest root joint j0 (pose correctives skip
    the root), so the world mesh is exactly  R (v_head - j0) + j0 + translation.
    -> verts_head [B, V, 3], R [B, 3, 3], t [B, 3] with world = v_head @ R^T + t
    """
    verts, R, t, _ = split_global_pose_and_root(flame, params)
    return verts, R, t


def split_global_pose_and_root(flame: FlameModel, params: dict[str, Tensor | None]
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``split_global_pose`` and the rest root joint j0 [B, 3], from which ``rigid_pose`` poses the same
    head mesh with another rotation and translation."""
    args = dict(params)
    rotation, translation = args.pop("rotation"), args.pop("translation")
    verts, joints = flame(**args)
    j0 = joints[:, 0, :3, 3]  # root at rest (no rotation/translation applied)
    R, t = rigid_pose(rotation.to(verts), translation.to(verts), j0)
    return verts, R, t, j0


def rigid_pose(rotation: Tensor, translation: Tensor, j0: Tensor) -> tuple[Tensor, Tensor]:
    """FLAME's root rotation [B, 3] (axis-angle) and translation [B, 3] about the rest root j0 [B, 3] as
    world = v_head @ R^T + t. -> R [B, 3, 3], t [B, 3]"""
    R = axis_angle_to_matrix(rotation)
    return R, j0 + translation - (R @ j0[..., None])[..., 0]


def canonical_mesh(flame: FlameModel, identity: dict[str, Tensor | None],
                   canonical: dict[str, Tensor | None] | None, jaw_deg: float) -> Tensor:
    """The actor's canonical head-space mesh. -> [V, 3]

    Shape and static offset of the actor, zero expression and eyes, the neck pose of the identity
    frame, jaw opened by ``jaw_deg`` about the x axis; with VHAP's ``canonical_flame_param.npz``
    (``canonical``) its shape, offset, expression and jaw are used instead.
    """
    src = canonical if canonical is not None else identity
    jaw = (src["jaw_pose"] if canonical is not None else
           torch.tensor([[math.radians(jaw_deg), 0.0, 0.0]], device=flame.v_template.device))
    expr = src["expr"] if canonical is not None else None
    verts, _ = flame(shape=src["shape"], expr=expr, neck_pose=identity["neck_pose"], jaw_pose=jaw,
                     static_offset=src["static_offset"])
    return verts[0]


def cut_weights(positions: Tensor, canonical_verts: Tensor, regions: dict[str, np.ndarray], band: float) -> Tensor:
    """How much each Gaussian follows corrections of the tracked global pose: 0 at the neck cut, rising
    smoothly (smoothstep) to 1 at ``band`` metres from it; all 1 with band 0. The distance to the cut of a
    canonical position [N, 3] is the smaller of its distance to the nearest 'neck' vertex and its height above
    the lowest of ``lib.dataset.masks.head_vertices`` (the chin: the plane the keep masks cut the hair at,
    ``cut_plane``; the canonical mesh's up axis is y). -> [N]"""
    if band <= 0:
        return torch.ones(positions.shape[0])
    neck = torch.as_tensor(np.asarray(regions["neck"], dtype=np.int64))
    head = head_vertices(canonical_verts.shape[0], regions)
    to_neck = torch.cdist(positions, canonical_verts[neck]).amin(1)
    above_chin = (positions[:, 1] - canonical_verts[head, 1].min()).clamp(min=0)
    x = (torch.minimum(to_neck, above_chin) / band).clamp(0, 1)
    return x * x * (3 - 2 * x)


class GaussianAvatar(nn.Module):
    """Posed head-space mesh + global pose -> Gaussians. Fixed geometry lives in buffers."""

    def __init__(self, faces: Tensor, uvs: Tensor, faces_uv: Tensor, canonical_verts: Tensor,
                 regions: dict[str, np.ndarray], pca: MeshPCA, size: int, n_pca: int,
                 widths: list[int], colour_width: int, feature_ch: int = 32, style_dim: int = 64,
                 convs_per_level: int = 1, removed_regions: tuple[str, ...] = ("neck",), init_scale: float = 1.0,
                 deform: str = "tracked", cut_band: float = 0.0):
        super().__init__()
        if deform not in DEFORMS:
            raise ConfigError(f"regressor.deform '{deform}': one of {DEFORMS}")
        self.deform = deform
        faces = faces.long()
        uvs = uvs.float()
        full = uv.texel_map(uvs, faces_uv, size)
        texel_region = uv.texel_regions(regions, faces, full)
        keep = torch.ones(full.n, dtype=torch.bool)
        for name in removed_regions:
            if name not in texel_region:
                raise ConfigError(f"region '{name}' not in the FLAME masks (it has {sorted(texel_region)}); "
                                 "check regressor.removed_regions")
            keep &= ~texel_region[name]
        tm = full.subset(keep)
        # An actor with few timesteps has fewer PCA components than asked for: use all of them.
        self.size, self.n_pca = size, min(n_pca, pca.n_components)
        self.register_buffer("faces", faces)
        self.register_buffer("uvs", uvs)
        self.register_buffer("faces_uv", faces_uv.long())
        self.register_buffer("texel_index", tm.index)
        self.register_buffer("texel_face", tm.face)
        self.register_buffer("texel_bary", tm.bary)
        self.region_names = sorted(texel_region)
        self.register_buffer("texel_regions", torch.stack([texel_region[n][keep] for n in self.region_names], 1))

        cverts = canonical_verts.float()[None]
        pos = uv.surface_points(cverts, faces, tm)[0]
        frames = uv.texel_frames(cverts, faces, uvs, faces_uv, tm)[0]
        self.register_buffer("canonical_positions", pos)  # [N, 3]
        self.register_buffer("canonical_frames", frames)  # [N, 3, 3]
        self.register_buffer("canonical_quats", matrix_to_quat(frames))  # [N, 4]
        self.register_buffer("canonical_log_scales", uv.knn_log_scale(pos) + math.log(init_scale))  # [N]
        # from the config, not the checkpoint: regressor.cut_band may change between training and evaluation
        self.register_buffer("cut_weight", cut_weights(pos, cverts[0], regions, cut_band), persistent=False)  # [N]
        centre, extent = pos.mean(0), (pos - pos.mean(0)).abs().max()
        pos_map = uv.scatter_texels(((pos - centre) / extent)[None], tm)
        self.register_buffer("position_map", pos_map)  # [1, 3, S, S] normalised canonical positions

        self.pca = pca
        self.generator = TextureUNet(size, 3, GEOMETRY_CHANNELS, self.n_pca, widths, feature_ch, style_dim,
                                     convs_per_level)
        self.colour = ColourHead(size, colour_width)
        self.bf16 = False  # bf16 autocast on the generator only: the assembly needs fp32 (CUDA)

    @property
    def texels(self) -> uv.TexelMap:
        return uv.TexelMap(self.size, self.texel_index, self.texel_face, self.texel_bary)

    @property
    def n_gaussians(self) -> int:
        return int(self.texel_index.shape[0])

    def region(self, name: str) -> Tensor:
        """[N] bool: the Gaussians of one FLAME mask region."""
        return self.texel_regions[:, self.region_names.index(name)]

    def network_input(self, verts_head: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """UV normal map of the PCA-projected mesh [B, 3, S, S], its whitened PCA coefficients [B, n] and
        the projected mesh itself [B, V, 3].

        The map and the coefficients carry no gradient, also while the tracked FLAME parameters are refined:
        the corrections reach the mesh through the geometry the Gaussians ride (as in GaussianAvatars), not
        through the network's input, where they would act as a per-frame code that the held-out frames
        (tracked, never refined) lack. The projected mesh keeps its gradient (``deform: pca``)."""
        coeffs, projected = self._projection(verts_head)
        with torch.no_grad():
            normals = uv.vertex_normals(projected, self.faces)
            tm = self.texels
            normal_map = uv.scatter_texels(uv.surface_points(normals, self.faces, tm), tm)
        return normal_map, coeffs.detach(), projected

    def forward(self, verts_head: Tensor, R: Tensor, t: Tensor, tracked: tuple[Tensor, Tensor] | None = None
                ) -> Gaussians:
        """verts_head [B, V, 3], global pose R [B, 3, 3], t [B, 3] -> Gaussians (B sets of N). tracked: the
        global pose (R, t) as the export tracked it when R, t are corrected (``follow_tracking``)."""
        outputs, riding = self.texel_outputs(verts_head)
        return self.assemble(outputs, riding, R, t, tracked)

    def texel_outputs(self, verts_head: Tensor) -> tuple[TexelOutputs, Tensor]:
        """The networks' half of ``forward``: their per-Gaussian outputs for head-space meshes [B, V, 3], and the
        mesh the Gaussians ride (``regressor.deform``)."""
        normal_map, coeffs, projected = self.network_input(verts_head)
        with torch.autocast(verts_head.device.type, torch.bfloat16, enabled=self.bf16):
            maps = self.generator(normal_map, coeffs)
        tm = self.texels
        outputs = TexelOutputs(uv.gather_texels(maps.float(), tm), uv.gather_texels(self.colour(self.position_map), tm))
        # the Gaussians ride the mesh the network sees (pca): tracking jitter outside its span filtered out
        return outputs, projected if self.deform == "pca" else verts_head

    def riding_mesh(self, verts_head: Tensor) -> Tensor:
        """The mesh the Gaussians ride for head-space meshes [B, V, 3] (``regressor.deform``), without the networks."""
        return self._projection(verts_head)[1] if self.deform == "pca" else verts_head

    def _projection(self, verts_head: Tensor) -> tuple[Tensor, Tensor]:
        """Whitened mesh-PCA coefficients [B, n] of head-space meshes and their projection [B, V, 3]."""
        coeffs = self.pca.coefficients(verts_head, self.n_pca)
        return coeffs, self.pca.reconstruct(coeffs)

    def assemble(self, outputs: TexelOutputs, verts_head: Tensor, R: Tensor, t: Tensor,
                 tracked: tuple[Tensor, Tensor] | None = None) -> Gaussians:
        """The Gaussians of the networks' outputs on the head-space mesh they ride [B, V, 3] under the global
        pose R [B, 3, 3], t [B, 3]: the geometry's half of ``forward``."""
        tm = self.texels
        d_pos, d_rot, d_scale, d_opa = outputs.residual.split([3, 4, 3, 1], dim=-1)
        d_pos = d_pos * POSITION_UNIT
        # The mesh is data (its frames need no gradient) unless the tracked FLAME parameters are being refined.
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(x.requires_grad for x in (verts_head, R, t))):
            origin = uv.surface_points(verts_head, self.faces, tm)
            frames = uv.texel_frames(verts_head, self.faces, self.uvs, self.faces_uv, tm)
            # Head space -> world folded into the frame: R_world = R_g R R_c^T.
            to_world = R[:, None] @ frames @ self.canonical_frames.transpose(-1, -2)[None]
            origin = origin @ R.transpose(-1, -2) + t[:, None]
        means = origin + (to_world @ d_pos[..., None])[..., 0]
        local = normalize_quat(self.canonical_quats + d_rot)
        quats = normalize_quat(quat_multiply(matrix_to_quat(to_world), local))
        scales = torch.exp(self.canonical_log_scales[None, :, None] + d_scale)
        opacities = torch.sigmoid(math.log(INITIAL_OPACITY / (1 - INITIAL_OPACITY)) + d_opa[..., 0])
        colors = torch.sigmoid(outputs.colour).expand(means.shape[0], -1, -1)
        return self.follow_tracking(Gaussians(means, quats, scales, opacities, colors, d_pos), R, t, tracked)

    def follow_tracking(self, g: Gaussians, R: Tensor, t: Tensor, tracked: tuple[Tensor, Tensor] | None) -> Gaussians:
        """Gaussians placed with the global pose R [B, 3, 3], t [B, 3], those near the neck cut moved back
        towards where the tracked pose (R0, t0) puts them, by 1 - ``cut_weight`` (module docstring): the
        cut then follows the tracking, as the keep masks' does. None, or the same pose: unchanged."""
        if tracked is None:
            return g
        R0, t0 = (x.to(R) for x in tracked)
        if torch.equal(R0, R) and torch.equal(t0, t):
            return g
        # a point placed by (R, t) sits at x = R^-1 (p - t) in head space; (R0, t0) places it at R0 x + t0
        at_tracked = (g.means - t[:, None]) @ (R0 @ R.transpose(-1, -2)).transpose(-1, -2) + t0[:, None]
        stay = (1.0 - self.cut_weight)[None, :, None]
        return replace(g, means=g.means + stay * (at_tracked - g.means))


def load_canonical_mesh(path: Path) -> Tensor:
    """The canonical mesh ``pca_mesh.py`` stored. -> [V, 3]"""
    if not path.is_file():
        raise MeshPcaError(f"canonical mesh not found at {path}; run `python pca_mesh.py CONFIG` first (stage 1)")
    try:
        with np.load(path, allow_pickle=False) as data:
            verts = np.asarray(data["verts"], dtype=np.float32)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise MeshPcaError(f"cannot read the canonical mesh {path} ({e}); rerun pca_mesh.py") from None
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise MeshPcaError(f"canonical mesh {path} holds verts {verts.shape}, not [V, 3]; rerun pca_mesh.py")
    check_finite(verts, "verts", f"canonical mesh {path}", MeshPcaError)
    return torch.from_numpy(verts)


def build_avatar(cfg, paths, flame: FlameModel) -> GaussianAvatar:
    """The avatar of a config: UV layout and masks of the head model, stage 1's PCA and canonical mesh."""
    obj = read_obj(resolve(cfg.actor.flame_uv))
    if obj["faces_uv"] is None:
        raise ObjFormatError(f"{resolve(cfg.actor.flame_uv)} has no UV layout (no vt indices in its faces); "
                         "actor.flame_uv must be the model's template OBJ with texture coordinates")
    if obj["faces"].shape[0] != flame.faces.shape[0]:
        raise ObjFormatError(f"{resolve(cfg.actor.flame_uv)} has {obj['faces'].shape[0]} faces but the model "
                         f"{resolve(cfg.actor.flame_model)} has {flame.faces.shape[0]}: they must be the same mesh")
    regions = load_regions(resolve(cfg.actor.flame_masks), flame.v_template.shape[0])
    faces, uvs, faces_uv = flame.faces.cpu(), torch.as_tensor(obj["uvs"]), torch.as_tensor(obj["faces_uv"])
    if cfg.actor.close_mouth:  # the hole between the lips closed by faces with texels of their own
        closure = mouth_faces(flame.v_template.cpu().numpy(), faces.numpy(), regions, uvs.numpy(), faces_uv.numpy())
        faces, uvs, faces_uv = closure.appended(faces, uvs, faces_uv)
    r = cfg.regressor
    return GaussianAvatar(
        faces, uvs, faces_uv, load_canonical_mesh(paths.canonical_mesh), regions, MeshPCA.load(paths.mesh_pca), r.uv_size, r.n_pca,
        r.widths, r.colour_width, r.feature_channels, r.style_dim, r.convs_per_level, tuple(r.removed_regions),
        r.init_scale, r.deform, r.cut_band)


def load_regressor(cfg, paths, flame: FlameModel, device) -> tuple[GaussianAvatar, dict]:
    """The trained regressor of stage 2 (newest checkpoint of ``paths``, an ``ActorPaths``), in eval
    mode. -> (avatar, {"path": checkpoint file, "step": its training step, "refinement": its FLAME
    refinement or None})"""
    ckpt = latest_checkpoint(paths.regressor_checkpoints)
    if ckpt is None:
        raise CheckpointError(f"no regressor checkpoint in {paths.regressor_checkpoints}; train it first "
                              "(python train.py CONFIG) with the same actor.name")
    avatar = build_avatar(cfg, paths, flame)
    state = load_checkpoint(ckpt)
    load_into(avatar, state["model"], ckpt, "regressor")
    return avatar.to(device).eval(), {"path": str(ckpt), "step": int(state["step"]),
                                      "refinement": refinement_from_state(state.get("flame_refinement"))}

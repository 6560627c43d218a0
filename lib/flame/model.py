"""The FLAME head model (or any model in its file format): load it and pose it in batch.

File format (FLAME 2020 / 2023 ``.pkl``, and our synthetic head model): a dict with
    v_template    (V, 3)      rest vertices, metres
    f             (F, 3)      triangles
    shapedirs     (V, 3, S)   columns 0-299 identity shape, 300-399 expression
    posedirs      (V, 3, 36)  pose correctives, see lbs.pose_correctives
    J_regressor   (J, V)      dense or scipy.sparse
    weights       (V, J)      skinning weights
    kintree_table (2, J)      row 0 = parent of each joint (root: -1 or 4294967295)
with J = 5 joints, in the order of JOINT_NAMES.

Posing follows VHAP (its parameter names are the arguments of ``forward``):
    v = v_template + shapedirs·[shape, expr] + static_offset + dynamic_offset
    full pose = [rotation, neck_pose, jaw_pose, eyes_pose]  (one axis-angle per joint)
    verts = LBS(v, full pose) + translation                 (no re-centring)
``rotation`` turns the head about the rest position of the root joint.
"""

import os

import numpy as np
import scipy.sparse
import torch
from torch import Tensor

from lib.errors import ProjectError, check_finite
from lib.flame.lbs import blend_shapes, lbs
from lib.flame.safe_pickle import load_pickle
from lib.paths import resolve

JOINT_NAMES = ("root", "neck", "jaw", "left_eye", "right_eye")
SHAPE_COLUMNS = 300  # shapedirs columns before this are shape, from it on expression
POSE_BATCH = 64  # frames posed together; skinning holds [B, V, 4, 4] transforms (0.3 MB per FLAME frame)

_REQUIRED_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights",
                  "kintree_table")


class FlameFormatError(ProjectError, ValueError):
    """A FLAME-format model file lacks a key or holds an array of the wrong shape."""


class FlameModel(torch.nn.Module):
    """FLAME-format head model with VHAP's parameters; buffers follow ``.to(device/dtype)``.

    Buffers (not saved in state_dict: the FLAME data is licensed and must not travel
    inside our checkpoints; rebuild the model from its file):
        v_template  [V, 3]
        faces       [F, 3] long
        shapedirs   [V, 3, n_shape + n_expr]   shape columns, then expression columns
        posedirs    [36, V*3]                  see lbs.pose_correctives
        J_regressor [J, V]
        lbs_weights [V, J]
        parents     [J] long, parents[0] = -1
    """

    joint_names = JOINT_NAMES

    def __init__(
        self,
        v_template: Tensor,   # [V, 3]
        faces: Tensor,        # [F, 3]
        shapedirs: Tensor,    # [V, 3, n_shape + n_expr]
        posedirs: Tensor,     # [9·(J-1), V*3]
        J_regressor: Tensor,  # [J, V]
        lbs_weights: Tensor,  # [V, J]
        parents: Tensor,      # [J]
        n_shape: int,
        n_expr: int,
    ):
        super().__init__()
        if shapedirs.shape[-1] != n_shape + n_expr:
            raise ValueError(
                f"shapedirs has {shapedirs.shape[-1]} columns, expected n_shape + n_expr = "
                f"{n_shape} + {n_expr}"
            )
        self.n_shape = n_shape
        self.n_expr = n_expr
        self._parent_list = tuple(int(p) for p in parents)  # the chain loop runs on the host
        for name, value in [("v_template", v_template), ("faces", faces.long()),
                            ("shapedirs", shapedirs), ("posedirs", posedirs),
                            ("J_regressor", J_regressor), ("lbs_weights", lbs_weights),
                            ("parents", parents.long())]:
            self.register_buffer(name, value, persistent=False)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        n_shape: int | None = None,
        n_expr: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "FlameModel":
        """Load a FLAME-format pickle (safely, see safe_pickle).

        n_shape / n_expr: None takes all the file holds (min(S, 300) shape columns and
        max(S - 300, 0) expression columns); asking for more than that is an error.
        """
        return cls.from_dict(load_pickle(path), n_shape, n_expr, dtype, source=str(path))

    @classmethod
    def from_config(cls, cfg) -> "FlameModel":
        """The model of ``cfg.actor.flame_model`` with the config's shape and expression counts."""
        return cls.from_file(resolve(cfg.actor.flame_model), cfg.actor.n_shape, cfg.actor.n_expr)

    @classmethod
    def from_dict(
        cls,
        data: dict,
        n_shape: int | None = None,
        n_expr: int | None = None,
        dtype: torch.dtype = torch.float32,
        source: str = "FLAME model",
    ) -> "FlameModel":
        """Build from the file format's dict (numpy arrays); ``source`` names it in errors."""
        if not isinstance(data, dict):
            raise FlameFormatError(
                f"{source} holds a {type(data).__name__}, not the dict of a FLAME model."
            )
        for key in _REQUIRED_KEYS:
            if key not in data:
                raise FlameFormatError(
                    f"{source} has no '{key}' (it holds {sorted(map(str, data))}); it is not "
                    f"a FLAME-format model, which needs {', '.join(_REQUIRED_KEYS)}."
                )
        if (n_shape is not None and n_shape < 0) or (n_expr is not None and n_expr < 0):
            raise FlameFormatError(f"n_shape and n_expr must be >= 0, got {n_shape}, {n_expr}")

        n_joints = len(JOINT_NAMES)
        v_template = _array(data, "v_template", source)
        _check_shape(v_template, (None, 3), "v_template", source)
        n_verts = v_template.shape[0]
        kintree = _array(data, "kintree_table", source)
        _check_shape(kintree, (2, n_joints), "kintree_table", source)
        regressor = data["J_regressor"]
        regressor = (regressor.toarray() if scipy.sparse.issparse(regressor)
                     else _array(data, "J_regressor", source))
        faces = _array(data, "f", source)
        shapedirs = _array(data, "shapedirs", source)
        posedirs = _array(data, "posedirs", source)
        weights = _array(data, "weights", source)
        n_pose = 9 * (n_joints - 1)
        _check_shape(faces, (None, 3), "f", source)
        _check_shape(shapedirs, (n_verts, 3, None), "shapedirs", source)
        _check_shape(posedirs, (n_verts, 3, n_pose), "posedirs", source)
        _check_shape(regressor, (n_joints, n_verts), "J_regressor", source)
        _check_shape(weights, (n_verts, n_joints), "weights", source)

        parents = kintree[0].astype(np.int64)
        parents[(parents < 0) | (parents >= n_joints)] = -1  # uint32 max marks the root
        if parents[0] != -1 or any(not 0 <= parents[j] < j for j in range(1, n_joints)) \
                or not np.array_equal(kintree[1], np.arange(n_joints)):
            raise FlameFormatError(
                f"{source}: kintree_table {kintree.tolist()} is not a chain rooted at joint 0 "
                f"with joints listed in order ({', '.join(JOINT_NAMES)})."
            )

        for key, array in (("v_template", v_template), ("shapedirs", shapedirs), ("posedirs", posedirs),
                           ("J_regressor", regressor), ("weights", weights)):
            check_finite(array, key, source, FlameFormatError)
        if faces.size and (faces.min() < 0 or faces.max() >= n_verts):
            raise FlameFormatError(f"{source}: 'f' indexes vertices outside [0, {n_verts}); the file is damaged.")

        n_columns = shapedirs.shape[-1]
        held = {"shape": min(n_columns, SHAPE_COLUMNS), "expression": max(n_columns - SHAPE_COLUMNS, 0)}
        for kind, asked, key in (("shape", n_shape, "actor.n_shape"), ("expression", n_expr, "actor.n_expr")):
            if asked is not None and asked > held[kind]:
                raise FlameFormatError(
                    f"{source} holds {held[kind]} {kind} columns (shapedirs has {n_columns}: shape 0-299, "
                    f"expression from 300 on) but {asked} are asked for ({key}); tracked {kind} values beyond "
                    f"the model's columns would be dropped without a word. Use the FLAME model the tracking "
                    f"used, or set {key}: {held[kind]} to drop them knowingly.")
        n_shape = held["shape"] if n_shape is None else n_shape
        n_expr = held["expression"] if n_expr is None else n_expr
        dirs = np.concatenate(
            [shapedirs[..., :n_shape], shapedirs[..., SHAPE_COLUMNS:SHAPE_COLUMNS + n_expr]],
            axis=-1,
        )

        def t(x: np.ndarray) -> Tensor:
            return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype)

        return cls(
            v_template=t(v_template),
            faces=torch.as_tensor(faces.astype(np.int64)),
            shapedirs=t(dirs),
            posedirs=t(posedirs.reshape(n_verts * 3, n_pose).T),
            J_regressor=t(regressor),
            lbs_weights=t(weights),
            parents=torch.as_tensor(parents),
            n_shape=n_shape,
            n_expr=n_expr,
        )

    def forward(
        self,
        shape: Tensor | None = None,          # [B, >= n_shape] (extra columns ignored)
        expr: Tensor | None = None,           # [B, >= n_expr] (extra columns ignored)
        rotation: Tensor | None = None,       # [B, 3] axis-angle of the root (global)
        neck_pose: Tensor | None = None,      # [B, 3]
        jaw_pose: Tensor | None = None,       # [B, 3]
        eyes_pose: Tensor | None = None,      # [B, 6] left eye, then right eye
        translation: Tensor | None = None,    # [B, 3]
        static_offset: Tensor | None = None,  # [B, V', 3], V' >= V (VHAP appends teeth)
        dynamic_offset: Tensor | None = None,  # [B, V', 3], per timestep; added like static_offset
    ) -> tuple[Tensor, Tensor]:
        """Posed vertices and joint world frames.

        An omitted argument is zero; an argument with batch 1 is shared by the batch. Offsets are
        rest-space displacements added before the joints are regressed and the mesh is skinned, as in
        VHAP's FLAME; rows past V (VHAP's 120 teeth vertices) belong to vertices this model does not
        have and are not read.
        Inputs are cast to the model's dtype and must be on its device.

        returns: verts            [B, V, 3]
                 joint_transforms [B, J, 4, 4]  frame of each posed joint in the world
                                                (rotation, posed position + translation);
                                                vertices of joint j moved rigidly by
                                                joint_transforms[:, j] · [I | -rest joint j]
        """
        args = {"shape": shape, "expr": expr, "rotation": rotation, "neck_pose": neck_pose,
                "jaw_pose": jaw_pose, "eyes_pose": eyes_pose, "translation": translation,
                "static_offset": static_offset, "dynamic_offset": dynamic_offset}
        sizes = [v.shape[0] for v in args.values() if v is not None and v.ndim > 0]
        batch = max(sizes, default=1)
        widths = {"shape": self.n_shape, "expr": self.n_expr, "rotation": 3, "neck_pose": 3,
                  "jaw_pose": 3, "eyes_pose": 6, "translation": 3}
        p = {name: self._param(name, args[name], batch, width) for name, width in widths.items()}

        n_verts = self.v_template.shape[0]
        offsets = {}
        for name in ("static_offset", "dynamic_offset"):
            value = args[name]
            if value is None:
                continue
            if value.ndim != 3 or value.shape[1] < n_verts or value.shape[2] != 3 or value.shape[0] not in (1, batch):
                raise ValueError(f"{name} must be [B, V', 3] with V' >= {n_verts} vertices (B = {batch}, or 1 to "
                                 f"share), got {tuple(value.shape)}")
            offsets[name] = value
        if batch <= POSE_BATCH:
            return self._pose(p, offsets)
        # in chunks: skinning holds [B, V, 4, 4] transforms, which would grow with a long sequence; the
        # results are written into place, so the peak is the outputs and one chunk's work
        verts = self.v_template.new_empty(batch, n_verts, 3)
        world = self.v_template.new_empty(batch, self.J_regressor.shape[0], 4, 4)
        for i in range(0, batch, POSE_BATCH):
            chunk = {k: v if v.shape[0] == 1 else v[i:i + POSE_BATCH] for k, v in offsets.items()}
            verts[i:i + POSE_BATCH], world[i:i + POSE_BATCH] = self._pose(
                {k: v[i:i + POSE_BATCH] for k, v in p.items()}, chunk)
        return verts, world

    def _pose(self, p: dict[str, Tensor], offsets: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``forward`` of checked parameters ([B, width] each) and rest-space offsets ([1 or B, V', 3] each)."""
        batch, n_verts = p["shape"].shape[0], self.v_template.shape[0]
        v_rest = self.v_template + blend_shapes(torch.cat([p["shape"], p["expr"]], dim=-1), self.shapedirs)
        for offset in offsets.values():
            v_rest = v_rest + offset[:, :n_verts].to(self.v_template.dtype)
        pose = torch.cat([p["rotation"], p["neck_pose"], p["jaw_pose"], p["eyes_pose"]], -1)
        verts, world = lbs(v_rest, pose.reshape(batch, -1, 3), self.J_regressor,
                           self._parent_list, self.posedirs, self.lbs_weights)
        shift = torch.zeros_like(world[:, :1])  # [B, 1, 4, 4]
        shift[:, 0, :3, 3] = p["translation"]
        return verts + p["translation"][:, None], world + shift

    def _param(self, name: str, value: Tensor | None, batch: int, width: int) -> Tensor:
        dtype, device = self.v_template.dtype, self.v_template.device
        if value is None:
            return torch.zeros(batch, width, dtype=dtype, device=device)
        if name in ("shape", "expr") and value.ndim == 2 and value.shape[1] > width:
            # The data carries all of the tracker's coefficients; the model may use fewer (config).
            value = value[:, :width]
        if value.ndim != 2 or value.shape[1] != width or value.shape[0] not in (1, batch):
            raise ValueError(
                f"{name} must be [B, {width}] (B = {batch}, or 1 to share), got "
                f"{tuple(value.shape)}; a single frame needs a leading batch axis "
                f"({name}[None])."
            )
        return value.to(dtype).expand(batch, width)


def load_regions(path: str | os.PathLike, n_verts: int | None = None) -> dict[str, np.ndarray]:
    """A FLAME_masks.pkl-style file: region name -> vertex indices [K] int64, each in [0, n_verts)."""
    if not os.path.isfile(path):
        raise FlameFormatError(f"FLAME region masks not found at {path} (actor.flame_masks): FLAME_masks.pkl comes "
                               "with FLAME from its website; the synthetic head model writes its own")
    data = load_pickle(path)
    if not isinstance(data, dict) or not data:
        raise FlameFormatError(f"{path} holds a {type(data).__name__}, not a dict of region name -> vertex "
                               "indices (FLAME_masks.pkl)")
    regions = {}
    for name, indices in data.items():
        values = np.asarray(indices)
        if not isinstance(name, str) or values.ndim != 1 or values.dtype.kind not in "iu":
            raise FlameFormatError(f"{path}: region {name!r} is not a name with a 1-D array of vertex indices "
                                   f"(got {values.dtype} {values.shape})")
        if values.size and (values.min() < 0 or (n_verts is not None and values.max() >= n_verts)):
            raise FlameFormatError(f"{path}: region '{name}' indexes vertices outside [0, {n_verts}); the masks "
                                   "belong to another head model")
        regions[name] = values.astype(np.int64)
    return regions


def _array(data: dict, key: str, source: str) -> np.ndarray:
    try:
        array = np.asarray(data[key])
    except ValueError as err:  # e.g. a chumpy expression the loader could not evaluate
        raise FlameFormatError(f"'{key}': {err}") from err
    if array.dtype == object:
        raise FlameFormatError(f"{source}: '{key}' is not a numeric array ({array.dtype}).")
    return array


def _check_shape(array: np.ndarray, expected: tuple, key: str, source: str) -> None:
    """expected: one int per axis, None where any length is fine."""
    if array.ndim != len(expected) or any(
        e is not None and n != e for n, e in zip(array.shape, expected)
    ):
        shown = tuple("any" if e is None else e for e in expected)
        raise FlameFormatError(
            f"{source}: '{key}' has shape {array.shape}, expected {shown} for a "
            f"FLAME-format model with {len(JOINT_NAMES)} joints."
        )

"""Linear blend skinning of a FLAME-format model, as pure functions over tensors.

B batch, V vertices, J joints, K blend-shape coefficients, P = 9·(J - 1) pose features.

The pipeline (``model.FlameModel.forward`` composes it):
    v_rest = v_template + blend_shapes(coeffs, shapedirs) (+ per-vertex offsets)
    joints = regress_joints(J_regressor, v_rest)
    R      = axis_angle_to_matrix(pose)                       # pose [B, J, 3]
    v_pose = v_rest + pose_correctives(R, posedirs)
    G      = kinematic_chain(R, joints, parents)              # joint frames in the world
    verts  = skin(v_pose, skinning_transforms(G, joints), weights)

Joint j's frame G_j = G_parent(j) · [R_j | joints_j - joints_parent(j)], and the root's is
[R_0 | joints_0]: a rotation of joint j turns its subtree about the joint's rest position.
Vertices move by G_j · [I | -joints_j], i.e. rest space -> joint-local -> posed world.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from lib.geometry.rotations import axis_angle_to_matrix


def blend_shapes(coeffs: Tensor, dirs: Tensor) -> Tensor:
    """Vertex offsets Σ_k coeffs_k · dirs[..., k].

    coeffs:  Tensor  # [B, K]
    dirs:    Tensor  # [V, 3, K]
    returns: Tensor  # [B, V, 3]
    """
    return torch.einsum("bk,vck->bvc", coeffs, dirs)


def regress_joints(J_regressor: Tensor, verts: Tensor) -> Tensor:
    """Rest joint positions as fixed linear combinations of the vertices.

    J_regressor: Tensor  # [J, V]
    verts:       Tensor  # [B, V, 3]
    returns:     Tensor  # [B, J, 3]
    """
    return torch.einsum("jv,bvc->bjc", J_regressor, verts)


def pose_correctives(rot_mats: Tensor, posedirs: Tensor) -> Tensor:
    """Pose-dependent vertex offsets, linear in (R_j - I) of every non-root joint.

    rot_mats: Tensor  # [B, J, 3, 3] local joint rotations
    posedirs: Tensor  # [P, V*3], P = 9·(J-1); feature index = 9·(j-1) + 3·row + col,
                      # output index = 3·vertex + axis
    returns:  Tensor  # [B, V, 3]
    """
    batch = rot_mats.shape[0]
    eye = torch.eye(3, dtype=rot_mats.dtype, device=rot_mats.device)
    features = (rot_mats[:, 1:] - eye).reshape(batch, -1)  # [B, P]
    return (features @ posedirs).reshape(batch, -1, 3)


def kinematic_chain(rot_mats: Tensor, joints: Tensor, parents: Sequence[int]) -> Tensor:
    """World frame of every joint after posing (rotation and posed joint position).

    rot_mats: Tensor         # [B, J, 3, 3] rotation of each joint relative to its parent
    joints:   Tensor         # [B, J, 3] rest joint positions
    parents:  Sequence[int]  # [J], parents[0] = -1 and parents[j] < j
    returns:  Tensor         # [B, J, 4, 4]
    """
    offsets = torch.cat([joints[:, :1], joints[:, 1:] - joints[:, list(parents[1:])]], dim=1)
    local = _rigid(rot_mats, offsets)  # [B, J, 4, 4]
    frames = [local[:, 0]]
    for j in range(1, len(parents)):
        frames.append(frames[parents[j]] @ local[:, j])
    return torch.stack(frames, dim=1)


def skinning_transforms(world: Tensor, joints: Tensor) -> Tensor:
    """Rest-space -> posed-space transform of each joint: world_j · [I | -joints_j].

    world:   Tensor  # [B, J, 4, 4] from kinematic_chain
    joints:  Tensor  # [B, J, 3] rest joint positions
    returns: Tensor  # [B, J, 4, 4]
    """
    rot = world[..., :3, :3]
    trans = world[..., :3, 3] - (rot @ joints[..., None])[..., 0]
    return _rigid(rot, trans)


def skin(verts: Tensor, transforms: Tensor, weights: Tensor) -> Tensor:
    """Linear blend skinning: each vertex moved by its weighted sum of joint transforms.

    verts:      Tensor  # [B, V, 3] rest-space (pose-corrected) vertices
    transforms: Tensor  # [B, J, 4, 4] from skinning_transforms
    weights:    Tensor  # [V, J], rows sum to 1
    returns:    Tensor  # [B, V, 3]
    """
    blended = torch.einsum("vj,bjrc->bvrc", weights, transforms[..., :3, :])  # [B, V, 3, 4]
    return (blended[..., :3] @ verts[..., None])[..., 0] + blended[..., 3]


def lbs(
    v_rest: Tensor,        # [B, V, 3]
    pose: Tensor,          # [B, J, 3] axis-angle per joint
    J_regressor: Tensor,   # [J, V]
    parents: Sequence[int],  # [J]
    posedirs: Tensor,      # [9·(J-1), V*3]
    weights: Tensor,       # [V, J]
) -> tuple[Tensor, Tensor]:
    """Pose a rest-space mesh: joints, pose correctives, chain and skinning.

    returns: (verts [B, V, 3], joint world frames [B, J, 4, 4])
    """
    joints = regress_joints(J_regressor, v_rest)
    rot_mats = axis_angle_to_matrix(pose)
    v_posed = v_rest + pose_correctives(rot_mats, posedirs)
    world = kinematic_chain(rot_mats, joints, parents)
    verts = skin(v_posed, skinning_transforms(world, joints), weights)
    return verts, world


def _rigid(rot: Tensor, trans: Tensor) -> Tensor:  # [..., 3, 3], [..., 3] -> [..., 4, 4]
    top = torch.cat([rot, trans[..., None]], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)

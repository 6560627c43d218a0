"""A small random model in the FLAME file format, written to a pickle for FlameModel.from_file."""

import pickle

import numpy as np
import pytest
import scipy.sparse

FLAME_PARENTS = [-1, 0, 1, 1, 1]  # root, neck, jaw, left eye, right eye
JAW = 2


def random_flame_dict(
    seed: int = 0,
    n_verts: int = 50,
    n_columns: int = 400,
    sparse_regressor: bool = False,
    root_parent: int = 4294967295,
    posedirs_scale: float = 0.01,
) -> dict:
    """Random arrays in the layout of a FLAME 2020/2023 pickle (5 joints, FLAME's chain).

    Each vertex is skinned to 1-3 joints; vertex 0 only to the root and vertex 1 only
    to the jaw, so both jaw-weighted and jaw-free vertices exist.
    """
    rng = np.random.default_rng(seed)
    n_joints = len(FLAME_PARENTS)
    weights = np.zeros((n_verts, n_joints))
    for v in range(n_verts):
        joints = rng.choice(n_joints, size=rng.integers(1, 4), replace=False)
        weights[v, joints] = rng.dirichlet(np.ones(len(joints)))
    weights[0] = np.eye(n_joints)[0]
    weights[1] = np.eye(n_joints)[JAW]
    regressor = np.zeros((n_joints, n_verts))
    for j in range(n_joints):
        support = rng.choice(n_verts, size=4, replace=False)
        regressor[j, support] = rng.dirichlet(np.ones(4))
    kintree = np.array([[root_parent] + FLAME_PARENTS[1:], list(range(n_joints))], np.int64)
    return {
        "v_template": rng.normal(scale=0.1, size=(n_verts, 3)),
        "f": rng.integers(0, n_verts, size=(2 * n_verts, 3)).astype(np.uint32),
        "shapedirs": rng.normal(scale=0.01, size=(n_verts, 3, n_columns)),
        "posedirs": rng.normal(scale=posedirs_scale, size=(n_verts, 3, 9 * (n_joints - 1))),
        "J_regressor": scipy.sparse.csc_matrix(regressor) if sparse_regressor else regressor,
        "weights": weights,
        "kintree_table": kintree,
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


@pytest.fixture
def write_flame(tmp_path):
    """write_flame(**random_flame_dict kwargs) -> (pickle path, the dict written)."""
    counter = iter(range(1000))

    def write(data: dict | None = None, **kwargs):
        data = random_flame_dict(**kwargs) if data is None else data
        path = tmp_path / f"flame_{next(counter)}.pkl"
        with path.open("wb") as f:
            pickle.dump(data, f, protocol=2)
        return path, data

    return write

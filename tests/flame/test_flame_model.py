"""FlameModel loading: counts, file-format variants, actionable errors, dtype/batch handling."""

import numpy as np
import pytest
import torch

from lib.flame.model import JOINT_NAMES, FlameFormatError, FlameModel


def test_missing_model_file_says_where_to_get_flame(tmp_path):
    path = tmp_path / "FLAME2023" / "flame2023.pkl"
    with pytest.raises(FileNotFoundError) as err:
        FlameModel.from_file(path)
    message = str(err.value)
    assert str(path) in message
    assert "https://flame.is.tue.mpg.de" in message and "licence" in message
    assert "synthetic actor" in message and "`./run.sh` with no argument" in message


@pytest.mark.parametrize("key", ["shapedirs", "kintree_table", "J_regressor"])
def test_missing_key_is_named_with_the_file(write_flame, key):
    _, data = write_flame()
    del data[key]
    path, _ = write_flame(data)
    with pytest.raises(FlameFormatError) as err:
        FlameModel.from_file(path)
    assert isinstance(err.value, ValueError)
    assert f"'{key}'" in str(err.value) and str(path) in str(err.value)


def test_wrong_array_shape_is_named_with_the_file(write_flame):
    _, data = write_flame()
    data["posedirs"] = data["posedirs"][:, :, :27]
    path, _ = write_flame(data)
    with pytest.raises(FlameFormatError, match=r"'posedirs' has shape \(50, 3, 27\)") as err:
        FlameModel.from_file(path)
    assert str(path) in str(err.value)


def test_counts_are_read_from_the_file_and_truncated_only_when_asked(write_flame):
    path, data = write_flame(n_columns=320)  # 300 shape + 20 expression columns
    model = FlameModel.from_file(path)
    assert (model.n_shape, model.n_expr) == (300, 20)
    with pytest.raises(FlameFormatError, match=r"holds 20 expression columns.*100 are asked for \(actor.n_expr\)"):
        FlameModel.from_file(path, n_shape=300, n_expr=100)
    assert model.shapedirs.shape == (50, 3, 320)

    small = FlameModel.from_file(path, n_shape=10, n_expr=5, dtype=torch.float64)
    expected = np.concatenate([data["shapedirs"][..., :10], data["shapedirs"][..., 300:305]], -1)
    np.testing.assert_array_equal(small.shapedirs.numpy(), expected)

    shape_only = FlameModel.from_file(write_flame(n_columns=50)[0])
    assert (shape_only.n_shape, shape_only.n_expr) == (50, 0)
    verts, _ = shape_only(shape=torch.ones(2, 50))
    assert verts.shape == (2, 50, 3)


def test_buffers_layout_and_constants(write_flame):
    path, data = write_flame()
    model = FlameModel.from_file(path)
    assert model.faces.dtype == torch.long and model.faces.shape == data["f"].shape
    assert model.parents.tolist() == [-1, 0, 1, 1, 1]
    assert model.posedirs.shape == (36, 150)
    assert model.J_regressor.shape == (5, 50) and model.lbs_weights.shape == (50, 5)
    assert model.joint_names == JOINT_NAMES == ("root", "neck", "jaw", "left_eye", "right_eye")
    # Licensed FLAME data must not end up inside our checkpoints.
    assert model.state_dict() == {}


def test_root_parent_as_minus_one_and_sparse_regressor_load_the_same_model(write_flame):
    dense = FlameModel.from_file(write_flame(seed=3)[0], dtype=torch.float64)
    other = FlameModel.from_file(write_flame(seed=3, root_parent=-1, sparse_regressor=True)[0],
                                 dtype=torch.float64)
    assert other.parents.tolist() == [-1, 0, 1, 1, 1]
    torch.testing.assert_close(other.J_regressor, dense.J_regressor)
    pose = torch.full((1, 3), 0.2, dtype=torch.float64)
    torch.testing.assert_close(other(jaw_pose=pose)[0], dense(jaw_pose=pose)[0])


def test_to_dtype_keeps_index_buffers_and_matches(write_flame):
    path, _ = write_flame(seed=4)
    model32 = FlameModel.from_file(path)
    model64 = FlameModel.from_file(path).to(torch.float64)
    assert model64.v_template.dtype == torch.float64 and model64.faces.dtype == torch.long
    assert model64.parents.dtype == torch.long
    gen = torch.Generator().manual_seed(0)
    shape = torch.randn(2, 300, generator=gen)
    jaw = 0.3 * torch.randn(2, 3, generator=gen)
    v32, _ = model32(shape=shape, jaw_pose=jaw)
    v64, _ = model64(shape=shape.double(), jaw_pose=jaw.double())
    assert v32.dtype == torch.float32 and v64.dtype == torch.float64
    torch.testing.assert_close(v32.double(), v64, atol=1e-6, rtol=0)


def test_batch_one_arguments_are_shared_across_the_batch(write_flame):
    model = FlameModel.from_file(write_flame(seed=5)[0], dtype=torch.float64)
    shape = torch.randn(1, 300, dtype=torch.float64)
    jaw = torch.randn(4, 3, dtype=torch.float64) * 0.2
    verts, transforms = model(shape=shape, jaw_pose=jaw)
    assert verts.shape == (4, 50, 3) and transforms.shape == (4, 5, 4, 4)
    torch.testing.assert_close(verts[2:3], model(shape=shape, jaw_pose=jaw[2:3])[0])


@pytest.mark.parametrize("offsets", [1, "per frame"])
def test_a_long_sequence_is_posed_in_chunks_with_the_same_result(write_flame, offsets, monkeypatch):
    import lib.flame.model as flame_model
    from lib.flame.model import POSE_BATCH

    batches = []

    def counting_lbs(v_rest, *args):
        batches.append(v_rest.shape[0])
        return lbs(v_rest, *args)

    lbs = flame_model.lbs
    monkeypatch.setattr(flame_model, "lbs", counting_lbs)

    model = FlameModel.from_file(write_flame(seed=6)[0], dtype=torch.float64)
    B = 2 * POSE_BATCH + 5
    gen = torch.Generator().manual_seed(1)
    params = {"shape": torch.randn(1, 300, generator=gen, dtype=torch.float64),
              "jaw_pose": 0.2 * torch.randn(B, 3, generator=gen, dtype=torch.float64),
              "translation": torch.randn(B, 3, generator=gen, dtype=torch.float64),
              "static_offset": 0.01 * torch.randn(1 if offsets == 1 else B, 53, 3, generator=gen, dtype=torch.float64),
              "dynamic_offset": 0.01 * torch.randn(B, 53, 3, generator=gen, dtype=torch.float64)}
    verts, transforms = model(**params)
    assert verts.shape == (B, 50, 3) and transforms.shape == (B, 5, 4, 4)
    assert max(batches) == POSE_BATCH  # memory bounded by the chunk, not the sequence
    for b in (0, POSE_BATCH - 1, POSE_BATCH, B - 1):  # either side of a chunk border
        one = {k: v if v.shape[0] == 1 else v[b:b + 1] for k, v in params.items()}
        v1, t1 = model(**one)
        torch.testing.assert_close(verts[b:b + 1], v1, rtol=0, atol=1e-12)
        torch.testing.assert_close(transforms[b:b + 1], t1, rtol=0, atol=1e-12)


def test_wrong_argument_shape_says_what_is_expected(write_flame):
    model = FlameModel.from_file(write_flame()[0])
    with pytest.raises(ValueError, match=r"shape must be \[B, 300\].*shape\[None\]"):
        model(shape=torch.zeros(300))
    with pytest.raises(ValueError, match="static_offset"):
        model(static_offset=torch.zeros(1, 10, 3))
    with pytest.raises(ValueError, match="dynamic_offset"):
        model(dynamic_offset=torch.zeros(1, 10, 3))


def test_dynamic_offset_is_a_rest_space_offset_added_like_the_static_one(write_flame):
    """VHAP's FLAME adds static_offset and dynamic_offset to the shaped template before the joints are
    regressed and the mesh is skinned; rows past the model's vertices (VHAP's teeth) are not read."""
    model = FlameModel.from_file(write_flame(seed=7)[0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    B = 3
    pose = {"shape": torch.randn(1, 300, generator=gen, dtype=torch.float64),
            "expr": 0.5 * torch.randn(B, 100, generator=gen, dtype=torch.float64),
            **{k: 0.2 * torch.randn(B, 3, generator=gen, dtype=torch.float64)
               for k in ("rotation", "neck_pose", "jaw_pose", "translation")}}
    static = 0.01 * torch.randn(1, 53, 3, generator=gen, dtype=torch.float64)  # 50 vertices + 3 "teeth"
    dynamic = 0.01 * torch.randn(B, 53, 3, generator=gen, dtype=torch.float64)
    verts, joints = model(**pose, static_offset=static, dynamic_offset=dynamic)
    summed, summed_joints = model(**pose, static_offset=static + dynamic)
    torch.testing.assert_close(verts, summed, rtol=0, atol=1e-12)
    torch.testing.assert_close(joints, summed_joints, rtol=0, atol=1e-12)  # the joints move with the offsets
    assert float((verts - model(**pose, static_offset=static)[0]).abs().amax()) > 1e-3
    teeth = dynamic.clone()
    teeth[:, 50:] = 100.0
    torch.testing.assert_close(model(**pose, static_offset=static, dynamic_offset=teeth)[0], verts, rtol=0, atol=0)


def test_extra_shape_and_expression_columns_are_ignored(write_flame):
    """VHAP writes 300 shape / 100 expression values; a model truncated by config uses the first ones."""
    path, _ = write_flame()
    model = FlameModel.from_file(path, n_shape=4, n_expr=3, dtype=torch.float64)
    shape = torch.randn(1, 300, dtype=torch.float64)
    expr = torch.randn(1, 100, dtype=torch.float64)
    full, _ = model(shape=shape, expr=expr)
    cut, _ = model(shape=shape[:, :4], expr=expr[:, :3])
    assert torch.equal(full, cut)

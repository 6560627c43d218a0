import numpy as np
import pytest

from lib.geometry.obj_io import ObjFormatError, read_obj, write_obj


def _quad_mesh():
    verts = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]) * 0.1234567891
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    # Four texture coordinates plus a seam duplicate of vertex 0's: T differs from V.
    uvs = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.5, 0.25]])
    faces_uv = np.array([[4, 1, 2], [0, 2, 3]])
    return verts, faces, uvs, faces_uv


def test_round_trip_keeps_separate_uv_indices(tmp_path):
    verts, faces, uvs, faces_uv = _quad_mesh()
    write_obj(tmp_path / "m.obj", verts, faces, uvs, faces_uv)
    mesh = read_obj(tmp_path / "m.obj")
    np.testing.assert_allclose(mesh["verts"], verts, rtol=1e-8, atol=1e-12)
    np.testing.assert_array_equal(mesh["faces"], faces)
    np.testing.assert_allclose(mesh["uvs"], uvs, atol=1e-12)
    np.testing.assert_array_equal(mesh["faces_uv"], faces_uv)
    assert mesh["faces"].dtype == np.int64 and mesh["verts"].dtype == np.float64


def test_round_trip_without_uvs_gives_none(tmp_path):
    verts, faces, _, _ = _quad_mesh()
    write_obj(tmp_path / "m.obj", verts, faces)
    mesh = read_obj(tmp_path / "m.obj")
    assert mesh["uvs"] is None and mesh["faces_uv"] is None
    np.testing.assert_array_equal(mesh["faces"], faces)


def test_reads_polygons_as_fans_negative_indices_and_skips_other_records(tmp_path):
    text = """# a quad and a triangle written in other OBJ styles
mtllib m.mtl
o thing
v 0 0 0
v 1 0 0
v 1 1 0
v 0 1 0
vt 0 0
vt 1 0
vt 1 1 0
vt 0 1
vn 0 0 1
g group
usemtl skin
s 1
f 1/1/1 2/2/1 3/3/1 4/4/1
f -4/-4/1 -2/-2/1 -1/-1/1
"""
    (tmp_path / "m.obj").write_text(text)
    mesh = read_obj(tmp_path / "m.obj")
    np.testing.assert_array_equal(mesh["faces"], [[0, 1, 2], [0, 2, 3], [0, 2, 3]])
    np.testing.assert_array_equal(mesh["faces_uv"], [[0, 1, 2], [0, 2, 3], [0, 2, 3]])
    np.testing.assert_allclose(mesh["uvs"][2], [1.0, 1.0])


def test_vertex_and_normal_only_corners_read_without_uvs(tmp_path):
    (tmp_path / "m.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nvn 0 0 1\nf 1//1 2//1 3//1\n")
    mesh = read_obj(tmp_path / "m.obj")
    assert mesh["uvs"] is None
    np.testing.assert_array_equal(mesh["faces"], [[0, 1, 2]])


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 4\n", 4, "vertex index 4"),
        ("v 0 0 0\nv 1 0 zero\nv 0 1 0\n", 2, "not numbers"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nf 1/1 2/1 3\n", 5, "mix corners"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2\n", 4, "at least 3 corners"),
        ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 0 1 2\n", 4, "start at 1"),
    ],
)
def test_malformed_file_error_names_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "bad.obj"
    path.write_text(text)
    with pytest.raises(ObjFormatError, match=message) as err:
        read_obj(path)
    assert f"{path}:{line}:" in str(err.value)


def test_write_rejects_uv_faces_that_do_not_match(tmp_path):
    verts, faces, uvs, faces_uv = _quad_mesh()
    with pytest.raises(ValueError, match="faces_uv"):
        write_obj(tmp_path / "m.obj", verts, faces, uvs, faces_uv[:1])
    with pytest.raises(ValueError, match="both"):
        write_obj(tmp_path / "m.obj", verts, faces, uvs, None)

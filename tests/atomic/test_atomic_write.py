import pytest

from lib.atomic import atomic_path, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "report.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_successful_write_replaces_and_creates_folders(tmp_path):
    target = tmp_path / "deep" / "x.json"
    write_json(target, {"b": 2})
    write_json(target, {"b": 3})
    assert target.read_text() == '{\n  "b": 3\n}'

"""tfconvnorm.files: outputs appear whole or not at all."""

import os

import pytest

from tfconvnorm import files


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = str(tmp_path / "out.bin")

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        files.atomic_write(path, failing)
    assert os.listdir(tmp_path) == []


def test_atomic_write_gives_the_mode_a_plain_open_would(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "out.bin"
        files.atomic_write(str(path), lambda f: f.write(b"abc"))
        assert path.read_bytes() == b"abc"
        assert (path.stat().st_mode & 0o777) == 0o644
        assert list(tmp_path.iterdir()) == [path]  # no temporary left behind
    finally:
        os.umask(old)


def test_json_round_trip_creates_the_directory(tmp_path):
    path = tmp_path / "deep" / "results.json"
    files.write_json(str(path), {"b": float("nan"), "a": [1, 2]})
    value = files.read_json(str(path))
    assert value["a"] == [1, 2] and value["b"] != value["b"]
    assert path.read_text().startswith('{\n  "a"')  # sorted, indented
    assert os.listdir(path.parent) == ["results.json"]

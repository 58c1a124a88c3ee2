"""Atomic writes and key=value parsing shared by the whole package."""

from __future__ import annotations

import pytest

from seer.io import atomic_dir, atomic_path, atomic_write, parse_key_values


def test_atomic_write_text_bytes_and_writer(tmp_path):
    assert atomic_write(tmp_path / "a.txt", "hi").read_text() == "hi"
    assert atomic_write(tmp_path / "sub" / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "c.txt", lambda f: f.write("via writer"))
    assert (tmp_path / "c.txt").read_text() == "via writer"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write(tmp_path / "keep.txt", "old")

    def boom(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "other.npy") as tmp:
            tmp.write_bytes(b"x")
            raise KeyError("stop")
    assert not (tmp_path / "other.npy").exists() and len(list(tmp_path.iterdir())) == 1


def test_atomic_dir_swaps_a_whole_directory_or_nothing(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.json").write_text("1")
    with atomic_dir(target) as tmp:  # replaced whole: files of the old version do not survive
        (tmp / "b.json").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.json"]
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(target) as tmp:
            (tmp / "c.json").write_text("half")
            raise OSError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["b.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left
    atomic_write(tmp_path / "file", "x")
    with pytest.raises(FileExistsError, match="not a directory"):
        with atomic_dir(tmp_path / "file"):
            pass


def test_parse_key_values_names_the_bad_item():
    assert parse_key_values(["a.b=1", "c= x=y"], what="override") == [("a.b", "1"), ("c", " x=y")]
    with pytest.raises(ValueError, match="override 'nope' is not of the form key=value"):
        parse_key_values(["nope"], what="override")
    with pytest.raises(ValueError, match="has an empty key"):
        parse_key_values(["a..b=1"], what="override")

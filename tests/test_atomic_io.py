"""fl_plugins.atomic_io (the one atomic-write implementation) and engine.checkpoint.atomic_torch_save built on it:
content, no temp file left on success or failure, the old file intact when a write fails, mode, if_changed."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fl_plugins.atomic_io import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writers_write_the_content_and_create_the_folder(tmp_path):
    assert atomic_write_bytes(b"\x00\x01", tmp_path / "a" / "b.bin") is True
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write_text("é\n", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_bytes() == "é\n".encode()
    atomic_write_json({"b": 1, "a": [1, 2]}, tmp_path / "d.json", indent=1, sort_keys=True)
    assert (tmp_path / "d.json").read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
    atomic_write_json({"x": None}, str(tmp_path / "e.json"))
    assert (tmp_path / "e.json").read_text() == json.dumps({"x": None}, indent=2) + "\n"
    assert _names(tmp_path) == ["a", "d.json", "e.json", "t.txt"]  # no temp file left


def test_failing_writer_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")

    def half_then_fail(f):
        f.write(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(half_then_fail, path)
    assert path.read_text() == "old"
    assert _names(tmp_path) == ["f.json"]


def test_failing_replace_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text("new", path)
    assert path.read_text() == "old"
    assert _names(tmp_path) == ["f.txt"]


def test_unserialisable_json_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json({"x": object()}, tmp_path / "x.json")
    assert _names(tmp_path) == []


def test_mode_of_an_existing_file_is_kept_and_a_new_file_is_0644(tmp_path):
    old = tmp_path / "old.txt"
    old.write_text("a")
    os.chmod(old, 0o600)
    atomic_write_text("b", old)
    assert stat.S_IMODE(old.stat().st_mode) == 0o600 and old.read_text() == "b"
    atomic_write_text("c", tmp_path / "new.txt")
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644


def test_if_changed_writes_nothing_when_the_content_is_the_same(tmp_path):
    path = tmp_path / "r.json"
    assert atomic_write_json({"a": 1}, path, if_changed=True) is True
    inode = path.stat().st_ino
    assert atomic_write_json({"a": 1}, path, if_changed=True) is False
    assert path.stat().st_ino == inode  # not replaced
    assert atomic_write_json({"a": 2}, path, if_changed=True) is True
    assert json.loads(path.read_text()) == {"a": 2} and path.stat().st_ino != inode
    assert atomic_write_json({"a": 2}, path) is True  # without if_changed it always writes


def test_atomic_torch_save_round_trips_and_keeps_the_old_file_on_error(tmp_path):
    import torch

    from fl_plugins.engine.checkpoint import atomic_torch_save

    path = tmp_path / "m.pt"
    atomic_torch_save({"w": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(3))
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails (the exact error type is torch's)
        atomic_torch_save({"f": lambda: 0}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(3))
    assert _names(tmp_path) == ["m.pt"]

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


# -- BackgroundSaver: writes later, in order, errors not lost ------------------------------------------------------------


def test_background_saver_writes_in_order_and_save_returns_before_the_write(tmp_path):
    import threading

    import torch

    from fl_plugins.engine.checkpoint import BackgroundSaver

    gate, order = threading.Event(), []
    saver = BackgroundSaver("test", max_pending=8)
    saver.submit("gate", lambda: (gate.wait(5), order.append("gate")))
    for i in range(3):
        saver.save({"i": torch.tensor([i])}, tmp_path / "m.pt")  # the same file three times: the last one wins
        saver.submit(f"mark {i}", order.append, i)
    saver.write_text("done", tmp_path / "t.txt")
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "t.txt").exists()  # nothing written yet
    gate.set()
    saver.flush()
    assert order == ["gate", 0, 1, 2]
    assert torch.load(tmp_path / "m.pt")["i"].item() == 2
    assert (tmp_path / "t.txt").read_text() == "done"
    assert _names(tmp_path) == ["m.pt", "t.txt"]


def test_background_saver_bounds_the_writes_waiting(tmp_path):
    import threading

    from fl_plugins.engine.checkpoint import BackgroundSaver

    gate = threading.Event()
    saver = BackgroundSaver("test", max_pending=1)
    saver.submit("first", gate.wait, 5)
    released = threading.Timer(0.3, gate.set)
    released.start()
    saver.submit("second", lambda: None)  # waits for the first: max_pending=1
    assert gate.is_set()
    saver.flush()


@pytest.mark.parametrize("on_error", ["raise", "log"])
def test_background_saver_failed_write_is_raised_naming_the_file_or_logged(tmp_path, caplog, on_error):
    from fl_plugins.engine.checkpoint import BackgroundSaver

    (tmp_path / "old.pt").write_bytes(b"old")
    saver = BackgroundSaver("server-files", on_error=on_error)
    saver.save(lambda: None, tmp_path / "old.pt")  # a lambda cannot be pickled
    if on_error == "raise":
        with pytest.raises(OSError, match=r"server-files: could not write .*old\.pt"):
            saver.flush()
    else:
        saver.flush()
        assert "server-files: could not write" in caplog.text and "old.pt" in caplog.text
    assert (tmp_path / "old.pt").read_bytes() == b"old" and _names(tmp_path) == ["old.pt"]
    saver.flush()  # the error was reported once


@pytest.mark.parametrize("kwargs, match", [({"on_error": "ignore"}, "on_error"), ({"max_pending": 0}, "max_pending")])
def test_background_saver_rejects_bad_settings(kwargs, match):
    from fl_plugins.engine.checkpoint import BackgroundSaver

    with pytest.raises(ValueError, match=match):
        BackgroundSaver("x", **kwargs)

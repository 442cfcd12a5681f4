"""flssl on bad input (issue #32): one line naming the file or setting and what to do, exit code 2 (a failed or
stopped run: 1), no traceback unless ``--debug``; a checkpoint whose pickle would run code is refused, not run.

"Read-only" here: the tests run as root, where ``chmod a-w`` stops no write, and no read-only mount can be made
in the container. So :func:`read_only` makes every write under a folder fail the way a read-only file system
fails (``OSError(errno.EROFS)`` from ``open``/``io.open`` for writing, ``os.open`` with a write flag, ``os.mkdir``
of a new folder, ``os.replace``/``rename``/``unlink``/``rmdir``/``chmod``), while reads work, as on a read-only
mount. Every file writer of the package (``atomic_io``, ``pathlib``, ``shutil``, ``zipfile``/numpy, nibabel, PIL,
the nvflare job export) goes through these calls.
"""

from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import os
import shlex
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_plugins.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
UNET_JOB = REPO / "jobs" / "finetune_seg_unet"
INPAINT_JOB = REPO / "jobs" / "unet_inpaint_pretrain"
VIT_JOB = REPO / "jobs" / "finetune_seg_vit"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit code, stdout, stderr); never a traceback without ``--debug``."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if "--debug" not in argv:
        assert "Traceback" not in err and "Traceback" not in out, err
    return rc, out, err


def error_line(err: str, command: str) -> str:
    """The one ``flssl <command>: error: ...`` line of stderr."""
    lines = [ln for ln in err.splitlines() if ln.startswith(f"flssl {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A global model file of finetune_seg_unet (the persistor's layout: ``{"model": state_dict}``)."""
    from fl_plugins.cli import _model_config_from
    from fl_plugins.models.factory import build_model

    p = tmp_path_factory.mktemp("ckpt") / "FL_global_model.pt"
    torch.save({"model": build_model(_model_config_from(UNET_JOB)).state_dict()}, p)
    return p


@pytest.fixture(scope="module")
def inpaint_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A global model file of unet_inpaint_pretrain (its method's federated state)."""
    from fl_plugins.cli import _persistor_args_from
    from fl_plugins.methods import build

    args = _persistor_args_from(INPAINT_JOB)
    p = tmp_path_factory.mktemp("ckpt") / "FL_global_model.pt"
    torch.save({"model": build(args["method"], args["method_config"]).state_module().state_dict()}, p)
    return p


@pytest.fixture(scope="module")
def round_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A round checkpoint of finetune_seg_unet after round 0 of 2."""
    from fl_plugins.flare.resume import save_round_checkpoint

    p = tmp_path_factory.mktemp("ckpt") / "round_checkpoint.pt"
    save_round_checkpoint(p, workflow="FedAvgWithFinalValidation", completed_round=0, total_rounds=2,
                          params={"w": np.zeros(2, np.float32)}, params_type="FULL", job_id="j1")
    return p


class _Evil:
    """Unpickling it calls ``open(marker, "w")``: a checkpoint that runs code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def read_only(monkeypatch: pytest.MonkeyPatch, root: Path, code: int = errno.EROFS) -> None:
    """Make writes under ``root`` fail as on a read-only file system (see the module docstring); reads work.
    ``code``: fail with another errno instead (a full disk, no permission)."""
    root_s = os.path.abspath(root)

    def under(p: object) -> bool:
        if isinstance(p, int):
            return False
        s = os.path.abspath(os.fsdecode(os.fspath(p)))
        return s == root_s or s.startswith(root_s + os.sep)

    def erofs(p: object) -> OSError:
        return OSError(code, os.strerror(code), os.fsdecode(os.fspath(p)))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and under(file):
            raise erofs(file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and under(path):
            raise erofs(path)
        return real_os_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):
        if under(path):
            if os.path.exists(path):  # Linux: EEXIST before EROFS
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(os.fspath(path)))
            raise erofs(path)
        return real_mkdir(path, *a, **k)

    def refuse(real):
        def f(path, *a, **k):
            if under(path) or (a and not isinstance(a[0], int) and under(a[0])):
                raise erofs(path)
            return real(path, *a, **k)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    for name in ("replace", "rename", "unlink", "remove", "rmdir", "chmod", "symlink", "link"):
        monkeypatch.setattr(os, name, refuse(getattr(os, name)))


def test_read_only_helper_fails_like_a_read_only_mount(tmp_path, monkeypatch):
    """The stand-in refuses each kind of write under the folder with EROFS and leaves reads and other folders."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "in.txt").write_text("x")
    read_only(monkeypatch, ro)
    from fl_plugins.atomic_io import atomic_write_text

    for write in (lambda: (ro / "a").write_text("x"), lambda: (ro / "d").mkdir(), lambda: os.makedirs(ro / "d" / "e"),
                  lambda: atomic_write_text("x", ro / "b"), lambda: np.savez(ro / "c.npz", a=np.zeros(1)),
                  lambda: os.unlink(ro / "in.txt")):
        with pytest.raises(OSError) as e:
            write()
        assert e.value.errno == errno.EROFS
    assert (ro / "in.txt").read_text() == "x" and sorted(os.listdir(ro)) == ["in.txt"]
    (tmp_path / "w.txt").write_text("ok")


# ------------------------------------------------------------------------------------- checkpoints handed in
CKPT_COMMANDS = {
    "evaluate": lambda ckpt, data, out: ["evaluate", "--checkpoint", ckpt, "--data", data, "--job", UNET_JOB,
                                         "--image-size", "16"],
    "export-backbone": lambda ckpt, data, out: ["export-backbone", "--checkpoint", ckpt, "--out", out, "--job",
                                                INPAINT_JOB],
}


@pytest.mark.parametrize("command", sorted(CKPT_COMMANDS))
def test_a_checkpoint_whose_pickle_runs_code_is_refused_before_it_runs(command, synth_seg_data, tmp_path, capsys):
    marker = tmp_path / "MARKER_code_ran"
    ckpt = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Evil(marker)}, ckpt)
    assert zipfile.is_zipfile(ckpt) and not marker.exists()  # a genuine torch.save zip; saving ran nothing
    rc, out, err = run(CKPT_COMMANDS[command](ckpt, synth_seg_data, tmp_path / "out.pt"), capsys)
    assert rc == 2
    assert not marker.exists(), "the checkpoint's pickle ran code"
    line = error_line(err, command)
    assert str(ckpt) in line and "--checkpoint" in line and "holds Python objects besides tensors" in line
    assert "io.open" in line  # the global it would have called, by name
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("job", ["finetune_seg_unet", "finetune_seg_vit"])
@pytest.mark.parametrize("content", ["evil", "random"])
def test_simulate_pretrained_refuses_a_file_that_is_no_checkpoint_of_tensors(job, content, synth_seg_data, tmp_path,
                                                                              monkeypatch, capsys):
    """``--pretrained`` (models.backbone.read_state_dict_file): the format first, weights_only; FLARE never starts."""
    marker = tmp_path / "MARKER_code_ran"
    ckpt = tmp_path / "pre.pt"
    if content == "evil":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Evil(marker)}, ckpt)
    else:
        ckpt.write_bytes(os.urandom(2048))
    monkeypatch.setattr("fl_plugins.cli.run_simulator", lambda *a, **k: pytest.fail("the simulator started"))
    rc, out, err = run(["simulate", "--job", job, "--data", synth_seg_data, "-w", tmp_path / "ws", "--pretrained",
                        ckpt], capsys)
    assert rc == 2 and not marker.exists()
    line = error_line(err, "simulate")
    assert line.startswith("flssl simulate: error: --pretrained: ") and str(ckpt) in line
    assert ("holds Python objects besides tensors" if content == "evil" else "is not a PyTorch checkpoint") in line


@pytest.mark.parametrize("command", sorted(CKPT_COMMANDS))
@pytest.mark.parametrize("content, found", [
    (os.urandom(4096), "a file starting with"),
    (b"", "a file starting with b''"),
    ("zip", "a zip without a data.pkl"),
    ("legacy", "a bare pickle (torch.save's legacy format or pickle.dump)"),  # before torch 1.6
])
def test_a_file_that_is_not_a_checkpoint_is_named(command, content, found, synth_seg_data, tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    if content == "zip":
        with zipfile.ZipFile(ckpt, "w") as z:
            z.writestr("notes.txt", "not a model")
    elif content == "legacy":
        torch.save({"model": {"w": torch.zeros(1)}}, ckpt, _use_new_zipfile_serialization=False)
    else:
        ckpt.write_bytes(content)
    rc, out, err = run(CKPT_COMMANDS[command](ckpt, synth_seg_data, tmp_path / "out.pt"), capsys)
    assert rc == 2
    line = error_line(err, command)
    assert f"--checkpoint: {str(ckpt)!r} is not a PyTorch checkpoint" in line and found in line
    assert "FL_global_model.pt" in line  # what to give instead
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("command, ckpt_fixture, expect", [
    # the fine-tuning U-Net (3 classes out) to the inpainting job (1 channel out): the output block differs
    ("export-backbone", "unet_ckpt", "tensor 'model.2.0.conv.weight' has shape (32, 3, 3, 3) in the checkpoint, "
                                     "(32, 1, 3, 3) in the model"),
    ("evaluate", "inpaint_ckpt", "tensor 'model.2.0.conv.weight' has shape (32, 1, 3, 3) in the checkpoint, "
                                 "(32, 3, 3, 3) in the model"),
    ("export-backbone", "vit_state", "none of its 2 tensors (e.g. 'cls_token') is a tensor of method 'unet_inpaint'"),
])
def test_a_checkpoint_of_another_architecture_names_the_first_differing_tensor(
        command, ckpt_fixture, expect, synth_seg_data, tmp_path, capsys, request):
    if ckpt_fixture == "vit_state":
        ckpt = tmp_path / "vit.pt"
        torch.save({"model": {"cls_token": torch.zeros(1, 1, 192), "pos_embed": torch.zeros(1, 65, 192)}}, ckpt)
    else:
        ckpt = request.getfixturevalue(ckpt_fixture)
    rc, out, err = run(CKPT_COMMANDS[command](ckpt, synth_seg_data, tmp_path / "out.pt"), capsys)
    assert rc == 2
    line = error_line(err, command)
    assert str(ckpt) in line and expect in line, line
    assert "Error(s) in loading state_dict" not in err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("job, size, expect", [
    (UNET_JOB, 7, "--image-size 7: the U-Net (strides [2, 2, 2, 2]) needs a multiple of 16; try 16"),
    (UNET_JOB, 40, "--image-size 40: the U-Net (strides [2, 2, 2, 2]) needs a multiple of 16; try 48"),
    (UNET_JOB, 0, "--image-size 0: must be a positive number of pixels"),
    (VIT_JOB, 12, "--image-size 12: the ViT (backbone.patch_size 8) needs a multiple of 8; try 16"),
])
def test_evaluate_checks_the_image_size_against_the_network(job, size, expect, synth_seg_data, unet_ckpt, capsys):
    rc, out, err = run(["evaluate", "--checkpoint", unet_ckpt, "--data", synth_seg_data, "--job", job,
                        "--image-size", str(size)], capsys)
    assert rc == 2
    assert expect in error_line(err, "evaluate")


def test_evaluate_runs_at_a_size_that_fits(synth_seg_data, unet_ckpt, tmp_path, capsys):
    """The checks refuse only what does not fit: the same checkpoint evaluates at 16 px and writes --out."""
    rc, out, err = run(["evaluate", "--checkpoint", unet_ckpt, "--data", synth_seg_data, "--job", UNET_JOB,
                        "--image-size", "16", "--out", tmp_path / "r.json"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["metric"] == "dice"


# -------------------------------------------------------------------------------------------- data handed in
def _loop(folder: Path, name: str) -> Path:
    """``folder/name`` -> ``folder/name.b`` -> ``folder/name``: a symlink loop."""
    a, b = folder / name, folder / f"{name}.b"
    os.symlink(b, a)
    os.symlink(a, b)
    return a


def _datalist_with_loop(synth_seg_data: Path, tmp: Path) -> list[str]:
    dl = json.loads((synth_seg_data / "site-1" / "datalist.json").read_text())
    base = synth_seg_data / "site-1"
    for s in ("training", "validation", "test"):
        for e in dl.get(s, []):
            for k in ("image", "label"):
                if k in e:
                    e[k] = str((base / e[k]).resolve())
    dl["training"][0]["image"] = str(_loop(tmp, "img.nii.gz"))
    (tmp / "datalist.json").write_text(json.dumps(dl))
    return ["check-data", tmp / "datalist.json"]


def _csv_with_loop(synth_seg_data: Path, tmp: Path) -> list[str]:
    _loop(tmp, "a.png")
    with open(tmp / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "label"], ["a.png", "0"], ["a.png", "1"]])
    return ["split", "--dataset", tmp / "labels.csv", "--out", tmp / "out", "--sites", "1"]


def _decathlon_with_loop(synth_seg_data: Path, tmp: Path) -> list[str]:
    (tmp / "imagesTr").mkdir()
    _loop(tmp / "imagesTr", "a.nii.gz")
    (tmp / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "x"}, "modality": {"0": "MRI"},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    return ["split", "--dataset", tmp / "dataset.json", "--out", tmp / "out", "--sites", "1"]


@pytest.mark.parametrize("make, command, where", [
    (_datalist_with_loop, "check-data", "training[0], field 'image'"),
    (_csv_with_loop, "split", "column 'image' = 'a.png'"),
    (_decathlon_with_loop, "split", "training[0], field 'image'"),
])
def test_a_symlink_loop_among_the_images_is_named(make, command, where, synth_seg_data, tmp_path, capsys):
    rc, out, err = run(make(synth_seg_data, tmp_path), capsys)
    assert rc == 2
    line = error_line(err, command)
    assert where in line and "is a symlink loop" in line and "fix the links" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("labels, expect", [
    (np.array([["cat"], ["dog"]] * 4), "train_labels are <U3 (e.g. 'cat'), not class ids"),
    (np.array([[0.5], [1.0]] * 4), "train_labels are float64 (e.g. 0.5), not class ids"),
    (np.array([[-1], [1]] * 4), "train_labels has a negative class id -1"),
])
def test_medmnist_labels_that_are_not_class_ids_are_named(labels, expect, tmp_path, capsys):
    arrays = {}
    for s in ("train", "val", "test"):
        arrays[f"{s}_images"] = np.zeros((8, 28, 28), np.uint8)
        arrays[f"{s}_labels"] = labels if s == "train" else np.zeros((8, 1), np.int64)
    np.savez(tmp_path / "bad.npz", **arrays)
    rc, out, err = run(["split", "--dataset", tmp_path / "bad.npz", "--out", tmp_path / "out", "--sites", "2"], capsys)
    assert rc == 2
    line = error_line(err, "split")
    assert str(tmp_path / "bad.npz") in line and expect in line, line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- a read-only output folder
def _resume_argv(ctx: dict[str, Path]) -> list[str]:
    return ["resume", "--checkpoint", ctx["round_ckpt"], "--job", UNET_JOB, "--out", ctx["ro"] / "resumed"]


#: every sub-command: its arguments with its output under the read-only folder ``ro``, the option the message
#: names (None: the command writes nothing, and runs as usual)
WALK = {
    "synth": (lambda c: ["synth", "--out", c["ro"] / "d", "--sites", "1", "--volumes", "3", "--slices", "4",
                         "--size", "16"], "--out"),
    "split": (lambda c: ["split", "--dataset", c["npz"], "--out", c["ro"] / "d", "--sites", "2"], "--out"),
    "check-data": (lambda c: ["check-data", c["data"]], None),
    "jobs": (lambda c: ["jobs"], None),
    "export-jobs": (lambda c: ["export-jobs", "--out", c["ro"] / "jobs", "finetune_seg_unet"], "--out"),
    "resume": (_resume_argv, "--out"),
    "init-workspace": (lambda c: ["init-workspace", "-w", c["ro"] / "ws", "--data", c["data"]], "--workspace"),
    "simulate": (lambda c: ["simulate", "--job", "finetune_seg_unet", "--data", c["data"], "-w", c["ro"] / "ws",
                            "--rounds", "1"], "--workspace"),
    "evaluate": (lambda c: ["evaluate", "--checkpoint", c["unet_ckpt"], "--data", c["data"], "--job", UNET_JOB,
                            "--image-size", "16", "--out", c["ro"] / "r.json"], "--out"),
    "export-backbone": (lambda c: ["export-backbone", "--checkpoint", c["inpaint_ckpt"], "--job", INPAINT_JOB,
                                   "--out", c["ro"] / "unet.pt"], "--out"),
    "results": (lambda c: ["results", c["result"]], None),
}


def test_the_walk_covers_every_sub_command():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(WALK)


@pytest.mark.parametrize("command", sorted(WALK))
def test_every_sub_command_with_a_read_only_output_folder(command, synth_seg_data, unet_ckpt, inpaint_ckpt,
                                                          round_ckpt, tmp_path, monkeypatch, capsys):
    """Each writing command stops at its first write with one line naming its output option, the path, "read-only
    file system" and what to do (exit 2), and leaves the folder as it was; the reading commands run as usual."""
    arrays = {f"{s}_{k}": (np.zeros((8, 28, 28), np.uint8) if k == "images" else np.arange(8)[:, None] % 2)
              for s in ("train", "val", "test") for k in ("images", "labels")}
    np.savez(tmp_path / "mnist.npz", **arrays)
    (tmp_path / "r.json").write_text(json.dumps({"metric": "dice", "split": "test", "overall": {"mean": 0.5}}))
    ro = tmp_path / "ro"
    ro.mkdir()
    ctx = {"ro": ro, "data": synth_seg_data, "npz": tmp_path / "mnist.npz", "unet_ckpt": unet_ckpt,
           "inpaint_ckpt": inpaint_ckpt, "round_ckpt": round_ckpt, "result": tmp_path / "r.json"}
    make, option = WALK[command]
    argv = make(ctx)
    read_only(monkeypatch, ro)
    monkeypatch.setattr("fl_plugins.cli.run_simulator", lambda *a, **k: pytest.fail("the simulator started"))
    rc, out, err = run(argv, capsys)
    monkeypatch.undo()
    assert list(ro.iterdir()) == []
    if option is None:
        assert rc == 0, err
        return
    assert rc == 2
    line = error_line(err, command)
    value = argv[argv.index(option if option != "--workspace" else "-w") + 1]
    assert line.startswith(f"flssl {command}: error: {option} {str(value)!r}: cannot write "), line
    assert line.endswith("read-only file system; give a folder on a writable disk"), line


def test_debug_keeps_the_traceback(synth_seg_data, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    for argv in (["--debug", "init-workspace", "-w", ro / "ws"], ["init-workspace", "-w", ro / "ws", "--debug"]):
        rc, out, err = run(argv, capsys)
        assert rc == 2
        assert "Traceback (most recent call last)" in err and "OSError: [Errno 30]" in err
        assert "read-only file system; give a folder on a writable disk" in error_line(err, "init-workspace")


@pytest.mark.parametrize("code, expect", [
    (errno.ENOSPC, "cannot write '{ws}/local': disk full; free space or write to another disk"),
    (errno.EDQUOT, "cannot write '{ws}/local': disk quota exceeded; free space or write to another disk"),
    (errno.EACCES, "cannot use '{ws}/local': permission denied; give a path you may write (or read), or fix its "
                   "permissions"),
])
def test_other_os_errors_of_a_write_name_the_option_and_what_to_do(code, expect, tmp_path, monkeypatch, capsys):
    read_only(monkeypatch, tmp_path / "ro", code)
    rc, out, err = run(["init-workspace", "-w", tmp_path / "ro" / "ws"], capsys)
    assert rc == 2
    ws = tmp_path / "ro" / "ws"
    assert error_line(err, "init-workspace") == (f"flssl init-workspace: error: --workspace {str(ws)!r}: "
                                                 + expect.format(ws=ws))


@pytest.mark.parametrize("argv, option", [
    (["synth", "--out", "{file}/d", "--sites", "1", "--volumes", "3", "--slices", "4", "--size", "16"], "--out"),
    (["init-workspace", "-w", "{file}/ws"], "--workspace"),
    (["export-jobs", "--out", "{file}/jobs", "finetune_seg_unet"], "--out"),
])
def test_an_output_under_a_regular_file_is_named(argv, option, tmp_path, capsys):
    """A real failing write (no stand-in): the output's parent is a regular file (ENOTDIR)."""
    (tmp_path / "file").write_text("a file, not a folder")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    rc, out, err = run(argv, capsys)
    assert rc == 2
    line = error_line(err, argv[0])
    assert f"{option} '{tmp_path / 'file'}/" in line and "a part of the path is a file, not a folder" in line, line
    assert (tmp_path / "file").read_text() == "a file, not a folder"


# ------------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_in_another_command_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("fl_plugins.data.generate_synthetic_segmentation", interrupted)
    rc, out, err = run(["synth", "--out", tmp_path / "d"], capsys)
    assert rc == 130
    assert err.strip() == ("flssl synth: stopped (Ctrl-C) before it finished; what it was writing may be incomplete: "
                           "run the command again")

@pytest.mark.parametrize("completed", [None, 1])
def test_ctrl_c_during_simulate_stops_cleanly_with_the_resume_command(completed, synth_seg_data, tmp_path,
                                                                      monkeypatch, capsys):
    """The simulator is replaced by one that writes the round checkpoint of round ``completed`` (None: no round
    completed) and then gets Ctrl-C; the printed ``flssl resume`` command is run and writes the resume job."""
    from fl_plugins.flare.resume import save_round_checkpoint

    ws = tmp_path / "ws"

    def interrupted(job_dir, ws_, n_sites, threads, log_path, quiet=False):
        if completed is not None:
            app = ws_ / "server" / "simulate_job" / "app_server"
            app.mkdir(parents=True)
            save_round_checkpoint(app / "round_checkpoint.pt", workflow="FedAvgWithFinalValidation",
                                  completed_round=completed, total_rounds=4, params={"w": np.zeros(2, np.float32)},
                                  params_type="FULL", job_id="simulate_job")
        raise KeyboardInterrupt

    monkeypatch.setattr("fl_plugins.cli.run_simulator", interrupted)
    rc, out, err = run(["simulate", "--job", "finetune_seg_unet", "--data", synth_seg_data, "-w", ws,
                        "--rounds", "4"], capsys)
    assert rc == 1
    line = next(ln for ln in err.splitlines() if ln.startswith("flssl simulate: stopped (Ctrl-C)"))
    assert f"log: {tmp_path / 'ws_simulate.log'}" in line
    if completed is None:
        assert "no round had completed, so nothing was kept to resume from: run the same command again" in line
        return
    ckpt = ws / "server" / "simulate_job" / "app_server" / "round_checkpoint.pt"
    job = tmp_path / "ws_job" / "finetune_seg_unet"
    new = tmp_path / "ws_job" / "finetune_seg_unet_resume2"
    assert f"kept round 1 (the last completed of rounds 0..3) in {ckpt}" in line
    resume = (f"flssl resume --checkpoint {shlex.quote(str(ckpt))} --job {shlex.quote(str(job))} --out "
              f"{shlex.quote(str(new))}")
    assert f"resume it: {resume} && flssl simulate --job {shlex.quote(str(new))} --data " in line
    assert main(shlex.split(resume)[1:]) == 0  # the hint works as printed
    assert "runs rounds 2..3" in capsys.readouterr().out
    assert (new / "app" / "config" / "resume_checkpoint.pt").is_file()

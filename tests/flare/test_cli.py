"""flssl commands: errors name the file or setting and exit 2; happy paths print what they did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_plugins.cli import main


def test_synth_then_check_data(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "d"), "--sites", "2", "--volumes", "3", "--slices", "4",
                 "--size", "16"]) == 0
    assert main(["check-data", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert out.count("OK ") == 2 and "site-2/datalist.json" in out


def test_check_data_names_missing_file(tmp_path, capsys):
    main(["synth", "--out", str(tmp_path / "d"), "--sites", "1", "--volumes", "3", "--slices", "4", "--size", "16"])
    p = tmp_path / "d" / "site-1" / "datalist.json"
    dl = json.loads(p.read_text())
    dl["validation"][0]["label"] = "labels/gone.nii.gz"
    p.write_text(json.dumps(dl))
    assert main(["check-data", str(p)]) == 2
    err = capsys.readouterr().err
    assert "gone.nii.gz" in err and "datalist.json" in err


@pytest.mark.parametrize("argv,match", [
    (["check-data", "/nonexistent/dl.json"], "/nonexistent/dl.json"),
    (["simulate", "--job", "finetune_seg_unet", "--data", "/nonexistent_dir", "-w", "/tmp/x"], "nonexistent_dir"),
    (["simulate", "--job", "no_such_job", "--data", "{data}", "-w", "{ws}"], "no_such_job"),
    (["simulate", "--job", "finetune_seg_unet", "--data", "{data}", "-w", "{ws}", "--sites", "3"], "site-3"),
    (["simulate", "--job", "finetune_seg_unet", "--data", "{data}", "-w", "{ws}", "--set", "fl.rounds=2"],
     "fl.rounds"),
    (["simulate", "--job", "finetune_seg_vit", "--data", "{data}", "-w", "{ws}", "--pretrained", "/no/ckpt.pt"],
     "/no/ckpt.pt"),
    (["evaluate", "--checkpoint", "/no/model.pt", "--data", "{data}"], "/no/model.pt"),
])
def test_bad_arguments_exit_2_with_the_bad_value(synth_seg_data, tmp_path, capsys, argv, match):
    argv = [a.replace("{data}", str(synth_seg_data)).replace("{ws}", str(tmp_path / "ws")) for a in argv]
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_results_table(tmp_path, capsys):
    r = {"metric": "dice", "split": "test", "overall": {"mean": 0.5, "std": 0.1, "n": 4}, "label": "unet"}
    (tmp_path / "a.json").write_text(json.dumps(r))
    assert main(["results", str(tmp_path / "a.json")]) == 0
    assert "unet" in capsys.readouterr().out


def test_results_over_seeds_gives_the_mean_sd_and_t_interval(tmp_path, capsys):
    """Five runs (one per seed): mean 0.414, sd 0.02302, t(4) = 2.776 -> 95 % CI 0.414 -+ 0.02858 (scipy agrees to
    1e-5: stats.t.ppf(0.975, 4) = 2.7764)."""
    files = []
    for seed, v in enumerate([0.40, 0.42, 0.41, 0.45, 0.39]):
        f = tmp_path / f"seed{seed}.json"
        f.write_text(json.dumps({"metric": "dice", "split": "test", "overall": {"mean": v, "std": 0.1, "n": 39},
                                 "label": f"seed{seed}"}))
        files.append(str(f))
    assert main(["results", *files]) == 0
    out = capsys.readouterr().out
    assert ("over 5 runs: mean 0.4140, sd 0.0230, min 0.3900, max 0.4500, 95 % CI of the mean [0.3854, 0.4426] "
            "(t, 4 df)") in out
    (tmp_path / "other.json").write_text(json.dumps({"metric": "accuracy", "split": "test", "overall": {"mean": 0.9}}))
    assert main(["results", files[0], str(tmp_path / "other.json")]) == 0
    assert "no summary over runs: the files mix metrics/splits" in capsys.readouterr().out


@pytest.mark.parametrize("values, expected", [
    ([], {"n": 0}),
    ([0.5], {"n": 1, "mean": 0.5}),
    ([1.0, 3.0], {"n": 2, "mean": 2.0, "sd": 2 ** 0.5, "ci95": [2.0 - 12.706, 2.0 + 12.706]}),  # t(1) * sqrt(2)/sqrt(2)
])
def test_mean_interval_against_hand_computation(values, expected):
    from fl_plugins.engine.metrics import mean_interval

    got = mean_interval(values)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v)


def test_mean_interval_refuses_non_finite_values():
    from fl_plugins.engine.metrics import mean_interval

    with pytest.raises(ValueError, match="non-finite"):
        mean_interval([0.5, float("nan")])


@pytest.mark.parametrize("job, size", [("finetune_cls_cnn", 28), ("finetune_cls", 32), ("finetune_seg_unet", 64)])
def test_evaluate_takes_the_image_size_the_sites_trained_at(job, size):
    """``flssl evaluate`` without ``--image-size`` resizes to the job's ``image_size`` (the executor's handler
    arguments), not to a backbone default: a MONAI CNN classifier trained at 28 px was evaluated at 64 px before
    and predicted the majority class on every BreastMNIST test image (balanced accuracy 0.5 vs 0.68-0.90)."""
    from fl_plugins.cli import _job_image_size

    repo = Path(__file__).resolve().parents[2]
    assert _job_image_size(repo / "jobs" / job) == size

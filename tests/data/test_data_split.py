from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fl_plugins.data import DataError, load_datalist, split_decathlon, split_medmnist
from fl_plugins.data.synthetic import write_npz_deterministic


def _fake_decathlon(root: Path, sections: dict[str, int], frames: int = 2, patient_field: bool = True) -> Path:
    """A Decathlon dataset.json with ``frames`` volumes per patient (empty files: split never reads voxels)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    ds: dict = {"name": "Fake", "labels": {"0": "background", "1": "a", "2": "b"}}
    pid = 0
    for section, n_patients in sections.items():
        ds[section] = []
        for _ in range(n_patients):
            pid += 1
            for f in range(frames):
                name = f"patient{pid:03d}_frame{f:02d}.nii.gz"
                for d in ("imagesTr", "labelsTr"):
                    (root / d / name).touch()
                e = {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"}
                if patient_field:
                    e["patient"] = f"patient{pid:03d}"
                ds[section].append(e)
    (root / "dataset.json").write_text(json.dumps(ds))
    return root / "dataset.json"


def _patients(dl: dict) -> dict[str, set[str]]:
    return {s: {e["patient"] for e in dl[s]} for s in ("training", "validation", "test")}


@pytest.mark.parametrize("num_sites", [2, 3])
def test_acdc_like_split_honours_sections_and_keeps_patients_together(tmp_path, num_sites):
    src = _fake_decathlon(tmp_path / "ds", {"training": 14, "validation": 4, "test": 5})
    paths = split_decathlon(src, tmp_path / "out", num_sites=num_sites, seed=3, labelled_per_site=2)
    assert [p.parent.name for p in paths] == [f"site-{i + 1}" for i in range(num_sites)]
    owner: dict[str, str] = {}
    by_section: dict[str, set[str]] = {"training": set(), "validation": set(), "test": set()}
    for p in paths:
        dl = load_datalist(p)
        for s, pats in _patients(dl).items():
            by_section[s] |= pats
            for pid in pats:
                assert owner.setdefault(pid, dl["site"]) == dl["site"]  # no patient on two sites
            assert pats, f"{dl['site']} has no {s} patient"
        frames: dict[str, int] = {}
        for e in dl["training"] + dl["validation"] + dl["test"]:
            frames[e["patient"]] = frames.get(e["patient"], 0) + 1
            assert Path(e["image"]).is_absolute()
        assert set(frames.values()) == {2}  # both frames of every patient on this site
        labelled = {e["patient"] for e in dl["training"] if e["labelled"]}
        assert len(labelled) == 2
        assert all("label" in e for e in dl["training"])  # unlabelled ones keep their label file, flagged
    assert [len(v) for v in by_section.values()] == [14, 4, 5]  # predefined sections honoured, nothing lost
    summary = json.loads((tmp_path / "out" / "split_summary.json").read_text())
    assert sum(s["patients"]["training"] for s in summary["sites"].values()) == 14
    assert all(s["labelled_patients"] == 2 and s["labelled_volumes"] == 4 for s in summary["sites"].values())


def test_split_is_deterministic_and_seed_matters(tmp_path):
    src = _fake_decathlon(tmp_path / "ds", {"training": 12, "validation": 3, "test": 3})
    a = split_decathlon(src, tmp_path / "a", 3, seed=0, labelled_per_site=1)
    b = split_decathlon(src, tmp_path / "b", 3, seed=0, labelled_per_site=1)
    c = split_decathlon(src, tmp_path / "c", 3, seed=1, labelled_per_site=1)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert (tmp_path / "a/split_summary.json").read_bytes() == (tmp_path / "b/split_summary.json").read_bytes()
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]


def test_hippocampus_like_groups_by_case_and_carves_sections(tmp_path):
    src = _fake_decathlon(tmp_path / "ds", {"training": 20}, frames=1, patient_field=False)
    paths = split_decathlon(src, tmp_path / "out", num_sites=2, val_fraction=0.1, test_fraction=0.2)
    seen = set()
    for p in paths:
        pats = _patients(load_datalist(p))
        assert [len(pats[s]) for s in ("training", "validation", "test")] == [7, 1, 2]
        allp = set().union(*pats.values())
        assert not allp & seen and all(x.startswith("patient") for x in allp)  # id = image file stem
        seen |= allp
    assert len(seen) == 20
    assert json.loads((tmp_path / "out/split_summary.json").read_text())["grouped_by"] == "image file stem"


@pytest.mark.parametrize(
    "kw,expect",
    [({"num_sites": 9}, "num_sites=9"), ({"num_sites": 2, "labelled_per_site": 5}, "labelled_per_site=5"),
     ({"num_sites": 0}, "num_sites"), ({"num_sites": 2, "modality_preset": "rgb"}, "'rgb'")],
)
def test_split_bad_arguments(tmp_path, kw, expect):
    src = _fake_decathlon(tmp_path / "ds", {"training": 8})
    with pytest.raises(DataError, match=expect):
        split_decathlon(src, tmp_path / "out", **kw)


def test_split_missing_inputs(tmp_path):
    with pytest.raises(DataError, match="dataset.json") as e:
        split_decathlon(tmp_path / "nothing", tmp_path / "out", 2)
    assert "nothing" in str(e.value)
    src = _fake_decathlon(tmp_path / "ds", {"training": 4})
    (tmp_path / "ds/labelsTr/patient002_frame01.nii.gz").unlink()
    with pytest.raises(DataError, match="patient002_frame01"):
        split_decathlon(src, tmp_path / "out", 2)


def test_patient_in_two_sections(tmp_path):
    src = _fake_decathlon(tmp_path / "ds", {"training": 4, "validation": 1})
    ds = json.loads(src.read_text())
    ds["validation"][0]["patient"] = "patient001"
    src.write_text(json.dumps(ds))
    with pytest.raises(DataError, match="patient001"):
        split_decathlon(src, tmp_path / "out", 2)


def test_split_medmnist(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 30), ("val", 6), ("test", 9)):
        arrays[f"{s}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % 3).astype(np.uint8).reshape(-1, 1)
    npz = write_npz_deterministic(tmp_path / "x.npz", arrays)
    paths = split_medmnist(npz, tmp_path / "out", num_sites=3, seed=0, labelled_per_site=4)
    again = split_medmnist(npz, tmp_path / "again", num_sites=3, seed=0, labelled_per_site=4)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    seen: dict[str, set[int]] = {"train": set(), "val": set(), "test": set()}
    for p in paths:
        dl = load_datalist(p)
        assert dl["num_classes"] == 3 and len(dl["training"]) == 10
        assert sum(e["labelled"] for e in dl["training"]) == 4
        for e in dl["training"] + dl["validation"] + dl["test"]:
            assert e["index"] not in seen[e["split"]]
            seen[e["split"]].add(e["index"])
            assert e["label"] == int(arrays[f"{e['split']}_labels"][e["index"], 0])
    assert [len(v) for v in seen.values()] == [30, 6, 9]
    with pytest.raises(DataError, match="labelled_per_site=11"):
        split_medmnist(npz, tmp_path / "bad", num_sites=3, labelled_per_site=11)
    with pytest.raises(DataError, match="num_sites=7"):
        split_medmnist(npz, tmp_path / "bad", num_sites=7)


def test_predefined_section_smaller_than_sites_is_carved(tmp_path):
    src = _fake_decathlon(tmp_path / "ds", {"training": 12, "validation": 1, "test": 6})
    pats = [_patients(load_datalist(p)) for p in split_decathlon(src, tmp_path / "out", 3, seed=0)]
    assert all(p["validation"] and p["test"] for p in pats)
    assert sum("patient013" in p["validation"] for p in pats) == 1  # the predefined one kept
    assert sum(len(p["training"]) for p in pats) == 12 - 2  # two sites carved one validation patient each


def test_write_split_writes_sites_as_they_come_and_the_summary_last(tmp_path):
    from fl_plugins.data.split import SUMMARY_NAME, _write_split

    def dl(site: str) -> dict:
        return {"format": "medmnist", "dataset": "x", "task": "classification", "num_classes": 2, "site": site,
                "training": [], "validation": [], "test": []}

    paths = _write_split(tmp_path / "ok", iter([(dl("site-1"), {"n": 1}), (dl("site-2"), {"n": 2})]), {"seed": 3})
    assert [p.relative_to(tmp_path / "ok").as_posix() for p in paths] == ["site-1/datalist.json",
                                                                           "site-2/datalist.json"]
    assert load_datalist(paths[1])["site"] == "site-2"
    assert json.loads((tmp_path / "ok" / SUMMARY_NAME).read_text()) == {"seed": 3, "sites": {"site-1": {"n": 1},
                                                                                             "site-2": {"n": 2}}}

    def failing():  # a splitter that finds a problem at its second site
        yield dl("site-1"), {}
        raise DataError("site-2 is too small")

    with pytest.raises(DataError, match="site-2 is too small"):
        _write_split(tmp_path / "bad", failing(), {})
    assert sorted(p.relative_to(tmp_path / "bad").as_posix() for p in (tmp_path / "bad").rglob("*.json")) == [
        "site-1/datalist.json"]  # the sites before the problem are written, the summary is not
    with pytest.raises(ValueError, match="site 'site-1' is written twice"):
        _write_split(tmp_path / "twice", [(dl("site-1"), {}), (dl("site-1"), {})], {})


def test_labelled_per_site_larger_than_a_site_names_it_after_writing_the_sites_before(tmp_path):
    src = _fake_decathlon(tmp_path / "ds", {"training": 14, "validation": 4, "test": 5})  # 5 / 5 / 4 training
    with pytest.raises(DataError, match=r"^labelled_per_site=5 exceeds the 4 training patients of site-3 "
                                        r"\(num_sites=3, "):
        split_decathlon(src, tmp_path / "out", num_sites=3, labelled_per_site=5)
    assert sorted(p.parent.name for p in (tmp_path / "out").rglob("datalist.json")) == ["site-1", "site-2"]
    assert not (tmp_path / "out" / "split_summary.json").exists()

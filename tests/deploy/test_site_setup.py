"""Unit tests for fl_plugins.flare.site_setup (pure file logic, no FLARE processes)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fl_plugins.flare import site_setup
from fl_plugins.flare.site_setup import (
    CLASS_ALLOW_PREFIXES,
    NotASiteWorkspaceError,
    configure_site,
    configure_workspace,
    default_class_allow_list,
    merge_allow_list,
)

DEFAULT = default_class_allow_list()

SERVER_RESOURCES_DEFAULT = {
    "format_version": 2,
    "class_list_enforcement_mode": "enforce",
    "class_allow_list": DEFAULT,
    "servers": [{"admin_storage": "transfer", "heart_beat_timeout": 600}],
    "snapshot_persistor": {
        "path": "nvflare.app_common.state_persistors.storage_state_persistor.StorageStatePersistor",
        "args": {
            "uri_root": "/",
            "storage": {
                "path": "nvflare.app_common.storages.filesystem_storage.FilesystemStorage",
                "args": {"root_dir": "/tmp/nvflare/snapshot-storage", "uri_root": "/"},
            },
        },
    },
    "components": [
        {
            "id": "job_manager",
            "path": "nvflare.apis.impl.job_def_manager.SimpleJobDefManager",
            "args": {"uri_root": "/tmp/nvflare/jobs-storage", "job_store_id": "job_store"},
        },
        {"id": "job_store", "path": "nvflare.app_common.storages.filesystem_storage.FilesystemStorage"},
    ],
}

CLIENT_RESOURCES_DEFAULT = {
    "format_version": 2,
    "class_list_enforcement_mode": "enforce",
    "class_allow_list": DEFAULT,
    "components": [{"id": "resource_manager", "path": "x.y.GPUResourceManager", "args": {"num_of_gpus": 0}}],
}


def _site(tmp_path: Path, name: str, role: str, resources_default: dict | None) -> Path:
    d = tmp_path / name
    (d / "startup").mkdir(parents=True)
    (d / "local").mkdir()
    (d / "startup" / ("fed_server.json" if role == "server" else "fed_client.json")).write_text("{}")
    if resources_default is not None:
        (d / "local" / "resources.json.default").write_text(json.dumps(resources_default))
    return d


def _read(p: Path) -> dict:
    return json.loads(p.read_text())


def test_default_list_is_nvflares():
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    assert DEFAULT == list(DEFAULT_CLASS_ALLOW_LIST)
    assert CLASS_ALLOW_PREFIXES == ["fl_plugins.", *site_setup.JOB_NVFLARE_CLASSES]
    assert site_setup.site_class_allow_list(["x.y."]) == DEFAULT + CLASS_ALLOW_PREFIXES + ["x.y."]


def test_client_from_default_file(tmp_path):
    site = _site(tmp_path, "site-1", "client", CLIENT_RESOURCES_DEFAULT)
    r = configure_site(site, "/data/site-1/datalist.json")
    res = _read(site / "local" / "resources.json")
    assert res["class_allow_list"] == DEFAULT + CLASS_ALLOW_PREFIXES
    assert res["components"] == CLIENT_RESOURCES_DEFAULT["components"]
    assert _read(site / "local" / "fl_plugins_site.json") == {"datalist": "/data/site-1/datalist.json"}
    assert r["role"] == "client" and r["resources_changed"] and r["site_config_changed"]
    assert r["storage_moved"] == []
    # the provisioned default file itself is never modified
    assert _read(site / "local" / "resources.json.default") == CLIENT_RESOURCES_DEFAULT


def test_client_without_default_file(tmp_path):
    site = _site(tmp_path, "site-1", "client", None)
    configure_site(site, None)
    assert _read(site / "local" / "resources.json") == {"class_allow_list": DEFAULT + CLASS_ALLOW_PREFIXES}
    assert not (site / "local" / "fl_plugins_site.json").exists()


def test_server_storage_moved_into_workspace(tmp_path):
    site = _site(tmp_path, "server1", "server", SERVER_RESOURCES_DEFAULT)
    r = configure_site(site, None)
    res = _read(site / "local" / "resources.json")
    root = str(site.resolve())
    assert res["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] == f"{root}/snapshot-storage"
    assert res["snapshot_persistor"]["args"]["uri_root"] == "/"
    assert res["snapshot_persistor"]["args"]["storage"]["args"]["uri_root"] == "/"
    assert res["components"][0]["args"]["uri_root"] == f"{root}/jobs-storage"
    assert len(r["storage_moved"]) == 2 and r["role"] == "server"


def test_client_storage_paths_untouched(tmp_path):
    res_default = dict(CLIENT_RESOURCES_DEFAULT, extra={"root_dir": "/tmp/nvflare/whatever"})
    site = _site(tmp_path, "site-1", "client", res_default)
    configure_site(site, None)
    assert _read(site / "local" / "resources.json")["extra"] == {"root_dir": "/tmp/nvflare/whatever"}


def test_server_storage_already_in_workspace_kept(tmp_path):
    res_default = json.loads(json.dumps(SERVER_RESOURCES_DEFAULT))
    res_default["components"][0]["args"]["uri_root"] = "/srv/flare/jobs"
    site = _site(tmp_path, "server1", "server", res_default)
    configure_site(site, None)
    assert _read(site / "local" / "resources.json")["components"][0]["args"]["uri_root"] == "/srv/flare/jobs"


def test_idempotent_and_keeps_user_edits(tmp_path):
    site = _site(tmp_path, "server1", "server", SERVER_RESOURCES_DEFAULT)
    configure_site(site, None)
    res_path = site / "local" / "resources.json"
    res = _read(res_path)
    # site admin edits: extra allowed class, enforcement mode, own setting
    res["class_allow_list"].append("my_hospital.plugins.")
    res["class_list_enforcement_mode"] = "warn"
    res["servers"][0]["heart_beat_timeout"] = 120
    res_path.write_text(json.dumps(res))
    r1 = configure_site(site, None)
    after = _read(res_path)
    assert after["class_allow_list"] == DEFAULT + CLASS_ALLOW_PREFIXES + ["my_hospital.plugins."]
    assert after["class_list_enforcement_mode"] == "warn"
    assert after["servers"][0]["heart_beat_timeout"] == 120
    mtime = res_path.stat().st_mtime_ns
    r2 = configure_site(site, None)
    assert not r2["resources_changed"] and res_path.stat().st_mtime_ns == mtime
    assert r1["storage_moved"] == [] and _read(res_path) == after


def test_default_entries_restored_and_extras(tmp_path, monkeypatch):
    site = _site(tmp_path, "site-1", "client", {"class_allow_list": ["a.b."]})
    monkeypatch.setattr(site_setup, "CLASS_ALLOW_PREFIXES", ["fl_plugins.", "nvflare.app_opt.pt.file_model_persistor."])
    configure_site(site, None, extra_allow=["x.y.Z"])
    lst = _read(site / "local" / "resources.json")["class_allow_list"]
    assert lst[0] == "a.b." and lst[1 : 1 + len(DEFAULT)] == DEFAULT
    assert lst[-3:] == ["fl_plugins.", "nvflare.app_opt.pt.file_model_persistor.", "x.y.Z"]


def test_allow_all_left_alone(tmp_path):
    site = _site(tmp_path, "site-1", "client", {"class_allow_list": ["*"]})
    configure_site(site, None)
    assert _read(site / "local" / "resources.json")["class_allow_list"] == ["*"]


def test_merge_allow_list_unit():
    assert merge_allow_list(None, ["a.", "b."], ["c.", "a."]) == ["a.", "b.", "c."]
    assert merge_allow_list(["z.", "a."], ["a.", "b."], ["c."]) == ["z.", "a.", "b.", "c."]
    with pytest.raises(ValueError):
        merge_allow_list([""], [], [])


def test_site_config_keeps_other_keys_and_updates(tmp_path):
    site = _site(tmp_path, "site-1", "client", CLIENT_RESOURCES_DEFAULT)
    (site / "local" / "fl_plugins_site.json").write_text(json.dumps({"datalist": "/old", "cache_dir": "/c"}))
    r = configure_site(site, "/data/{site}/datalist.json")
    assert _read(site / "local" / "fl_plugins_site.json") == {"datalist": "/data/{site}/datalist.json", "cache_dir": "/c"}
    assert r["site_config_changed"]
    assert not configure_site(site, "/data/{site}/datalist.json")["site_config_changed"]


def test_atomic_write_leaves_no_temp_files_and_keeps_mode(tmp_path):
    site = _site(tmp_path, "site-1", "client", CLIENT_RESOURCES_DEFAULT)
    res_path = site / "local" / "resources.json"
    res_path.write_text("{}")
    os.chmod(res_path, 0o600)
    configure_site(site, "/d.json")
    assert stat.S_IMODE(res_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in (site / "local").iterdir()) == [
        "fl_plugins_site.json",
        "resources.json",
        "resources.json.default",
    ]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    site = _site(tmp_path, "site-1", "client", CLIENT_RESOURCES_DEFAULT)
    res_path = site / "local" / "resources.json"
    res_path.write_text('{"keep": 1}')

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(site_setup.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        configure_site(site, None)
    assert res_path.read_text() == '{"keep": 1}'
    assert [p.name for p in (site / "local").iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: None, "not a folder"),
        (lambda d: d.mkdir(), "not a FLARE site workspace"),
        (lambda d: (d / "startup").mkdir(parents=True) or (d / "startup" / "fed_admin.json").write_text("{}"),
         "admin startup kit"),
        (lambda d: (d / "startup").mkdir(parents=True) or (d / "startup" / "fed_client.json").write_text("{}"),
         "missing the 'local' folder"),
    ],
)
def test_not_a_site_names_the_path(tmp_path, setup, match):
    d = tmp_path / "somewhere"
    setup(d)
    with pytest.raises(NotASiteWorkspaceError, match=match) as ei:
        configure_site(d, None)
    assert str(d) in str(ei.value)


def test_invalid_json_names_the_path(tmp_path):
    site = _site(tmp_path, "site-1", "client", None)
    (site / "local" / "resources.json").write_text("{not json")
    with pytest.raises(ValueError, match="resources.json"):
        configure_site(site, None)
    (site / "local" / "resources.json").write_text('{"class_allow_list": "fl_plugins."}')
    with pytest.raises(ValueError, match="class_allow_list must be a list"):
        configure_site(site, None)


def test_configure_workspace(tmp_path):
    prod = tmp_path / "prod_00"
    _site(prod, "localhost", "server", SERVER_RESOURCES_DEFAULT)
    _site(prod, "site-1", "client", CLIENT_RESOURCES_DEFAULT)
    _site(prod, "site-2", "client", CLIENT_RESOURCES_DEFAULT)
    admin = prod / "admin@nvidia.com" / "startup"
    admin.mkdir(parents=True)
    (admin / "fed_admin.json").write_text("{}")
    out = configure_workspace(prod, {"site-1": "/d/1.json", "*": "/d/{site}.json"})
    assert sorted(out) == ["localhost", "site-1", "site-2"]
    assert _read(prod / "site-1" / "local" / "fl_plugins_site.json") == {"datalist": "/d/1.json"}
    assert _read(prod / "site-2" / "local" / "fl_plugins_site.json") == {"datalist": "/d/{site}.json"}
    assert not (prod / "localhost" / "local" / "fl_plugins_site.json").exists()
    for s in ("localhost", "site-1", "site-2"):
        assert "fl_plugins." in _read(prod / s / "local" / "resources.json")["class_allow_list"]
    with pytest.raises(NotASiteWorkspaceError, match="site-9"):
        configure_workspace(prod, {"site-9": "/x.json"})
    with pytest.raises(NotASiteWorkspaceError, match="no FLARE site workspaces"):
        configure_workspace(tmp_path / "prod_00" / "admin@nvidia.com", {})


def test_cli(tmp_path, capsys):
    prod = tmp_path / "prod_00"
    site = _site(prod, "site-1", "client", CLIENT_RESOURCES_DEFAULT)
    assert site_setup.main([str(site), "--datalist", "/d.json", "--allow", "a.b."]) == 0
    assert json.loads(capsys.readouterr().out)["site_config"].endswith("fl_plugins_site.json")
    assert _read(site / "local" / "resources.json")["class_allow_list"][-len(CLASS_ALLOW_PREFIXES) - 1 :] == [*CLASS_ALLOW_PREFIXES, "a.b."]
    assert site_setup.main(["--workspace", str(prod), "--datalist", "/d/{site}.json"]) == 0
    assert _read(site / "local" / "fl_plugins_site.json") == {"datalist": "/d/{site}.json"}
    assert site_setup.main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def _component_paths(node, where=""):
    if isinstance(node, dict):
        for key in ("path", "class_path"):
            if isinstance(node.get(key), str) and "." in node[key]:
                yield where, node[key]
        for k, v in node.items():
            yield from _component_paths(v, f"{where}.{k}" if where else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _component_paths(v, f"{where}[{i}]")


def _allowed(path: str, allow: list[str]) -> bool:  # nvflare 2.9 ComponentPathAuthorizer matching rules
    return any(path == p or (path.startswith(p) if p.endswith(".") else path.startswith(p + ".")) for p in allow)


_REPO_JOBS = sorted(p.parent for p in (Path(__file__).resolve().parents[2] / "jobs").glob("*/meta.json"))


@pytest.mark.parametrize("job_dir", _REPO_JOBS or [None], ids=[j.name for j in _REPO_JOBS] or ["no-jobs"])
def test_repo_job_classes_pass_the_site_allow_list(job_dir):
    """Every class a code-free job in jobs/ names must pass the allow list site_setup writes (else the job fails
    on the sites with ComponentNotAuthorized; declare the class in site_setup.JOB_NVFLARE_CLASSES; every job/option
    combination the builder can emit is checked in tests/flare/test_allow_list.py)."""
    if job_dir is None:
        pytest.skip("jobs/ has no job folder yet")
    if any(job_dir.glob("*/custom")):
        pytest.skip(f"{job_dir.name} ships app/custom code (BYOC): the allow list does not apply")
    allow = merge_allow_list(None, DEFAULT, CLASS_ALLOW_PREFIXES)
    bad = []
    for cfg in job_dir.glob("*/config/config_fed_*.json"):
        for where, path in _component_paths(json.loads(cfg.read_text())):
            if not _allowed(path, allow):
                bad.append(f"{cfg.relative_to(job_dir)}: {where}: {path}")
    assert not bad, "classes not on the site allow list:\n" + "\n".join(bad)

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_plugins.data import DataError, resolve_datalist, write_site_config
from fl_plugins.data.site_config import ENV_VAR, SITE_CONFIG_NAME


@pytest.fixture()
def two_sites(tmp_path: Path) -> Path:
    for s in ("site-1", "site-2"):
        (tmp_path / "data" / s).mkdir(parents=True)
        (tmp_path / "data" / s / "datalist.json").write_text("{}")
    return tmp_path / "data"


def test_site_config_file_with_placeholder(tmp_path, two_sites, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    local = tmp_path / "local"
    cfg = write_site_config(local, two_sites / "{site}" / "datalist.json")
    assert cfg == local / SITE_CONFIG_NAME and "{site}" in json.loads(cfg.read_text())["datalist"]
    assert resolve_datalist("site-2", local) == (two_sites / "site-2" / "datalist.json").resolve()


def test_env_var_overrides_site_config(tmp_path, two_sites, monkeypatch):
    write_site_config(tmp_path / "local", two_sites / "site-1" / "datalist.json")
    monkeypatch.setenv(ENV_VAR, str(two_sites / "{site}" / "datalist.json"))
    assert resolve_datalist("site-2", tmp_path / "local").parent.name == "site-2"
    assert resolve_datalist("site-2", None).parent.name == "site-2"


def test_relative_path_is_relative_to_config_dir(tmp_path, two_sites, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    (tmp_path / SITE_CONFIG_NAME).write_text(json.dumps({"datalist": "data/{site}/datalist.json"}))
    assert resolve_datalist("site-1", tmp_path) == (two_sites / "site-1" / "datalist.json").resolve()


@pytest.mark.parametrize(
    "content,expect",
    [(None, "create"), ("not json", "not valid JSON"), ('{"other": 1}', "no 'datalist'"),
     ('{"datalist": "/nowhere/{site}/datalist.json"}', "/nowhere/site-1/datalist.json")],
)
def test_site_config_errors_say_what_to_create(tmp_path, monkeypatch, content, expect):
    monkeypatch.delenv(ENV_VAR, raising=False)
    if content is not None:
        (tmp_path / SITE_CONFIG_NAME).write_text(content)
    with pytest.raises(DataError) as e:
        resolve_datalist("site-1", tmp_path)
    assert expect in str(e.value) and SITE_CONFIG_NAME in str(e.value)


def test_missing_env_target_and_nothing_configured(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "{site}.json"))
    with pytest.raises(DataError, match="site-7.json"):
        resolve_datalist("site-7", None)
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(DataError, match=ENV_VAR):
        resolve_datalist("site-7", None)

"""The site set-up allows exactly the classes our jobs can emit (nvflare 2.9 ``class_allow_list``).

Every registered job (``job_builder.job_names()``) is built with every entry of :data:`OPTION_VARIANTS`, exported,
and each component config of its ``config_fed_server.json`` / ``config_fed_client.json`` is checked the way a site
checks it: nvflare's own config walk (``JsonConfigurator._authorize_component_config_tree``: top-level workflows,
components, executors, filters and every nested ``{"path": ...}`` in their args) feeding nvflare's own
``ComponentPathAuthorizer`` reading the ``local/resources.json`` that ``site_setup.configure_site`` wrote into a
fake provisioned server / client workspace. The reverse holds too: every nvflare class declared in
``site_setup.JOB_NVFLARE_CLASSES`` is emitted by some job/option and is not on nvflare's default list.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from nvflare.apis.fl_exception import UnsafeComponentError
from nvflare.apis.workspace import Workspace
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer
from nvflare.fuel.utils.json_scanner import Node
from nvflare.private.json_configer import JsonConfigurator

from fl_plugins.flare import job_builder, site_setup

#: Option combinations that change which classes a job emits: variant id -> ``build_job`` overrides. Every job in
#: ``job_names()`` is built with every variant. One line per variant; add e.g. aggregator choices here.
OPTION_VARIANTS: dict[str, dict] = {
    "quantization=None": {"fl": {"quantization": None}},
    "quantization=float16": {"fl": {"quantization": "float16"}},
    "quantization=blockwise8": {"fl": {"quantization": "blockwise8"}},
    "aggregator=weighted_average": {"fl": {"aggregator": "weighted_average"}},
}

CONFIGS = {"server": "config_fed_server.json", "client": "config_fed_client.json"}
#: (job, variant) combinations the job refuses when it is built (tested below): PTNU needs unquantised weights
REFUSED = {("fclopt_ptnu_dp_pretrain", "quantization=float16"), ("fclopt_ptnu_dp_pretrain", "quantization=blockwise8")}
CASES = [(job, variant) for job in job_builder.job_names() for variant in OPTION_VARIANTS
         if (job, variant) not in REFUSED]

#: what nvflare's provisioning writes into a site's local/resources.json.default (the allow-list part)
_PROVISIONED_RESOURCES = {
    "format_version": 2,
    "class_list_enforcement_mode": "enforce",
    "class_allow_list": list(DEFAULT_CLASS_ALLOW_LIST),
}
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _site(root: Path, name: str, role: str) -> Path:
    d = root / name
    (d / "startup").mkdir(parents=True)
    (d / "local").mkdir()
    (d / "startup" / ("fed_server.json" if role == "server" else "fed_client.json")).write_text("{}")
    (d / "local" / "resources.json.default").write_text(json.dumps(_PROVISIONED_RESOURCES))
    return d


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, Workspace]:
    """A provisioned server and client workspace after ``configure_site``: role -> nvflare ``Workspace``."""
    root = tmp_path_factory.mktemp("prod_00")
    out = {}
    for role, name in (("server", "localhost"), ("client", "site-1")):
        d = _site(root, name, role)
        site_setup.configure_site(d, None)
        ws = Workspace(str(d), name)
        assert ws.get_resources_file_path() == str(d / "local" / "resources.json")
        out[role] = ws
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(job, variant) -> exported job folder (built once per module)."""
    root = tmp_path_factory.mktemp("jobs")
    out = {}
    for job, variant in CASES:
        dst = root / re.sub(r"[^A-Za-z0-9_.-]", "_", variant)
        job_builder.build_job(job, OPTION_VARIANTS[variant]).export_job(str(dst))
        out[job, variant] = dst / job
    return out


def _app_configs(job_dir: Path) -> list[tuple[str, Path]]:
    """(role, config file) of every app the job deploys (``meta.json`` deploy_map)."""
    meta = json.loads((job_dir / "meta.json").read_text())
    assert not list(job_dir.glob("*/custom")), f"{job_dir.name} ships app/custom code: the allow list would not apply"
    out = []
    for app, targets in meta["deploy_map"].items():
        roles = ["server", "client"] if "@ALL" in targets else ["server" if t == "server" else "client" for t in targets]
        for role in sorted(set(roles)):
            out.append((role, job_dir / app / "config" / CONFIGS[role]))
    return out


def _checked_classes(config_file: Path, workspace: Workspace | None) -> dict[str, str]:
    """Walk ``config_file`` as a site does; every component config goes through nvflare's authorizer reading
    ``workspace``'s resources (``workspace=None``: only collect). Returns class path -> config path; raises
    ``UnsafeComponentError`` for the first class the site would reject."""
    authorizer = ComponentPathAuthorizer()
    seen: dict[str, str] = {}

    def auth(config_dict, config_ctx, node):  # noqa: ARG001 - nvflare's build_auth_func signature
        path = config_dict.get("path", config_dict.get("class_path"))
        seen.setdefault(path, node.path())
        if workspace is not None:
            authorizer.authorize_component_config(config_dict, node, workspace=workspace)
        return ""

    conf = JsonConfigurator(str(config_file), base_pkgs=[], module_names=[])
    conf.set_component_build_authorizer(auth)
    root = Node(conf.config_data)
    root.processor = conf
    conf._authorize_component_config_tree(conf.config_data, conf.config_ctx, root)
    return seen


def _all_path_strings(node) -> set[str]:
    """Every dotted ``path`` / ``class_path`` value anywhere in a config (independent of nvflare's walk)."""
    out: set[str] = set()
    if isinstance(node, dict):
        for key in ("path", "class_path"):
            if isinstance(node.get(key), str) and _DOTTED.match(node[key]):
                out.add(node[key])
        for v in node.values():
            out |= _all_path_strings(v)
    elif isinstance(node, list):
        for v in node:
            out |= _all_path_strings(v)
    return out


def _emitted(exported) -> dict[str, list[str]]:
    """class path -> ['job/variant/role', ...] over every exported job."""
    out: dict[str, list[str]] = {}
    for (job, variant), job_dir in exported.items():
        for role, cfg in _app_configs(job_dir):
            for cls in _checked_classes(cfg, None):
                out.setdefault(cls, []).append(f"{job}/{variant}/{role}")
    return out


def test_option_table_covers_every_quantization_type_controller_and_aggregator():
    fl = [v.get("fl", {}) for v in OPTION_VARIANTS.values()]
    assert set(job_builder.QUANTIZATION_TYPES) <= {f.get("quantization") for f in fl}
    assert set(job_builder.AGGREGATORS) <= {f.get("aggregator") for f in fl}
    # a controller is emitted by an option variant or by a job whose own default names it (FCL, FCLOpt)
    own = {job_builder.JOBS[j].defaults["fl"].get("controller", "fedavg") for j in job_builder.job_names()}
    assert set(job_builder.CONTROLLERS) <= {f.get("controller", "fedavg") for f in fl} | own


@pytest.mark.parametrize(("job", "variant"), sorted(REFUSED))
def test_refused_combinations_are_refused_with_a_message(job, variant):
    with pytest.raises(ValueError, match="needs unquantised weights"):
        job_builder.build_job(job, OPTION_VARIANTS[variant])


def test_written_list_is_default_plus_declared(sites):
    declared = ["fl_plugins.", *site_setup.JOB_NVFLARE_CLASSES]
    assert site_setup.CLASS_ALLOW_PREFIXES == declared
    assert site_setup.site_class_allow_list() == [*DEFAULT_CLASS_ALLOW_LIST, *declared]
    for ws in sites.values():
        written = json.loads(Path(ws.get_resources_file_path()).read_text())["class_allow_list"]
        assert written == site_setup.site_class_allow_list()
        ComponentPathAuthorizer._normalize_allow_list(written)  # every entry valid for nvflare (raises if not)


@pytest.mark.parametrize("job, variant", CASES, ids=[f"{j}-{v}" for j, v in CASES])
def test_site_allows_every_class_the_job_emits(job, variant, exported, sites):
    job_dir = exported[job, variant]
    for role, cfg in _app_configs(job_dir):
        try:
            checked = _checked_classes(cfg, sites[role])
        except UnsafeComponentError as e:
            pytest.fail(f"{job} ({variant}): the {role} site would reject {cfg.name}: {e} "
                        "(declare the class in site_setup.JOB_NVFLARE_CLASSES)")
        # nvflare's walk saw every class path in the file (nothing escaped the check)
        assert set(checked) == _all_path_strings(json.loads(cfg.read_text())), cfg
        assert checked, f"{cfg}: no component found"


def test_rejected_without_the_declared_classes(exported, tmp_path):
    """The check bites: a site with only the default list + ``fl_plugins.`` (the set-up before the fix) rejects the
    float16 job's quantization filters, as the user saw on POC."""
    d = _site(tmp_path, "site-1", "client")
    (d / "local" / "resources.json").write_text(json.dumps(
        dict(_PROVISIONED_RESOURCES, class_allow_list=[*DEFAULT_CLASS_ALLOW_LIST, "fl_plugins."])))
    cfg = exported["finetune_seg_unet", "quantization=float16"] / "app" / "config" / "config_fed_client.json"
    with pytest.raises(UnsafeComponentError, match=r"nvflare\.app_opt\.pt\.quantization\..*not in allow_list"):
        _checked_classes(cfg, Workspace(str(d), "site-1"))


def test_declared_list_is_exact(exported):
    """Every class a job emits is ours or allowed by nvflare's default list or declared; every declared nvflare
    class is emitted by some job/option and is not already on nvflare's default list (no padding)."""
    emitted = _emitted(exported)
    default = set(DEFAULT_CLASS_ALLOW_LIST)
    declared = list(site_setup.JOB_NVFLARE_CLASSES)
    assert len(declared) == len(set(declared)), "duplicate entries in JOB_NVFLARE_CLASSES"
    outside = {c: where[:3] for c, where in emitted.items() if not c.startswith("fl_plugins.") and c not in default}
    assert set(outside) == set(declared), (
        f"emitted non-default nvflare classes {sorted(outside)} != declared {sorted(declared)}; "
        f"not declared: {sorted(set(outside) - set(declared))}; "
        f"declared but emitted by no job/option in OPTION_VARIANTS: {sorted(set(declared) - set(outside))}"
    )
    assert not set(declared) & default, "declared classes already on nvflare's default list"
    assert all(c.startswith("nvflare.") for c in declared)

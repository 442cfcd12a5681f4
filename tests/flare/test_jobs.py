"""Job export: what each shipped job folder contains, that it carries no code, and that jobs/ matches the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from fl_plugins.flare.jobs import JOBS, build_job, job_names, job_settings
from fl_plugins.flare.recipes import export_jobs
from fl_plugins.flare.sim_workspace import write_sim_local
from fl_plugins.flare.site_setup import site_class_allow_list

REPO = Path(__file__).resolve().parents[2]
#: pretraining jobs of registered methods through the generic SSL handler: job -> (method, settings section); from
#: the JobSpecs, checked against the expected set below so that a job cannot leave the set unnoticed
METHOD_JOBS = {n: (s.method, s.section) for n, s in JOBS.items() if s.handler == "ssl"}
#: jobs with their own workflow and tasks (tests/flare/test_stagewise_job.py, test_fcl_job.py); the rest are FedAvg jobs
OWN_WORKFLOW_JOBS = {n for n, s in JOBS.items() if s.workflow != "fedavg"}
FEDAVG_JOBS = [n for n in job_names() if n not in OWN_WORKFLOW_JOBS]


def test_job_sets_from_the_specs():
    """The tests' job sets are derived from the JobSpecs; this pins what they hold today."""
    assert METHOD_JOBS == {"dino_pretrain": ("dino", "dino"), "dinov2_pretrain": ("dino", "dino"),
                           "unet_inpaint_pretrain": ("unet_inpaint", "unet_inpaint"),
                           "mae_vit_pretrain": ("mae", "mae"), "mae3d_pretrain": ("mae", "mae"),
                           **({"simclr_pretrain": ("simclr", "simclr")} if "simclr_pretrain" in JOBS else {})}
    assert OWN_WORKFLOW_JOBS == {"meduniverse_stagewise", "fcl_pretrain", "fcl_noexchange_pretrain",
                                 "fclopt_pretrain", "fclopt_ptnu_dp_pretrain"}
    assert {n for n, s in JOBS.items() if s.handler == "finetune"} == {
        "finetune_seg_unet", "finetune_seg_vit", "finetune_cls", "finetune_cls_cnn"}


def _paths(node) -> list[str]:
    """Every component class path in a config, nested ones included (nvflare checks those too)."""
    out = []
    if isinstance(node, dict):
        if isinstance(node.get("path"), str) and "." in node["path"] and "args" in node:
            out.append(node["path"])
        for v in node.values():
            out += _paths(v)
    elif isinstance(node, list):
        for v in node:
            out += _paths(v)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jobs")
    export_jobs(out)
    return out


@pytest.mark.parametrize("name", job_names())
def test_job_has_no_custom_code_and_only_allowed_classes(exported, name):
    job = exported / name
    assert not (job / "app" / "custom").exists()  # no BYOC: sites need fl_plugins installed, not the byoc right
    meta = json.loads((job / "meta.json").read_text())
    assert meta["deploy_map"] == {"app": ["@ALL"]}
    for side in ("server", "client"):
        cfg = json.loads((job / "app" / "config" / f"config_fed_{side}.json").read_text())
        for p in _paths(cfg):
            assert p.startswith("fl_plugins.") or p in DEFAULT_CLASS_ALLOW_LIST, f"{name}/{side}: {p} not allowed"


@pytest.mark.parametrize("name", FEDAVG_JOBS)
def test_job_server_config(exported, name):
    cfg = json.loads((exported / name / "app" / "config" / "config_fed_server.json").read_text())
    assert cfg["server"]["task_request_interval"] == 0.1
    (wf,) = cfg["workflows"]
    assert wf["path"] == "fl_plugins.flare.controllers.FedAvgWithFinalValidation"
    assert wf["args"]["task_check_period"] == 0.05 and wf["args"]["num_rounds"] == 2
    comps = {c["id"]: c for c in cfg["components"]}
    assert set(comps) == {"persistor", "tb_receiver"}  # the controller picks the best model (no model selector)
    if name.startswith("finetune"):
        assert comps["persistor"]["args"]["model_config"] == JOBS[name].defaults["model"]
        assert "num_batches_tracked" in comps["persistor"]["args"]["exclude_regex"]
    else:  # the registered method; exactly its site-kept keys are excluded (DINO mode A: none)
        from fl_plugins.flare.jobs import non_federated_regex_of
        from fl_plugins.methods import build

        args = comps["persistor"]["args"]
        assert args["method"] == METHOD_JOBS[name][0] and "model_config" not in args
        assert args.get("exclude_regex") == non_federated_regex_of(build(args["method"], args["method_config"]))
        if args["method"] == "dino":
            assert args["method_config"]["federation_mode"] == "A" and "exclude_regex" not in args
    assert wf["args"].get("key_metric") == JOBS[name].defaults["fl"]["key_metric"]


@pytest.mark.parametrize("name", FEDAVG_JOBS)
def test_job_client_config(exported, name):
    cfg = json.loads((exported / name / "app" / "config" / "config_fed_client.json").read_text())
    (ex,) = cfg["executors"]
    assert ex["tasks"] == ["train", "validate", "submit_model"]
    assert ex["executor"]["path"] == "fl_plugins.flare.executor.HandlerExecutor"  # one executor for every method
    args = ex["executor"]["args"]
    if name.startswith("finetune"):
        assert args["handler"] == "finetune" and args["handler_args"]["model"] == JOBS[name].defaults["model"]
    else:
        server = json.loads((exported / name / "app" / "config" / "config_fed_server.json").read_text())
        persistor = next(c for c in server["components"] if c["id"] == "persistor")
        assert name in METHOD_JOBS  # every other FedAvg job: the generic SSL handler of the registered method
        assert args["handler"] == "ssl" and args["handler_args"]["method"] == persistor["args"]["method"]
        assert args["handler_args"]["config"] == persistor["args"]["method_config"]  # one config, both sides
        assert args["handler_args"]["spatial_dims"] == JOBS[name].dims(job_settings(name))
        # a preview for the masked-image-modelling jobs (their methods draw one); DINO has none to draw
        assert args["handler_args"].get("preview_every") == JOBS[name].defaults.get("preview_every")
    assert [c["path"] for c in cfg["components"]] == ["nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent"]


@pytest.mark.parametrize("name", job_names())
def test_shipped_jobs_folder_matches_registry(exported, name):
    """jobs/<name> is the export of the job's Recipe; regenerate with `flssl export-jobs --out jobs`."""
    made = sorted(f.relative_to(exported) for f in (exported / name).rglob("*") if f.is_file())
    shipped = sorted(f.relative_to(REPO / "jobs") for f in (REPO / "jobs" / name).rglob("*") if f.is_file())
    assert shipped == made, f"jobs/{name} has other files than its export: run `flssl export-jobs --out jobs`"
    for rel in made:
        assert json.loads((REPO / "jobs" / rel).read_text()) == json.loads((exported / rel).read_text()), (
            f"jobs/{rel} is stale")


def test_every_jobs_folder_has_a_recipe_and_every_recipe_a_folder():
    """Both directions: a folder in jobs/ that no Recipe exports fails, and so does a Recipe without a folder."""
    from fl_plugins.flare.recipes import RECIPES

    folders = {p.name for p in (REPO / "jobs").iterdir() if p.is_dir()}
    assert folders == set(RECIPES) == set(job_names())


def test_recipe_export_equals_the_job_and_refuses_bad_settings(tmp_path):
    from fl_plugins.flare.recipes import DinoRecipe, recipe_for

    r = DinoRecipe({"fl": {"num_rounds": 3}, "dino": {"lr": 5e-4}})
    r.export(str(tmp_path))
    client = json.loads((tmp_path / "dino_pretrain" / "app" / "config" / "config_fed_client.json").read_text())
    args = client["executors"][0]["executor"]["args"]["handler_args"]
    assert args["config"]["lr"] == 5e-4 and args["total_rounds"] == 3
    with pytest.raises(ValueError, match=r"job setting 'dino.lr' expects a number, got '5e-4x'"):
        DinoRecipe({"dino": {"lr": "5e-4x"}})
    with pytest.raises(ValueError, match="DinoRecipe builds job 'dino_pretrain', not 'finetune_cls'"):
        DinoRecipe(job="finetune_cls")
    with pytest.raises(ValueError, match="no recipe for job 'nope'"):
        recipe_for("nope")


def test_overrides_are_applied_and_unknown_keys_rejected():
    s = job_settings("finetune_seg_unet", {"fl": {"num_rounds": 7}, "trainer": {"steps_per_round": 3}})
    assert s["fl"]["num_rounds"] == 7 and s["trainer"]["steps_per_round"] == 3 and s["trainer"]["batch_size"] == 8
    with pytest.raises(ValueError, match=r"unknown job setting 'fl.rounds'"):
        build_job("finetune_seg_unet", {"fl": {"rounds": 3}})
    with pytest.raises(ValueError, match="unknown job 'nope'"):
        build_job("nope")
    with pytest.raises(ValueError, match="num_rounds must be >= 1, got 0"):
        build_job("finetune_seg_unet", {"fl": {"num_rounds": 0}})


@pytest.mark.parametrize("kind", ["float16", "blockwise8"])
def test_quantized_transfer_adds_filters_both_ways(tmp_path, kind):
    build_job("dino_pretrain", {"fl": {"quantization": kind}}).export_job(str(tmp_path))
    cfg = {side: json.loads((tmp_path / "dino_pretrain/app/config" / f"config_fed_{side}.json").read_text())
           for side in ("server", "client")}
    q, dq = "nvflare.app_opt.pt.quantization.quantizer.ModelQuantizer", \
        "nvflare.app_opt.pt.quantization.dequantizer.ModelDequantizer"
    assert [f["path"] for f in cfg["server"]["task_data_filters"][0]["filters"]] == [q]
    assert [f["path"] for f in cfg["server"]["task_result_filters"][0]["filters"]] == [dq]
    assert [f["path"] for f in cfg["client"]["task_data_filters"][0]["filters"]] == [dq]
    assert [f["path"] for f in cfg["client"]["task_result_filters"][0]["filters"]] == [q]
    with pytest.raises(ValueError, match="quantization must be one of"):
        build_job("dino_pretrain", {"fl": {"quantization": "int3"}})


def test_sim_workspace_allow_list_and_site_config(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "resources.json").write_text(json.dumps({"keep_me": 1}))
    write_sim_local(tmp_path, "/data/{site}/datalist.json")
    write_sim_local(tmp_path, "/data/{site}/datalist.json")  # idempotent
    res = json.loads((tmp_path / "local" / "resources.json").read_text())
    assert res["keep_me"] == 1
    # the same declared list a site's set-up writes (fl_plugins. + the nvflare classes jobs can emit)
    assert res["class_allow_list"] == site_class_allow_list()
    site = json.loads((tmp_path / "local" / "fl_plugins_site.json").read_text())
    assert site == {"datalist": "/data/{site}/datalist.json"}


def _handler_args(job, handler: str) -> dict:
    """The ``handler_args`` of the job's one executor running ``handler``, as exported in the client config."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        job.export_job(d)
        cfg = json.loads(next(Path(d).rglob("config_fed_client.json")).read_text())
    (exe,) = [e["executor"] for e in cfg["executors"] if e["executor"]["args"]["handler"] == handler]
    return exe["args"]["handler_args"]


def _client_dino(job, arg: str = "config") -> dict:
    """The DINO job's method ``config`` (or another argument of its generic SSL handler) as exported."""
    args = _handler_args(job, "ssl")
    assert args["method"] == "dino"
    return args[arg]


@pytest.mark.parametrize(("name", "key", "value"), [
    ("dino_pretrain", "lr", 5e-4),
    ("dino_pretrain", "momentum_teacher", 0.99),
    ("dinov2_pretrain", "centering", "sinkhorn_knopp"),
    ("dinov2_pretrain", "koleo_weight", 0.0),
    ("dinov2_pretrain", "mask_sample_probability", 0.25),
])
def test_every_dino_config_field_is_settable(name, key, value):
    """``--set dino.<field>`` reaches the site executor for any DINOConfig field, not only the listed defaults."""
    assert JOBS[name].defaults["dino"].get(key) != value
    dino = _client_dino(build_job(name, {"dino": {key: value}}))
    assert dino[key] == value
    assert dino["total_steps"] == 2 * 5  # rounds x steps_per_round still fills the schedule horizon


def test_dino_settings_unknown_field_and_bad_value_named():
    with pytest.raises(ValueError, match=r"unknown job setting 'dino\.lrr'; known: \[.*'lr'"):
        job_settings("dino_pretrain", {"dino": {"lrr": 1e-3}})
    with pytest.raises(ValueError, match=r"unknown job setting 'model'"):
        job_settings("dino_pretrain", {"model": {"lr": 1e-3}})
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -1"):
        build_job("dino_pretrain", {"dino": {"lr": -1}})


def test_explicit_total_steps_is_kept():
    assert _client_dino(build_job("dino_pretrain", {"dino": {"total_steps": 777}}))["total_steps"] == 777


@pytest.mark.parametrize("name", ["dino_pretrain", "dinov2_pretrain"])
def test_view_settings_reach_the_executor(name):
    """``--set views.<field>`` (augmentation strength of the training views) is exported as the executor's ``views``."""
    assert _client_dino(build_job(name)) and _client_dino(build_job(name), "views") == {}
    views = _client_dino(build_job(name, {"views": {"intensity_prob": 0.0, "blur_sigma": [0.05, 0.6]}}), "views")
    assert views == {"intensity_prob": 0.0, "blur_sigma": [0.05, 0.6]}


@pytest.mark.parametrize(("views", "match"), [
    ({"intensity_prob": 1.5}, r"view settings: intensity_prob=1.5 must be in \[0, 1\]"),
    ({"blur_sigma": [2.0, 1.0]}, r"view settings: blur_sigma=\(2.0, 1.0\) must satisfy 0 < min <= max"),
    ({"intensity": 0.5}, r"unknown job setting 'views\.intensity'; known: \[.*'intensity_prob'"),
    ({"local_crop_size": 16}, r"unknown job setting 'views\.local_crop_size'"),  # a dino.* setting, not a view one
])
def test_bad_view_settings_are_named_when_the_job_is_built(views, match):
    with pytest.raises(ValueError, match=match):
        build_job("dino_pretrain", {"views": views})


def _client_ssl(job) -> dict:
    """The generic SSL handler's arguments as exported in the client config."""
    return _handler_args(job, "ssl")


def test_unet_inpaint_settings_reach_the_executor_and_bad_ones_are_named():
    args = _client_ssl(build_job("unet_inpaint_pretrain"))
    assert args["method"] == "unet_inpaint" and args["spatial_dims"] == 2 and args["knn_every"] == 0
    assert args["config"]["total_steps"] == 2 * 5 and args["config"]["seed"] == 0  # rounds x steps, the job's seed
    args = _client_ssl(build_job("unet_inpaint_pretrain", {"unet_inpaint": {"loss": "l1", "unet": {
        "channels": [8, 16, 32], "strides": [2, 2]}}, "preview_every": 0, "fl": {"seed": 3}}))
    assert args["config"]["loss"] == "l1" and args["config"]["unet"]["channels"] == [8, 16, 32]
    assert args["preview_every"] == 0 and args["config"]["seed"] == 3
    with pytest.raises(ValueError, match=r"unknown job setting 'unet_inpaint\.mask'; known: \[.*'mask_ratio'"):
        job_settings("unet_inpaint_pretrain", {"unet_inpaint": {"mask": 0.5}})
    with pytest.raises(ValueError, match=r"unknown job setting 'unet_inpaint\.unet\.chanels'"):
        job_settings("unet_inpaint_pretrain", {"unet_inpaint": {"unet": {"chanels": [8]}}})
    with pytest.raises(ValueError, match=r"unet_inpaint setting 'loss'='huber': must be 'mse' or 'l1'"):
        build_job("unet_inpaint_pretrain", {"unet_inpaint": {"loss": "huber"}})


def test_finetune_seg_unet_takes_a_pretrained_unet_and_its_settings():
    s = job_settings("finetune_seg_unet", {"model": {"pretrained": "/x/unet.pt", "channels": [8, 16, 32],
                                                     "strides": [2, 2]}})
    assert s["model"] == {"arch": "unet", "num_classes": 3, "pretrained": "/x/unet.pt", "channels": [8, 16, 32],
                          "strides": [2, 2]}
    with pytest.raises(ValueError, match=r"unknown job setting 'model\.backbone'"):
        job_settings("finetune_seg_unet", {"model": {"backbone": {}}})


@pytest.mark.parametrize("name", ["finetune_cls", "finetune_cls_cnn", "finetune_seg_unet", "finetune_seg_vit"])
def test_finetune_optimisation_settings_reach_the_executor(name):
    """``--set trainer.warmup_steps=...`` etc. (FinetuneConfig fields beside the job's defaults) reach the sites."""
    args = _handler_args(build_job(name, {"trainer": {"warmup_steps": 4, "weight_decay": 0.05,
                                                             "grad_clip": 1.0, "aug_rot90": False}}), "finetune")
    assert {k: args["trainer"][k] for k in ("warmup_steps", "weight_decay", "grad_clip", "aug_rot90")} == {
        "warmup_steps": 4, "weight_decay": 0.05, "grad_clip": 1.0, "aug_rot90": False}
    assert "warmup_steps" not in _handler_args(build_job(name), "finetune")["trainer"]  # the dataclass default applies


@pytest.mark.parametrize(("trainer", "match"), [
    ({"warmup_steps": "x"}, r"job setting 'trainer\.warmup_steps' expects an integer, got 'x'"),
    ({"warmup_steps": -1}, r"fine-tuning setting 'warmup_steps'=-1: must be >= 0"),
    ({"warmup_steps": 500}, r"'total_steps'=20: must be >= max\(1, warmup_steps=500\)"),  # 2 rounds x 10 steps
    ({"optimizer": "adamx"}, r"fine-tuning setting 'optimizer'='adamx'"),
    ({"total_steps": 9}, r"unknown job setting 'trainer\.total_steps'"),
])
def test_bad_finetune_trainer_settings_fail_when_the_job_is_built(trainer, match):
    with pytest.raises(ValueError, match=match):
        build_job("finetune_cls", {"trainer": trainer})

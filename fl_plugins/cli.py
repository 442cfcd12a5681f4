"""``flssl``: the everyday steps — make or split site data, run a job in the FLARE simulator with site data wired
in, evaluate a checkpoint on a held-out split, print a results table.

Run ``flssl <command> --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fl_plugins.settings import parse_set

__all__ = ["main"]


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


# ----------------------------------------------------------------------------------------------------------- data
def cmd_synth(a: argparse.Namespace) -> int:
    from fl_plugins.data import generate_synthetic_multitask, generate_synthetic_segmentation

    t0 = time.perf_counter()
    if a.task == "segmentation":
        paths = generate_synthetic_segmentation(
            a.out, num_sites=a.sites, volumes_per_site=a.volumes, num_slices=a.slices, size=a.size,
            labelled_per_site=a.labelled, seed=a.seed,
        )
    else:
        paths = generate_synthetic_multitask(a.out, class_counts=tuple([2] * a.sites), size=a.size, seed=a.seed)
    print(f"wrote {len(paths)} site datalists in {time.perf_counter() - t0:.1f}s:")
    for p in paths:
        print(f"  {p}")
    return 0


_CSV_OPTIONS = ("task", "image_column", "label_column", "mask_column", "patient_column", "num_classes")


def cmd_split(a: argparse.Namespace) -> int:
    from fl_plugins.data import split_decathlon, split_images_csv, split_medmnist

    src = Path(a.dataset)
    suffix = src.suffix.lower()
    if getattr(a, "volumes", False) and suffix in (".npz", ".csv"):
        raise CLIError("--volumes reads a Decathlon dataset's volumes whole (3D); a MedMNIST .npz holds 2D images or "
                       "3D volumes already, a CSV lists 2D images: leave --volumes out")
    given = [f"--{k.replace('_', '-')}" for k in _CSV_OPTIONS if getattr(a, k, None) is not None]
    if given and suffix != ".csv":
        raise CLIError(f"{', '.join(given)}: options of a CSV of labels (--dataset labels.csv), not of "
                       f"{str(src)!r}")
    fractions = {k: v for k, v in (("val_fraction", a.val_fraction), ("test_fraction", a.test_fraction))
                 if v is not None}
    if suffix == ".npz":
        if a.eval_only:
            raise CLIError("--eval-only: a MedMNIST .npz has its own test split (every site gets a part of it)")
        paths = split_medmnist(src, a.out, num_sites=a.sites, seed=a.seed, labelled_per_site=a.labelled, rgb=a.rgb)
    elif suffix == ".csv":
        task = a.task or ("segmentation" if a.mask_column else "classification" if a.label_column else None)
        paths = split_images_csv(
            src, a.out, num_sites=a.sites, seed=a.seed, labelled_per_site=a.labelled, task=task,
            image_column=a.image_column or "image", label_column=a.label_column or "label",
            mask_column=a.mask_column or "mask", patient_column=a.patient_column, num_classes=a.num_classes,
            rgb=a.rgb, modality_preset=a.preset or "unit", eval_only=a.eval_only, **fractions,
        )
    elif suffix == ".json" or src.is_dir():
        paths = split_decathlon(
            src, a.out, num_sites=a.sites, seed=a.seed, labelled_per_site=a.labelled, modality_preset=a.preset or "mr",
            volumes=bool(getattr(a, "volumes", False)), eval_only=a.eval_only, **fractions,
        )
    else:
        raise CLIError(f"--dataset {str(src)!r}: flssl split reads a Decathlon dataset.json, a MedMNIST .npz or a "
                       f"CSV of labels (.csv) listing PNG/JPEG images; {src.suffix or 'this'} files are not supported")
    print(f"wrote {len(paths)} site datalists:")
    for p in paths:
        print(f"  {p}")
    summary = Path(a.out) / "split_summary.json"
    if summary.exists():
        print(summary.read_text())
    return 0


def _refuse_dataset_description(p: Path) -> None:
    """A Decathlon ``dataset.json`` (a dataset description) or a CSV of labels given where a site datalist belongs:
    say what to run."""
    if p.suffix.lower() == ".csv":
        raise CLIError(f"{str(p)!r} is a CSV of labels, not a site datalist: run 'flssl split --dataset {p} "
                       "--out <dir> --sites N' first, then check-data <dir>")
    try:
        obj = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return  # load_datalist names the problem
    if (isinstance(obj, dict) and "format" not in obj and ("training" in obj or "test" in obj)
            and ("labels" in obj or "modality" in obj)):
        raise CLIError(f"{str(p)!r} is a dataset description (Decathlon dataset.json), not a site datalist: run "
                       f"'flssl split --dataset {p} --out <dir> --sites N' first, then check-data <dir>")


def _check_datalists(paths: list[Path], sections: tuple[str, ...], job: str | None = None,
                     settings: dict[str, Any] | None = None, fit_error: str = "the data does not fit the job",
                     on_ok: Any = None, present_only: bool = False) -> None:
    """Load and deep-check each datalist and, for a ready job, that the data fits it; print what the data layer does
    to the images (once per note); raise one error listing every misfit. ``on_ok(path, dl)`` after each file.
    ``present_only``: of ``sections`` check ``training`` (unless the datalist is evaluation-only) and the non-empty
    others, noting the empty ones."""
    from fl_plugins.data import load_datalist, validate_datalist
    from fl_plugins.flare.data_check import job_data_notes
    from fl_plugins.flare.jobs.data_fit import job_data_problems

    problems: list[str] = []
    notes: list[str] = []
    for p in paths:
        _refuse_dataset_description(p)
        dl = load_datalist(p)
        secs = sections
        if present_only:
            secs = tuple(s for s in sections if dl.get(s) or (s == "training" and not dl.get("eval_only")))
            for s in sections:
                if s not in secs and s != "training" and not dl.get("eval_only"):
                    note = (f"section {s!r} is empty in some datalists" + (": fine-tuning jobs validate on it"
                                                                          if s == "validation" else ""))
                    if note not in notes:
                        notes.append(note)
            note = ('evaluation-only datalists ("eval_only": true): for flssl evaluate --split test; no job trains '
                    'on them')
            if dl.get("eval_only") and note not in notes:
                notes.append(note)
        validate_datalist(dl, sections=secs, deep=True)
        if job is not None and settings is not None:
            problems += job_data_problems(job, settings, dl)
        notes += [n for n in job_data_notes(dl) if n not in notes]
        if on_ok is not None:
            on_ok(p, dl)
    for n in notes:
        print(f"note: {n}")
    if problems:
        raise CLIError(f"{fit_error}:\n  " + "\n  ".join(problems))


def cmd_check_data(a: argparse.Namespace) -> int:
    settings = None
    if a.job:
        from fl_plugins.flare.jobs import job_settings

        try:
            settings = job_settings(a.job, parse_set(a.set))
        except ValueError as e:
            raise CLIError(str(e)) from e

    def ok(p: Path, dl: dict[str, Any]) -> None:
        n = {s: len(dl.get(s, [])) for s in ("training", "validation", "test")}
        preset = dl["modality_preset"] + (f" ({dl['modality_preset_reason']})" if "modality_preset_reason" in dl else "")
        print(f"OK {p}: {n}, intensity preset {preset}")

    _check_datalists(_datalists(a.datalist), ("training", "validation", "test"), a.job, settings,
                     f"the data does not fit job {a.job!r}", on_ok=ok, present_only=not a.job)
    return 0


def _datalists(arg: str) -> list[Path]:
    p = Path(arg)
    if p.is_dir():
        found = sorted(p.glob("*/datalist.json"))
        if not found:
            raise CLIError(f"no site datalists (<site>/datalist.json) under {str(p)!r}")
        return found
    if not p.is_file():
        raise CLIError(f"datalist {str(p)!r} does not exist")
    return [p]


# ----------------------------------------------------------------------------------------------------------- jobs
def cmd_export_jobs(a: argparse.Namespace) -> int:
    from fl_plugins.flare.recipes import export_jobs

    for p in export_jobs(a.out, a.names or None):
        print(f"exported {p}")
    return 0


def cmd_resume(a: argparse.Namespace) -> int:
    from fl_plugins.flare.resume import make_resume_job

    existed = os.path.lexists(a.out)
    try:
        done = make_resume_job(a.checkpoint, a.job, a.out)  # ResumeError (a ValueError): main prints it, exit 2
    except OSError:  # a write failed half-way (disk full, read-only): no half-copied job folder is left behind
        if not existed and os.path.isdir(a.out):
            shutil.rmtree(a.out, ignore_errors=True)
        raise
    first, last = done["rounds"]
    print(f"wrote {done['out']} (job {done['name']!r}): resumes run {done['run_id']} of job {done['from_job']} after "
          f"its round {done['completed_round']}, runs rounds {first}..{last}")
    print(f"submit it: nvflare job submit -j {done['out']}   (or in the admin console: submit_job {done['out']})")
    return 0


def cmd_list_jobs(a: argparse.Namespace) -> int:
    from fl_plugins.flare.jobs import JOBS

    for name, spec in sorted(JOBS.items()):
        print(f"{name:22s} {spec.description}")
    return 0


def init_workspace(ws: Path, data: str | None) -> None:
    """Prepare a simulator workspace: class allow list + where each simulated site finds its datalist."""
    from fl_plugins.flare.sim_workspace import write_sim_local

    write_sim_local(ws, datalist_template=data)


def cmd_init_workspace(a: argparse.Namespace) -> int:
    ws = Path(a.workspace)
    init_workspace(ws, _datalist_template(a.data))
    print(f"prepared {ws / 'local'}; now run: nvflare simulator <job folder> -w {ws} -n <sites> -t <threads>")
    return 0


def _datalist_template(data: str | None) -> str | None:
    if data is None:
        return None
    p = Path(data).resolve()
    if p.is_dir():
        if not any(p.glob("*/datalist.json")):
            raise CLIError(f"data folder {str(p)!r} has no <site>/datalist.json (make one with 'flssl synth' or 'flssl split')")
        return str(p / "{site}" / "datalist.json")
    if "{site}" in str(data):
        return str(data)
    raise CLIError(f"--data must be a folder of <site>/datalist.json or a path with {{site}}, got {data!r}")


_PROGRESS = re.compile(r"(Round \d+ started|Finished FedAvg|final validation|new best global model|ERROR|"
                       r"cannot start|Traceback|system_panic|Error)")


def run_simulator(job_dir: Path, ws: Path, n_sites: int, threads: int, log_path: Path, quiet: bool = False) -> int:
    from fl_plugins.cpu_threads import site_thread_env

    # min(threads, sites) site processes train side by side: split the cores between them (unless the user set
    # OMP_NUM_THREADS); with torch's default every site would use every core (2x slower on 2 cores, see cpu_threads)
    env = site_thread_env(max(1, min(threads, n_sites)))
    cmd = [sys.executable, "-m", "nvflare.cli", "simulator", str(job_dir), "-w", str(ws), "-n", str(n_sites),
           "-t", str(threads)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                if not quiet and _PROGRESS.search(line):
                    print(f"[{time.perf_counter() - t0:6.1f}s] {line.strip()[:200]}", flush=True)
            rc = proc.wait()
        except KeyboardInterrupt:  # the simulator got the Ctrl-C too: give it time to stop, then end it
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            raise
    return rc


def _stopped_line(ws: Path, job_dir: Path, a: argparse.Namespace, log_path: Path) -> str:
    """What a Ctrl-C during ``flssl simulate`` kept (the last completed round's checkpoint) and how to resume."""
    from fl_plugins.flare.resume import CHECKPOINT_FILE, ResumeError, load_round_checkpoint

    ckpt = ws / "server" / "simulate_job" / "app_server" / CHECKPOINT_FILE
    head = f"flssl simulate: stopped (Ctrl-C) during the run (log: {log_path})"
    if not ckpt.is_file():
        return f"{head}; no round had completed, so nothing was kept to resume from: run the same command again"
    try:
        done = load_round_checkpoint(ckpt, setting="round checkpoint")
    except ResumeError as e:
        return f"{head}; its round checkpoint cannot start a resumed run ({e}): run the same command again"
    r = int(done["round"])
    if r + 1 >= int(done["total_rounds"]):
        return (f"{head} after its last round {r}; the checkpoint of that round is {ckpt}; nothing is left to "
                "resume")
    q = shlex.quote
    new_job = job_dir.parent / f"{job_dir.name}_resume{r + 1}"
    return (f"{head}; kept round {r} (the last completed of rounds 0..{int(done['total_rounds']) - 1}) in {ckpt}; "
            f"resume it: flssl resume --checkpoint {q(str(ckpt))} --job {q(str(job_dir))} --out {q(str(new_job))} "
            f"&& flssl simulate --job {q(str(new_job))} --data {q(str(a.data))} -w {q(str(ws))} -n {a.sites} "
            f"-t {a.threads}")


def sim_outputs(ws: Path) -> dict[str, Path]:
    job_ws = ws / "server" / "simulate_job"
    return {
        "global_model": job_ws / "app_server" / "FL_global_model.pt",
        "best_model": job_ws / "app_server" / "best_FL_global_model.pt",
        "final_metrics": job_ws / "app_server" / "final_metrics.json",
        "tensorboard": job_ws / "tb_events",
        "log": ws / "server" / "log.txt",
    }


def _preflight_sites(template: str | None, n_sites: int, job: str | None = None,
                     settings: dict[str, Any] | None = None) -> None:
    """Check every simulated site's datalist (files exist, NIfTI readable, labels, shapes) and, for a ready job, that
    the data fits it (task, class count, 2D/3D), before FLARE starts."""
    if template is None:
        return
    t0 = time.perf_counter()
    paths = []
    for i in range(1, n_sites + 1):
        dl_path = Path(template.replace("{site}", f"site-{i}"))
        if not dl_path.is_file():
            raise CLIError(f"simulated site site-{i} has no datalist at {str(dl_path)!r} (--data has fewer sites "
                           f"than --sites={n_sites}?)")
        paths.append(dl_path)
    _check_datalists(paths, ("training", "validation"), job, settings)
    print(f"site data checked ({n_sites} sites) in {time.perf_counter() - t0:.1f}s")


def _num_classes_from_data(template: str | None, job: str, overrides: dict[str, Any]) -> None:
    """Fine-tuning jobs take ``model.num_classes`` from the datalist unless the user set it (printed)."""
    from fl_plugins.data import load_datalist
    from fl_plugins.flare.jobs import JOBS

    spec = JOBS.get(job)
    if template is None or spec is None or "model" not in spec.defaults:
        return
    if "num_classes" in overrides.get("model", {}):
        return
    dl_path = Path(template.replace("{site}", "site-1"))
    if not dl_path.is_file():
        return
    dl = load_datalist(dl_path)
    default = spec.defaults["model"]["num_classes"]
    task = spec.defaults.get("trainer", {}).get("task")
    if dl["task"] == task and int(dl["num_classes"]) != default:
        overrides.setdefault("model", {})["num_classes"] = int(dl["num_classes"])
        print(f"model.num_classes={dl['num_classes']} from {dl_path} (the job's default is {default}; "
              "--set model.num_classes=... to override)")


def cmd_simulate(a: argparse.Namespace) -> int:
    from fl_plugins.flare.jobs import JOBS, build_job, job_settings

    ws = Path(a.workspace).resolve()
    overrides = parse_set(a.set)
    if a.rounds is not None:
        overrides.setdefault("fl", {})["num_rounds"] = a.rounds
    overrides.setdefault("fl", {}).setdefault("min_clients", a.sites)
    if a.pretrained:
        pre = Path(a.pretrained).resolve()
        if not pre.is_file():
            raise CLIError(f"--pretrained {str(pre)!r} does not exist")
        overrides.setdefault("model", {})["pretrained"] = str(pre)
    if a.labelled is not None:
        overrides["num_labelled_patients"] = a.labelled
    template = _datalist_template(a.data)
    settings = None
    if a.job in JOBS:
        _num_classes_from_data(template, a.job, overrides)
        try:
            settings = job_settings(a.job, overrides)
        except (TypeError, ValueError) as e:
            raise CLIError(f"job {a.job!r}: {e}") from e
    _preflight_sites(template, a.sites, a.job if a.job in JOBS else None, settings)
    if a.pretrained and settings is not None and "model" in settings:
        from fl_plugins.models.factory import build_model
        from fl_plugins.models.pretrained_report import pretrained_report

        try:  # load it here once: a file that does not fit is named before FLARE starts, and the user sees what loads
            if settings["model"].get("arch") == "unet":  # the U-Net has no backbone part: its loader reports
                from fl_plugins.models.unet import load_unet_pretrained

                net = build_model({**settings["model"], "pretrained": None})
                print(load_unet_pretrained(net, settings["model"]["pretrained"]))
            else:
                print(pretrained_report(build_model(settings["model"]), settings["model"]["pretrained"]))
        except ValueError as e:
            raise CLIError(f"--pretrained: {e}") from e
    if a.job in JOBS:
        jobs_dir = ws.parent / (ws.name + "_job")
        if jobs_dir.exists():
            shutil.rmtree(jobs_dir)
        try:
            build_job(a.job, overrides).export_job(str(jobs_dir))
        except (TypeError, ValueError) as e:
            raise CLIError(f"job {a.job!r}: {e}") from e
        job_dir = jobs_dir / a.job
    else:
        job_dir = Path(a.job)
        if not (job_dir / "meta.json").is_file():
            raise CLIError(f"--job {a.job!r} is neither a registered job ({sorted(JOBS)}) nor a job folder with meta.json")
        # only the user's overrides count: fl.min_clients (from --sites) is always filled in above
        if a.set or a.rounds is not None or a.pretrained or a.labelled is not None:
            raise CLIError("--set/--rounds/--pretrained/--labelled apply to registered job names, not job folders")
    if ws.exists() and a.clean:
        shutil.rmtree(ws)
    init_workspace(ws, template)
    print(f"simulating {job_dir} with {a.sites} sites ({a.threads} threads); workspace {ws}")
    t0 = time.perf_counter()
    # beside the workspace: the simulator empties <ws> (all but startup/ and local/) when it starts
    log_path = ws.parent / f"{ws.name}_simulate.log"
    try:
        rc = run_simulator(job_dir, ws, a.sites, a.threads, log_path, quiet=a.quiet)
    except KeyboardInterrupt:
        print(_stopped_line(ws, job_dir, a, log_path), file=sys.stderr)
        return 1
    out = sim_outputs(ws)
    print(f"simulator exited with {rc} after {time.perf_counter() - t0:.1f}s; full log: {log_path}")
    for k, p in out.items():
        print(f"  {k:14s} {p} {'' if p.exists() else '(missing)'}")
    if out["final_metrics"].exists():
        print(out["final_metrics"].read_text())
    if rc != 0 or not out["global_model"].exists():
        print("the run failed; see the errors above and the log", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------------- eval
def _job_configs(path: Path, name: str) -> Iterator[dict[str, Any]]:
    """The readable ``name`` configs (``config_fed_server.json`` / ``config_fed_client.json``) of a job folder,
    simulator workspace or downloaded job result (or ``path`` itself when it is a file), parsed, in path order."""
    for c in [path] if path.is_file() else sorted(path.rglob(name)):
        try:
            yield json.loads(c.read_text())
        except (OSError, json.JSONDecodeError):
            continue


def _persistor_args_from(path: Path) -> dict[str, Any]:
    """The persistor's args in a job folder, simulator workspace or downloaded job result."""
    for cfg in _job_configs(path, "config_fed_server.json"):
        for comp in cfg.get("components", []):
            if comp.get("path", "").endswith("ConfigModelPersistor"):
                return comp["args"]
    raise CLIError(f"no ConfigModelPersistor found under {str(path)!r}")


def _job_image_size(path: Path) -> int | None:
    """The sites' ``image_size`` (the executor's handler arguments in ``config_fed_client.json``) of a job folder,
    simulator workspace or downloaded result; None if no client config names one."""
    for cfg in _job_configs(path, "config_fed_client.json"):
        for ex in cfg.get("executors", []):
            size = ((ex.get("executor") or {}).get("args") or {}).get("handler_args", {}).get("image_size")
            if isinstance(size, int) and not isinstance(size, bool):
                return size
    return None


def _model_config_from(path: Path) -> dict[str, Any]:
    """The persistor's model_config (fine-tuning jobs)."""
    args = _persistor_args_from(path)
    if "model_config" not in args:
        raise CLIError(f"the job under {str(path)!r} pretrains method {args.get('method')!r}: it has no model_config "
                       "(evaluate a fine-tuning checkpoint; export a pretrained backbone with export-backbone)")
    return args["model_config"]


def _check_image_size(model_cfg: dict[str, Any], size: int | None) -> None:
    """``--image-size`` against the network: a U-Net halves it at every stride (a multiple of their product), a ViT
    cuts it into patches (a multiple of the patch size); anything else is tried on one blank image."""
    if size is None:
        return
    arch = model_cfg.get("arch")
    if size < 1:
        raise CLIError(f"--image-size {size}: must be a positive number of pixels")
    if arch == "unet":
        strides = model_cfg.get("strides", (2, 2, 2, 2))
        step = 1
        for st in strides:
            step *= int(st)
        if size % step:
            raise CLIError(f"--image-size {size}: the U-Net (strides {list(strides)}) needs a multiple of {step}; "
                           f"try {-(-size // step) * step}")
        return
    if arch in ("vit_seg", "vit_classifier"):
        patch = int((model_cfg.get("backbone") or {}).get("patch_size", 8))
        if size % patch:
            raise CLIError(f"--image-size {size}: the ViT (backbone.patch_size {patch}) needs a multiple of {patch}; "
                           f"try {-(-size // patch) * patch}")
        return
    if model_cfg.get("spatial_dims", 2) != 2:
        return
    import torch

    from fl_plugins.models.factory import build_model

    net = build_model({**model_cfg, "pretrained": None}).eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, int(model_cfg.get("in_channels", 1)), size, size))
    except RuntimeError as e:
        raise CLIError(f"--image-size {size}: too small or odd for model {arch!r} "
                       f"({str(e).strip().splitlines()[0][:160]}); try a larger size such as 64") from e


def cmd_evaluate(a: argparse.Namespace) -> int:
    from fl_plugins.engine.checkpoint import check_state_fits, load_tensor_checkpoint, state_dict_of
    from fl_plugins.engine.evaluation import evaluate_sites

    ckpt = Path(a.checkpoint)
    if not ckpt.is_file():
        raise CLIError(f"checkpoint {str(ckpt)!r} does not exist")
    job_dir = Path(a.job or ckpt.parent.parent)
    try:
        model_cfg = json.loads(a.model_config) if a.model_config else _model_config_from(job_dir)
    except json.JSONDecodeError as e:
        raise CLIError(f"--model-config {a.model_config!r} is not JSON ({e}); give e.g. "
                       "'{\"arch\": \"unet\", \"num_classes\": 3}'") from e
    if not isinstance(model_cfg, dict):
        raise CLIError(f"--model-config {a.model_config!r}: expected a JSON object (the model config)")
    image_size = a.image_size
    if image_size is None and not a.model_config:  # the size the sites trained at, not a guess
        image_size = _job_image_size(job_dir)
        if image_size is not None:
            print(f"image size {image_size} (the job's; --image-size to change)")
    _check_image_size(model_cfg, image_size)
    state = state_dict_of(load_tensor_checkpoint(ckpt), ckpt)
    from fl_plugins.models.factory import build_model

    check_state_fits(state, build_model({**model_cfg, "pretrained": None}).state_dict(), ckpt,
                     f"model {model_cfg.get('arch')!r}")
    result = evaluate_sites(model_cfg, state, _datalists(a.data), split=a.split, image_size=image_size)
    result["checkpoint"] = str(ckpt)
    print(_format_result(result))
    if a.out:
        from fl_plugins.atomic_io import atomic_write_json

        atomic_write_json(result, a.out)
        print(f"wrote {a.out}")
    return 0


def _format_result(r: dict[str, Any]) -> str:
    lines = [f"{r.get('metric', 'metric')} on split {r.get('split')!r} ({r.get('checkpoint', '')})"]
    for site, m in r.get("sites", {}).items():
        lines.append(f"  {site:12s} {m['mean']:.4f} ± {m['std']:.4f}  (n={m['n']})")
    o = r.get("overall", {})
    if o:
        lines.append(f"  {'overall':12s} {o['mean']:.4f} ± {o['std']:.4f}  (n={o['n']})")
    return "\n".join(lines)


def cmd_export_backbone(a: argparse.Namespace) -> int:
    import torch

    from fl_plugins.engine.checkpoint import check_state_fits, load_tensor_checkpoint, state_dict_of
    from fl_plugins.engine.export import export_backbone

    ckpt = Path(a.checkpoint)
    if not ckpt.is_file():
        raise CLIError(f"checkpoint {str(ckpt)!r} does not exist")
    args = _persistor_args_from(Path(a.job or ckpt.parent.parent))
    if not args.get("method"):
        raise CLIError(f"{str(ckpt)!r} is not a pretraining checkpoint (its job fine-tunes model "
                       f"{args.get('model_config', {}).get('arch')!r}; there is no backbone to export)")
    from fl_plugins.methods import build, import_plugins

    import_plugins(args.get("imports") or [])
    method = build(args["method"], args.get("method_config") or {})
    state = state_dict_of(load_tensor_checkpoint(ckpt), ckpt)
    check_state_fits(state, method.state_module().state_dict(), ckpt, f"method {args['method']!r}")
    which = a.which if hasattr(method, a.which) else None
    prefix = f"{which}.backbone." if which else ""
    missing = [k for k in method.state_module().state_dict() if k.startswith(prefix) and k not in state]
    if which and missing:
        raise CLIError(f"{str(ckpt)!r} has no {a.which} backbone (federation mode without the {a.which}?): "
                       f"missing {missing[:3]}")
    method.state_module().load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    out = export_backbone(method, a.out, which=which)
    spec = getattr(method.config, "backbone", None)
    if args["method"] == "unet_inpaint":  # the whole U-Net: it starts the segmentation fine-tuning
        from fl_plugins.models.unet import UNET_DEFAULTS

        norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731  (JSON lists vs tuples)
        changed = {k: v for k, v in (method.config.unet or {}).items() if norm(UNET_DEFAULTS.get(k)) != norm(v)}
        sets = "".join(f" --set 'model.{k}={json.dumps(norm(v), separators=(',', ':'))}'"
                       for k, v in sorted(changed.items()))
        print(f"wrote the inpainting U-Net to {out}")
        print(f"fine-tune from it: flssl simulate --job finetune_seg_unet --pretrained {out}{sets} "
              f"--set image_size={method.config.image_size} ...")
        return 0
    if spec is None or not hasattr(spec, "timm_kwargs"):
        print(f"wrote the backbone of method {args['method']!r} to {out}")
        return 0
    if getattr(method.config, "spatial_dims", 2) == 3:  # MAE 3D: a MONAI ViT (no 3D ViT fine-tuning job yet)
        from fl_plugins.methods.mae import vit3d_kwargs

        print(f"wrote the 3D ViT encoder to {out}")
        print(f"load it in MONAI: monai.networks.nets.ViT(**{vit3d_kwargs(method.config)}).load_state_dict("
              f"torch.load({str(out)!r}))  (the vit.* part of UNETR)")
        return 0
    print(f"wrote the {a.which + ' ' if which else ''}backbone to {out}")
    print(f"fine-tune from it: flssl simulate --job finetune_seg_vit --pretrained {out} "
          f"--set 'model.backbone={json.dumps(spec.to_dict())}' ...")
    print(f"load it in timm: timm.create_model({spec.name!r}, pretrained=True, pretrained_cfg_overlay={{'file': "
          f"{str(out)!r}}}, **{spec.timm_kwargs()})")
    return 0


def cmd_results(a: argparse.Namespace) -> int:
    rows = []
    for f in a.files:
        p = Path(f)
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CLIError(f"cannot read results file {str(p)!r}: {e}") from e
        o = r.get("overall", {})
        rows.append((r.get("label") or p.stem, r.get("metric", "?"), r.get("split", "?"), o.get("mean"), o.get("std"),
                     o.get("n")))
    w = max([len(r[0]) for r in rows] + [5])
    print(f"{'run':{w}s}  metric      split  mean    std     n")
    for name, metric, split, mean, std, n in rows:
        ms = "-" if mean is None else f"{mean:.4f}"
        ss = "-" if std is None else f"{std:.4f}"
        print(f"{name:{w}s}  {metric:10s}  {split:5s}  {ms:6s}  {ss:6s}  {n}")
    means = [r[3] for r in rows if r[3] is not None]
    if len(means) >= 2:  # one run per seed: the spread over seeds and the interval of their mean
        from fl_plugins.engine.metrics import mean_interval

        kinds = sorted({(r[1], r[2]) for r in rows})
        if len(kinds) > 1:
            print(f"(no summary over runs: the files mix metrics/splits {kinds})")
        else:
            s = mean_interval(means)
            lo, hi = s["ci95"]
            print(f"over {s['n']} runs: mean {s['mean']:.4f}, sd {s['sd']:.4f}, min {min(means):.4f}, max "
                  f"{max(means):.4f}, 95 % CI of the mean [{lo:.4f}, {hi:.4f}] (t, {s['n'] - 1} df)")
    return 0


# ----------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flssl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="on an error, print the traceback too (also accepted after "
                   "the command)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate synthetic site data (NIfTI phantoms or 2D multi-task .npz)")
    s.add_argument("--out", required=True, help="output folder; writes <out>/site-N/datalist.json")
    s.add_argument("--sites", type=int, default=2)
    s.add_argument("--task", choices=["segmentation", "classification"], default="segmentation")
    s.add_argument("--volumes", type=int, default=6, help="volumes per site (segmentation)")
    s.add_argument("--slices", type=int, default=12, help="slices per volume (segmentation)")
    s.add_argument("--size", type=int, default=64, help="in-plane size in pixels")
    s.add_argument("--labelled", type=int, default=None, help="labelled patients per site (default: all)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("split", help="split a real dataset (Decathlon dataset.json, MedMNIST .npz, or PNG/JPEG "
                       "images listed by a CSV of labels) into N sites")
    s.add_argument("--dataset", required=True, help="path to dataset.json (Decathlon layout), a MedMNIST .npz, or a "
                   ".csv listing PNG/JPEG images (paths relative to the CSV) with a label or a mask per row")
    s.add_argument("--out", required=True)
    s.add_argument("--sites", type=int, required=True)
    s.add_argument("--labelled", type=int, default=None, help="labelled patients per site kept for fine-tuning")
    s.add_argument("--preset", default=None, help="modality preset written to the datalists (mr, ct, unit; default: "
                   "mr for a Decathlon dataset, unit for a CSV)")
    s.add_argument("--rgb", action="store_true",
                   help="MedMNIST / CSV: keep RGB images as 3 channels (default: converted to one grey channel)")
    s.add_argument("--eval-only", action="store_true",
                   help="Decathlon / CSV: every case to the sites' test sections (datalist 'eval_only': true), for "
                        "flssl evaluate; automatic for a dataset.json with no training cases")
    s.add_argument("--task", choices=["classification", "segmentation"], default=None,
                   help="CSV: default segmentation when it has the mask column, else classification")
    s.add_argument("--image-column", default=None, help="CSV: column of the image paths (default: image)")
    s.add_argument("--label-column", default=None, help="CSV: column of the class labels, integer ids or names "
                   "(default: label)")
    s.add_argument("--mask-column", default=None, help="CSV: column of the mask image paths, pixel values = class "
                   "indices (default: mask)")
    s.add_argument("--patient-column", default=None, help="CSV: column of the patient ids; a patient's images stay on "
                   "one site (default: patient, when present; else split by image)")
    s.add_argument("--num-classes", type=int, default=None, help="CSV: number of classes (default: from the labels / "
                   "masks)")
    s.add_argument("--volumes", action="store_true",
                   help="Decathlon: read whole 3D volumes (datalist 'volumes': true, for mae3d_pretrain) instead of "
                        "2D slices")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--val-fraction", type=float, default=None,
                   help="Decathlon / CSV: share of each site's training patients carved as validation when the "
                        "dataset has no validation section (0 = none; default 0.1)")
    s.add_argument("--test-fraction", type=float, default=None,
                   help="Decathlon / CSV: the same for the test section (0 = none; default 0.2)")
    s.set_defaults(fn=cmd_split)

    s = sub.add_parser("check-data", help="validate site datalists and their files (NIfTI readable, labels, shapes)")
    s.add_argument("datalist", help="a datalist.json or a folder of <site>/datalist.json")
    s.add_argument("--job", help="also check that the data fits this ready job (task, class count, 2D/3D)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="job setting for --job, e.g. model.num_classes=4 (repeatable)")
    s.set_defaults(fn=cmd_check_data)

    s = sub.add_parser("jobs", help="list the ready jobs")
    s.set_defaults(fn=cmd_list_jobs)

    s = sub.add_parser("export-jobs", help="export registered jobs as FLARE job folders")
    s.add_argument("--out", default="jobs")
    s.add_argument("names", nargs="*")
    s.set_defaults(fn=cmd_export_jobs)

    s = sub.add_parser("resume", help="write a job folder that resumes a crashed job from its last completed round "
                                      "(the server's <job>/app_server/round_checkpoint.pt)")
    s.add_argument("--checkpoint", required=True, help="round_checkpoint.pt from the crashed job's server app folder")
    s.add_argument("--job", required=True, help="the job folder that was submitted (e.g. jobs/finetune_seg_unet)")
    s.add_argument("--out", required=True, help="new job folder to write (must not exist)")
    s.set_defaults(fn=cmd_resume)

    s = sub.add_parser("init-workspace", help="prepare a simulator workspace (allow list + site data location)")
    s.add_argument("--workspace", "-w", required=True)
    s.add_argument("--data", help="folder of <site>/datalist.json (or a path template containing {site})")
    s.set_defaults(fn=cmd_init_workspace)

    s = sub.add_parser("simulate", help="run a job in the FLARE simulator with site data wired in")
    s.add_argument("--job", required=True, help="registered job name (see 'flssl jobs') or a job folder")
    s.add_argument("--data", required=True, help="folder of <site>/datalist.json")
    s.add_argument("--workspace", "-w", required=True)
    s.add_argument("--sites", "-n", type=int, default=2)
    s.add_argument("--threads", "-t", type=int, default=2)
    s.add_argument("--rounds", type=int, default=None)
    s.add_argument("--labelled", type=int, default=None, help="labelled patients per site used for fine-tuning")
    s.add_argument("--pretrained", default=None, help="pretrained weights from 'flssl export-backbone': a ViT "
                   "backbone for the ViT jobs (finetune_seg_vit, finetune_cls), a unet_inpaint_pretrain U-Net for "
                   "the U-Net job (finetune_seg_unet)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job setting, e.g. --set trainer.steps_per_round=50 --set model.num_classes=4")
    s.add_argument("--clean", action="store_true", help="delete the workspace first")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_simulate)

    s = sub.add_parser("evaluate", help="evaluate a global checkpoint on held-out splits of site datalists")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", required=True, help="a datalist.json or a folder of <site>/datalist.json")
    s.add_argument("--split", default="test", choices=["training", "validation", "test"])
    s.add_argument("--job", default=None, help="job folder / workspace holding the model config (default: next to "
                   "the checkpoint)")
    s.add_argument("--model-config", default=None, help="model config as JSON (overrides --job)")
    s.add_argument("--image-size", type=int, default=None, help="default: the job's image size / 64")
    s.add_argument("--out", default=None, help="write the result JSON here")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("export-backbone", help="write the backbone of a pretraining global checkpoint for "
                       "fine-tuning (DINO/DINOv2/MAE: the timm-loadable ViT state_dict; unet_inpaint: the whole "
                       "U-Net, for finetune_seg_unet --pretrained)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="DINO's recommended evaluation weights are the teacher's (methods-spec 2.7)")
    s.add_argument("--job", default=None, help="job folder / workspace holding the model config")
    s.set_defaults(fn=cmd_export_backbone)

    s = sub.add_parser("results", help="print a table from result JSON files written by 'flssl evaluate --out'; with "
                                       "one file per seed, also the mean, sd and 95 %% interval over them")
    s.add_argument("files", nargs="+")
    s.set_defaults(fn=cmd_results)
    return p


#: what to do after an operating-system error, by errno
_OS_ADVICE = {
    errno.EROFS: ("read-only file system", "give a folder on a writable disk"),
    errno.EACCES: ("permission denied", "give a path you may write (or read), or fix its permissions"),
    errno.EPERM: ("operation not permitted", "give a path you may write (or read), or fix its permissions"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "give a path whose parents are folders"),
    errno.EISDIR: ("is a folder, not a file", "give a file path"),
    errno.EEXIST: ("already exists", "give a new path or remove it"),
    errno.ELOOP: ("symlink loop", "fix the symbolic links (ls -l) or give the real path"),
    errno.ENOSPC: ("disk full", "free space or write to another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space or write to another disk"),
    errno.ENAMETOOLONG: ("file name too long", "give a shorter path"),
}


def _path_options(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """The command's options that hold a path (``--out``, ``--workspace``, ...), as (flag, absolute path)."""
    out = []
    for k, v in vars(args).items():
        if k in ("fn", "command", "debug") or not isinstance(v, str) or not v:
            continue
        flag = {"datalist": "datalist", "workspace": "--workspace"}.get(k, f"--{k.replace('_', '-')}")
        out.append((flag, Path(v).expanduser().absolute()))
    return out


def _os_error_line(e: OSError, args: argparse.Namespace) -> str:
    """One line for an operating-system error: the option whose path it concerns (a write under ``--out`` or beside
    ``--workspace``: its ``_job`` folder and log), the file, what happened and what to do."""
    what, todo = _OS_ADVICE.get(e.errno, (e.strerror or type(e).__name__, "check the path"))
    fname = e.filename if e.filename is not None else None
    if fname is None:  # wrapped errors (a background write, shutil.Error) carry their own text
        return f"{e}: {todo}" if e.errno in _OS_ADVICE else str(e)
    f = Path(str(fname)).expanduser().absolute()
    tmp = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", f.name)  # atomic_io's temp file next to the destination
    if tmp and e.filename2 is None:
        f = fname = f.parent / tmp.group(1)
    opts = [(flag, p) for flag, p in _path_options(args)  # the path itself, under it, or beside it (<ws>_job)
            if f == p or p in f.parents or (f.parent == p.parent and f.name.startswith(p.name))]
    opts.sort(key=lambda o: -len(str(o[1])))
    where = f"{opts[0][0]} {str(opts[0][1])!r}: " if opts else ""
    target = f"{str(fname)!r}" + (f" -> {str(e.filename2)!r}" if e.filename2 else "")
    if opts and f == opts[0][1] and not e.filename2:
        target = "it"
    verb = "write" if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT) else "use"
    return f"{where}cannot {verb} {target}: {what}; {todo}"


def main(argv: list[str] | None = None) -> int:
    """Run one command. The package's errors (CLIError, ValueError: data, config and checkpoint errors) and the
    operating-system errors (OSError: permissions, read-only, missing, symlink loops, disk full) print one line
    naming the file or setting and what to do, exit code 2 (a failed run: 1); ``--debug`` prints the traceback
    first. Anything else is a bug: its traceback is printed as Python does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    prefix = f"flssl {args.command}: error:"

    def fail(msg: str, code: int = 2) -> int:
        if debug:
            traceback.print_exc()
        print(f"{prefix} {msg}", file=sys.stderr)
        return code

    try:
        return int(args.fn(args) or 0)
    except CLIError as e:
        return fail(str(e))
    except OSError as e:  # before ValueError: nothing here is both; FileNotFoundError is one
        return fail(_os_error_line(e, args))
    except ValueError as e:  # DataError, CheckpointError and config errors carry the file / setting name
        return fail(str(e))
    except RuntimeError as e:
        if str(e).startswith("Symlink loop"):  # pathlib.Path.resolve on Python < 3.13
            return fail(f"{e}: fix the symbolic links (ls -l) or give the real path")
        raise
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"flssl {args.command}: stopped (Ctrl-C) before it finished; what it was writing may be incomplete: "
              "run the command again", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

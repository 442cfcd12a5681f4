"""Round checkpoints of a server workflow, and resuming a crashed job from one.

nvflare 2.9.0 has no snapshot resume: after a server crash the job record stays ``RUNNING`` and a clone starts at
round 0 (``docs/deployment.md`` 9.4). Here every workflow that mixes in :class:`RoundCheckpoint` writes, after each
completed round (stage-wise: stage), ``<server app dir>/round_checkpoint.pt`` atomically:

=====================  ===========================================================================================
``format``             :data:`CHECKPOINT_FORMAT` (a file of another format is refused, naming both)
``workflow``           the writing controller's class name (a checkpoint of another workflow is refused)
``round``              the last **completed** round (the resumed job starts at ``round + 1``)
``total_rounds``       the job's rounds counted from round 0 (a resumed job runs ``total_rounds - round - 1``)
``params``             the global model after that round (what the persistor saved; tensors)
``params_numpy``       whether ``params`` were numpy arrays on the wire (they are turned back into numpy)
``params_type``        ``FULL`` / ``DIFF``
``best``               the best-model record of :class:`~fl_plugins.flare.controllers.BestModelSelection` or None
``extra``              what the workflow needs besides (e.g. FCLOpt's predicted target, the bytes so far)
``job_id``             the job that wrote it (a resumed job names it in its log)
``run_id``             the first job of the chain of resumes (sites key their own state by it)
=====================  ===========================================================================================

A new job resumes from it when its controller gets ``resume_from`` (job setting ``fl.resume_from``; ``flssl resume``
writes a job folder that carries the checkpoint in its server app's ``config/`` folder, so it can be submitted from
the admin console without access to the server's disk). Relative paths are resolved against the app's ``config/``
folder. The resumed job starts at ``round + 1`` with the checkpoint's global model, the best model so far and the
workflow's extra state; sites log to TensorBoard at the round numbers they are sent, so curves continue at the right
step. Site-persistent state (optimiser moments, kept on a site between rounds) is not part of the server's
checkpoint: every task carries the run's id (``meta["run_id"]``: the first job of the chain of resumes) and each
site keeps its own state in a file keyed by it (:meth:`fl_plugins.flare.handler.MethodHandler.train`), which the
resumed job's first round loads.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fl_plugins.engine.checkpoint import BackgroundSaver, atomic_torch_save

__all__ = ["CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "ResumeError", "RoundCheckpoint", "load_round_checkpoint",
           "resolve_resume_path", "save_round_checkpoint"]

CHECKPOINT_FILE = "round_checkpoint.pt"
CHECKPOINT_FORMAT = "fl_plugins.round_checkpoint/1"
_KEYS = ("format", "workflow", "round", "total_rounds", "params", "params_numpy", "params_type", "best", "extra",
         "job_id", "run_id")


class ResumeError(ValueError):
    """A checkpoint cannot start the job (missing, another format or workflow, nothing left, keys differ)."""


def _tensors(obj: Any) -> Any:
    """numpy arrays -> tensors, recursively through dicts and lists (``torch.load(weights_only=True)`` reads them)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj)).clone()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tensors(v) for v in obj]
    return obj


def _arrays(obj: Any) -> Any:
    """tensors -> numpy arrays, recursively (the inverse of :func:`_tensors`)."""
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _arrays(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_arrays(v) for v in obj]
    return obj


def save_round_checkpoint(path: str | os.PathLike, *, workflow: str, completed_round: int, total_rounds: int,
                          params: dict[str, Any], params_type: Any, best: dict[str, Any] | None = None,
                          extra: dict[str, Any] | None = None, job_id: str | None = None,
                          run_id: str | None = None, saver: BackgroundSaver | None = None) -> None:
    """Write one round checkpoint (see the module docstring) atomically; ``extra`` may hold numpy arrays. The
    object is built (arrays copied) now; with ``saver`` it is written by its background thread."""
    numpy_params = any(isinstance(v, np.ndarray) for v in params.values())
    ptype = params_type.value if isinstance(params_type, ParamsType) else (params_type or ParamsType.FULL.value)
    (saver.save if saver is not None else atomic_torch_save)({
        "format": CHECKPOINT_FORMAT, "workflow": workflow, "round": int(completed_round),
        "total_rounds": int(total_rounds), "params": _tensors(dict(params)), "params_numpy": numpy_params,
        "params_type": str(ptype), "best": best, "extra": {"value": _tensors(extra or {})}, "job_id": job_id,
        "run_id": run_id or job_id,
    }, path)


def load_round_checkpoint(path: str | os.PathLike, workflow: str | None = None,
                          setting: str = "resume_from") -> dict[str, Any]:
    """Read a round checkpoint; ``params`` (and ``extra``) come back as numpy arrays when they were numpy.

    Raises:
        ResumeError: missing or unreadable file, another format, another workflow than ``workflow``; the message
            names ``setting`` and the path.
    """
    if not os.path.isfile(path):
        raise ResumeError(f"{setting}: no round checkpoint at {str(path)!r} (a job writes {CHECKPOINT_FILE} in its "
                          "server app folder after every completed round)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a damaged or foreign file
        raise ResumeError(f"{setting}: {str(path)!r} is not a readable round checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ResumeError(f"{setting}: {str(path)!r} has format {found!r}, expected {CHECKPOINT_FORMAT!r}")
    missing = [k for k in _KEYS if k not in ckpt]
    if missing:
        raise ResumeError(f"{setting}: {str(path)!r} lacks {missing}")
    if workflow is not None and ckpt["workflow"] != workflow:
        raise ResumeError(f"{setting}: {str(path)!r} was written by workflow {ckpt['workflow']!r}; this job's "
                          f"workflow is {workflow!r}")
    if ckpt["params_numpy"]:
        ckpt["params"] = _arrays(ckpt["params"])
    ckpt["extra"] = _arrays(ckpt["extra"]["value"])
    return ckpt


def resolve_resume_path(resume_from: str, app_root: str) -> str:
    """An absolute path as it is; a relative one inside the server app's ``config/`` folder (where ``flssl resume``
    puts the checkpoint it packs into a job)."""
    return resume_from if os.path.isabs(resume_from) else os.path.join(app_root, "config", resume_from)


class ServerFiles:
    """Mixin for a server workflow: its per-round files (round checkpoint, best model) are written by one background
    thread (:class:`~fl_plugins.engine.checkpoint.BackgroundSaver`), so the next round's task goes out without
    waiting for the disk: with the persistor's global model file (:mod:`fl_plugins.flare.persistor`, its own
    saver), these writes took 0.23 of the 0.26 s between two rounds of a 1.6 M-parameter U-Net job
    (``benchmarks/fl_overhead.py --breakdown``, loaded machine), and grow with the model. A crash loses at most the
    write in flight (the previous file stays whole). A failed write fails the run at the next write or at the end.
    The workflow calls :meth:`flush_files` when its ``run`` ends."""

    @property
    def files(self) -> BackgroundSaver:
        saver = self.__dict__.get("_files")
        if saver is None:
            saver = self.__dict__["_files"] = BackgroundSaver("server-files")
        return saver

    def flush_files(self) -> None:
        self.files.flush()


class RoundCheckpoint(ServerFiles):
    """Mixin for a server workflow (an nvflare ``ModelController``): write a round checkpoint after every completed
    round, and start from one. Call :meth:`init_round_checkpoint` in ``__init__``; call :meth:`write_round_checkpoint`
    when a round's global model is final and :meth:`read_resume_checkpoint` at the start of ``run``. Subclasses with
    more state override :meth:`resume_state` / :meth:`restore_resume_state`."""

    def init_round_checkpoint(self, resume_from: str | None = None) -> None:
        if resume_from is not None and (not isinstance(resume_from, str) or not resume_from.strip()):
            raise ValueError(f"resume_from must be the path of a {CHECKPOINT_FILE} or None, got {resume_from!r}")
        self.resume_from = resume_from
        self.resumed_from: dict[str, Any] | None = None  # the checkpoint's record (no params) once resumed
        self._run_id: str | None = None

    @property
    def run_id(self) -> str:
        """The run's id: the resumed checkpoint's ``run_id``, else this job's id (sent to the sites in every task)."""
        if self._run_id is None:
            self._run_id = str(self.fl_ctx.get_job_id())
        return self._run_id

    # -- hooks -------------------------------------------------------------------------------------------------------
    def resume_state(self) -> dict[str, Any]:
        """The workflow's own state besides the global model and the best model (numpy arrays allowed)."""
        return {}

    def restore_resume_state(self, extra: dict[str, Any]) -> None:
        """Take back what :meth:`resume_state` returned."""

    # -- use -----------------------------------------------------------------------------------------------------------
    def _app_root(self) -> str:
        return self.fl_ctx.get_prop(FLContextKey.APP_ROOT) or "."

    def write_round_checkpoint(self, model: FLModel, completed_round: int, total_rounds: int) -> None:
        path = os.path.join(self._app_root(), CHECKPOINT_FILE)
        save_round_checkpoint(path, workflow=type(self).__name__, completed_round=completed_round,
                              total_rounds=total_rounds, params=dict(model.params or {}),
                              params_type=model.params_type, best=getattr(self, "best", None),
                              extra=self.resume_state(), job_id=self.fl_ctx.get_job_id(), run_id=self.run_id,
                              saver=self.files)

    def read_resume_checkpoint(self, total_rounds: int, initial: FLModel | None = None) -> dict[str, Any] | None:
        """If ``resume_from`` is set: read and check the checkpoint (workflow, rounds left, the initial model's keys
        and shapes when ``initial`` is given), restore the best model and the extra state, log, and return it
        (``params`` as on the wire); else None.

        Raises:
            ResumeError: see :func:`load_round_checkpoint`; also nothing left to run, or keys/shapes that differ
                from the job's model (the message names ``resume_from``, the path and the first differences).
        """
        if not self.resume_from:
            return None
        path = resolve_resume_path(self.resume_from, self._app_root())
        ckpt = load_round_checkpoint(path, workflow=type(self).__name__)
        done = int(ckpt["round"])
        if done + 1 >= total_rounds:
            raise ResumeError(f"resume_from: {path!r} is after round {done}; this job has {total_rounds} round(s) "
                              f"(0..{total_rounds - 1}): nothing left to run")
        if initial is not None and initial.params:
            want = {k: tuple(np.shape(v)) for k, v in initial.params.items()}
            got = {k: tuple(np.shape(v)) for k, v in ckpt["params"].items()}
            if want != got:
                diff = sorted(set(want) ^ set(got))[:3] or [k for k in want if want[k] != got[k]][:3]
                raise ResumeError(f"resume_from: the global model in {path!r} does not match this job's model "
                                  f"(keys or shapes differ, e.g. {diff})")
        if ckpt["best"] is not None and hasattr(self, "best"):
            self.best = ckpt["best"]
        self.restore_resume_state(ckpt["extra"])
        self._run_id = str(ckpt["run_id"])
        self.resumed_from = {k: ckpt[k] for k in ("round", "total_rounds", "job_id", "run_id", "workflow")}
        self.info(f"resuming job {ckpt['job_id']} from {path}: round {done} was its last completed round; this job "
                  f"runs rounds {done + 1}..{total_rounds - 1}")
        return ckpt


#: where :func:`make_resume_job` puts the checkpoint in the new job's app (``config/``, read by the server app)
RESUME_FILE = "resume_checkpoint.pt"


def _server_config(job_dir: str) -> str:
    """The server config of a FLARE job folder (the app that ``meta.json``'s ``deploy_map`` sends to the server)."""
    import json

    meta_path = os.path.join(job_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise ResumeError(f"--job: {job_dir!r} is not a FLARE job folder (no meta.json)")
    with open(meta_path) as f:
        deploy = json.load(f).get("deploy_map") or {}
    for app, targets in deploy.items():
        if any(t in ("@ALL", "server") for t in targets):
            path = os.path.join(job_dir, app, "config", "config_fed_server.json")
            if os.path.isfile(path):
                return path
    raise ResumeError(f"--job: no server app with config/config_fed_server.json in {job_dir!r} (deploy_map {deploy})")


def make_resume_job(checkpoint: str, job_dir: str, out_dir: str) -> dict[str, Any]:
    """Write ``out_dir``: a copy of the job folder ``job_dir`` that resumes from ``checkpoint`` (the checkpoint
    travels inside the job, ``<server app>/config/resume_checkpoint.pt``, and the workflow gets
    ``resume_from: "resume_checkpoint.pt"``). Returns what it did (rounds, jobs, paths).

    Raises:
        ResumeError: the checkpoint or job cannot be read, the job's workflow is not the checkpoint's, nothing is
            left to run, or ``out_dir`` exists.
    """
    import json
    import shutil

    ckpt = load_round_checkpoint(checkpoint, setting="--checkpoint")
    cfg_path = _server_config(job_dir)
    with open(cfg_path) as f:
        cfg = json.load(f)
    workflows = [w for w in cfg.get("workflows", []) if str(w.get("path", "")).rsplit(".", 1)[-1] == ckpt["workflow"]]
    if len(workflows) != 1:
        names = [w.get("path") for w in cfg.get("workflows", [])]
        raise ResumeError(f"--job: {job_dir!r} runs {names}; the checkpoint was written by {ckpt['workflow']!r}")
    args = workflows[0].setdefault("args", {})
    total = int(args.get("start_round", 0)) + int(args.get("num_rounds", ckpt["total_rounds"]))
    if total != int(ckpt["total_rounds"]):
        raise ResumeError(f"--job: {job_dir!r} has {total} round(s); the checkpoint's job had {ckpt['total_rounds']}")
    if int(ckpt["round"]) + 1 >= total:
        raise ResumeError(f"--checkpoint: {checkpoint!r} is after round {ckpt['round']}, the last of {total}: "
                          "nothing left to run")
    if os.path.exists(out_dir):
        raise ResumeError(f"--out: {out_dir!r} exists; give a new folder")
    shutil.copytree(job_dir, out_dir)
    args["resume_from"] = RESUME_FILE
    new_cfg = os.path.join(out_dir, os.path.relpath(cfg_path, job_dir))
    with open(new_cfg, "w") as f:
        json.dump(cfg, f, indent=2)
    shutil.copyfile(checkpoint, os.path.join(os.path.dirname(new_cfg), RESUME_FILE))
    meta_path = os.path.join(out_dir, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["name"] = f"{meta.get('name', os.path.basename(job_dir))}_resume{int(ckpt['round']) + 1}"
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=4)
    return {"out": out_dir, "name": meta["name"], "from_job": ckpt["job_id"], "run_id": ckpt["run_id"],
            "completed_round": int(ckpt["round"]), "rounds": [int(ckpt["round"]) + 1, total - 1]}

"""Every ready job as an NVIDIA FLARE ``Recipe``: the same object runs with ``SimEnv``, ``PocEnv`` and ``ProdEnv``
and exports the folder in ``jobs/`` (``tests/flare/test_jobs.py`` keeps both in sync, in both directions).

Python path (what ``flssl simulate`` does from the command line)::

    from nvflare.recipe import SimEnv
    from fl_plugins.flare.recipes import DinoRecipe

    recipe = DinoRecipe({"fl": {"num_rounds": 5}, "steps_per_round": 10}, datalist="site_data/{site}/datalist.json")
    run = recipe.execute(SimEnv(num_clients=2, workspace_root="workspace"))    # or PocEnv / ProdEnv / RunningPocEnv
    recipe.export("jobs")                                                       # the job folder jobs/dino_pretrain

Settings are the job's nested settings (the same keys as ``flssl simulate --set``; unknown keys and values of the
wrong type are refused with the setting named). ``datalist`` tells simulated sites where their data is (written
into the simulation workspace's ``local/fl_plugins_site.json``, with nvflare's default class allow list plus
``fl_plugins.`` in ``local/resources.json``); POC and production sites are set up by their IT instead
(``python -m fl_plugins.flare.site_setup``, docs/deployment.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from nvflare.recipe.poc_env import PocEnv
from nvflare.recipe.sim_env import SimEnv
from nvflare.recipe.spec import ExecEnv, Recipe

from fl_plugins.flare.jobs import JOBS, build_job, job_names

__all__ = ["JobRecipe", "RECIPES", "recipe_for", "export_jobs", "RunningPocEnv",
           *sorted(spec.recipe for spec in JOBS.values())]


class JobRecipe(Recipe):
    """The ready job :attr:`JOB` (or ``job``) with ``settings``, as a Recipe.

    Args:
        settings: nested job settings (defaults: the job's; see ``flssl jobs``).
        datalist: for ``SimEnv`` only: where each simulated site finds its datalist (``{site}`` is replaced by the
            site name, e.g. ``"site_data/{site}/datalist.json"``).
        job: the registered job name, for the generic class (subclasses fix it).
    """

    JOB: ClassVar[str | None] = None

    def __init__(self, settings: dict[str, Any] | None = None, datalist: str | None = None,
                 job: str | None = None) -> None:
        name = job or self.JOB
        if name is None:
            raise ValueError(f"JobRecipe needs a job name; registered jobs: {job_names()}")
        if self.JOB is not None and job not in (None, self.JOB):
            raise ValueError(f"{type(self).__name__} builds job {self.JOB!r}, not {job!r}")
        self.job_name = name
        self.settings = dict(settings or {})
        self.datalist = datalist
        super().__init__(build_job(name, self.settings))

    def process_env(self, env: ExecEnv) -> None:
        """SimEnv: write the simulation workspace's ``local/`` (allow list + datalist) where the simulator reads it."""
        if isinstance(env, SimEnv):
            from fl_plugins.flare.sim_workspace import write_sim_local

            datalist = self.datalist
            if datalist is not None and "{site}" in datalist and not os.path.isabs(datalist):
                datalist = os.path.abspath(datalist)
            write_sim_local(os.path.join(env.workspace_root, self.name), datalist)


def _recipe_class(job: str) -> type[JobRecipe]:
    """The Recipe class of ``job``, named by its JobSpec (``JobSpec.recipe``), documented by its description."""
    spec = JOBS[job]
    return type(spec.recipe, (JobRecipe,), {"JOB": job, "__module__": __name__, "__qualname__": spec.recipe,
                                             "__doc__": f"{spec.description}.\n\nThe job ``{job}`` as a Recipe "
                                             "(see :class:`JobRecipe`)."})


#: job name -> its Recipe class (every registered job has exactly one, named by its JobSpec)
RECIPES: dict[str, type[JobRecipe]] = {job: _recipe_class(job) for job in job_names()}
globals().update({cls.__name__: cls for cls in RECIPES.values()})  # e.g. fl_plugins.flare.recipes.DinoRecipe


def recipe_for(name: str, settings: dict[str, Any] | None = None, datalist: str | None = None) -> JobRecipe:
    """The Recipe of the registered job ``name``."""
    if name not in RECIPES:
        raise ValueError(f"no recipe for job {name!r}; jobs with recipes: {sorted(RECIPES)}")
    return RECIPES[name](settings, datalist=datalist)


def export_jobs(out_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Export the ready jobs, through their Recipes, as FLARE job folders (``jobs/`` is this with every job)."""
    out = Path(out_dir)
    paths = []
    for n in names or job_names():
        recipe_for(n).export(str(out))
        paths.append(out / n)
    return paths


class RunningPocEnv(PocEnv):
    """A ``PocEnv`` that submits to a POC system that is already running (``python3 poc/poc.py start``, sites set
    up for ``fl_plugins``: allow list and data) instead of re-provisioning and restarting one, which
    ``PocEnv.deploy`` does and which loses the sites' local set-up.

    Args:
        poc_workspace: the POC workspace (``NVFLARE_POC_WORKSPACE`` of ``poc/poc.py env``).
        username: the project admin of that POC (``poc/project_poc.yml``: ``admin@nvidia.com``).
    """

    def __init__(self, poc_workspace: str, username: str = "admin@nvidia.com", **kwargs: Any) -> None:
        super().__init__(username=username, **kwargs)
        self.poc_workspace = str(poc_workspace)

    def deploy(self, job: Any) -> str:
        if not self._check_poc_running():
            raise RuntimeError(f"no POC system is running in {self.poc_workspace}: start one with "
                               "'python3 poc/poc.py prepare ...' and 'python3 poc/poc.py start'")
        return self._get_session_manager().submit_job(job)

    def stop(self, clean_up: bool = False) -> None:
        """Leave the POC system running: it belongs to whoever started it (``Run.get_result`` calls this)."""

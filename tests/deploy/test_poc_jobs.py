"""Jobs on a real POC system (session fixture ``poc``): submitted with the nvflare CLI and with the admin console.

Per job: ``nvflare --format json job submit -j <job> --startup-kit <admin kit>`` -> ``job wait`` -> ``job download``,
then FINISHED:COMPLETED, the persistor's global model file(s) and, for jobs that stream metrics to the server, one
TensorBoard event file with at least one scalar tag per site. Every ``jobs/<name>/`` folder with a ``meta.json`` is
run on synthetic site data (wired into each site's ``local/fl_plugins_site.json``), with every client-side
``steps_per_round`` lowered to 2 (``FL_PLUGINS_DEPLOY_FULL_JOBS=1`` runs the folders unmodified; a few folders run only
when named, see ``_NAMED_ONLY``); while ``jobs/`` has
none, the harness runs its own allow-listed numpy job (tests/deploy/assets/np_job). Job variants that no folder
exercises are built with the job builder when the test runs (``deploy_utils.GENERATED_JOBS``: a float16-quantized
``finetune_seg_vit``, whose filter classes must pass the sites' allow list). Jobs that read the same synthetic
data are submitted together and run side by side (fixture ``submit_group``). Jobs that the README's deployment
walkthrough submits are checked there instead (same checks, own POC system).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import record_timing
from .deploy_utils import (
    FULL_JOBS,
    JOB_TIMEOUT,
    NP_JOB,
    check_job_result,
    data_generator_for,
    export_generated_job,
    generated_jobs,
    is_generated,
    repo_jobs,
    shrunk_job_copy,
    wait_for,
)
from .test_readme_walkthrough import walkthrough_jobs

pytestmark = pytest.mark.slow

# A job the README walkthrough submits runs there, end to end on its own POC, with the same result checks
# (tests/deploy/test_readme_walkthrough.py): not run twice per test session.
# Some job folders run on POC only when named (FL_PLUGINS_DEPLOY_JOBS=<name>,...): the segmentation data group would
# otherwise be two waves of jobs (the POC server runs 4 at once; about 85 s more on 2 cores). Each of them has a
# sibling that runs here with the same server and site classes, and runs end to end elsewhere:
# * dino_pretrain: dinov2_pretrain runs here (same DINO handler and controller); dino_pretrain runs in the simulator
#   twice (tests/integration/test_simulator_dino.py, test_recipe_simenv.py).
# * fcl_noexchange_pretrain: fcl_pretrain runs here (the same FCLController, exchange off).
# * fclopt_pretrain: fclopt_ptnu_dp_pretrain runs here (the same FCLOptController and handler, PTNU + DP on).
# * finetune_seg_vit: its float16 variant runs here (deploy_utils.GENERATED_JOBS).
# * the masked-image-modelling pretraining jobs: their site code is the executor + SSLHandler that dinov2_pretrain
#   runs here; they run end to end in the simulator (tests/integration/test_simulator_inpaint.py). mae3d_pretrain
#   also needs 3D volumes, which no JOB_DATA generator of deploy_utils makes yet.
_NAMED_ONLY = {"dino_pretrain", "fcl_noexchange_pretrain", "fclopt_pretrain", "finetune_seg_vit",
               "unet_inpaint_pretrain", "mae_vit_pretrain", "mae3d_pretrain"}
_REPO_JOBS = [j for j in repo_jobs() if j.name not in walkthrough_jobs()
              and (j.name not in _NAMED_ONLY or os.environ.get("FL_PLUGINS_DEPLOY_JOBS"))] + generated_jobs()


def _data_group(job_dir: Path) -> str:
    return data_generator_for(job_dir.name)[0] if job_dir != NP_JOB else "np_job"


# Ordered so that the jobs reading the same synthetic data are adjacent (they are submitted together, see below).
JOBS = sorted(_REPO_JOBS, key=lambda j: (_data_group(j), j.name)) or [NP_JOB]


@dataclass
class _Submitted:
    job_id: str
    job_dir: Path  # the folder actually submitted (the shrunk copy)
    changes: list[str]
    t0: float


@pytest.fixture(scope="module")
def submit_group(poc, synthetic_data, tmp_path_factory) -> Callable[[Path], _Submitted]:
    """``submit(job_dir)``: the submission of ``job_dir``, made together with every other job of its data group.

    The jobs that read the same synthetic site data are submitted at once and run side by side on the POC (the
    server's job scheduler runs up to ``max_jobs`` = 4 jobs at once, nvflare's provisioning default), so their
    start-up and polling overlap instead of adding up. A group's data is wired into the sites only after every job
    of the previous group has finished: a job reads the site config when it starts on the site.
    """
    done: dict[str, _Submitted] = {}  # every job of a submitted group
    root = tmp_path_factory.mktemp("jobs")

    def submit(job_dir: Path) -> _Submitted:
        if job_dir.name not in done:  # its group is not submitted yet
            group = _data_group(job_dir)
            for prev in done.values():  # normally already finished: each test waits for its job
                poc.wait(prev.job_id, timeout=JOB_TIMEOUT)
            if job_dir != NP_JOB:
                gen_name, gen, kwargs = data_generator_for(job_dir.name)
                data = synthetic_data(gen_name, gen, kwargs)
                poc.configure_data(str(data / "{site}" / "datalist.json"))
            for j in [j for j in JOBS if _data_group(j) == group]:
                src, changes = j, []
                if is_generated(j):
                    src = export_generated_job(j, root / "generated")
                if j != NP_JOB and not FULL_JOBS:
                    src, changes = shrunk_job_copy(src, root / j.name)
                done[j.name] = _Submitted(poc.submit(src), src, changes, time.monotonic())
        return done[job_dir.name]

    return submit


@pytest.mark.parametrize("job_dir", JOBS, ids=[j.name for j in JOBS])
def test_job_on_poc(job_dir: Path, poc, submit_group, tmp_path):
    if job_dir != NP_JOB:
        gen_name, gen, _ = data_generator_for(job_dir.name)
        if gen is None:
            pytest.skip(f"{job_dir.name}: data generator fl_plugins.data.{gen_name} is missing")
    sub = submit_group(job_dir)
    result = poc.wait(sub.job_id, timeout=JOB_TIMEOUT)
    path = poc.download(sub.job_id, tmp_path / "results")
    record_timing(f"job {job_dir.name}: submit (with its data group)+run+download", time.monotonic() - sub.t0)
    report = check_job_result(sub.job_dir, result, path / "workspace", poc.sites)
    print(job_dir.name, result.get("duration_s"), sub.changes, report)


def _console(kit: Path, env: dict, commands: list[str], timeout: float = 120) -> str:
    """Pipe commands into the admin kit's interactive console (startup/fl_admin.sh); returns its output."""
    script = "\n".join([*commands, "bye"]) + "\n"
    p = subprocess.run([str(kit / "startup" / "fl_admin.sh")], input=script, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return p.stdout + p.stderr


def test_submit_through_admin_console(poc, tmp_path):
    """The interactive console path a user types: submit_job, list_jobs, download_job (into the kit's transfer/)."""
    kit, env = poc.admin_kit, poc.env
    job = shutil.copytree(NP_JOB, tmp_path / "np_job")  # the console signs the folder it submits, in place
    t0 = time.monotonic()
    out = _console(kit, env, [f"submit_job {job}", "list_jobs"])
    m = re.search(r"Submitted job: ([0-9a-f-]{36})", out)
    assert m, f"console did not submit the job:\n{out}"
    job_id = m.group(1)
    assert re.search(rf"\|\s*{job_id}\s*\|\s*np_job\s*\|", out), f"list_jobs does not show the job:\n{out}"

    def finished():
        o = _console(kit, env, ["list_jobs"])
        row = next((line for line in o.splitlines() if job_id in line), "")
        return row if "FINISHED" in row else None

    row = wait_for(finished, timeout=JOB_TIMEOUT, what=f"job {job_id} to finish (console list_jobs)", interval=2)
    assert "FINISHED:COMPLETED" in row, row
    out = _console(kit, env, [f"download_job {job_id}"])
    assert "content downloaded to" in out, out
    ws = kit / "transfer" / job_id / "workspace"
    record_timing("console: submit_job+run+download_job", time.monotonic() - t0)
    assert (ws / "models" / "server.npy").is_file(), sorted(os.listdir(kit / "transfer" / job_id))
    assert (job / ".__nvfl_sig.json").is_file(), "expected: console submit_job signs the job folder in place"

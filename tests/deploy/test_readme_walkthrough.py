"""The README's deployment walkthrough, run word for word as a new user would type it.

The fenced ``bash`` block that follows the ``<!-- walkthrough: ... -->`` marker in README.md is extracted and run
verbatim by ``bash -e -o pipefail`` (every command must succeed), in a scratch folder that holds a copy of the
repository's ``poc/`` and ``jobs/`` (the commands use paths relative to the repository root; the copy keeps the
test from writing ``site_data/`` and ``workspace/`` into the checkout). ``fl_plugins`` and ``flssl`` come from the
installed package, as after the README's set-up commands. Then the test checks what the user would look at: the
downloaded global model and TensorBoard events, the job listed as finished in the admin console, and that no
FLARE process survives the walkthrough's own ``stop``/``clean``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from .conftest import record_timing
from .deploy_utils import check_job_result, poc_driver

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MARKER = "<!-- walkthrough:"


def walkthrough_block(readme: Path = REPO / "README.md") -> str:
    """The ``bash`` block right after the walkthrough marker (the marker must exist exactly once)."""
    text = readme.read_text(encoding="utf-8")
    assert text.count(MARKER) == 1, f"expected exactly one {MARKER!r} marker in {readme}"
    after = text[text.index(MARKER):]
    m = re.search(r"```bash\n(.*?)\n```", after, flags=re.S)
    assert m, f"no ```bash block after the walkthrough marker in {readme}"
    return m.group(1)


def walkthrough_jobs() -> list[str]:
    """Names of the ``jobs/`` folders the walkthrough submits."""
    return re.findall(r"poc\.py submit jobs/([\w-]+)", walkthrough_block())


def test_walkthrough_block_shape():
    """The block is the documented sequence: prepare, start, submit with download, console, stop, clean."""
    cmds = [line.split("#")[0].strip() for line in walkthrough_block().splitlines() if line.strip()]
    order = ["flssl synth", "poc.py prepare", "poc.py start", "poc.py submit", "fl_admin.sh", "poc.py stop",
             "poc.py clean"]
    pos = [next(i for i, c in enumerate(cmds) if key in c) for key in order]
    assert pos == sorted(pos), cmds
    assert walkthrough_jobs() == ["finetune_seg_unet"]


def test_readme_deployment_walkthrough(tmp_path):
    block = walkthrough_block()
    work = tmp_path / "checkout"
    work.mkdir()
    for d in ("poc", "jobs"):
        shutil.copytree(REPO / d, work / d)
    marker = str(work / "workspace") + os.sep
    env = poc_driver.python_env()  # this interpreter's folder (python3, flssl, nvflare) first on PATH
    for k in ("FL_PLUGINS_POC_ROOT", "FL_PLUGINS_DATALIST", "NVFLARE_POC_WORKSPACE"):
        env.pop(k, None)
    t0 = time.monotonic()
    try:
        p = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=work, env=env, capture_output=True,
                           text=True, timeout=1200, stdin=subprocess.DEVNULL)
        record_timing("README walkthrough (synth .. clean)", time.monotonic() - t0)
        out = p.stdout + p.stderr
        assert p.returncode == 0, f"walkthrough failed (rc={p.returncode}):\n{out[-6000:]}"

        # the submit line printed the job id and a finished status, then downloaded the server's job folder
        job_id = re.search(r'"job_id": "([0-9a-f-]{36})"', out)
        assert job_id, out[-3000:]
        assert '"status": "FINISHED:COMPLETED"' in out, out[-3000:]
        ws = work / "workspace" / "poc_results" / job_id.group(1) / "workspace"
        ckpt = torch.load(ws / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=False)
        assert ckpt["model"] and all(torch.isfinite(v).all() for v in ckpt["model"].values())
        # the same checks as every job run on POC in test_poc_jobs.py (which skips the jobs run here)
        for name in walkthrough_jobs():
            check_job_result(REPO / "jobs" / name, {"status": "FINISHED:COMPLETED"}, ws, ["site-1", "site-2"])
        # the ls line listed the checkpoint; the console listed the job as finished
        assert "FL_global_model.pt" in out
        assert re.search(rf"\|\s*{job_id.group(1)}\s*\|\s*finetune_seg_unet\s*\|\s*FINISHED:COMPLETED\s*\|", out), \
            f"the console's list_jobs table has no finished row for the job:\n{out[-3000:]}"
        assert f"submitted job {job_id.group(1)}; waiting" in out  # progress while the job runs
        # clean removed the POC folder, and the walkthrough's stop left nothing running
        assert not (work / "workspace" / "poc").exists()
        assert not poc_driver.find_processes(marker)
    finally:
        survivors = poc_driver.kill_processes(marker)
        assert not survivors, f"FLARE processes survived the walkthrough (killed): {survivors}"

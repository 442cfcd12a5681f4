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
from typing import Any, ClassVar

from nvflare.recipe.poc_env import PocEnv
from nvflare.recipe.sim_env import SimEnv
from nvflare.recipe.spec import ExecEnv, Recipe

from fl_plugins.flare.job_builder import build_job, job_names

__all__ = ["JobRecipe", "RECIPES", "recipe_for", "RunningPocEnv", "FinetuneSegUnetRecipe", "FinetuneSegVitRecipe",
           "FinetuneClsRecipe", "FinetuneClsCnnRecipe", "DinoRecipe", "Dinov2Recipe", "UNetInpaintRecipe",
           "MAEViTRecipe", "MAE3DRecipe", "MedUniverseStagewiseRecipe", "FCLRecipe", "FCLNoExchangeRecipe",
           "FCLOptRecipe", "FCLOptPTNUDPRecipe"]


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


class FinetuneSegUnetRecipe(JobRecipe):
    """Segmentation fine-tuning, MONAI U-Net from scratch (the honest baseline)."""

    JOB = "finetune_seg_unet"


class FinetuneSegVitRecipe(JobRecipe):
    """Segmentation fine-tuning, timm ViT + UNETR-style decoder, optionally from a pretrained backbone."""

    JOB = "finetune_seg_vit"


class FinetuneClsRecipe(JobRecipe):
    """Classification fine-tuning, timm ViT + linear/MLP head."""

    JOB = "finetune_cls"


class FinetuneClsCnnRecipe(JobRecipe):
    """Classification fine-tuning, MONAI ResNet-10 (the CNN baseline; 2D or 3D)."""

    JOB = "finetune_cls_cnn"


class DinoRecipe(JobRecipe):
    """Federated DINO pretraining of a timm ViT on unlabelled images."""

    JOB = "dino_pretrain"


class Dinov2Recipe(JobRecipe):
    """Federated DINOv2 (DINO + iBOT + KoLeo) pretraining."""

    JOB = "dinov2_pretrain"


class UNetInpaintRecipe(JobRecipe):
    """Federated masked-inpainting pretraining of the segmentation U-Net (its export starts ``finetune_seg_unet``).

    CPU defaults (64 px, batch 16); GPU scale: ``{"unet_inpaint": {"image_size": 256, "patch_size": 32,
    "batch_size": 128}, "steps_per_round": 100, "fl": {"num_rounds": 100}}``.
    """

    JOB = "unet_inpaint_pretrain"


class MAEViTRecipe(JobRecipe):
    """Federated MAE (or SimMIM) pretraining of a 2D timm ViT (its export starts the ViT fine-tuning jobs).

    CPU defaults (ViT-tiny width, 6 blocks, 64 px, patch 8, batch 16); GPU scale (MAE's ViT-B recipe):
    ``{"mae": {"backbone": {"name": "vit_base_patch16_224", "img_size": 224, "patch_size": 16, "depth": 12},
    "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16, "norm_pix_loss": True, "batch_size": 128},
    "steps_per_round": 100, "fl": {"num_rounds": 100}}``.
    """

    JOB = "mae_vit_pretrain"


class MAE3DRecipe(JobRecipe):
    """Federated MAE pretraining of a 3D ViT on volumes (MONAI ``MaskedAutoEncoderViT``; 3D MedMNIST datalists or Decathlon datalists with "volumes": true).

    CPU defaults (32^3 volumes, patch 8, ViT-tiny width, 6 blocks, batch 16); GPU scale: ``{"mae": {"backbone":
    {"img_size": 64, "depth": 12}, "batch_size": 64}, "steps_per_round": 100, "fl": {"num_rounds": 100}}``.
    """

    JOB = "mae3d_pretrain"


class FCLRecipe(JobRecipe):
    """Federated contrastive learning with feature exchange and global structural matching (FCL) of the segmentation
    U-Net's encoder on slices of volumes (its export starts ``finetune_seg_unet``).

    Privacy settings (what leaves a site besides the weights): ``{"exchange": {"max_features": 256,
    "feature_noise_std": 0.05, "feature_dtype": "float16"}}``; ``docs/privacy_fcl.md``.
    """

    JOB = "fcl_pretrain"


class FCLNoExchangeRecipe(JobRecipe):
    """The FCL baseline without feature exchange: local contrastive terms only, FedAvg of the encoder."""

    JOB = "fcl_noexchange_pretrain"


class FCLOptRecipe(JobRecipe):
    """FCLOpt: BYOL-style federated contrastive learning on structural positives, no negatives, no feature exchange;
    online, predictor and target averaged (methods-spec 7.8, reconstructed)."""

    JOB = "fclopt_pretrain"


class FCLOptPTNUDPRecipe(JobRecipe):
    """FCLOpt + PTNU (predicted target, never downloaded) + DP (target uploads only when the site's target strays;
    ``{"dp_threshold": None}`` for PTNU alone)."""

    JOB = "fclopt_ptnu_dp_pretrain"


class MedUniverseStagewiseRecipe(JobRecipe):
    """Stage-wise federated fine-tuning (MedUniverse): one ViT backbone improved stage by stage by sites with different
    classification tasks (2D or 3D); heads stay on the sites.

    E.g. ``MedUniverseStagewiseRecipe({"model": {"pretrained": "/abs/mae_backbone.pt"}, "stagewise": {"num_stages": 3,
    "k_per_stage": 4, "weighting": "samples"}, "fl": {"min_clients": 4}}, datalist="sites/{site}/datalist.json")``;
    the base of every stage is kept in the server's ``app_server/stage_<s>_base.pt`` (see fl_plugins.flare.stagewise).
    """

    JOB = "meduniverse_stagewise"


#: job name -> its Recipe class (every registered job has exactly one)
RECIPES: dict[str, type[JobRecipe]] = {
    cls.JOB: cls for cls in (FinetuneSegUnetRecipe, FinetuneSegVitRecipe, FinetuneClsRecipe, FinetuneClsCnnRecipe,
                             DinoRecipe, Dinov2Recipe, UNetInpaintRecipe,
                             MAEViTRecipe, MAE3DRecipe, MedUniverseStagewiseRecipe, FCLRecipe,
                             FCLNoExchangeRecipe, FCLOptRecipe, FCLOptPTNUDPRecipe)
}


def recipe_for(name: str, settings: dict[str, Any] | None = None, datalist: str | None = None) -> JobRecipe:
    """The Recipe of the registered job ``name``."""
    if name not in RECIPES:
        raise ValueError(f"no recipe for job {name!r}; jobs with recipes: {sorted(RECIPES)}")
    return RECIPES[name](settings, datalist=datalist)


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

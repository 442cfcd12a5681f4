"""Federated pretraining jobs of registered methods (DINO / DINOv2, U-Net inpainting, MAE 2D / 3D, SimCLR): the
generic ``ssl`` handler on the sites (fl_plugins.flare.ssl_handler), the method's federated state on the server.

The settings section of a job is named after its method (``--set dino.lr=5e-4``, ``--set mae.mask_ratio=0.6``);
every field of the method's config can be set and the config class validates the values when the job is built;
``views.*`` are the augmentation settings of the method's training views (methods that have them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fl_plugins.flare.jobs.assembly import build_fedavg_job
from fl_plugins.flare.jobs.base import FLSettings, JobSpec, non_federated_regex_of, with_step_horizon
from fl_plugins.flare.jobs.finetune import VIT_CPU
from fl_plugins.models.unet import UNET_DEFAULTS

__all__ = ["SPECS", "build_pretrain_job", "method_job_spec"]


def build_pretrain_job(
    name: str,
    method: str,
    config: dict[str, Any],
    fl: dict[str, Any] | None = None,
    steps_per_round: int = 5,
    knn_every: int = 1,
    knn_max_items: int = 256,
    views: dict[str, Any] | None = None,
    imports: list[str] | None = None,
    plugin_files: list[str] | None = None,
    client: str = "executor",
    spatial_dims: int | None = None,
    preview_every: int | None = None,
) -> Any:
    """A federated pretraining job of any registered method (a plugin's too): FedAvg of its federated state.

    Args:
        name: job name.
        method: registered method name; a plugin's module must be listed in ``imports`` (and, to ship it with the
            job, its file in ``plugin_files``).
        config: the method's config dict (``seed`` and, if present, ``total_steps`` handled as in SSLHandler).
        fl: ``FLSettings`` fields (validated).
        steps_per_round / knn_every / knn_max_items / views: :class:`~fl_plugins.flare.ssl_handler.SSLHandler`.
        client: ``"executor"`` or ``"client_api"`` (see :func:`~fl_plugins.flare.jobs.assembly.assemble_job`).
        spatial_dims / preview_every: :class:`~fl_plugins.flare.ssl_handler.SSLHandler` arguments, passed only when
            given (None: the handler's default).
    """
    from fl_plugins.methods import build, get_spec, import_plugins

    settings = FLSettings(**{"key_metric": "knn_accuracy", **(fl or {})})
    import_plugins(imports or [])
    config = {**config, "seed": config.get("seed", settings.seed)}
    built = build(method, dict(config))  # validates the config here, not on the sites
    spec = get_spec(method)
    if spec.views is not None:  # and the views: a bad view setting is named when the job is built
        spec.views(built.config, dict(views or {}))
    args = {"method": method, "config": dict(config), "steps_per_round": steps_per_round,
            "total_rounds": settings.num_rounds, "knn_every": knn_every, "knn_max_items": knn_max_items,
            "views": dict(views or {})}
    if spatial_dims is not None:
        args["spatial_dims"] = int(spatial_dims)
    if preview_every is not None:
        args["preview_every"] = int(preview_every)
    return build_fedavg_job(name, "ssl", args, settings, method=method, method_config=dict(config),
                            exclude_vars=non_federated_regex_of(built), imports=imports, client=client,
                            plugin_files=plugin_files)


def _method_builder(method: str, section: str, dims: Callable[[dict[str, Any]], int]
                    ) -> Callable[[str, dict[str, Any]], Any]:
    """Builder of a pretraining job of the registered ``method`` whose config is the settings' ``section``."""

    def builder(name: str, s: dict[str, Any]) -> Any:
        fl = FLSettings(**s["fl"])
        cfg = dict(s[section])
        cfg.setdefault("seed", fl.seed)  # the job's seed (mixed with each site's name on the sites)
        cfg = with_step_horizon(cfg, s["steps_per_round"], fl.num_rounds)
        try:
            spatial_dims = dims(s)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{section} settings: {e}") from e
        preview = s.get("preview_every")
        return build_pretrain_job(name, method, cfg, fl=dict(s["fl"]), steps_per_round=s["steps_per_round"],
                                  knn_every=s.get("knn_every", 0), knn_max_items=s.get("knn_max_items", 256),
                                  views=s.get("views"), spatial_dims=spatial_dims,
                                  preview_every=None if preview is None else int(preview))

    return builder


def method_job_spec(name: str, recipe: str, description: str, method: str, defaults: dict[str, Any],
                    dims: Callable[[dict[str, Any]], int], open_keys: dict[str, Any], *, section: str | None = None,
                    dims_key: str | None = None, jobs_by_dims: dict[int, str] | None = None,
                    compat: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None) -> JobSpec:
    """The :class:`JobSpec` of a pretraining job of the registered ``method`` (settings section ``section``,
    default the method's name): the generic ``ssl`` handler, FedAvg, the data check by ``dims``."""
    section = section or method
    return JobSpec(name=name, recipe=recipe, description=description, defaults=defaults,
                   builder=_method_builder(method, section, dims), handler="ssl", data="pretrain", dims=dims,
                   dims_key=dims_key, jobs_by_dims=dict(jobs_by_dims or {}), method=method, section=section,
                   open_keys=open_keys, compat=compat)


def _fields(ref: str) -> dict[str, Any]:
    """Field -> default of the config class ``module:Class`` (its type checks ``--set`` values)."""
    from fl_plugins.flare.jobs.base import load_ref

    return load_ref(ref)().to_dict()


def _two_d(_: dict[str, Any]) -> int:
    return 2


def _unet_dims(s: dict[str, Any]) -> int:
    return int({**UNET_DEFAULTS, **dict(s["unet_inpaint"].get("unet") or {})}["spatial_dims"])


def _mae_dims(s: dict[str, Any]) -> int:
    return int(s["mae"].get("spatial_dims", 2))


_BACKBONE_FIELDS = _fields("fl_plugins.models.backbone:BackboneSpec")
_UNET_FIELDS = dict(UNET_DEFAULTS)
_MIM_JOBS = {2: "mae_vit_pretrain", 3: "mae3d_pretrain"}  # the masked-image-modelling job that fits 2D / 3D data
_KNN = {"knn_every": 1, "knn_max_items": 256}


def _dino_variant(overrides: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``--set dino.variant=dino|dinov2`` (the settings before the loss weights): the variant's preset over the job's
    ``dino`` defaults, the other given fields on top (:func:`fl_plugins.methods.dino_config.expand_variant`)."""
    from fl_plugins.methods.dino_config import expand_variant

    dino = overrides.get("dino")
    if not isinstance(dino, dict) or "variant" not in dino:
        return overrides
    return {**overrides, "dino": expand_variant(dino, defaults=defaults["dino"])}


def _dino_specs() -> list[JobSpec]:
    from fl_plugins.data.view_config import VIEW_SETTING_FIELDS
    from fl_plugins.methods.dino_config import DINO_PRESET, DINOV2_PRESET

    common = {"backbone": dict(VIT_CPU), "batch_size": 16,
              "out_dim": 1024,  # K = 1024 at CPU scale (methods-spec 2.7 / 9.3)
              "hidden_dim": 512,  # [R] CPU scale (2048 [V])
              "bottleneck_dim": 128,  # [R] CPU scale (256 [V])
              "local_crop_size": 32, "n_local_crops": 4, "federation_mode": "A"}
    fields = _fields("fl_plugins.methods.dino_config:DINOConfig")
    out = []
    for job, preset, what in (("dino_pretrain", DINO_PRESET, "DINO"),
                              ("dinov2_pretrain", DINOV2_PRESET, "DINOv2 (iBOT + KoLeo)")):
        out.append(method_job_spec(
            job, "DinoRecipe" if job == "dino_pretrain" else "Dinov2Recipe",
            f"Federated {what} pretraining of a timm ViT on unlabelled images, FedAvg (mode A), k-NN monitor; the "
            "loss terms are settings (dino.dino_weight, dino.ibot_weight, dino.koleo_weight: iBOT-only is "
            "--set dino.dino_weight=0 --set dino.ibot_weight=1)",
            "dino",
            {"fl": {"num_rounds": 2, "min_clients": 2, "key_metric": "knn_accuracy"},
             "dino": {**common, **preset}, "steps_per_round": 5, **_KNN,
             "views": {}},  # augmentation settings of the training views (the method's defaults when empty)
            _two_d, {"dino": fields, "views": VIEW_SETTING_FIELDS},
            jobs_by_dims={2: job, 3: "mae3d_pretrain"}, compat=_dino_variant))
    return out


_VIT3D = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "in_chans": 1, "depth": 6}


def _mim_specs() -> list[JobSpec]:
    inpaint = method_job_spec(
        "unet_inpaint_pretrain", "UNetInpaintRecipe",
        "Federated masked-inpainting pretraining of the whole finetune_seg_unet U-Net (de Mooij et al. 2024) on "
        "unlabelled images, FedAvg, ssl/preview images in TensorBoard; export-backbone -> finetune_seg_unet "
        "--pretrained. GPU scale: --set unet_inpaint.image_size=256 --set unet_inpaint.patch_size=32 --set "
        "unet_inpaint.batch_size=128 --set steps_per_round=100 --rounds 100 (fine-tune with the same image size and "
        "U-Net settings)",
        "unet_inpaint",
        # CPU defaults: InpaintConfig's (64 px, 8 px patches, mask 0.75, the fine-tuning job's U-Net) but batch 16 (as
        # dino_pretrain; a site needs at least batch_size training slices: the test sites have 24)
        {"fl": {"num_rounds": 2, "min_clients": 2, "key_metric": None},  # no k-NN monitor: a U-Net outputs images
         "unet_inpaint": {"unet": {}, "image_size": 64, "patch_size": 8, "mask_ratio": 0.75, "batch_size": 16,
                          "lr": 1e-3},
         "steps_per_round": 5, "preview_every": 1},
        _unet_dims,
        # every InpaintConfig field (e.g. --set unet_inpaint.loss=l1) and every U-Net setting
        # (--set 'unet_inpaint.unet.channels=[8,16,32,64,128]'; the fine-tuning job's model must match)
        {"unet_inpaint": _fields("fl_plugins.methods.unet_inpaint:InpaintConfig"), "unet_inpaint.unet": _UNET_FIELDS},
        dims_key="unet_inpaint.unet.spatial_dims", jobs_by_dims={2: "unet_inpaint_pretrain", 3: "mae3d_pretrain"})
    mae_fields = _fields("fl_plugins.methods.mae_config:MAEConfig")
    out = [inpaint]
    for job, recipe, dims, backbone, what in (
        ("mae_vit_pretrain", "MAEViTRecipe", 2, dict(VIT_CPU),
         "a 2D timm ViT on unlabelled images (or SimMIM: --set mae.variant=simmim); export-backbone -> "
         "finetune_seg_vit / finetune_cls --pretrained. GPU scale (MAE's ViT-B recipe): --set "
         "mae.backbone.name=vit_base_patch16_224 --set mae.backbone.img_size=224 --set mae.backbone.patch_size=16 "
         "--set mae.backbone.depth=12 --set mae.decoder_dim=512 --set mae.decoder_depth=8 --set mae.decoder_heads=16 "
         "--set mae.norm_pix_loss=true --set mae.batch_size=128 --set steps_per_round=100 --rounds 100"),
        ("mae3d_pretrain", "MAE3DRecipe", 3, dict(_VIT3D),
         "a 3D ViT (MONAI MaskedAutoEncoderViT, the ViT-tiny width) on unlabelled volumes (3D MedMNIST, e.g. "
         "AdrenalMNIST3D, or Decathlon data split with --volumes); export-backbone -> a MONAI ViT state_dict "
         "(UNETR's vit.*). GPU scale: --set mae.backbone.img_size=64 --set mae.backbone.depth=12 --set "
         "mae.batch_size=64 --set steps_per_round=100 --rounds 100"),
    ):
        out.append(method_job_spec(
            job, recipe, f"Federated MAE pretraining of {what}; FedAvg, k-NN monitor, ssl/preview images", "mae",
            # CPU defaults: MAEConfig's (mask 0.75, decoder 192-d x 2 blocks) with the dino_pretrain ViT (64 px,
            # patch 8, 6 blocks; 3D: 32^3 volumes, patch 8 = 64 tokens) and batch 16 (a site needs at least
            # batch_size training images); lr 1e-3 [R]: MAE's scaling rule (1.5e-4 x batch / 256) gives 9e-6 at
            # batch 16, which barely moves a model in a CPU run; 1e-3 took the masked MSE on PneumoniaMNIST from
            # 0.39 to 0.013 in 360 steps (docs/results/mim_real_data.md section 2). On a GPU at batch >= 256 use
            # the rule (--set mae.lr=null).
            {"fl": {"num_rounds": 2, "min_clients": 2, "key_metric": "knn_accuracy"},
             "mae": {"variant": "mae", "spatial_dims": dims, "backbone": backbone, "batch_size": 16, "lr": 1e-3},
             "steps_per_round": 5, **_KNN, "preview_every": 1},
            _mae_dims,
            # every MAEConfig field (e.g. --set mae.mask_ratio=0.6 --set mae.lr=1e-3) and every backbone field
            {"mae": mae_fields, "mae.backbone": _BACKBONE_FIELDS},
            dims_key="mae.spatial_dims", jobs_by_dims=_MIM_JOBS))
    return out


def _simclr_spec() -> JobSpec:
    return method_job_spec(
        "simclr_pretrain", "SimCLRRecipe",
        "Federated SimCLR (FedSimCLR, the FCL paper's baseline): NT-Xent of two augmented views of each unlabelled "
        "image, the finetune_seg_unet U-Net encoder (or a 2D ViT: --set simclr.backbone.kind=vit), FedAvg, k-NN "
        "monitor; export-backbone -> finetune_seg_unet --pretrained. GPU scale: --set simclr.image_size=256 --set "
        "simclr.batch_size=256 --set simclr.proj_hidden_dim=2048 --set steps_per_round=100 --rounds 100",
        "simclr",
        # CPU defaults: SimCLRConfig's (64 px, batch 16, projection 512 -> 128, tau 0.1)
        {"fl": {"num_rounds": 2, "min_clients": 2, "key_metric": "knn_accuracy"},
         "simclr": {"backbone": {"kind": "unet_encoder"}, "image_size": 64, "batch_size": 16},
         "steps_per_round": 5, **_KNN},
        _two_d,
        # every SimCLRConfig field (--set simclr.temperature=0.2) and the encoder's settings (U-Net or ViT)
        {"simclr": _fields("fl_plugins.methods.simclr:SimCLRConfig"),
         "simclr.backbone": {"kind": "unet_encoder", **_UNET_FIELDS, **_BACKBONE_FIELDS}},
        jobs_by_dims={2: "simclr_pretrain", 3: "mae3d_pretrain"})


SPECS = [*_dino_specs(), *_mim_specs(), _simclr_spec()]

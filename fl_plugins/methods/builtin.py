"""The package's own methods, registered under their public names (imported by the registry on first use).

======== =========================================== ================================================================
name     config                                      batches
======== =========================================== ================================================================
dino     :class:`~fl_plugins.methods.dino_config.    multi-crop views (:meth:`DINOConfig.training_views` + the job's
         DINOConfig` fields (``variant``: dino or      ``views`` settings), ``[g1, g2, l1..lL]``
         dinov2)
finetune :class:`~fl_plugins.engine.finetune.        labelled items ``{"image", "label"}`` (the handler builds them)
         FinetuneConfig` fields
unet_    :class:`~fl_plugins.methods.unet_inpaint.   the image itself ``{"image": [B, C, *spatial]}``; flips, rot90
inpaint  InpaintConfig` fields                       and masks drawn in the step
mae      :class:`~fl_plugins.methods.mae_config.     the image itself ``{"image": [B, C, *spatial]}``; crops, flips
         MAEConfig` fields (``variant``: mae or      and masks drawn in the step (MAE 2D/3D, SimMIM 2D)
         simmim)
======== =========================================== ================================================================
"""

from __future__ import annotations

from typing import Any

from fl_plugins.methods.registry import register_method

__all__: list[str] = []


def _build_dino(config: dict[str, Any]) -> Any:
    from fl_plugins.methods.dino import DINOConfig, DINOMethod

    try:
        return DINOMethod(DINOConfig.from_dict(dict(config)))
    except TypeError as e:  # an unknown field: DINOConfig names it
        raise ValueError(f"dino settings: {e}") from e


def _dino_views(config: Any, settings: dict[str, Any]) -> tuple[Any, Any]:
    from fl_plugins.data.views import MultiCropTransform, multicrop_collate

    return MultiCropTransform(config.training_views(settings)), multicrop_collate


def _build_finetune(config: dict[str, Any]) -> Any:
    from fl_plugins.engine.finetune import FinetuneConfig, FinetuneMethod

    return FinetuneMethod(FinetuneConfig.from_dict(dict(config)))


def _build_unet_inpaint(config: dict[str, Any]) -> Any:
    from fl_plugins.methods.unet_inpaint import InpaintConfig, UNetInpaintMethod

    return UNetInpaintMethod(InpaintConfig.from_dict(dict(config)))


register_method("dino", _build_dino, views=_dino_views,
                description="DINO / DINOv2 self-distillation (student, EMA teacher, centres; modes A/B/C)")
register_method("finetune", _build_finetune,
                description="supervised fine-tuning (segmentation or classification) of a build_model network")
register_method("unet_inpaint", _build_unet_inpaint,
                description="masked inpainting of the whole segmentation U-Net (2D/3D; MSE on masked pixels)")


def _build_mae(config: dict[str, Any]) -> Any:
    from fl_plugins.methods.mae import MAEConfig, MAEMethod

    return MAEMethod(MAEConfig.from_dict(dict(config)))


register_method("mae", _build_mae,
                description="masked image modelling of a ViT: MAE (2D timm / 3D MONAI) or SimMIM (2D)")


def _build_fcl(config: dict[str, Any]) -> Any:
    from fl_plugins.methods.fcl import FCLConfig, FCLMethod

    return FCLMethod(FCLConfig.from_dict(dict(config)))


register_method("fcl", _build_fcl,
                description="federated contrastive learning with feature exchange and global structural matching "
                "(U-Net encoder; batches of partitions from the fcl task handler)")


def _build_fclopt(config: dict[str, Any]) -> Any:
    from fl_plugins.methods.fclopt import FCLOptConfig, FCLOptMethod

    return FCLOptMethod(FCLOptConfig.from_dict(dict(config)))


register_method("fclopt", _build_fclopt,
                description="FCLOpt: BYOL-style federated contrastive learning without negatives, structural "
                "positives (target averaged, or predicted by PTNU); reconstructed from the abstract")

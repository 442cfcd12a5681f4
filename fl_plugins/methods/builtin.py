"""The package's own methods: one row each in :data:`BUILTIN_METHODS`, which the registry reads and registers.

The registry imports this module, never the other way round (no import circle): every builder is named by a
``"module:attribute"`` string that the registry imports on first use, so no method module is imported before it
is needed. Adding a method is one row.

======== =========================================== ================================================================
name     config                                      batches
======== =========================================== ================================================================
dino     :class:`~fl_plugins.methods.dino_config.    multi-crop views (:meth:`DINOConfig.training_views` + the job's
         DINOConfig` fields (loss weights dino_,     ``views`` settings), ``[g1, g2, l1..lL]``
         ibot_, koleo_weight; DINO_PRESET,
         DINOV2_PRESET)
finetune :class:`~fl_plugins.engine.finetune.        labelled items ``{"image", "label"}`` (the handler builds them)
         FinetuneConfig` fields
unet_    :class:`~fl_plugins.methods.unet_inpaint.   the image itself ``{"image": [B, C, *spatial]}``; flips, rot90
inpaint  InpaintConfig` fields                       and masks drawn in the step
mae      :class:`~fl_plugins.methods.mae_config.     the image itself ``{"image": [B, C, *spatial]}``; crops, flips
         MAEConfig` fields (``variant``: mae or      and masks drawn in the step (MAE 2D/3D, SimMIM 2D)
         simmim)
fcl      :class:`~fl_plugins.methods.fcl.FCLConfig`  partition batches from the fcl task handler
fclopt   :class:`~fl_plugins.methods.fclopt.         partition batches from the fclopt task handler
         FCLOptConfig`
simclr   :class:`~fl_plugins.methods.simclr.         two augmented views ``{"view1", "view2"}`` (data.pair_views)
         SimCLRConfig`
======== =========================================== ================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["BUILTIN_METHODS", "BuiltinMethod"]


class BuiltinMethod(NamedTuple):
    """One built-in method (a row of :data:`BUILTIN_METHODS`).

    Attributes:
        builder: with ``config``: ``"module:MethodClass"``, built as ``MethodClass(ConfigClass.from_dict(d))``;
            without: ``"module:function"`` or a callable, config dict -> method.
        config: ``"module:ConfigClass"`` (a class with a strict ``from_dict``), or None.
        description: one line for listings.
        views: ``"module:function"`` or a callable ``(method.config, view_settings) -> (transform, collate)``
            (:class:`~fl_plugins.methods.registry.MethodSpec`); None = the image itself.
    """

    builder: str | Callable[[dict[str, Any]], Any]
    config: str | None
    description: str
    views: str | Callable[[Any, dict[str, Any]], tuple[Any, Any]] | None = None


def _dino_views(config: Any, settings: dict[str, Any]) -> tuple[Any, Any]:
    """DINO's multi-crop views: ``config.training_views(settings)`` -> transform, :func:`multicrop_collate`."""
    from fl_plugins.data.views import MultiCropTransform, multicrop_collate

    return MultiCropTransform(config.training_views(settings)), multicrop_collate


#: name -> row; the registry registers every row under its name when it is imported.
BUILTIN_METHODS: dict[str, BuiltinMethod] = {
    "dino": BuiltinMethod("fl_plugins.methods.dino:DINOMethod", "fl_plugins.methods.dino:DINOConfig",
                          "DINO / DINOv2 self-distillation (student, EMA teacher, centres; modes A/B/C)",
                          views=_dino_views),
    "finetune": BuiltinMethod("fl_plugins.engine.finetune:FinetuneMethod", "fl_plugins.engine.finetune:FinetuneConfig",
                              "supervised fine-tuning (segmentation or classification) of a build_model network"),
    "unet_inpaint": BuiltinMethod("fl_plugins.methods.unet_inpaint:UNetInpaintMethod",
                                  "fl_plugins.methods.unet_inpaint:InpaintConfig",
                                  "masked inpainting of the whole segmentation U-Net (2D/3D; MSE on masked pixels)"),
    "mae": BuiltinMethod("fl_plugins.methods.mae:MAEMethod", "fl_plugins.methods.mae_config:MAEConfig",
                         "masked image modelling of a ViT: MAE (2D timm / 3D MONAI) or SimMIM (2D)"),
    "fcl": BuiltinMethod("fl_plugins.methods.fcl:FCLMethod", "fl_plugins.methods.fcl:FCLConfig",
                         "federated contrastive learning with feature exchange and global structural matching "
                         "(U-Net encoder; batches of partitions from the fcl task handler)"),
    "fclopt": BuiltinMethod("fl_plugins.methods.fclopt:FCLOptMethod", "fl_plugins.methods.fclopt:FCLOptConfig",
                            "FCLOpt: BYOL-style federated contrastive learning without negatives, structural "
                            "positives (target averaged, or predicted by PTNU); reconstructed from the abstract"),
    "simclr": BuiltinMethod("fl_plugins.methods.simclr:SimCLRMethod", "fl_plugins.methods.simclr:SimCLRConfig",
                            "SimCLR (FedSimCLR baseline): NT-Xent of two views of each image, U-Net encoder or ViT",
                            views="fl_plugins.methods.simclr:simclr_views"),
}

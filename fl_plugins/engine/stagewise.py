"""Framework-free site side of stage-wise federated fine-tuning (MedUniverse, methods-spec section 6).

A site fine-tunes the stage's base backbone together with its own task head on its labelled data. The network is a
:class:`~fl_plugins.models.slice_classifier.SliceViTClassifier` (2D images, or 3D volumes slice by slice through the
same 2D backbone); the method and trainer are the fine-tuning ones (:mod:`fl_plugins.engine.finetune`) with another
state taxonomy:

+-----------+-----------------------------------------------------------+------------------------------------------+
| state     | contents                                                  | lifetime / where                         |
+===========+===========================================================+==========================================+
| federated | every ``backbone.*`` tensor                               | the stage's base: received, fine-tuned,  |
|           |                                                           | returned (and averaged by the server)    |
+-----------+-----------------------------------------------------------+------------------------------------------+
| site      | every ``head.*`` tensor (sized by the site's own number   | the site, across stages, never sent;     |
|           | of classes)                                               | saved in the site workspace by the       |
|           |                                                           | handler so that a restarted site keeps it|
+-----------+-----------------------------------------------------------+------------------------------------------+
| rebuilt   | the optimizer (fresh at every stage: each stage starts    | one stage                                |
|           | from a new base), data loaders, augmentation RNG          |                                          |
+-----------+-----------------------------------------------------------+------------------------------------------+

No ``nvflare`` here (see :mod:`fl_plugins.flare.stage_handler` for the task handler).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fl_plugins.engine.finetune import FinetuneConfig, FinetuneMethod, FinetuneTrainer, balanced_class_weights
from fl_plugins.engine.method import MethodBase
from fl_plugins.engine.train_loop import build_optimizer
from fl_plugins.models.backbone import BackboneSpec
from fl_plugins.models.slice_classifier import BaseBackbone, SliceViTClassifier

__all__ = ["BACKBONE_PREFIX", "HEAD_PREFIX", "STAGE_MODEL_KEYS", "StageMethod", "StageTrainer", "build_base_backbone",
           "stage_backbone_spec"]

logger = logging.getLogger(__name__)

#: wire prefix of the shared backbone (federated) and of the site's head (never sent)
BACKBONE_PREFIX = "backbone."
HEAD_PREFIX = "head."
#: keys of the job's ``model`` section (a ``vit_classifier`` config: ``num_classes`` is each site's own)
STAGE_MODEL_KEYS = ("arch", "num_classes", "backbone", "head", "pretrained")


def stage_backbone_spec(model: Mapping[str, Any]) -> BackboneSpec:
    """The backbone spec of a stage-wise ``model`` config, checked (errors name the setting and value)."""
    if not isinstance(model, Mapping):
        raise ValueError(f"stage-wise model settings must be a dict, got {type(model).__name__}")
    arch = model.get("arch", "vit_classifier")
    if arch != "vit_classifier":
        raise ValueError(f"stage-wise model setting 'arch'={arch!r}: must be 'vit_classifier' (a timm ViT backbone, "
                         "shared by every site, + a head per site)")
    unknown = sorted(set(model) - set(STAGE_MODEL_KEYS))
    if unknown:
        raise ValueError(f"unknown stage-wise model setting(s) {unknown}; valid: {list(STAGE_MODEL_KEYS)}")
    b = model.get("backbone", {})
    if not isinstance(b, Mapping):
        raise ValueError(f"stage-wise model setting 'backbone' must be a dict of BackboneSpec fields, got {b!r}")
    try:
        return BackboneSpec.from_dict(dict(b))
    except (TypeError, ValueError) as e:
        raise ValueError(f"stage-wise model setting 'backbone': {e}") from e


def build_base_backbone(model: Mapping[str, Any], seed: int = 0) -> BaseBackbone:
    """The server's base: the backbone only (``backbone.*`` keys), loaded from ``model["pretrained"]`` when given
    (an exported backbone, e.g. ``flssl export-backbone`` of ``mae_vit_pretrain``), else random under ``seed``."""
    spec = stage_backbone_spec(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return BaseBackbone(spec, pretrained=model.get("pretrained") or None)


class StageMethod(FinetuneMethod):
    """Supervised fine-tuning of backbone + head where only the backbone is federated (module docstring).

    Args:
        config: fine-tuning settings; ``config.model`` is a ``vit_classifier`` config whose ``num_classes`` is the
            site's (>= 2) and whose ``pretrained`` is ignored on sites (the base comes from the server).
        num_slices: slices per volume for 3D data (:class:`SliceViTClassifier`).
    """

    def __init__(self, config: FinetuneConfig, num_slices: int | None = 8) -> None:
        MethodBase.__init__(self, config)
        if config.task != "classification":
            raise ValueError(f"stage-wise fine-tuning is classification; got task {config.task!r}")
        spec = stage_backbone_spec(config.model)
        nc = config.model.get("num_classes")
        if isinstance(nc, bool) or not isinstance(nc, int) or nc < 2:
            raise ValueError(f"stage-wise head: num_classes must be an int >= 2, got {nc!r}")
        self.task = "classification"
        self.num_classes = nc
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = SliceViTClassifier(spec, nc, head=str(config.model.get("head", "linear")),
                                            num_slices=num_slices)
        self.loss_fn = nn.CrossEntropyLoss()
        self._federated = [k for k in self.model.state_dict() if k.startswith(BACKBONE_PREFIX)]

    def load_federated_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Strict load of exactly the backbone keys (a head key in ``sd`` is refused: heads never travel)."""
        heads = sorted(k for k in sd if k.startswith(HEAD_PREFIX))
        if heads:
            raise ValueError(f"received state has head key(s) {heads[:5]}: heads are the sites' own and never sent "
                             "(the server must send backbone.* keys only)")
        MethodBase.load_federated_state_dict(self, sd)


class StageTrainer(FinetuneTrainer):
    """:class:`~fl_plugins.engine.finetune.FinetuneTrainer` (seeded ``train_steps``, ``evaluate``) around a
    :class:`StageMethod`, with a fresh optimizer per stage (:meth:`reset_optimizer`) and the head's state.

    Args:
        config / train_dataset / val_dataset: as :class:`FinetuneTrainer`.
        num_slices: :class:`StageMethod`'s.
    """

    def __init__(self, config: FinetuneConfig, train_dataset: Dataset, val_dataset: Dataset | None = None,
                 num_slices: int | None = 8) -> None:
        self.config = config
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.task = config.task
        self.device = torch.device(config.device)
        self.method = StageMethod(config, num_slices=num_slices).to(self.device)
        self.num_classes = self.method.num_classes
        self.model = self.method.model
        self.loss_fn = self.method.loss_fn
        if config.class_weighting == "balanced":
            from fl_plugins.engine.finetune import _labels_of

            self.class_weights = balanced_class_weights(_labels_of(train_dataset), self.num_classes)
            self.method.loss_fn = nn.CrossEntropyLoss(weight=self.class_weights.to(self.device))
        self._federated = self.method._federated
        self.total_local_steps = 0
        self.reset_optimizer()

    def reset_optimizer(self) -> None:
        """A fresh optimizer (no moments): each stage fine-tunes a new base."""
        self.optimizer = build_optimizer(self.method, kind=self.config.optimizer, weight_decay=self.config.weight_decay)

    def head_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the head's tensors (the site state)."""
        return self.method.site_state_dict()

    def load_head_state(self, sd: Mapping[str, Any]) -> None:
        """Load a saved head strictly (key set, shapes, finite values)."""
        self.method.load_site_state_dict(sd)

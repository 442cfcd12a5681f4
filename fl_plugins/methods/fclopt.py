"""FCLOpt: communication-efficient federated contrastive learning without negatives (methods-spec 7.8, framework 2).

**Reconstructed** [R]: the paper's equations were not reachable; methods-spec 7.8 reconstructs the method from its
abstract ("does not rely on negative samples"). BYOL-style: online network = encoder (the ``finetune_seg_unet``
U-Net encoder, as FCL) + projector, predictor on top; target network = EMA of encoder + projector. Positives are
*structural*: each slice of a batch (:class:`~fl_plugins.data.partition.PartitionBatches`: ``V`` volumes x one slice
per partition) is paired with the slice of the same partition in the next volume of the batch (cyclically), both
augmented. No negatives, no memory bank, no feature exchange. Loss, symmetrised::

    L = 1/2 [ || p(z_a)/|p(z_a)| - sg(z'_b)/|z'_b| ||^2 + (a <-> b) ] = 2 - (cos(p(z_a), z'_b) + cos(p(z_b), z'_a))

with ``z = projector(encoder(x))`` online, ``z'`` from the target, ``p`` the predictor; lightly's
``NegativeCosineSimilarity`` computes the cosines; the heads are lightly's ``BYOLProjectionHead`` /
``BYOLPredictionHead``. After each step ``xi <- m xi + (1 - m) theta`` (``target_momentum``).

State taxonomy (``target_mode``):

* ``"fedavg"`` (FCLOpt alone): federated = online encoder + projector, predictor and target (all averaged; both
  directions carry theta + phi + xi); site = ``num_batches_tracked`` counters.
* ``"ptnu"`` (FCLOpt + PTNU, optionally DP): federated = online + predictor; the target (``target.*``) is *rebuilt*
  each round from the predicted target every party computes (:mod:`fl_plugins.core.ptnu`); it crosses the wire
  only when the server must correct or resynchronise a site, or (DP) when a site's true target strays from the
  prediction.

``local_predictor=True`` (either mode) moves the predictor (``predictor.*``) from *federated* to *site* state: it
never crosses the wire and each site keeps its own between rounds [R: not in the abstract; the predictor is a
per-site head in the sense of FedU (Zhuang et al., ICCV 2021), which updates it divergence-aware instead of always
averaging]. It saves the predictor's bytes both ways (0.53 MB per site per round with the default heads, 2 % of
FCLOpt's traffic) at the price of a per-site head; its effect on the fine-tuning Dice is measured in
``docs/results/fclopt_acdc.md``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fl_plugins.core.ema import update_momentum
from fl_plugins.core.schedules import warmup_cosine_or_constant
from fl_plugins.engine.method import MethodBase
from fl_plugins.methods.fcl import SliceContrastSettings, augment_view
from fl_plugins.models.backbones import build_backbone, feature_dim

__all__ = ["FCLOptConfig", "FCLOptMethod", "PREDICTOR_PREFIX", "TARGET_MODES", "TARGET_PREFIX", "structural_pairs"]

TARGET_MODES = ("fedavg", "ptnu")
TARGET_PREFIX = "target."
PREDICTOR_PREFIX = "predictor."


@dataclass(frozen=True)
class FCLOptConfig(SliceContrastSettings):
    """Settings of FCLOpt ([R] throughout: methods-spec 7.8 reconstruction; sizes for 64 px CPU runs).

    The shared fields (``backbone``: default the ``finetune_seg_unet`` U-Net encoder; ``image_size`` 64;
    ``num_partitions`` ``S`` = 4; ``volumes_per_batch`` ``V`` = 8, batch ``V * S`` = 32; the augmentations
    ``crop_scale``, ``intensity``; AdamW 3e-4 cosine ``lr``, ``min_lr_ratio``, ``warmup_steps``, ``total_steps``,
    ``weight_decay`` 1e-5; ``seed``: model init) and their defaults are
    :class:`~fl_plugins.methods.fcl.SliceContrastSettings`'s, as for FCL.

    Attributes:
        proj_hidden_dim, proj_dim, pred_hidden_dim: BYOL heads, 512 / 128 / 512 [R: BYOL's 4096 / 256 / 4096
            scaled to a 256-channel encoder].
        target_momentum: ``m``, 0.99 [R 7.8: 0.99-0.996].
        target_mode: ``"fedavg"`` or ``"ptnu"`` (module docstring).
        local_predictor: keep the predictor on the site instead of averaging it (module docstring), default False.
    """

    proj_hidden_dim: int = 512
    proj_dim: int = 128
    pred_hidden_dim: int = 512
    target_momentum: float = 0.99
    target_mode: str = "fedavg"
    local_predictor: bool = False

    SECTION = "fclopt"

    def __post_init__(self) -> None:
        self.check_common(("proj_hidden_dim", "proj_dim", "pred_hidden_dim"), "a positive is a slice of another volume")
        if not 0.0 <= self.target_momentum <= 1.0:
            raise self._bad("target_momentum", "must be in [0, 1]")
        if self.target_mode not in TARGET_MODES:
            raise self._bad("target_mode", f"must be one of {list(TARGET_MODES)}")
        if not isinstance(self.local_predictor, bool):
            raise self._bad("local_predictor", "must be true or false")


def structural_pairs(part: Tensor, vol: Tensor) -> Tensor:
    """For each slice ``i`` of a batch, the index of its positive: the slice of the same partition in the next volume
    of the batch (cyclically, in order of first appearance). ``[B]`` int64.

    Raises:
        ValueError: a partition present in only one volume (no positive from another volume).
    """
    vols = list(dict.fromkeys(vol.tolist()))
    where = {(int(v), int(p)): i for i, (v, p) in enumerate(zip(vol.tolist(), part.tolist()))}
    out = []
    for v, p in zip(vol.tolist(), part.tolist()):
        k = vols.index(v)
        for step in range(1, len(vols)):
            j = where.get((vols[(k + step) % len(vols)], p))
            if j is not None:
                out.append(j)
                break
        else:
            raise ValueError(f"partition {p} of volume {v} has no slice of another volume in the batch")
    return torch.tensor(out, dtype=torch.long)


class FCLOptMethod(MethodBase):
    """FCLOpt as a :class:`~fl_plugins.engine.method.Method` (see the module docstring)."""

    def __init__(self, config: FCLOptConfig) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        super().__init__(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.encoder = build_backbone(config.backbone_settings())
            dim = feature_dim(self.encoder)
            self.projector = BYOLProjectionHead(dim, config.proj_hidden_dim, config.proj_dim)
            self.predictor = BYOLPredictionHead(config.proj_dim, config.pred_hidden_dim, config.proj_dim)
        self.target = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder),
                                     "projector": copy.deepcopy(self.projector)})
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.criterion = NegativeCosineSimilarity()
        self.embed_dim = dim

    # -- state taxonomy ------------------------------------------------------------------------------------------
    def state_taxonomy(self) -> dict[str, list[str]]:
        keys = list(self.state_dict())
        counter = re.compile(r"(^|\.)num_batches_tracked$")
        site = sorted(k for k in keys if counter.search(k))
        target = self.target_keys()
        target_buffers = sorted(k for k in keys if k.startswith(TARGET_PREFIX) and k not in site and k not in target)
        if self.config.local_predictor:  # a per-site head: never averaged, kept on the site between rounds
            site = sorted(set(site) | {k for k in keys if k.startswith(PREDICTOR_PREFIX)})
        rest = sorted(k for k in keys if k not in site and not k.startswith(TARGET_PREFIX))
        if self.config.target_mode == "fedavg":
            return {"federated": sorted(rest + target + target_buffers), "site": site, "rebuilt": []}
        # PTNU: the target's parameters are predicted each round; its BatchNorm running statistics are never used
        # (the target runs with batch statistics) and never predicted: they stay on the site
        return {"federated": rest, "site": sorted(site + target_buffers), "rebuilt": target}

    def target_keys(self) -> list[str]:
        """The target network's parameters (what PTNU predicts and DP may upload), sorted. Its BatchNorm running
        statistics are not among them: the target runs with batch statistics, so they never act, and a forward
        pass moves them in a way no EMA of the online weights predicts."""
        return sorted(TARGET_PREFIX + n for n, _ in self.target.named_parameters())

    def online_keys(self) -> list[str]:
        """The online encoder + projector parameters (``encoder.*``, ``projector.*``), sorted: the ``theta`` of
        PTNU, in the target's key order after dropping the ``target.`` prefix."""
        return [k[len(TARGET_PREFIX):] for k in self.target_keys()]

    def target_state(self) -> dict[str, Tensor]:
        sd = self.state_dict()
        return {k: sd[k].detach().clone() for k in self.target_keys()}

    def load_target_state(self, sd: Mapping[str, Any]) -> None:
        from fl_plugins.engine.method import load_state_subset

        load_state_subset(self, sd, self.target_keys(), "FCLOptMethod: target network", finite=True)

    # -- optimisation --------------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        params = [p for m in (self.encoder, self.projector, self.predictor) for p in m.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": self.config.weight_decay}]

    def lr_at(self, global_step: int) -> float:
        c = self.config
        return warmup_cosine_or_constant(global_step, c.lr, c.warmup_steps, c.total_steps, c.min_lr_ratio)

    def after_step(self, global_step: int) -> dict[str, float]:
        update_momentum(self.encoder, self.target["encoder"], self.config.target_momentum)
        update_momentum(self.projector, self.target["projector"], self.config.target_momentum)
        return {}

    def training_step(self, batch: Any, global_step: int, rng: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """``2 - (cos(p(z_a), z'_b) + cos(p(z_b), z'_a))`` of ``{"image" [B, C, H, W], "part" [B], "vol" [B]}``, each
        slice ``a`` paired with its :func:`structural_pairs` positive ``b``."""
        x = batch["image"]
        s = self.config.image_size
        if x.dim() != 4 or tuple(x.shape[2:]) != (s, s):
            raise ValueError(f"fclopt (image_size={s}) takes slices [B, C, {s}, {s}], got {tuple(x.shape)}")
        j = structural_pairs(batch["part"], batch["vol"]).to(x.device)
        c = self.config
        xa = augment_view(x, rng, tuple(c.crop_scale), c.intensity)
        xb = augment_view(x[j], rng, tuple(c.crop_scale), c.intensity)
        pa = self.predictor(self.projector(self.encoder(xa)))
        pb = self.predictor(self.projector(self.encoder(xb)))
        with torch.no_grad():
            ta = self.target["projector"](self.target["encoder"](xa))
            tb = self.target["projector"](self.target["encoder"](xb))
        loss = 2.0 + self.criterion(pa, tb) + self.criterion(pb, ta)  # 2 - cos - cos
        with torch.no_grad():
            spread = torch.nn.functional.normalize(pa, dim=1).std(0).mean()  # ~ 1/sqrt(D) healthy, 0 collapsed
        return loss, {"loss": float(loss.detach()), "output_std": float(spread)}

    def backbone(self) -> nn.Module:
        """The online encoder (its export starts ``finetune_seg_unet`` through ``model.pretrained``)."""
        return self.encoder

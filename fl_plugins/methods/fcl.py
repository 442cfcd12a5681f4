"""Federated contrastive learning with feature exchange and global structural matching (FCL, methods-spec 7).

Networks (methods-spec 7.3): main encoder ``f_q`` = the U-Net encoder of ``finetune_seg_unet``
(:class:`~fl_plugins.models.unet.UNetEncoder`: the MONAI U-Net's contracting path, global-average pooled; its
``state_dict`` keys are the U-Net's, so the export loads into the segmentation U-Net through ``model.pretrained``) or,
as an option, a timm ViT (``backbone.kind = "vit"``), + projection head ``GAP -> Linear(c, c) -> ReLU -> Linear(c,
D_f)``, L2-normalised [R, the group's ``UNet2D_classification``]. Momentum encoder ``f_k`` = an EMA copy of encoder +
projector, ``theta_k <- m theta_k + (1 - m) theta_q`` after every step; it makes every key and every memory-bank
feature, with batch statistics (:meth:`FCLMethod.momentum_features`).

A batch (:class:`~fl_plugins.data.partition.PartitionBatches`) holds ``V`` local volumes x one slice of each of the
``S`` partitions; each slice is augmented twice (random resized crop, flips, intensity scale/shift, drawn from the
step's generator): view 1 through ``f_q`` gives the queries, view 2 through ``f_k`` the keys. Loss:
:func:`fl_plugins.core.contrastive.fcl_loss` against the round's memory bank (this site's momentum features + the
other sites' features, :meth:`FCLMethod.set_bank`), set by the task handler each round; the local part is a FIFO
queue that every step's keys refresh (:meth:`FCLMethod.enqueue`, methods-spec 7.4 "FIFO"), the remote part stays
as received for the round.

State taxonomy: federated = ``encoder.*`` and ``projector.*`` (parameters and BatchNorm running statistics, as in
fine-tuning); site = ``num_batches_tracked`` counters (and ``momentum.*`` with ``momentum_reset=False``); rebuilt =
``momentum.*`` (default, methods-spec 7.6 [R]: a copy of the received global encoder + projector at round start).
The memory bank is not module state: it lives one round on the site.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fl_plugins.core.contrastive import fcl_loss
from fl_plugins.core.ema import update_momentum
from fl_plugins.core.schedules import warmup_cosine_or_constant
from fl_plugins.engine.method import MethodBase
from fl_plugins.models.backbones import build_backbone, feature_dim
from fl_plugins.models.unet import UNET_DEFAULTS
from fl_plugins.strict_config import StrictConfig

__all__ = ["FCLConfig", "FCLMethod", "SliceContrastSettings", "augment_view"]


@dataclass(frozen=True)
class SliceContrastSettings(StrictConfig):
    """What the settings of the slice-contrastive methods (``fcl``, ``fclopt``) share: the fields below (backbone,
    slices, batches, augmentations, optimiser), their validation (:meth:`check_common`), the strict ``from_dict`` /
    ``to_dict`` of :class:`~fl_plugins.strict_config.StrictConfig` and the backbone settings with the U-Net defaults.
    Subclasses are frozen dataclasses that add their method's fields and set :attr:`SECTION` (the name in messages).

    Attributes:
        backbone: :func:`~fl_plugins.models.backbones.build_backbone` settings; default ``kind = "unet_encoder"``
            with ``finetune_seg_unet``'s U-Net settings (they must equal the fine-tuning job's ``model`` for the
            export to load); ``{"kind": "vit", ...}`` for a timm ViT (2D).
        image_size: side of the training slices, 64 [R] (the fine-tuning job's default).
        num_partitions: ``S``, 4 [V 7.2].
        volumes_per_batch: ``V``; a batch is ``V * S`` slices, 8 x 4 = 32 [R].
        crop_scale: area range of the random resized crop, (0.6, 1.0) [R: mild, a slice's position must survive].
        intensity: maximal relative intensity scale/shift jitter, 0.2 [R].
        lr, min_lr_ratio, warmup_steps, total_steps: AdamW 3e-4 [R: GCL used 1e-3 [V]; at batch 32, 64 px on
            ACDC 1e-3 drove the FCL features to near-collapse (cosine 0.99 between all slices) while 3e-4 separated
            the partitions slowly (same 0.964 / other 0.936 after 120 steps)] with cosine decay to
            ``lr * min_lr_ratio`` over ``total_steps`` global steps (None = the job's horizon).
        weight_decay: 1e-5 [V positional_cl].
        seed: model init; the handler draws data and augmentation from the site's own seed.
    """

    SECTION = "?"

    backbone: dict = field(default_factory=lambda: {"kind": "unet_encoder"})
    image_size: int = 64
    num_partitions: int = 4
    volumes_per_batch: int = 8
    crop_scale: tuple = (0.6, 1.0)
    intensity: float = 0.2
    lr: float = 3e-4
    min_lr_ratio: float = 0.01
    warmup_steps: int = 0
    total_steps: int | None = None
    weight_decay: float = 1e-5
    seed: int = 0

    def _bad(self, name: str, why: str) -> ValueError:
        return ValueError(f"{self.SECTION} setting {name!r}={getattr(self, name)!r}: {why}")

    def check_common(self, positive_ints: tuple[str, ...], volumes_why: str) -> None:
        """Raise ``ValueError`` naming the setting for a bad shared value (and for a non-positive-int setting named
        in ``positive_ints``)."""
        for name in ("image_size", "num_partitions", *positive_ints):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise self._bad(name, "must be an int >= 1")
        v = self.volumes_per_batch
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise self._bad("volumes_per_batch", f"must be an int >= 2 ({volumes_why})")
        cs = tuple(self.crop_scale)
        if len(cs) != 2 or not 0 < cs[0] <= cs[1] <= 1:
            raise self._bad("crop_scale", "must be [lo, hi] with 0 < lo <= hi <= 1")
        if not 0 <= self.intensity < 1:
            raise self._bad("intensity", "must be in [0, 1)")
        if not self.lr > 0:
            raise self._bad("lr", "must be > 0")
        total = self.total_steps
        if total is not None and total < 1:
            raise self._bad("total_steps", "must be >= 1 or None")
        if not isinstance(self.backbone, Mapping):
            raise self._bad("backbone", "must be a dict of build_backbone settings")

    @classmethod
    def _coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        """``backbone``: ``kind`` defaults to ``"unet_encoder"`` (null -> the default backbone); ``crop_scale``: a
        tuple."""
        if "backbone" in d:
            d["backbone"] = {"kind": "unet_encoder", **dict(d["backbone"] or {})}
        if "crop_scale" in d:
            d["crop_scale"] = tuple(d["crop_scale"])
        return d

    def backbone_settings(self) -> dict[str, Any]:
        """The backbone's ``build_backbone`` settings with the U-Net defaults filled in (``unet_encoder``)."""
        b = dict(self.backbone)
        if b.get("kind", "unet_encoder") == "unet_encoder":
            return {"kind": "unet_encoder", **UNET_DEFAULTS, **{k: v for k, v in b.items() if k != "kind"}}
        return b


@dataclass(frozen=True)
class FCLConfig(SliceContrastSettings):
    """Settings of FCL ([V] methods-spec 7.2-7.6 where marked; [R] reconstruction or CPU-scale choice).

    The shared fields (``backbone``, ``image_size``, ``num_partitions``, ``volumes_per_batch``, ``crop_scale``,
    ``intensity``, ``lr``, ``min_lr_ratio``, ``warmup_steps``, ``total_steps``, ``weight_decay``, ``seed``) and
    their defaults are :class:`SliceContrastSettings`'s.

    Attributes:
        proj_dim: ``D_f``, 128 [R 7.3].
        temperature: ``tau``, 0.1 [V group code default].
        num_negatives: ``K`` per query, 512 [R 7.5: 512-4096; the low end for a CPU-sized bank].
        momentum: EMA momentum ``m`` per step, 0.999 [R 7.3, MoCo]: the keys must come from (nearly) the encoder
            that made the memory bank, the round's global model; with 0.99 the key encoder drifts away from the bank
            within a round and the main encoder learns "recent vs. stale feature" instead of anatomy (ACDC, 64 px:
            every slice's feature collapsed to one point within 40 steps).
        momentum_reset: re-initialise the momentum encoder from the received global model every round [R 7.6
            default]; False keeps it on the site (site state).
        batch_negatives: the batch's other-partition keys are negatives too [R, not in the paper's equations]:
            without them the encoder learns "computed in this batch" (BatchNorm statistics) instead of anatomy --
            on ACDC the loss rose above chance and the features collapsed (cosine 0.999 between all slices).
    """

    proj_dim: int = 128
    temperature: float = 0.1
    num_negatives: int = 512
    momentum: float = 0.999
    momentum_reset: bool = True
    batch_negatives: bool = True

    SECTION = "fcl"

    def __post_init__(self) -> None:
        self.check_common(("proj_dim", "num_negatives"), "local positives come from other volumes")
        if not self.temperature > 0:
            raise self._bad("temperature", "must be > 0")
        if not 0.0 <= self.momentum <= 1.0:
            raise self._bad("momentum", "must be in [0, 1]")


def augment_view(x: Tensor, rng: torch.Generator, crop_scale: tuple[float, float], intensity: float,
                 flip: bool = True) -> Tensor:
    """One random view of each image of ``x [B, C, H, W]`` (same shape): a random resized crop (area fraction in
    ``crop_scale``, aspect ratio 3/4..4/3, bilinear back to ``H x W``), random horizontal/vertical flips and an
    intensity ``x * (1 + a) + b`` with ``a, b ~ U(-intensity, intensity)``; all drawn from ``rng``."""
    b, _, h, w = x.shape
    out = []
    for i in range(b):
        r = torch.rand(6, generator=rng).tolist()
        area = (crop_scale[0] + (crop_scale[1] - crop_scale[0]) * r[0]) * h * w
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r[1])
        ch = max(1, min(h, round(math.sqrt(area / aspect))))
        cw = max(1, min(w, round(math.sqrt(area * aspect))))
        if area >= h * w:  # the whole image (no aspect change)
            ch, cw = h, w
        top = int(r[2] * (h - ch + 1))
        left = int(r[3] * (w - cw + 1))
        v = x[i:i + 1, :, top:top + ch, left:left + cw]
        if (ch, cw) != (h, w):
            v = F.interpolate(v, size=(h, w), mode="bilinear", align_corners=False)
        dims = [d for d, u in ((-1, r[4]), (-2, r[5])) if flip and u < 0.5]
        if dims:
            v = v.flip(dims)
        out.append(v)
    v = torch.cat(out)
    if intensity > 0:
        ab = (torch.rand(b, 2, generator=rng).to(x.device) * 2 - 1) * intensity
        v = v * (1 + ab[:, 0].view(b, 1, 1, 1)) + ab[:, 1].view(b, 1, 1, 1)
    return v


def projection_head(in_dim: int, out_dim: int) -> nn.Sequential:
    """``Linear(c, c) -> ReLU -> Linear(c, D_f)`` (methods-spec 7.3 [R]); the input is already pooled."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


class FCLMethod(MethodBase):
    """FCL as a :class:`~fl_plugins.engine.method.Method` (see the module docstring)."""

    def __init__(self, config: FCLConfig) -> None:
        super().__init__(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.encoder = build_backbone(config.backbone_settings())
            dim = feature_dim(self.encoder)
            self.projector = projection_head(dim, config.proj_dim)
        self.momentum = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder),
                                       "projector": copy.deepcopy(self.projector)})
        for p in self.momentum.parameters():
            p.requires_grad_(False)
        self.embed_dim = dim
        self._bank: tuple[Tensor, Tensor, Tensor] | None = None
        self._local_slots = torch.zeros(0, dtype=torch.long)
        self._ptr = 0

    # -- state taxonomy ------------------------------------------------------------------------------------------
    def state_taxonomy(self) -> dict[str, list[str]]:
        keys = list(self.state_dict())
        counter = re.compile(r"(^|\.)num_batches_tracked$")
        mom = [k for k in keys if k.startswith("momentum.")]
        main = [k for k in keys if not k.startswith("momentum.")]
        site = sorted(k for k in main if counter.search(k))
        if self.config.momentum_reset:
            return {"federated": sorted(set(main) - set(site)), "site": site, "rebuilt": sorted(mom)}
        return {"federated": sorted(set(main) - set(site)), "site": sorted(site + mom), "rebuilt": []}

    def load_federated_state_dict(self, sd: Mapping[str, Any]) -> None:
        super().load_federated_state_dict(sd)
        if self.config.momentum_reset:
            self.reset_momentum()

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Momentum encoder + projector := the main ones (parameters and buffers)."""
        self.momentum["encoder"].load_state_dict(self.encoder.state_dict())
        self.momentum["projector"].load_state_dict(self.projector.state_dict())

    # -- optimisation --------------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for m in (self.encoder, self.projector) for p in m.parameters() if p.requires_grad],
                 "weight_decay": self.config.weight_decay}]

    def lr_at(self, global_step: int) -> float:
        c = self.config
        return warmup_cosine_or_constant(global_step, c.lr, c.warmup_steps, c.total_steps, c.min_lr_ratio)

    def after_step(self, global_step: int) -> dict[str, float]:
        update_momentum(self.encoder, self.momentum["encoder"], self.config.momentum)
        update_momentum(self.projector, self.momentum["projector"], self.config.momentum)
        return {}

    # -- features ------------------------------------------------------------------------------------------------
    def _check_images(self, x: Tensor) -> None:
        s = self.config.image_size
        if x.dim() != 4 or tuple(x.shape[2:]) != (s, s):
            raise ValueError(f"fcl (image_size={s}) takes slices [B, C, {s}, {s}], got {tuple(x.shape)}")

    def query(self, x: Tensor) -> Tensor:
        """L2-normalised main features ``[B, D_f]`` of images ``[B, C, H, W]`` (graph attached)."""
        return F.normalize(self.projector(self.encoder(x)), dim=1)

    @torch.no_grad()
    def momentum_features(self, x: Tensor, chunk: int = 64) -> Tensor:
        """L2-normalised momentum features ``[B, D_f]`` (no graph), ``chunk`` images at a time.

        The momentum encoder runs with batch statistics (BatchNorm in train mode, as MoCo's key encoder, and as the
        queries): with running statistics (eval mode) keys and queries live in different spaces while the model is
        young, and the loss rose above chance on ACDC. Its running statistics move as a side effect; they are
        rebuilt every round (``momentum_reset``) and never sent. Callers mix the images of a chunk (the bank is
        extracted in random chunks of the training batch size, :meth:`bank_features`)."""
        self._check_images(x)
        enc, proj = self.momentum["encoder"], self.momentum["projector"]
        was = enc.training
        enc.train()
        proj.train()
        try:
            out = [F.normalize(proj(enc(x[i:i + chunk])), dim=1) for i in range(0, x.shape[0], chunk)]
        finally:
            enc.train(was)
            proj.train(was)
        return torch.cat(out) if out else x.new_zeros(0, self.config.proj_dim)

    def bank_features(self, x: Tensor, generator: torch.Generator, chunk: int) -> Tensor:
        """Momentum features ``[N, D_f]`` of images ``[N, C, H, W]`` in dataset order, computed in random chunks of
        ``chunk`` images (batch statistics of a mix of volumes and partitions, like a training batch)."""
        perm = torch.randperm(x.shape[0], generator=generator)
        out = torch.empty(x.shape[0], self.config.proj_dim)
        out[perm] = self.momentum_features(x[perm], chunk=chunk)
        return out

    def set_bank(self, feat: Tensor, part: Tensor, remote: Tensor) -> None:
        """The round's memory bank ``Q``: features ``[M, D_f]`` (L2-normalised), partition ids ``[M]`` and
        ``remote [M]`` bool (another site's feature)."""
        if feat.dim() != 2 or feat.shape[1] != self.config.proj_dim:
            raise ValueError(f"memory bank features must be [M, {self.config.proj_dim}], got {tuple(feat.shape)}")
        if part.shape != feat.shape[:1] or remote.shape != feat.shape[:1]:
            raise ValueError(f"memory bank: part {tuple(part.shape)} / remote {tuple(remote.shape)} do not match "
                             f"{feat.shape[0]} features")
        if feat.shape[0] < 1:
            raise ValueError("memory bank is empty: FCL needs at least one feature to sample negatives from")
        self._bank = (feat.float().clone(), part.long().clone(), remote.bool().clone())
        self._local_slots = torch.nonzero(~self._bank[2]).flatten()  # the FIFO part of the bank
        self._ptr = 0

    @torch.no_grad()
    def enqueue(self, keys: Tensor, part: Tensor) -> None:
        """MoCo's FIFO: the batch's momentum keys ``[B, D_f]`` replace the oldest *local* bank entries (the remote
        ones stay for the round). Without it the bank is frozen at round start and the encoder finds a shortcut:
        map every slice to one point far from the frozen bank (local loss falls, the features collapse; seen on
        ACDC: pairwise cosine 1.000 after one round)."""
        slots = self._local_slots
        if self._bank is None or slots.numel() == 0:
            return
        n = min(keys.shape[0], slots.numel())
        idx = slots[(self._ptr + torch.arange(n)) % slots.numel()]
        self._bank[0][idx] = keys[:n].to(self._bank[0])
        self._bank[1][idx] = part[:n].to(self._bank[1])
        self._ptr = (self._ptr + n) % slots.numel()

    def training_step(self, batch: Any, global_step: int, rng: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Loss of ``{"image": [B, C, H, W], "part": [B], "vol": [B]}`` against the round's bank."""
        if self._bank is None:
            raise RuntimeError("FCLMethod.training_step before set_bank: the task handler sets the round's memory bank")
        x = batch["image"]
        self._check_images(x)
        c = self.config
        v1 = augment_view(x, rng, tuple(c.crop_scale), c.intensity)
        v2 = augment_view(x, rng, tuple(c.crop_scale), c.intensity)
        q = self.query(v1)
        k = self.momentum_features(v2)
        bank, bank_part, bank_remote = (t.to(x.device) for t in self._bank)
        out = fcl_loss(q, k, batch["part"].to(x.device), batch["vol"].to(x.device), bank, bank_part, bank_remote,
                       c.num_negatives, c.temperature, rng, batch_negatives=c.batch_negatives)
        self.enqueue(k, batch["part"])
        return out

    def backbone(self) -> nn.Module:
        """The main encoder (U-Net encoder: its export starts ``finetune_seg_unet`` through ``model.pretrained``)."""
        return self.encoder

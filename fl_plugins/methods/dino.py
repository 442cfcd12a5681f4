"""DINO / DINOv2 self-distillation as one ``nn.Module`` with a declared federated state taxonomy.

``DINOMethod`` assembles the pure-torch parts of :mod:`fl_plugins.core` around two timm ViTs (student with
stochastic depth, teacher without; methods-spec 2.1 / 3.1). Its flat ``state_dict`` uses the prefixes of
methods-spec 1.2::

    student.backbone.*   student.dino_head.*   teacher.backbone.*   teacher.dino_head.*
    buffers.dino_center  [K]                   buffers.ibot_center  [K]   (iBOT only)

(The loss terms are settings, :class:`DINOConfig` ``dino_weight`` / ``ibot_weight`` / ``koleo_weight``; DINO and
DINOv2 are presets of them. With iBOT (``ibot_weight > 0``) the backbones have ``{student,teacher}.backbone.mask_token
[1, D]`` and there is ``buffers.ibot_center``; iBOT shares the DINO head, DINOv2's default ``ibot.separate_head=false``
[V], so there is no ``*.ibot_head.*``. ``buffers.dino_center`` always exists (stable wire contract) and follows the
teacher's CLS logits, the collapse monitor's targets, also when ``dino_weight=0``.)

State taxonomy per federation mode (methods-spec 2.7 [R]); every ``state_dict`` key is in exactly one class:

======  =====================================  ======================================  ===============================
mode    federated (sent, aggregated)           site-persistent (kept by the client)    rebuilt at round start
======  =====================================  ======================================  ===============================
A       ``student.*``, ``teacher.*``,          --                                      --
        ``buffers.*``
B       ``student.*``                          ``buffers.*``; ``teacher.*`` if          ``teacher.*`` <- student if
                                               ``teacher_init="keep_local"``           ``teacher_init="copy_global"``
C       ``teacher.*``                          ``buffers.*``                           ``student.*`` <- teacher
======  =====================================  ======================================  ===============================

"Round start" is :meth:`DINOMethod.load_federated_state_dict`: it loads the global state, then applies the
rebuild rule of the mode. Outside ``state_dict`` and never on the wire (methods-spec 1.2): optimiser state
(owned by the caller of ``fl_plugins.engine.train_loop.run_local_steps``: keeping one AdamW across rounds makes
it site-persistent, calling ``build_optimizer`` each round makes it ephemeral), schedule
values (pure functions of the global step), iBOT masks (pure function of ``(config.seed, global_step)``).

Centering / Sinkhorn-Knopp statistics are per-client batch only (no ``torch.distributed``; methods-spec 3.3).
With ``centering="sinkhorn_knopp"`` the centre buffers are kept (stable wire contract) but stay unused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from fl_plugins.core.centering import centered_teacher_probs, sinkhorn_knopp, update_center
from fl_plugins.core.collapse import target_entropies
from fl_plugins.core.dino_loss import dino_cross_entropy
from fl_plugins.core.ema import update_momentum
from fl_plugins.core.heads import build_dino_head, cancel_last_layer_gradients, copy_dino_head
from fl_plugins.core.ibot_loss import ibot_patch_loss
from fl_plugins.core.koleo import koleo_loss
from fl_plugins.core.masked_vit import add_mask_token, forward_tokens
from fl_plugins.core.masking import BlockMaskGenerator, sample_ibot_masks
from fl_plugins.engine.method import load_state_subset, state_subset
from fl_plugins.engine.train_loop import adamw_param_groups
from fl_plugins.methods.dino_config import DINOConfig
from fl_plugins.models.backbone import create_backbone

__all__ = ["DINOConfig", "DINOMethod", "N_GLOBAL_CROPS"]

N_GLOBAL_CROPS = 2  # [V]


class _Centers(nn.Module):
    """Holder of the non-trainable centre buffers (``dino_center [K]``, ``ibot_center [K]``)."""

    def __init__(self, out_dim: int, with_ibot: bool) -> None:
        super().__init__()
        self.register_buffer("dino_center", torch.zeros(out_dim))
        if with_ibot:
            self.register_buffer("ibot_center", torch.zeros(out_dim))


class DINOMethod(nn.Module):
    """Student/teacher DINO / iBOT / KoLeo (DINO, DINOv2 and their parts) with explicit centres and a per-mode
    state taxonomy.

    Args:
        config: :class:`DINOConfig`.

    Example:
        >>> method = DINOMethod(DINOConfig(total_steps=100))
        >>> loss, stats = method.training_step(views, global_step=0)   # views: [g1, g2, l1..lL], each [B,1,s,s]
        >>> loss.backward(); method.cancel_last_layer_gradients(0); optimizer.step(); method.update_teacher(0)
    """

    def __init__(self, config: DINOConfig) -> None:
        super().__init__()
        self.config = config
        spec = config.backbone
        student_backbone = create_backbone(spec)
        teacher_backbone = create_backbone(replace(spec, drop_path_rate=0.0))  # teacher: no stochastic depth [V]
        if config.uses_ibot:
            add_mask_token(student_backbone)
            add_mask_token(teacher_backbone)
        teacher_backbone.load_state_dict(student_backbone.state_dict())
        head = build_dino_head(
            student_backbone.embed_dim,
            config.out_dim,
            config.hidden_dim,
            config.bottleneck_dim,
            bool(config.norm_last_layer),
        )
        self.student = nn.ModuleDict({"backbone": student_backbone, "dino_head": head})
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone, "dino_head": copy_dino_head(head)})
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        # ``nn.Module.buffers`` is a method, so ``add_module("buffers", ...)`` is refused; registering the holder
        # in ``_modules`` directly gives the spec's ``buffers.dino_center`` keys in state_dict/named_buffers.
        self._modules["buffers"] = _Centers(config.out_dim, with_ibot=config.uses_ibot)
        self._mask_generator = BlockMaskGenerator(config.patch_grid)

    def __deepcopy__(self, memo: dict[int, Any]) -> DINOMethod:
        """Rebuild from the config and copy the state: lightly's head uses the legacy ``weight_norm``, whose
        computed ``weight`` tensor makes a plain ``copy.deepcopy`` fail."""
        new = type(self)(self.config).to(next(self.parameters()).device)
        new.load_state_dict(self.state_dict())
        new.train(self.training)
        memo[id(self)] = new
        return new

    # ---- small accessors ---------------------------------------------------------------------------------------
    @property
    def centers(self) -> _Centers:
        """The ``buffers`` sub-module (``dino_center``, ``ibot_center``)."""
        return self._modules["buffers"]  # type: ignore[return-value]

    def train(self, mode: bool = True) -> DINOMethod:
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout / drop-path
        return self

    def sample_masks(self, n_images: int, global_step: int) -> Tensor:
        """iBOT masks ``[n_images, h, w]`` for this step: a pure function of ``(config.seed, global_step)``."""
        gen = torch.Generator().manual_seed((self.config.seed * 1_000_003 + global_step) % (2**63))
        cfg = self.config
        return sample_ibot_masks(
            n_images, cfg.patch_grid, cfg.mask_ratio_min_max, cfg.mask_sample_probability, gen, self._mask_generator
        )

    # ---- training ----------------------------------------------------------------------------------------------
    def teacher_targets(self, logits: Tensor, center_name: str, teacher_temp: float) -> Tensor:
        """Teacher target probabilities of ``logits [N, K]``: Sinkhorn-Knopp, or softmax of the logits centred by
        ``self.centers.<center_name>`` (``"dino_center"`` / ``"ibot_center"``), at ``teacher_temp``."""
        if self.config.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, teacher_temp, self.config.sinkhorn_iterations)
        return centered_teacher_probs(logits, getattr(self.centers, center_name), teacher_temp)

    def _check_views(self, views: Sequence[Tensor]) -> int:
        if len(views) < N_GLOBAL_CROPS:
            raise ValueError(f"need at least {N_GLOBAL_CROPS} global views, got {len(views)} view(s)")
        batch = views[0].shape[0]
        for i, v in enumerate(views):
            if v.dim() != 4 or v.shape[0] != batch:
                raise ValueError(f"view {i} must be [B={batch}, C, H, W], got {tuple(v.shape)}")
        if views[0].shape != views[1].shape:
            raise ValueError(f"the 2 global views differ in shape: {tuple(views[0].shape)} vs {tuple(views[1].shape)}")
        return batch

    def _student_local_cls(self, local_views: Sequence[Tensor]) -> list[Tensor]:
        """Backbone CLS of the local crops, one forward per run of equally-sized views (DINO MultiCropWrapper)."""
        out: list[Tensor] = []
        i = 0
        while i < len(local_views):
            j = i
            while j < len(local_views) and local_views[j].shape == local_views[i].shape:
                j += 1
            out.append(self.student["backbone"](torch.cat(list(local_views[i:j]))))
            i = j
        return out

    def training_step(
        self,
        views: Sequence[Tensor] | Mapping[str, Any],
        global_step: int,
        rng: torch.Generator | None = None,
        *,
        masks: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss of one batch of multi-crop views; updates the centres (no gradient) as a side effect.

        The loss is ``dino_weight * DINO + koleo_weight * KoLeo + ibot_weight * iBOT`` over the terms whose weight
        is > 0 (:class:`DINOConfig`). Without the DINO term the local crops are not used (they feed it only).

        Args:
            views: ``[g1, g2, l1, ..., lL]``: 2 global crops ``[B, C, G, G]`` then local crops ``[B, C, s, s]``;
                or a batch ``{"views": [...], "masks": ...}``.
            global_step: server-owned global step (teacher temperature; default iBOT masks).
            rng: unused (the iBOT masks are a pure function of ``(config.seed, global_step)``; the augmentation
                streams belong to the data loader).
            masks: iBOT only (``ibot_weight > 0``), optional ``[2B, G/p, G/p]`` bool iBOT masks for
                ``cat(g1, g2)``; default :meth:`sample_masks`.

        Returns:
            ``(loss, stats)``: scalar loss with a graph into the student only; ``stats`` holds floats
            ``loss``, ``teacher_temp``, the collapse monitor ``teacher_entropy``, ``teacher_mean_entropy``,
            ``teacher_mi`` (:func:`fl_plugins.core.collapse.target_entropies`, on the teacher's CLS targets), and
            per term: ``dino_loss`` (DINO), ``koleo_loss`` (KoLeo), ``ibot_loss`` and ``mask_ratio`` (iBOT).
        """
        if isinstance(views, Mapping):
            masks = views.get("masks") if masks is None else masks
            views = views["views"]
        cfg = self.config
        batch = self._check_views(views)
        n_glob = N_GLOBAL_CROPS * batch
        global_views = torch.cat(list(views[:N_GLOBAL_CROPS]))  # [2B, C, G, G]
        use_dino, use_ibot = cfg.uses_dino, cfg.uses_ibot
        local_views = list(views[N_GLOBAL_CROPS:]) if use_dino else []  # the locals feed the DINO term only
        teacher_temp = cfg.teacher_temp_at(global_step)
        if use_ibot:
            if masks is None:
                masks = self.sample_masks(n_glob, global_step)
            masks = masks.to(device=global_views.device, dtype=torch.bool)
            if masks.shape[0] != n_glob:
                raise ValueError(f"masks must have {n_glob} rows (2 global crops x batch), got {tuple(masks.shape)}")
        elif masks is not None:
            raise ValueError(f"masks are only used by the iBOT term (ibot_weight > 0), got ibot_weight="
                             f"{cfg.ibot_weight}")

        # teacher: global crops only, unmasked, no gradient [V]
        with torch.no_grad():
            if use_ibot:
                t_cls, t_patch = forward_tokens(self.teacher["backbone"], global_views)
                t_logits = self.teacher["dino_head"](torch.cat([t_cls, t_patch[masks.flatten(1)]]))
            else:
                t_logits = self.teacher["dino_head"](self.teacher["backbone"](global_views))
            t_cls_logits, t_patch_logits = t_logits[:n_glob], t_logits[n_glob:]
            t_cls_probs = self.teacher_targets(t_cls_logits, "dino_center", teacher_temp)

        # student: globals (masked for iBOT) and, for DINO, the locals; one head call for the CLS tokens the DINO
        # term uses (globals, locals) and the masked patches
        if use_ibot:
            s_gcls, s_gpatch = forward_tokens(self.student["backbone"], global_views, masks)
            s_masked = s_gpatch[masks.flatten(1)]
        else:
            s_gcls = self.student["backbone"](global_views)
            s_masked = s_gcls[:0]
        s_cls = [s_gcls, *self._student_local_cls(local_views)] if use_dino else []
        s_logits = self.student["dino_head"](torch.cat([*s_cls, s_masked]))
        n_cls = sum(c.shape[0] for c in s_cls)

        stats: dict[str, float] = {"teacher_temp": teacher_temp}
        stats.update(target_entropies(t_cls_probs))  # collapse monitor (fl_plugins.core.collapse)
        terms: list[Tensor] = []  # in this order (the sum of the DINO, then DINOv2, code)
        if use_dino:
            student_views = list(s_logits[:n_cls].split(batch))  # [g1, g2, l1..lL], each [B, K]
            dino = dino_cross_entropy(t_cls_probs.reshape(N_GLOBAL_CROPS, batch, -1), student_views, cfg.student_temp)
            terms.append(cfg.dino_weight * dino)
            stats["dino_loss"] = float(dino.detach())
        if cfg.koleo_weight > 0:
            koleo = sum(koleo_loss(c) for c in s_gcls.chunk(N_GLOBAL_CROPS))  # per global crop, pre-head [V]
            terms.append(cfg.koleo_weight * koleo)
            stats["koleo_loss"] = float(koleo.detach())
        if use_ibot:
            with torch.no_grad():
                t_patch_probs = self.teacher_targets(t_patch_logits, "ibot_center", teacher_temp)
            ibot = ibot_patch_loss(t_patch_probs, s_logits[n_cls:], masks, cfg.student_temp)
            terms.append(cfg.ibot_weight * ibot)
            stats["ibot_loss"] = float(ibot.detach())
            stats["mask_ratio"] = float(masks.float().mean())
        loss = terms[0]  # DINOConfig refuses a config without the DINO or the iBOT term
        for term in terms[1:]:
            loss = loss + term

        if cfg.centering == "centering":  # centres updated after the loss used the old value [V]
            with torch.no_grad():
                c = self.centers
                c.dino_center.copy_(update_center(c.dino_center, t_cls_logits, cfg.center_momentum))
                if use_ibot:
                    c.ibot_center.copy_(update_center(c.ibot_center, t_patch_logits, cfg.center_momentum))
        stats["loss"] = float(loss.detach())
        return loss, stats

    def cancel_last_layer_gradients(self, global_step: int) -> bool:
        """Drop the student prototype layer's gradients while ``global_step < freeze_last_layer_steps``."""
        return cancel_last_layer_gradients(self.student["dino_head"], global_step, self.config.freeze_last_layer_steps)

    def update_teacher(self, global_step: int) -> float:
        """EMA ``teacher <- m teacher + (1 - m) student`` with ``m = teacher_momentum_at(global_step)``; returns m."""
        m = self.config.teacher_momentum_at(global_step)
        update_momentum(self.student, self.teacher, m)
        return m

    # ---- Method protocol (fl_plugins.methods.base) ---------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups over the student's trainable parameters (no decay on biases and 1-D tensors [V])."""
        return adamw_param_groups(self.student)

    def after_backward(self, global_step: int) -> dict[str, float]:
        return {"last_layer_frozen": float(self.cancel_last_layer_gradients(global_step))}

    def after_step(self, global_step: int) -> dict[str, float]:
        return {"teacher_momentum": self.update_teacher(global_step)}

    def lr_at(self, global_step: int) -> float:
        return self.config.lr_at(global_step)

    def weight_decay_at(self, global_step: int) -> float:
        return self.config.weight_decay_at(global_step)

    @property
    def clip_grad(self) -> float | None:
        return self.config.clip_grad if self.config.clip_grad > 0 else None

    def state_module(self) -> nn.Module:
        """The module whose ``state_dict`` keys are the wire keys: the method itself."""
        return self

    def backbone(self) -> nn.Module:
        """The teacher backbone: what the k-NN monitor reads and what is exported (methods-spec 2.7 [V])."""
        return self.teacher["backbone"]

    # ---- state taxonomy ----------------------------------------------------------------------------------------
    def state_taxonomy(self) -> dict[str, list[str]]:
        """``{"federated", "site", "rebuilt"}`` -> sorted ``state_dict`` keys (a partition; see module doc)."""
        keys = list(self.state_dict().keys())
        student = [k for k in keys if k.startswith("student.")]
        teacher = [k for k in keys if k.startswith("teacher.")]
        buffers = [k for k in keys if k.startswith("buffers.")]
        mode, keep_local = self.config.federation_mode, self.config.teacher_init == "keep_local"
        if mode == "A":
            out = {"federated": keys, "site": [], "rebuilt": []}
        elif mode == "B":
            out = {
                "federated": student,
                "site": buffers + (teacher if keep_local else []),
                "rebuilt": [] if keep_local else teacher,
            }
        else:
            out = {"federated": teacher, "site": buffers, "rebuilt": student}
        return {k: sorted(v) for k, v in out.items()}

    def _subset(self, keys: Sequence[str]) -> dict[str, Tensor]:
        return state_subset(self, keys)

    def _load_subset(self, sd: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
        load_state_subset(self, sd, keys, what, finite=False)  # DINO's load never checked values (as before)

    def federated_state_dict(self) -> dict[str, Tensor]:
        """The tensors sent to the server this round (cloned, float32), keyed by ``state_dict`` names."""
        return self._subset(self.state_taxonomy()["federated"])

    def load_federated_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Round start: load the global state (exact key set and shapes, else ``ValueError``), then rebuild.

        Mode B + ``copy_global``: teacher <- student. Mode C: student <- teacher. Accepts tensors or arrays.
        """
        self._load_subset(
            sd, self.state_taxonomy()["federated"], f"federated state (mode {self.config.federation_mode})"
        )
        mode = self.config.federation_mode
        if mode == "B" and self.config.teacher_init == "copy_global":
            self.teacher.load_state_dict(self.student.state_dict())
        elif mode == "C":
            self.student.load_state_dict(self.teacher.state_dict())

    def site_state_dict(self) -> dict[str, Tensor]:
        """Method state the client keeps between rounds (cloned); empty in mode A."""
        return self._subset(self.state_taxonomy()["site"])

    def load_site_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore :meth:`site_state_dict` (exact key set and shapes, else ``ValueError``)."""
        self._load_subset(sd, self.state_taxonomy()["site"], f"site state (mode {self.config.federation_mode})")

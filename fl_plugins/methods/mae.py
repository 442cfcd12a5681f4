"""Masked image modelling with a ViT: MAE (2D timm ViT, 3D MONAI ViT) and SimMIM (2D timm ViT), methods-spec 4.

Variants (settings and their sources: :class:`~fl_plugins.methods.mae_config.MAEConfig`):

* **MAE 2D** (He et al. 2022 [V ``models_mae.py``]): the timm ViT's ``patch_embed`` and its *learned*
  ``pos_embed`` (timm's, trained; MAE fixes a sin-cos one -- the learned one keeps the encoder exactly
  ``create_backbone(spec)``), then per sample ``round(mask_ratio * N)`` patches dropped
  (:func:`~fl_plugins.core.mim.random_patch_mask`), the CLS token + visible tokens through ``blocks`` and
  ``norm``. Decoder: ``decoder_embed`` (Linear -> ``decoder_dim``), mask tokens at the dropped positions
  (unshuffle), fixed 2D sin-cos decoder pos-emb, timm ``Block`` s and a norm (lightly's
  ``MaskedVisionTransformerDecoderTIMM``: mask token, pos-emb, blocks, norm), ``decoder_pred`` (Linear -> p*p*C).
  Loss :func:`~fl_plugins.core.mim.masked_patch_mse` against :func:`~fl_plugins.core.mim.patchify` of the image
  (optionally :func:`~fl_plugins.core.mim.norm_pix_target`).
* **SimMIM 2D** (Xie et al. 2022 [V ``models/simmim.py``, ``data/data_simmim.py``]): a random ``mask_ratio`` of
  the ``simmim_mask_patch x simmim_mask_patch``-patch blocks masked, upsampled to the patch grid; the encoder sees
  every token, masked patch embeddings replaced by a learnable ``mask_token`` before the pos-emb; head = one
  Linear(embed_dim -> p*p*C) per token (= SimMIM's 1x1 conv + PixelShuffle); loss
  :func:`~fl_plugins.core.mim.masked_pixel_loss` ``kind="l1"`` on masked pixels.
* **MAE 3D**: ``monai.networks.nets.MaskedAutoEncoderViT`` on ``[B, C, D, H, W]`` volumes (fixed sin-cos pos-embs,
  MONAI's blocks), its width / heads / MLP / depth / patch / size from the ``backbone`` spec
  (:func:`vit3d_kwargs`). MONAI masks inside ``forward`` with ``torch.multinomial`` on the global CPU stream (no
  generator argument), so the call runs under ``torch.random.fork_rng`` seeded by an int drawn from the step's
  generator: same generator state -> same mask, and the global stream is left untouched. Its prediction is
  ``[B, N, p^3 * C]`` in the token order of its conv patch embedding (row-major over the (D, H, W) grid, as
  :func:`~fl_plugins.core.mim.patchify`, checked in ``tests/methods/test_mae.py``); the pixel order inside a patch
  is whatever the target teaches ``decoder_pred``: we use ``patchify``'s ``(pd, ph, pw, C)``. MONAI's
  ``TransformerBlock`` also builds a ``norm_cross_attn`` LayerNorm that it never uses (no cross-attention): those
  parameters get ``requires_grad=False`` (they stay in the ``state_dict``, whose keys ``ViT`` shares). MONAI's
  attention blocks need the package ``einops`` (a MONAI optional dependency).

Augmentation (RandomResizedCrop + horizontal flip [V both]) runs in the step on the batch, drawn from the step's
generator like the masks, as one ``affine_grid`` / ``grid_sample`` per batch (bilinear; 3D: trilinear, the crop's
volume fraction drawn from ``crop_scale``, its cube root the depth fraction, the aspect on H x W) [R] -- so the
method needs no views factory and 2D and 3D share one code path.

State taxonomy (methods-spec 4.1 "Federated MAE wire" [R]): everything federated -- encoder (``encoder.*``),
decoder (``decoder_embed.*``, ``decoder.*`` incl. its ``mask_token`` and fixed ``pos_embed``, ``decoder_pred.*``),
SimMIM's ``mask_token``, MONAI's ``mae.*`` (fixed sin-cos pos-embs included: a few kB, and the wire stays the
``state_dict``); nothing site (no BatchNorm, no counters); nothing rebuilt. The optimiser's moments stay on the site.

Export (``backbone()``): 2D the timm ViT ``encoder`` itself, keys exactly ``create_backbone(spec)``'s, so
``flssl export-backbone`` output starts ``finetune_cls`` / ``finetune_seg_vit`` through ``model.pretrained``
(SimMIM's ``mask_token`` lives on the method, not the backbone). 3D a ``monai.networks.nets.ViT`` (``classification
=False``, sin-cos pos-emb) that shares the MAE encoder's modules, keys exactly ``ViT(**vit3d_kwargs(config))``'s --
the ``vit.*`` part of MONAI's UNETR; MAE's CLS token is not part of it (a non-classification ViT has none).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightly.models import utils as lightly_utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM
from monai.networks.nets import MaskedAutoEncoderViT, ViT
from torch import Tensor, nn

from fl_plugins.core.mim import (
    NORM_PIX_EPS,
    grid_shape,
    masked_patch_mse,
    masked_pixel_loss,
    norm_pix_target,
    patch_mask_to_pixels,
    patchify,
    random_patch_mask,
    unpatchify,
)
from fl_plugins.engine.method import MethodBase
from fl_plugins.engine.train_loop import adamw_param_groups
from fl_plugins.methods.mae_config import MAEConfig
from fl_plugins.models.backbone import BackboneSpec, create_backbone

__all__ = ["MAEConfig", "MAEMethod", "ViT3DBackbone", "random_resized_crop_flip", "vit3d_kwargs"]


@functools.lru_cache(maxsize=16)
def _timm_dims(name: str) -> tuple[int, int, int]:
    """``(embed_dim, num_heads, mlp hidden width)`` of the timm ViT ``name`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, depth=1, num_classes=0)
    blk = m.blocks[0]
    return int(m.embed_dim), int(blk.attn.num_heads), int(blk.mlp.fc1.out_features)


def vit3d_kwargs(config: MAEConfig) -> dict[str, Any]:
    """``monai.networks.nets.ViT`` arguments of the 3D encoder of ``config`` (a ViT built with them takes the 3D
    export strictly): the backbone spec's timm width, heads and MLP width, its depth, patch, size and channels."""
    spec: BackboneSpec = config.backbone
    dim, heads, mlp = _timm_dims(spec.name)
    return {"in_channels": spec.in_chans, "img_size": config.image_size, "patch_size": spec.patch_size,
            "hidden_size": dim, "mlp_dim": mlp, "num_layers": spec.depth, "num_heads": heads,
            "proj_type": "conv", "pos_embed_type": "sincos", "classification": False, "spatial_dims": 3}


class ViT3DBackbone(ViT):
    """MONAI's ``ViT`` whose ``forward`` returns the mean of the normed patch tokens ``[B, hidden_size]`` (the
    k-NN monitor's ``backbone(x) -> [B, D]``); ``state_dict`` keys are ``ViT``'s."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        tokens, _ = super().forward(x)
        return tokens.mean(dim=1)


def random_resized_crop_flip(x: Tensor, scale: tuple[float, float], ratio: tuple[float, float], flip: bool,
                             rng: torch.Generator) -> Tensor:
    """Per-sample RandomResizedCrop (+ horizontal flip) of ``x [B, C, H, W]`` or ``[B, C, D, H, W]`` back to its
    size, all randomness from ``rng``: crop area (2D) / volume (3D) fraction ~ U(``scale``), aspect W/H log-uniform
    in ``ratio`` (3D: depth fraction = cube root of the volume fraction), clamped to the image, centre uniform where
    the crop fits, flip of W with probability 1/2. Bilinear / trilinear sampling (``grid_sample``)."""
    b, nd = x.shape[0], x.dim() - 2
    u = torch.rand(b, 3 + nd, generator=rng, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    side = area.sqrt() if nd == 2 else area ** (1 / 3)
    sizes = [side * r.sqrt(), side / r.sqrt()] + ([side] if nd == 3 else [])  # affine_grid axis order: W, H, (D)
    sizes = [s.clamp(max=1.0) for s in sizes]
    sign = torch.where(u[:, 2] < 0.5, -1.0, 1.0) if flip else torch.ones(b, dtype=torch.float64)
    theta = torch.zeros(b, nd, nd + 1, dtype=torch.float64)
    for i, s in enumerate(sizes):
        theta[:, i, i] = s * (sign if i == 0 else 1.0)
        theta[:, i, nd] = (2 * u[:, 3 + i] - 1) * (1 - s)
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _init_linear(m: nn.Module) -> None:
    """MAE's init of its linear layers (xavier uniform, zero bias) [V ``models_mae._init_weights``]."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MAEMethod(MethodBase):
    """MAE / SimMIM as a :class:`~fl_plugins.engine.method.Method` (see the module docstring).

    ``training_step`` takes ``{"image": [B, C, *spatial]}`` (or the tensor); :meth:`preview` gives the TensorBoard
    images; :meth:`backbone` the network to export.
    """

    def __init__(self, config: MAEConfig) -> None:
        super().__init__(config)
        c = config
        self.spatial_dims = c.spatial_dims
        self.patch_size = c.backbone.patch_size
        self.channels = c.backbone.in_chans
        self.grid = grid_shape((c.image_size,) * c.spatial_dims, self.patch_size)
        self.num_patches = math.prod(self.grid)
        out = self.patch_size ** c.spatial_dims * self.channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            if c.spatial_dims == 3:
                self._build_3d()
            else:
                self.encoder = create_backbone(c.backbone)
                dim = int(self.encoder.embed_dim)
                self.prefix = int(self.encoder.num_prefix_tokens)
                if c.variant == "mae":
                    self.decoder_embed = nn.Linear(dim, c.decoder_dim)
                    self.decoder = MaskedVisionTransformerDecoderTIMM(
                        num_patches=self.num_patches, embed_dim=c.decoder_dim, depth=c.decoder_depth,
                        num_heads=c.decoder_heads, num_prefix_tokens=self.prefix)
                    self.decoder_pred = nn.Linear(c.decoder_dim, out)
                    _init_linear(self.decoder_embed)
                    _init_linear(self.decoder_pred)
                else:
                    self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
                    nn.init.trunc_normal_(self.mask_token, std=0.02)  # [V SimMIM]
                    self.decoder_pred = nn.Linear(dim, out)

    def _build_3d(self) -> None:
        c = self.config
        try:
            import einops  # noqa: F401  (MONAI's transformer blocks need it: an optional MONAI dependency)
        except ImportError as e:
            raise ImportError("mae setting 'spatial_dims'=3 uses MONAI's MaskedAutoEncoderViT, whose attention "
                              "blocks need the package 'einops' (pip install einops)") from e
        kw = vit3d_kwargs(c)
        if kw["hidden_size"] % 6:
            raise ValueError(f"mae setting 'backbone.name'={c.backbone.name!r}: its width {kw['hidden_size']} must "
                             "be a multiple of 6 in 3D (MONAI's 3D sin-cos position embedding)")
        self.mae = MaskedAutoEncoderViT(
            in_channels=kw["in_channels"], img_size=kw["img_size"], patch_size=kw["patch_size"],
            hidden_size=kw["hidden_size"], mlp_dim=kw["mlp_dim"], num_layers=kw["num_layers"],
            num_heads=kw["num_heads"], masking_ratio=c.mask_ratio, decoder_hidden_size=c.decoder_dim,
            decoder_mlp_dim=4 * c.decoder_dim, decoder_num_layers=c.decoder_depth, decoder_num_heads=c.decoder_heads,
            proj_type=kw["proj_type"], pos_embed_type=kw["pos_embed_type"], decoder_pos_embed_type="sincos",
            spatial_dims=3)
        for name, module in self.mae.named_modules():  # MONAI builds a cross-attention norm it never uses
            if name.endswith("norm_cross_attn"):
                module.requires_grad_(False)
        vit = ViT3DBackbone(**kw)
        vit.patch_embedding = self.mae.patch_embedding  # shared modules: the export is the trained encoder
        vit.blocks = nn.ModuleList(list(self.mae.blocks)[:-1])
        vit.norm = self.mae.blocks[-1]
        object.__setattr__(self, "_vit3d", vit)  # not a submodule: its tensors are the MAE's (no duplicate keys)

    # -- optimisation ----------------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """No weight decay on biases and 1-D tensors [V MAE ``param_groups_weight_decay``]; the variant's betas
        per group (``build_optimizer`` keeps them)."""
        groups = adamw_param_groups(self)
        for g in groups:
            g["betas"] = tuple(self.config.betas)
        return groups

    def lr_at(self, global_step: int) -> float:
        return self.config.lr_at(global_step)

    def weight_decay_at(self, global_step: int) -> float:
        return float(self.config.weight_decay)

    @property
    def clip_grad(self) -> float | None:
        return float(self.config.clip_grad) or None

    # -- forward ---------------------------------------------------------------------------------------------------
    def _check_images(self, x: Any) -> Tensor:
        x = x["image"] if isinstance(x, Mapping) else x
        n, sd = self.config.image_size, self.spatial_dims
        want = (self.channels,) + (n,) * sd
        if not isinstance(x, Tensor) or x.dim() != sd + 2 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            other = "3D volumes [B, C, D, H, W]" if sd == 2 else "2D images [B, C, H, W]"
            raise ValueError(f"mae (spatial_dims={sd}, image_size={n}, in_chans={self.channels}) takes "
                             f"[B, {', '.join(map(str, want))}], got {got}"
                             + (f"; for {other} set spatial_dims={5 - sd}" if isinstance(x, Tensor)
                                and x.dim() == 5 - sd + 2 else ""))
        return x

    def _encode(self, x: Tensor, keep: Tensor | None = None, token_mask: Tensor | None = None) -> Tensor:
        """timm ViT tokens ``[B, prefix + K, D]`` after ``norm``: only the patches ``keep [B, K]`` (MAE), or all
        with the ``token_mask [B, N]`` ones replaced by ``mask_token`` before the pos-emb (SimMIM)."""
        enc = self.encoder
        t = enc.patch_embed(x)  # [B, h, w, D] (dynamic_img_size)
        if token_mask is not None:
            m = token_mask.reshape(t.shape[:-1]).unsqueeze(-1)
            t = torch.where(m, self.mask_token.to(t.dtype).reshape(1, 1, 1, -1), t)
        t = enc._pos_embed(t)  # [B, prefix + N, D], prefix tokens prepended, pos-emb added
        if keep is not None:
            t = torch.cat([t[:, : self.prefix], lightly_utils.get_at_index(t[:, self.prefix:], keep)], dim=1)
        t = enc.patch_drop(t)
        t = enc.norm_pre(t)
        t = enc.blocks(t)
        return enc.norm(t)

    def _mask_2d(self, b: int, rng: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(mask [B, N] bool True = masked, ids_keep [B, K] or empty)`` on the model's patch grid."""
        c = self.config
        if c.variant == "mae":
            mask, ids = random_patch_mask(b, self.num_patches, c.mask_ratio, rng, device=device)
            n_keep = self.num_patches - int(mask[0].sum())
            return mask, ids[:, :n_keep]
        coarse = grid_shape(self.grid, c.simmim_mask_patch)
        small, _ = random_patch_mask(b, math.prod(coarse), c.mask_ratio, rng, device=device)
        mask = patch_mask_to_pixels(small, coarse, c.simmim_mask_patch).reshape(b, self.num_patches)
        return mask, mask.new_zeros(b, 0, dtype=torch.long)

    def predict(self, x: Tensor, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(pred [B, N, p^d * C] per patch in patchify order, mask [B, N] bool True = masked)`` of ``x``."""
        b = x.shape[0]
        if self.spatial_dims == 3:
            seed = int(torch.randint(0, 2**62, (1,), generator=rng))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                pred, mask = self.mae(x)
            return pred, mask.bool()
        mask, keep = self._mask_2d(b, rng, x.device)
        if self.config.variant == "simmim":
            t = self._encode(x, token_mask=mask)
            return self.decoder_pred(t[:, self.prefix:]), mask
        t = self.decoder_embed(self._encode(x, keep=keep))  # [B, prefix + K, Dd]
        full = lightly_utils.repeat_token(self.decoder.mask_token, (b, self.prefix + self.num_patches))
        idx = torch.cat([torch.arange(self.prefix, device=x.device).expand(b, -1), keep + self.prefix], dim=1)
        full = lightly_utils.set_at_index(full, idx, t.to(full.dtype))  # unshuffle: visible tokens back in place
        full = self.decoder(full)  # + fixed sin-cos pos-emb, blocks, norm
        return self.decoder_pred(full[:, self.prefix:]), mask

    def _losses(self, x: Tensor, pred: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, the same loss of an all-zero prediction)``."""
        if self.config.variant == "simmim":
            pix = patch_mask_to_pixels(mask, self.grid, self.patch_size).to(x.dtype)
            rec = unpatchify(pred, self.patch_size, self.grid, self.channels)
            loss = masked_pixel_loss(rec, x, pix, "l1")
            with torch.no_grad():
                base = masked_pixel_loss(torch.zeros_like(x), x, pix, "l1")
            return loss, base
        target = patchify(x, self.patch_size)
        if self.config.norm_pix_loss:
            target = norm_pix_target(target)
        loss = masked_patch_mse(pred, target, mask)
        with torch.no_grad():
            base = masked_patch_mse(torch.zeros_like(target), target, mask)
        return loss, base

    def training_step(self, batch: Any, global_step: int, rng: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Loss of ``{"image": [B, C, *spatial]}``: augment, mask, reconstruct, loss on masked patches. Stats:
        ``loss``, ``masked_fraction`` (of patches), ``zero_fill_loss`` (the loss of predicting 0 everywhere: the
        level a model that learned nothing reaches)."""
        x = self._check_images(batch)
        c = self.config
        if c.augment:
            x = random_resized_crop_flip(x, c.crop_scale, c.crop_ratio, c.aug_flip, rng)
        pred, mask = self.predict(x, rng)
        loss, base = self._losses(x, pred, mask)
        return loss, {"loss": float(loss.detach()), "masked_fraction": float(mask.float().mean()),
                      "zero_fill_loss": float(base)}

    @torch.no_grad()
    def preview(self, images: Tensor, rng: torch.Generator) -> dict[str, Tensor]:
        """What TensorBoard shows: ``{"input", "masked", "reconstruction"}`` each ``[N, C, *spatial]``: the images,
        the images with masked patches set to 0, and the images with the prediction pasted into the masked patches
        (with ``norm_pix_loss`` mapped back with each true patch's mean and std, which the model never sees)."""
        x = self._check_images(images)
        was = self.training
        self.eval()
        try:
            pred, mask = self.predict(x, rng)
        finally:
            self.train(was)
        if self.config.norm_pix_loss:
            target = patchify(x, self.patch_size)
            mean = target.mean(dim=-1, keepdim=True)
            std = torch.sqrt(target.var(dim=-1, keepdim=True, unbiased=False) + NORM_PIX_EPS)
            pred = pred * std + mean
        rec = unpatchify(pred, self.patch_size, self.grid, self.channels)
        pix = patch_mask_to_pixels(mask, self.grid, self.patch_size).to(x.dtype)
        return {"input": x, "masked": x * (1 - pix), "reconstruction": x * (1 - pix) + rec * pix}

    def backbone(self) -> nn.Module:
        """2D: the timm ViT encoder (keys = ``create_backbone(spec)``'s). 3D: a MONAI ``ViT`` sharing the MAE
        encoder's modules (keys = ``ViT(**vit3d_kwargs(config))``'s)."""
        return self._vit3d if self.spatial_dims == 3 else self.encoder

"""Local MAE / SimMIM training throughput: the ``fl_plugins`` ``mae`` method vs lightly's example loop, and the
bytes each method sends per round.

1. Throughput. Both arms train the same timm ViT (``fl_plugins.models.backbone.create_backbone`` of one
   ``BackboneSpec``) on the same pre-made batch (no augmentation in either arm by default: ours runs with
   ``augment=False``; ``--augment`` instead applies our RandomResizedCrop + flip to both, ours inside its step, the
   reference to its batch before each step), with the same number of masked patches, the same decoder width / depth /
   heads (MAE) and AdamW with the same LR, betas and weight decay:

   * ours: ``fl_plugins.methods.build("mae", cfg)`` + ``build_optimizer`` + ``run_local_steps`` (what the site
     handler runs: schedules from the global step, loss / stats read back every step);
   * reference: lightly's ``examples/pytorch/mae.py`` (MIT licence, lightly-ai/lightly) -- ``MaskedVisionTransformerTIMM``
     encoder, ``Linear`` decoder embedding, ``MaskedVisionTransformerDecoderTIMM``, ``Linear`` prediction head on the
     masked tokens, ``nn.MSELoss``; for ``--variant simmim`` lightly's ``examples/pytorch/simmim.py`` on the timm ViT
     (all tokens encoded with ``idx_mask``, ``Linear`` decoder on the masked tokens, ``nn.L1Loss``).

   Repeats alternate the order of the arms (A B, B A, ...) so that load from other processes hits both alike;
   warm-up steps are untimed. Ratio = median(ours) / median(reference) images per second (target >= 0.95).

2. Bytes per round: the federated state (``method.federated_state_dict()`` as float32 numpy, what the handler
   sends), its FLModel serialised as FLARE does (``FLModelUtils.to_shareable`` + FOBS, as ``wire_bytes.py``),
   against 4 bytes x the method's trainable parameters and 4 bytes x the exported backbone's parameters, for MAE 2D,
   SimMIM 2D, MAE 3D (tiny volume) and ``unet_inpaint`` (its defaults).

    python benchmarks/mae_throughput.py --batch 32 --steps 8 --repeats 5 --threads 1 [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Any

import torch
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
from torch import nn

from fl_plugins.engine.train_loop import build_optimizer, run_local_steps
from fl_plugins.methods import build
from fl_plugins.methods.mae import random_resized_crop_flip
from fl_plugins.models.backbone import BackboneSpec, create_backbone


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="mae", choices=["mae", "simmim"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img", type=int, default=64, help="image side (backbone img_size)")
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--depth", type=int, default=6, help="ViT blocks")
    p.add_argument("--decoder-dim", type=int, default=192)
    p.add_argument("--decoder-depth", type=int, default=2)
    p.add_argument("--decoder-heads", type=int, default=4)
    p.add_argument("--augment", action="store_true",
                   help="RandomResizedCrop + flip in both arms (default: none in either)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm")
    p.add_argument("--steps", type=int, default=8, help="timed steps per arm and repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch default); 1 avoids OpenMP spin on a shared box")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--img3d", type=int, default=32, help="cube side of the MAE 3D bytes row")
    p.add_argument("--patch3d", type=int, default=8)
    p.add_argument("--no-bytes", action="store_true", help="skip the bytes-per-round table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    return p.parse_args(argv)


# ---- reference: lightly's examples (MIT licence) ------------------------------------------------------------------
class LightlyMAE(nn.Module):
    """lightly ``examples/pytorch/mae.py`` (lightly-ai/lightly, MIT licence): model and step as there, on our ViT,
    with our decoder size, channel count and mask count instead of the example's."""

    def __init__(self, vit: nn.Module, decoder_dim: int, decoder_depth: int, decoder_heads: int,
                 mask_ratio: float) -> None:
        super().__init__()
        self.mask_ratio = mask_ratio
        self.patch_size = vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=decoder_dim, depth=decoder_depth,
            num_heads=decoder_heads, num_prefix_tokens=vit.num_prefix_tokens, mlp_ratio=4.0, proj_drop_rate=0.0,
            attn_drop_rate=0.0)
        self.prediction_head = nn.Linear(decoder_dim, self.patch_size**2 * vit.patch_embed.proj.in_channels)
        self.criterion = nn.MSELoss()

    def forward_encoder(self, images: torch.Tensor, idx_keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone.encode(images=images, idx_keep=idx_keep)

    def forward_decoder(self, x_encoded: torch.Tensor, idx_keep: torch.Tensor, idx_mask: torch.Tensor) -> torch.Tensor:
        batch_size = x_encoded.shape[0]
        x_decode = self.decoder_embed(x_encoded)
        x_masked = utils.repeat_token(self.decoder.mask_token, (batch_size, self.sequence_length))
        x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
        x_decoded = self.decoder(x_masked)  # + fixed sin-cos pos-emb, blocks, norm
        x_pred = utils.get_at_index(x_decoded, idx_mask)  # predict pixel values for masked tokens only
        return self.prediction_head(x_pred)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        batch_size = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(
            size=(batch_size, self.sequence_length), mask_ratio=self.mask_ratio, device=images.device)
        x_encoded = self.forward_encoder(images=images, idx_keep=idx_keep)
        x_pred = self.forward_decoder(x_encoded=x_encoded, idx_keep=idx_keep, idx_mask=idx_mask)
        patches = utils.patchify(images, self.patch_size)
        target = utils.get_at_index(patches, idx_mask - 1)  # idx_mask counts the class token
        return self.criterion(x_pred, target)


class LightlySimMIM(nn.Module):
    """lightly ``examples/pytorch/simmim.py`` (lightly-ai/lightly, MIT licence) on the timm ViT
    (``MaskedVisionTransformerTIMM`` in place of the example's torchvision one)."""

    def __init__(self, vit: nn.Module, mask_ratio: float) -> None:
        super().__init__()
        self.mask_ratio = mask_ratio
        self.patch_size = vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder = nn.Linear(vit.embed_dim, self.patch_size**2 * vit.patch_embed.proj.in_channels)
        self.criterion = nn.L1Loss()

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        batch_size = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(
            size=(batch_size, self.sequence_length), mask_ratio=self.mask_ratio, device=images.device)
        x_encoded = self.backbone.encode(images=images, idx_mask=idx_mask)  # every token, masked ones replaced
        x_out = self.decoder(utils.get_at_index(x_encoded, idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)
        return self.criterion(x_out, target)


class Reference:
    """The reference training loop (the examples' ``loss.backward(); optimizer.step(); optimizer.zero_grad()``)."""

    def __init__(self, model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                 augment: dict[str, Any] | None) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
        self.augment = augment
        self.rng = torch.Generator().manual_seed(1)

    def run(self, images: torch.Tensor, num_steps: int) -> torch.Tensor:
        self.model.train()
        total_loss = torch.zeros((), device=images.device)
        for _ in range(num_steps):
            x = images if self.augment is None else random_resized_crop_flip(images, rng=self.rng, **self.augment)
            loss = self.model.loss(x)
            total_loss += loss.detach()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
        return total_loss


# ---- throughput ---------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    spec = BackboneSpec(img_size=args.img, patch_size=args.patch, depth=args.depth)
    cfg = {"variant": args.variant, "backbone": spec.to_dict(), "augment": args.augment, "batch_size": args.batch,
           "decoder_dim": args.decoder_dim, "decoder_depth": args.decoder_depth,
           "decoder_heads": args.decoder_heads, "seed": args.seed}
    ours = build("mae", cfg).to(device)
    c = ours.config
    ours_opt = build_optimizer(ours)
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, spec.in_chans, args.img, args.img, generator=g).to(device)
    batch = [{"image": images}]
    step = 0

    def run_ours(n: int) -> None:
        nonlocal step
        run_local_steps(ours, batch, ours_opt, n, step)
        step += n

    # warm-up of ours first: its stats give the exact masked count the reference must match
    warm = run_local_steps(ours, batch, ours_opt, max(args.warmup, 1), 0)
    step = max(args.warmup, 1)
    num_patches = (args.img // args.patch) ** 2
    n_mask = round(warm["masked_fraction"] * num_patches)
    ref_ratio = (n_mask - 0.5) / num_patches  # lightly keeps int(N * (1 - ratio)) patches: exactly N - n_mask
    torch.manual_seed(args.seed)
    vit = create_backbone(spec)
    if args.variant == "mae":
        model = LightlyMAE(vit, c.decoder_dim, c.decoder_depth, c.decoder_heads, ref_ratio)
    else:
        model = LightlySimMIM(vit, ref_ratio)
    model.to(device)
    aug = ({"scale": c.crop_scale, "ratio": c.crop_ratio, "flip": c.aug_flip} if args.augment else None)
    ref = Reference(model, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay, augment=aug)
    ref.run(images, max(args.warmup, 1))

    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_ref = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.variant.upper()} throughput | torch {torch.__version__}, device {device}, threads "
          f"{torch.get_num_threads()} | ViT {spec.name} depth {spec.depth} patch {spec.patch_size} img {args.img} | "
          f"batch {args.batch} | {n_mask}/{num_patches} patches masked"
          + (f" | decoder {c.decoder_dim}x{c.decoder_depth}, {c.decoder_heads} heads" if args.variant == "mae" else "")
          + f" | augment {'both arms' if args.augment else 'off in both arms'}")
    print(f"  trainable parameters: ours {n_ours:,}, lightly {n_ref:,}")

    arms = {"ours": run_ours, "lightly": lambda n: ref.run(images, n)}
    rates: dict[str, list[float]] = {"ours": [], "lightly": []}
    for r in range(args.repeats):
        order = ("ours", "lightly") if r % 2 == 0 else ("lightly", "ours")
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            arms[name](args.steps)
            _sync(device)
            rates[name].append(args.batch * args.steps / (time.perf_counter() - t0))
        print(f"  repeat {r + 1}: ours {rates['ours'][-1]:8.1f} img/s | lightly {rates['lightly'][-1]:8.1f} img/s")
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["ours"] / med["lightly"]
    print(f"median images/s: ours {med['ours']:.1f}, lightly reference {med['lightly']:.1f}")
    print(f"throughput ratio ours/lightly = {ratio:.3f} (target >= 0.95)")
    return {"variant": args.variant, "device": str(device), "threads": torch.get_num_threads(),
            "backbone": spec.to_dict(), "batch": args.batch, "masked_patches": n_mask, "num_patches": num_patches,
            "decoder": [c.decoder_dim, c.decoder_depth, c.decoder_heads], "augment": args.augment,
            "trainable_params": {"ours": n_ours, "lightly": n_ref}, "images_per_s": rates,
            "median_images_per_s": med, "ratio_ours_over_lightly": ratio}


# ---- bytes per round ----------------------------------------------------------------------------------------------
def _wire_bytes(params: dict[str, Any]) -> int | None:
    """Length of the FLModel the handler returns from ``train``, serialised as FLARE does (None without nvflare)."""
    try:
        from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
        from nvflare.app_common.decomposers import common_decomposers
        from nvflare.app_common.utils.fl_model_utils import FLModelUtils
        from nvflare.fuel.utils import fobs

        from fl_plugins.wire import META_NUM_STEPS
    except ImportError:
        return None
    common_decomposers.register()  # numpy arrays on the wire, as in a FLARE site process
    model = FLModel(params=params, params_type=ParamsType.FULL, metrics={},
                    meta={META_NUM_STEPS: 100, "train_loss": 1.0})
    return len(fobs.dumps(FLModelUtils.to_shareable(model)))


def bytes_per_round(args: argparse.Namespace) -> list[dict[str, Any]]:
    import numpy as np

    spec = {"img_size": args.img, "patch_size": args.patch, "depth": args.depth}
    dec = {"decoder_dim": args.decoder_dim, "decoder_depth": args.decoder_depth, "decoder_heads": args.decoder_heads}
    rows = [
        ("mae 2D", "mae", {"variant": "mae", "backbone": spec, **dec}),
        ("simmim 2D", "mae", {"variant": "simmim", "backbone": spec}),
        ("mae 3D", "mae", {"variant": "mae", "spatial_dims": 3, **dec,
                           "backbone": {"img_size": args.img3d, "patch_size": args.patch3d, "depth": args.depth}}),
        ("unet_inpaint", "unet_inpaint", {}),
    ]
    out = []
    print("\nbytes per round (float32; MB = 1e6 bytes; wire = FLModel via FLModelUtils.to_shareable + FOBS)")
    print(f"{'method':13s} {'fed tensors':>11s} {'fed MB':>8s} {'trainable MB':>12s} {'fed/train':>9s} "
          f"{'backbone MB':>11s} {'fed/backbone':>12s} {'wire MB':>8s} {'wire/fed':>8s}")
    for label, name, cfg in rows:
        m = build(name, cfg)
        fed = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in m.federated_state_dict().items()}
        fed_b = int(sum(v.nbytes for v in fed.values()))
        train_b = 4 * sum(p.numel() for p in m.parameters() if p.requires_grad)
        bb_b = 4 * sum(p.numel() for p in m.backbone().parameters())
        wire = _wire_bytes(fed)
        print(f"{label:13s} {len(fed):11d} {fed_b / 1e6:8.3f} {train_b / 1e6:12.3f} {fed_b / train_b:9.4f} "
              f"{bb_b / 1e6:11.3f} {fed_b / bb_b:12.4f} "
              + (f"{wire / 1e6:8.3f} {wire / fed_b:8.4f}" if wire is not None else f"{'n/a':>8s} {'n/a':>8s}"))
        out.append({"method": label, "config": cfg, "federated_tensors": len(fed), "federated_bytes": fed_b,
                    "trainable_bytes": train_b, "backbone_param_bytes": bb_b, "wire_bytes": wire,
                    "fed_over_trainable": fed_b / train_b, "fed_over_backbone": fed_b / bb_b,
                    "wire_over_fed": None if wire is None else wire / fed_b})
    return out


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # MONAI 3D sin-cos pos-emb, bytes table
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    result: dict[str, Any] = {"throughput": throughput(args, device)}
    if not args.no_bytes:
        result["bytes_per_round"] = bytes_per_round(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

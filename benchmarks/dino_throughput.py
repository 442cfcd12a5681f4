"""Local DINO training throughput: ``fl_plugins`` step vs a reference loop built from lightly's parts.

Both sides train the same timm ViT (``fl_plugins.models.backbone.create_backbone``) on the same pre-made
multi-crop batch (augmentation excluded), with the same head size, AdamW and step count:

* ours: ``DINOMethod`` + ``fl_plugins.engine.train_loop.run_local_steps`` (schedules from the global step,
  crops of one size in one forward, grad clipping, last-layer freeze, EMA);
* reference: lightly's ``DINOProjectionHead`` + ``DINOLoss`` + ``update_momentum`` + ``cosine_schedule`` in the
  loop of lightly's DINO example (one forward per view, EMA before the forward, no grad clipping).

Repeats alternate between the two so that load from other processes hits both alike; the ratio is
median(ours) / median(reference) images per second (target >= 0.95). Prints figures only.

    python benchmarks/dino_throughput.py --batch 16 --depth 4 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from lightly.loss import DINOLoss
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule

from fl_plugins.core.heads import build_dino_head, copy_dino_head
from fl_plugins.engine.train_loop import build_optimizer, run_local_steps
from fl_plugins.methods import DINOConfig, DINOMethod
from fl_plugins.models.backbone import BackboneSpec, create_backbone


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--global-size", type=int, default=32)
    p.add_argument("--local-size", type=int, default=16)
    p.add_argument("--n-local", type=int, default=4)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--out-dim", type=int, default=1024)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--bottleneck-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch default); 1 avoids OpenMP spin on a shared box",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class LightlyReference:
    """DINO training loop assembled from lightly's parts (head, loss, EMA, cosine schedule)."""

    def __init__(self, spec: BackboneSpec, args: argparse.Namespace, total_steps: int) -> None:
        self.student_backbone = create_backbone(spec)
        self.teacher_backbone = create_backbone(replace(spec, drop_path_rate=0.0))
        self.teacher_backbone.load_state_dict(self.student_backbone.state_dict())
        self.student_head = build_dino_head(  # lightly DINOProjectionHead
            self.student_backbone.embed_dim, args.out_dim, args.hidden_dim, args.bottleneck_dim, True
        )
        self.student_head.freeze_last_layer = 1
        self.teacher_head = copy_dino_head(self.student_head)  # lightly's head cannot be deep-copied
        for p in [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad = False
        self.criterion = DINOLoss(output_dim=args.out_dim, warmup_teacher_temp_epochs=0)
        params = [p for m in (self.student_backbone, self.student_head) for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.total_steps = total_steps

    def run(self, views: list[torch.Tensor], num_steps: int, global_step: int) -> None:
        for step in range(global_step, global_step + num_steps):
            m = cosine_schedule(step, self.total_steps, 0.996, 1.0)
            update_momentum(self.student_backbone, self.teacher_backbone, m)
            update_momentum(self.student_head, self.teacher_head, m)
            with torch.no_grad():
                teacher_out = [self.teacher_head(self.teacher_backbone(v)) for v in views[:2]]
            student_out = [self.student_head(self.student_backbone(v)) for v in views]
            loss = self.criterion(teacher_out, student_out, teacher_temp=0.04)
            loss.backward()
            self.student_head.cancel_last_layer_gradients(current_epoch=step)
            self.optimizer.step()
            self.optimizer.zero_grad()


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = BackboneSpec(img_size=args.global_size, patch_size=args.patch, depth=args.depth)
    total_steps = args.warmup + args.steps * args.repeats + 1
    cfg = DINOConfig(
        backbone=spec, local_crop_size=args.local_size, n_local_crops=args.n_local, batch_size=args.batch,
        out_dim=args.out_dim, hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim,
        total_steps=total_steps, freeze_last_layer_steps=1,
    )  # fmt: skip
    ours = DINOMethod(cfg)
    ours_opt = build_optimizer(ours)
    ref = LightlyReference(spec, args, total_steps)
    g = torch.Generator().manual_seed(args.seed)
    views = [torch.randn(args.batch, 1, args.global_size, args.global_size, generator=g) for _ in range(2)]
    views += [torch.randn(args.batch, 1, args.local_size, args.local_size, generator=g) for _ in range(args.n_local)]

    def run_ours(n: int, step: int) -> None:
        run_local_steps(ours, [views], ours_opt, n, step)

    def run_ref(n: int, step: int) -> None:
        ref.run(views, n, step)

    print(
        f"DINO throughput | torch {torch.__version__}, threads {torch.get_num_threads()} | ViT {spec.name} "
        f"depth {args.depth} patch {args.patch} | batch {args.batch}, 2x{args.global_size}px + "
        f"{args.n_local}x{args.local_size}px | K {args.out_dim}, head {args.hidden_dim}/{args.bottleneck_dim}"
    )
    run_ours(args.warmup, 0)
    run_ref(args.warmup, 0)
    rates: dict[str, list[float]] = {"ours": [], "lightly": []}
    step = args.warmup
    for r in range(args.repeats):
        for name, fn in (("ours", run_ours), ("lightly", run_ref)) if r % 2 == 0 else (
            ("lightly", run_ref), ("ours", run_ours)):  # fmt: skip
            t0 = time.perf_counter()
            fn(args.steps, step)
            rates[name].append(args.batch * args.steps / (time.perf_counter() - t0))
        step += args.steps
        print(f"  repeat {r + 1}: ours {rates['ours'][-1]:7.1f} img/s | lightly {rates['lightly'][-1]:7.1f} img/s")
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"median images/s: ours {med['ours']:.1f}, lightly reference {med['lightly']:.1f}")
    print(f"throughput ratio ours/lightly = {med['ours'] / med['lightly']:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()

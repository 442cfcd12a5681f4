"""Single-site DINO probe: does the representation collapse with these settings on this site's images?

Trains DINO/DINOv2 on one site's unlabelled training images in one process (no federation) and prints, every
``--every`` steps: the k-NN monitor of the teacher backbone (the job's monitor: slice-position partitions for
volumes), and the collapse statistics of the teacher targets on one fixed batch (``fl_plugins.core.collapse``):
per-sample entropy ``H``, entropy of the batch mean ``H(mean)`` and their difference ``MI``. Uniform collapse:
``H`` and ``H(mean)`` -> log K; one-hot collapse: both -> 0; either way ``MI`` -> 0.

``--reference lightly`` runs the same backbone, head sizes, data and views through the reference loop built from
lightly's parts (``benchmarks/dino_throughput.py``: lightly ``DINOProjectionHead`` + ``DINOLoss`` +
``update_momentum``, AdamW at a constant ``lr``, no weight-decay schedule), to tell a bug in our step from a
property of the regime.

Examples::

    python studies/dino_collapse_probe.py --datalist runs/pre/site-1/datalist.json --steps 150 --every 25 \
        --set lr=5e-4 --set teacher_temp=0.02 --set warmup_teacher_temp=0.02
    python studies/dino_collapse_probe.py --datalist runs/pre/site-1/datalist.json --steps 150 --every 25 \
        --reference lightly --lr 1e-4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from fl_plugins.settings import parse_set


def main(argv: list[str] | None = None) -> int:
    from fl_plugins.core.collapse import target_entropies
    from fl_plugins.engine.knn import knn_accuracy
    from fl_plugins.engine.train_loop import run_local_steps
    from fl_plugins.flare.handler import SiteContext
    from fl_plugins.flare.job_builder import job_settings
    from fl_plugins.flare.ssl_handler import SSLHandler

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datalist", required=True, help="one site's datalist.json")
    p.add_argument("--job", default="dino_pretrain", choices=["dino_pretrain", "dinov2_pretrain"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="DINOConfig field")
    p.add_argument("--views", action="append", default=[], metavar="FIELD=VALUE",
                   help="MultiCropConfig field of the training views (e.g. intensity_prob=0.4, blur_sigma=[0.03,0.6])")
    p.add_argument("--reference", choices=["ours", "lightly"], default="ours")
    p.add_argument("--lr", type=float, default=1e-4, help="constant AdamW lr of --reference lightly")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.steps < 1 or a.every < 1:
        p.error(f"--steps and --every must be >= 1, got {a.steps} and {a.every}")
    if not Path(a.datalist).is_file():
        p.error(f"--datalist {a.datalist!r} does not exist")
    torch.set_num_threads(a.threads)

    dino = dict(job_settings(a.job, {"dino": parse_set(a.set)})["dino"], total_steps=a.steps)
    site = SiteContext(site_name=Path(a.datalist).parent.name, datalist_path=a.datalist, workspace_dir=".",
                       log_scalar=lambda *_: None)
    h = SSLHandler(site, "dino", dino, steps_per_round=a.every, total_rounds=max(1, a.steps // a.every), knn_every=1,
                   knn_max_items=256, spatial_dims=2)
    if a.views:
        import dataclasses

        from fl_plugins.data.views import MultiCropTransform

        views = h.loader.dataset.transform.config
        h.loader.dataset.transform = MultiCropTransform(dataclasses.replace(views, **{
            k: tuple(v) if isinstance(v, list) else v for k, v in parse_set(a.views).items()}))
    fixed = torch.cat(list(next(iter(h.loader))[:2]))  # both global crops of one batch
    cfg = h.method.config

    if a.reference == "ours":
        method = h.method

        def teacher_backbone() -> torch.nn.Module:
            return method.teacher["backbone"]

        def targets() -> torch.Tensor:
            return method.teacher_targets(method.teacher["dino_head"](method.teacher["backbone"](fixed)),
                                           "dino_center", cfg.teacher_temp_at(0))

        def train(n: int, step: int) -> float:
            return float(run_local_steps(method, h.loader, h.optimizer, n, global_step=step)["loss"])
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        from dino_throughput import LightlyReference

        ref = LightlyReference(cfg.backbone, argparse.Namespace(out_dim=cfg.out_dim, hidden_dim=cfg.hidden_dim,
                                                                bottleneck_dim=cfg.bottleneck_dim), a.steps)
        for g in ref.optimizer.param_groups:
            g["lr"] = a.lr
        batches = iter(h.loader)

        def teacher_backbone() -> torch.nn.Module:
            return ref.teacher_backbone

        def targets() -> torch.Tensor:
            t = ref.teacher_head(ref.teacher_backbone(fixed))
            return torch.softmax((t - ref.criterion.center) / 0.04, dim=-1).reshape(-1, t.shape[-1])

        def train(n: int, step: int) -> float:
            nonlocal batches
            for s in range(step, step + n):
                try:
                    b = next(batches)
                except StopIteration:
                    batches = iter(h.loader)
                    b = next(batches)
                ref.student_backbone.train()
                ref.run(list(b), 1, s)
            return float("nan")

    print(f"{a.reference}: {a.job} on {len(h.loader.dataset)} images of {a.datalist}; log K = "
          f"{math.log(cfg.out_dim):.2f}; settings {json.dumps(parse_set(a.set))} views {json.dumps(parse_set(a.views))}", flush=True)
    t0 = time.perf_counter()
    step = 0
    while True:
        with torch.no_grad():
            teacher_backbone().eval()
            knn = knn_accuracy(teacher_backbone(), h.knn_train, h.knn_val) if h.knn_val else float("nan")
            e = target_entropies(targets())
        line = (f"step {step:5d}  knn {knn:.3f}  H {e['teacher_entropy']:.2f}  H(mean) "
                f"{e['teacher_mean_entropy']:.2f}  MI {e['teacher_mi']:.2f}")
        if step >= a.steps:
            print(f"{line}  [{time.perf_counter() - t0:.0f}s]", flush=True)
            return 0
        n = min(a.every, a.steps - step)
        loss = train(n, step)
        step += n
        print(f"{line}  loss(next {n}) {loss:.3f}  [{time.perf_counter() - t0:.0f}s]", flush=True)


if __name__ == "__main__":
    sys.exit(main())

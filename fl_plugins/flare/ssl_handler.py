"""Self-supervised pretraining of any registered method on a site's unlabelled images: the task handler.

Pipeline (:class:`SSLHandler`): datalist -> every training image, labels never read -> the method's views
(``MethodSpec.views``; default the image itself, batched as ``{"image": [B, C, H, W]}``) -> ``methods.build`` ->
AdamW over ``method.parameter_groups()`` -> k-NN monitor on ``method.backbone()``.

What crosses the wire is exactly ``method.federated_state_dict()``. Kept on the site between rounds: the optimiser
(AdamW moments) and ``method.site_state_dict()`` (the method object lives as long as the job). Rebuilt each round:
the data-loader and augmentation streams. Schedules are pure functions of the server-owned global step
``round * steps_per_round``.

Seeds: the job's ``seed`` (method config) plus a hash of the site name, so sites draw different augmentations and
masks; the server's copy of the config keeps the job's seed, and the seed is never on the wire.

Preview: for a method with ``preview(images, rng) -> {"input", "masked", "reconstruction"}`` (masked image
modelling: ``unet_inpaint``, ``mae``), every ``preview_every`` rounds, after the local steps, the site logs one
TensorBoard image ``ssl/preview`` (:attr:`SSLHandler.PREVIEW_TAG`): rows input / masked input / reconstruction of
:attr:`SSLHandler.PREVIEW_IMAGES` images fixed when the site starts (spread over the first entries of its
validation section, else training; volumes: their middle slice), each row min-max scaled, the mask drawn from a
generator seeded with the site seed (the same masks every round). It travels as nvflare's IMAGE analytics record
to the server's ``tb_events/<site>/`` (:attr:`SiteContext.log_image`).

Monitor: every ``knn_every`` rounds a weighted k-NN (k=20, T=0.07; methods-spec 8.2) on the *received* global
backbone's features. Labels need no annotation: for volumes the label of a slice is its position partition
(:func:`fl_plugins.data.position_partition`), for 2D image datasets the image class. Bank = the site's training
images, queries = its validation images. Whole Decathlon volumes (datalist ``"volumes": true``) have no such
label: the monitor is off for them.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from fl_plugins.core.schedules import step_horizon
from fl_plugins.flare.handler import MethodHandler, SiteContext

__all__ = ["SSLHandler", "site_seed", "preview_grid"]

logger = logging.getLogger(__name__)


def site_seed(seed: int, site_name: str) -> int:
    """The seed of a site's random streams: the job's ``seed`` + a stable hash of the site name."""
    return int(seed) + zlib.crc32(site_name.encode()) % 100_000


def preview_grid(rows: Sequence[torch.Tensor], pad: int = 2) -> np.ndarray:
    """One image ``[C, H', W']`` float32 in [0, 1] from rows of images ``[N, C, *spatial]`` (one row each).

    Volumes ``[N, C, D, H, W]`` show their middle slice along D; images with other than 1 or 3 channels show
    their first channel. Each row is min-max scaled on its own (a constant row becomes 0); tiles are separated
    by ``pad`` white pixels.
    """
    tiles = []
    for r in rows:
        x = torch.nan_to_num(r.detach().float().cpu())  # a diverged model still gives a readable image
        if x.dim() == 5:
            x = x[:, :, x.shape[2] // 2]
        if x.dim() != 4:
            raise ValueError(f"preview rows are [N, C, H, W] or [N, C, D, H, W], got {tuple(r.shape)}")
        if x.shape[1] not in (1, 3):
            x = x[:, :1]
        lo, hi = x.min(), x.max()
        x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
        tiles.append(x)
    n, c, h, w = tiles[0].shape
    out = torch.ones(c, len(tiles) * h + (len(tiles) - 1) * pad, n * w + (n - 1) * pad)
    for i, x in enumerate(tiles):
        for j in range(n):
            out[:, i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = x[j]
    return out.numpy().astype(np.float32)


class _Images:
    """Items ``{"image": ...}`` -> the image tensor, then the method's per-image transform."""

    def __init__(self, base: Sequence[Any], transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        item = self.base[i]
        image = item["image"] if isinstance(item, dict) else item
        return self.transform(image) if self.transform is not None else {"image": image}


class SSLHandler(MethodHandler):
    """Federated self-supervised pretraining of the registered method ``method`` on one site.

    Args:
        site: where the handler runs.
        method: registered method name (``fl_plugins.methods.method_names()``; plugins: list their module in
            ``imports`` of the job, which the executor imports first).
        config: the method's config dict (a ``total_steps`` of None becomes
            :func:`~fl_plugins.core.schedules.step_horizon` ``(steps_per_round, total_rounds)``;
            ``seed`` is mixed with the site name, so every method config takes a ``seed``).
        steps_per_round: local optimizer steps per round (>= 1).
        total_rounds: FL rounds.
        knn_every: k-NN monitor every N rounds (0 = off).
        knn_max_items: cap on bank/query images of the monitor.
        num_workers: data-loader workers.
        views: augmentation settings passed to the method's views factory.
        batch_size / image_size: default ``config["batch_size"]`` and the backbone's ``img_size`` (or
            ``config["image_size"]``).
        spatial_dims: the image dimensionality the method needs (2 or 3); None = any.
        preview_every: log the ``ssl/preview`` image every N rounds, for methods with ``preview`` (0 = off).
    """

    LOSS_META_KEY = "ssl_loss"
    #: TensorBoard tag and number of images (columns) of the masked-image-modelling preview
    PREVIEW_TAG = "ssl/preview"
    PREVIEW_IMAGES = 4

    def __init__(
        self,
        site: SiteContext,
        method: str,
        config: dict[str, Any],
        steps_per_round: int = 10,
        total_rounds: int = 1,
        knn_every: int = 1,
        knn_max_items: int = 512,
        num_workers: int = 0,
        views: dict[str, Any] | None = None,
        batch_size: int | None = None,
        image_size: int | None = None,
        spatial_dims: int | None = None,
        preview_every: int = 1,
    ) -> None:
        from fl_plugins.data import build_dataset, data_geometry, load_datalist, validate_datalist
        from fl_plugins.engine.knn import knn_items
        from fl_plugins.engine.train_loop import build_optimizer
        from fl_plugins.methods import get_spec

        if steps_per_round < 1:
            raise ValueError(f"steps_per_round must be >= 1, got {steps_per_round}")
        if knn_every < 0:
            raise ValueError(f"knn_every must be >= 0 (0 = off), got {knn_every}")
        if preview_every < 0:
            raise ValueError(f"preview_every must be >= 0 (0 = off), got {preview_every}")
        spec = get_spec(method)
        self.site = site
        cfg = dict(config)
        if "total_steps" in cfg and cfg["total_steps"] is None:  # the schedule horizon of this job
            cfg["total_steps"] = step_horizon(steps_per_round, total_rounds)
        cfg["seed"] = site_seed(int(cfg.get("seed", 0)), site.site_name)
        self.seed = cfg["seed"]
        dl = load_datalist(site.datalist_path)
        validate_datalist(dl, sections=("training",), deep=True)
        geo = data_geometry(dl)
        if spatial_dims is not None and geo.spatial_dims != spatial_dims:
            from fl_plugins.flare.data_check import decathlon_mode_fix

            fix = decathlon_mode_fix(dl, geo.spatial_dims)
            raise ValueError(f"datalist {site.datalist_path} holds {geo.spatial_dims}D images ({geo.source}); method "
                             f"{method!r} trains on {spatial_dims}D images" + (f": {fix}" if fix else ""))
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        self.method = spec.builder(cfg)
        mcfg = self.method.config
        batch = int(batch_size or getattr(mcfg, "batch_size", 0) or cfg.get("batch_size", 0))
        if batch < 1:
            raise ValueError(f"method {method!r}: set batch_size (handler argument or method config)")
        backbone_spec = getattr(mcfg, "backbone", None)
        img = int(image_size or getattr(backbone_spec, "img_size", 0) or getattr(mcfg, "image_size", 0)
                  or cfg.get("image_size", 0))
        if img < 1:
            raise ValueError(f"method {method!r}: set image_size (handler argument or method config)")
        # SSL uses every training image, labelled or not; labels are never read
        train = build_dataset(dl, dl["training"], image_size=img, with_labels=False)
        if len(train) < batch:
            raise ValueError(f"site {site.site_name}: {len(train)} training images in {site.datalist_path} < "
                             f"batch_size={batch}")
        transform, collate = spec.views(mcfg, dict(views or {})) if spec.views else (None, default_collate)
        self.loader = DataLoader(_Images(train, transform), batch_size=batch, shuffle=True, drop_last=True,
                                 collate_fn=collate, num_workers=num_workers, generator=g)
        self.optimizer = build_optimizer(self.method)  # site-persistent: AdamW moments survive rounds
        self.steps_per_round = steps_per_round
        self.num_train_items = len(train)
        self.knn_every = knn_every
        self.knn_train: list[dict] = []
        self.knn_val: list[dict] = []
        if knn_every and dl["format"] == "decathlon" and dl.get("volumes"):
            # a whole volume has no annotation-free k-NN label (a slice has its position partition)
            logger.warning("site %s: k-NN monitor off: whole Decathlon volumes (\"volumes\": true) carry no label "
                           "for it, so no knn_accuracy and no best model: the result is the last round's global "
                           "model (--set knn_every=0 skips this warning)", site.site_name)
        elif knn_every and dl["format"] == "images" and dl["task"] == "segmentation":
            # every image is a one-slice "volume": its position partition is the same for all, no k-NN label
            logger.warning("site %s: k-NN monitor off: PNG/JPEG segmentation images carry no annotation-free label "
                           "for it, so no knn_accuracy and no best model: the result is the last round's global "
                           "model (--set knn_every=0 skips this warning)", site.site_name)
        elif knn_every and dl.get("validation"):
            classes = dl["task"] == "classification"  # MedMNIST, PNG/JPEG classification: the class labels
            val = build_dataset(dl, dl["validation"], image_size=img, with_labels=classes)
            bank = build_dataset(dl, [e for e in dl["training"] if "label" in e], image_size=img,
                                 with_labels=True) if classes else train
            self.knn_train = knn_items(bank, knn_max_items, 0)
            self.knn_val = knn_items(val, knn_max_items, 1)
        self.preview_every = preview_every if callable(getattr(self.method, "preview", None)) else 0
        self.preview_images = self._pick_preview_images(dl, img) if self.preview_every else None
        logger.info("site %s: %s, %d unlabelled training images, k-NN monitor %s, preview %s", site.site_name, method,
                    len(train), f"{len(self.knn_train)}/{len(self.knn_val)} items" if self.knn_val else "off",
                    f"{self.PREVIEW_TAG} every {self.preview_every} round(s)" if self.preview_every else "off")

    def _pick_preview_images(self, dl: dict[str, Any], img: int) -> torch.Tensor:
        """The fixed preview images ``[N, C, *spatial]``: N items spread evenly over the dataset of the first N
        entries of the validation section (else training), e.g. the middle slice of each of N volumes."""
        from fl_plugins.data import build_dataset

        n = self.PREVIEW_IMAGES
        entries = (dl.get("validation") or dl["training"])[:n]
        ds = build_dataset(dl, entries, image_size=img, with_labels=False)
        idx = [int((i + 0.5) * len(ds) / n) for i in range(min(n, len(ds)))]
        return torch.stack([torch.as_tensor(ds[i]["image"]) for i in idx])

    def preview(self) -> np.ndarray:
        """The ``ssl/preview`` image of the current model: ``[C, 3 H + 2 pad, N W + (N - 1) pad]`` in [0, 1]."""
        if self.preview_images is None:
            raise ValueError(f"site {self.site.site_name}: no preview (method without preview, or preview_every=0)")
        was = self.method.training
        self.method.eval()
        try:
            with torch.no_grad():
                device = next(self.method.parameters()).device
                rng = torch.Generator().manual_seed(self.seed)  # the same masks every round (CPU, as in training)
                out = self.method.preview(self.preview_images.to(device), rng)
        finally:
            self.method.train(was)
        return preview_grid([out["input"], out["masked"], out["reconstruction"]])

    def log_round(self, stats: dict[str, Any], rnd: int) -> None:
        self.log_stats(stats, rnd, prefix="ssl/")
        if self.preview_every and rnd % self.preview_every == 0:
            try:
                image = self.preview()
            except Exception as e:  # a monitor: never the reason a round fails; said once, then off
                logger.warning("site %s: %s preview failed, turned off for this run: %s", self.site.site_name,
                               self.PREVIEW_TAG, e)
                self.preview_every = 0
                return
            self.site.log_image(self.PREVIEW_TAG, image, rnd)

    def monitor_due(self, rnd: int) -> bool:
        return bool(self.knn_every) and rnd % self.knn_every == 0

    def monitor(self, rnd: int) -> dict[str, float]:
        from fl_plugins.engine.knn import knn_accuracy

        if not self.knn_val:
            return {}
        self.method.eval()
        with torch.no_grad():
            acc = knn_accuracy(self.method.backbone(), self.knn_train, self.knn_val)
        return {"knn_accuracy": float(acc)}

    def local_train(self, global_step: int) -> dict[str, float]:
        from fl_plugins.engine.train_loop import run_local_steps

        rng = torch.Generator().manual_seed((self.seed * 1_000_003 + global_step) % (2**63))
        return run_local_steps(self.method, self.loader, self.optimizer, self.steps_per_round, global_step, rng=rng)

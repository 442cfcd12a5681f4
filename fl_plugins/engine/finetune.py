"""Framework-free supervised fine-tuning (segmentation / classification) of one site, as FL needs it.

No ``nvflare`` here: :class:`FinetuneTrainer` is driven by ``fl_plugins.flare.finetune_handler`` (or any loop).

State taxonomy (what crosses the wire, what a site keeps, what is rebuilt):

+--------------------+-----------------------------------------------------------+--------------------------------+
| state              | contents                                                  | lifetime / where               |
+====================+===========================================================+================================+
| federated          | every parameter with ``requires_grad=True``; ``running_   | global: sent to and received   |
|                    | mean`` / ``running_var`` of BatchNorm/InstanceNorm layers | from the server every round,   |
|                    | that track running statistics                             | FedAvg-ed (:func:`federated_   |
|                    |                                                           | keys`, ``federated_state()``)  |
+--------------------+-----------------------------------------------------------+--------------------------------+
| site-persistent    | optimizer state (Adam moments, step counts); every        | the site's job: kept by the    |
|                    | ``num_batches_tracked`` (a local counter, only read when  | :class:`FinetuneTrainer`       |
|                    | BN momentum is None, which no model here uses); frozen    | between rounds, never on the   |
|                    | parameters (linear-probe backbone, loaded from the        | wire                           |
|                    | ``pretrained`` file at construction); any other buffer    |                                |
+--------------------+-----------------------------------------------------------+--------------------------------+
| rebuilt each round | DataLoader + shuffling generator and augmentation/dropout | one ``train_steps`` call,      |
|                    | RNG (seeded from ``(seed, global_step)``); the LR (a pure | deterministic                  |
|                    | function of the server-owned global step)                 |                                |
+--------------------+-----------------------------------------------------------+--------------------------------+

A server persistor that stores the model's full ``state_dict`` must not send the site-persistent keys
(``load_federated_state`` is strict): give it ``exclude_vars=non_federated_regex(model)`` (for the MONAI U-Net
that is ``(^|\\.)num_batches_tracked$``).
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fl_plugins.core.schedules import cosine_with_warmup, linear_warmup_then_constant
from fl_plugins.engine.method import MethodBase
from fl_plugins.engine.metrics import ClassificationMetric, SegmentationMetric
from fl_plugins.engine.train_loop import build_optimizer, run_local_steps
from fl_plugins.models.factory import TASK_OF_ARCH, build_model
from fl_plugins.strict_config import StrictConfig

__all__ = [
    "augment_flip_rot90",
    "balanced_class_weights",
    "FinetuneConfig",
    "FinetuneMethod",
    "FinetuneTrainer",
    "evaluate_checkpoint",
    "evaluate_model",
    "federated_keys",
    "non_federated_regex",
    "TASKS",
]

logger = logging.getLogger(__name__)

#: Class weightings of the classification loss (FinetuneConfig.class_weighting).
CLASS_WEIGHTINGS = ("none", "balanced")

#: Supported tasks.
TASKS = ("segmentation", "classification")
_OPTIMIZERS = ("adamw", "adam")
_NORMS_WITH_STATS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                     nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


# ---------------------------------------------------------------------------------------------------------------------
# Federated key set
# ---------------------------------------------------------------------------------------------------------------------


def federated_keys(model: nn.Module) -> list[str]:
    """The federated ``state_dict`` keys of ``model`` (trainable parameters + norm running mean/var), in order.

    Args:
        model: any module.

    Returns:
        keys of ``model.state_dict()`` in their order; never a ``num_batches_tracked`` or a frozen parameter.
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    stats = set()
    for name, m in model.named_modules():
        if isinstance(m, _NORMS_WITH_STATS) and m.track_running_stats:
            for b in ("running_mean", "running_var"):
                if getattr(m, b, None) is not None:
                    stats.add(f"{name}.{b}" if name else b)
    return [k for k in model.state_dict() if k in trainable or k in stats]


def non_federated_regex(model: nn.Module) -> str | None:
    """A regex (for ``re.search``) matching exactly the non-federated ``state_dict`` keys, or None if none.

    Meant for the server persistor's ``exclude_vars``. Whole top-level groups that are non-federated (a frozen
    ``backbone.``) become one prefix pattern; ``num_batches_tracked`` one suffix pattern.
    """
    keys = list(model.state_dict())
    fed = set(federated_keys(model))
    non_fed = [k for k in keys if k not in fed]
    if not non_fed:
        return None
    parts = []
    nbt = r"(^|\.)num_batches_tracked$"
    if any(re.search(nbt, k) for k in non_fed):
        parts.append(nbt)
    rest = [k for k in non_fed if not re.search(nbt, k)]
    groups: dict[str, list[str]] = {}
    for k in rest:
        groups.setdefault(k.split(".", 1)[0], []).append(k)
    for top, ks in groups.items():
        if "." in ks[0] and not any(k.startswith(top + ".") for k in fed):
            parts.append("^" + re.escape(top + "."))
        else:
            parts.extend("^" + re.escape(k) + "$" for k in ks)
    pattern = "|".join(parts)
    matched = {k for k in keys if re.search(pattern, k)}
    if matched != set(non_fed):  # pragma: no cover - guards the construction above
        raise RuntimeError(f"non-federated regex {pattern!r} does not match exactly the non-federated keys")
    return pattern


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneConfig(StrictConfig):
    """Local fine-tuning settings (immutable; build from JSON with :meth:`from_dict`, strict as every
    :class:`~fl_plugins.strict_config.StrictConfig`, section ``"fine-tuning"``; ``model`` is required).

    Defaults and their sources ([V] verified recipe, [R] project choice, see methods-spec 0.1):

    Attributes:
        model: ``fl_plugins.models.factory.build_model`` config; its arch must solve ``task``.
        task: "segmentation" (loss MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``, methods-spec 5.2 step 3
            "Dice + CE") or "classification" (cross-entropy).
        lr: peak LR, 1e-3 [R]: CPU-scale rounds of tens of steps; the positional_cl U-Net recipe's Adam 5e-5
            (methods-spec 7.7 [V]) is tuned for 100 epochs at 352^2 and barely moves a model in 20 steps.
        min_lr_ratio: final LR = ``lr * min_lr_ratio``; 0.1 = positional_cl's cosine 5e-5 -> 5e-6 [V].
        warmup_steps: linear warmup steps of the global schedule; 0 = positional_cl (no warmup) [V].
        total_steps: schedule length in global steps (the FLARE handler sets ``steps_per_round * num_rounds``);
            None = no decay (constant LR after warmup).
        weight_decay: 1e-5 = positional_cl [V] (decoupled, AdamW, unless ``optimizer="adam"``).
        optimizer: "adamw" [R] or "adam" (L2 penalty, positional_cl's choice).
        batch_size: 8 [R] (2-core CPU; the job default).
        steps_per_round: local optimizer steps per FL round, 20 [R] (methods-spec 9.3 budget).
        seed: base seed of model init, shuffling, augmentation and dropout.
        num_workers: DataLoader workers; 0 [R]: 2-core CPU inside a FLARE client process.
        aug_flip: random horizontal + vertical flips (p = 0.5 each) of 2D images and labels (positional_cl
            "random mirror" [V]).
        aug_rot90: random rotation by k * 90 degrees, k uniform in {0..3}, of square images (stand-in for
            positional_cl's random rotation [V]; lossless on the pixel grid).
        grad_clip: max global gradient L2 norm, None = no clipping (positional_cl does not clip [V]; DINO uses 3.0).
        ignore_empty: MONAI Dice ``ignore_empty`` semantics for evaluation (see :mod:`fl_plugins.engine.metrics`).
        class_weighting: classification only: ``"none"`` or ``"balanced"`` (cross-entropy weight of class k =
            n / (K n_k) over the site's labelled training items, K = classes present: scikit-learn's "balanced"
            rule, so a rare class counts as much as a common one).
        device: torch device, "cpu" [R: the project's CI machines have no GPU].
    """

    SECTION = "fine-tuning"

    model: dict = field(metadata={"what": "a build_model config dict"})
    task: str = "segmentation"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    total_steps: int | None = None
    weight_decay: float = 1e-5
    optimizer: str = "adamw"
    batch_size: int = 8
    steps_per_round: int = 20
    seed: int = 0
    num_workers: int = 0
    aug_flip: bool = True
    aug_rot90: bool = True
    grad_clip: float | None = None
    ignore_empty: bool = True
    device: str = "cpu"
    class_weighting: str = "none"

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"fine-tuning setting {name!r}={getattr(self, name)!r}: {why}")

        if not isinstance(self.model, Mapping) or "arch" not in self.model:
            raise bad("model", "must be a build_model config dict with an 'arch' key")
        if self.task not in TASKS:
            raise bad("task", f"must be one of {list(TASKS)}")
        arch_task = TASK_OF_ARCH.get(self.model["arch"])
        if arch_task is not None and arch_task != self.task:
            raise bad("task", f"model arch {self.model['arch']!r} is a {arch_task} model")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise bad("class_weighting", f"must be one of {list(CLASS_WEIGHTINGS)}")
        if self.class_weighting != "none" and self.task != "classification":
            raise bad("class_weighting", "applies to classification only")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "must be in [0, 1]")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be >= 0")
        if self.total_steps is not None and self.total_steps < max(1, self.warmup_steps):
            raise bad("total_steps", f"must be >= max(1, warmup_steps={self.warmup_steps}) or null")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.optimizer not in _OPTIMIZERS:
            raise bad("optimizer", f"must be one of {list(_OPTIMIZERS)}")
        if self.batch_size < 1:
            raise bad("batch_size", "must be >= 1")
        if self.steps_per_round < 1:
            raise bad("steps_per_round", "must be >= 1")
        if self.num_workers < 0:
            raise bad("num_workers", "must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise bad("grad_clip", "must be > 0 or null")

    @classmethod
    def _coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        """``model``: a deep copy of the given dict (no aliasing of the caller's, i.e. the job's, settings)."""
        if isinstance(d.get("model"), Mapping):
            d["model"] = copy.deepcopy(dict(d["model"]))
        return d

    def lr_at(self, global_step: int) -> float:
        """LR of ``global_step`` (pure function; the warm-up convention of :mod:`fl_plugins.core.schedules`).

        Linear warm-up ``0 -> lr`` over ``warmup_steps`` (0 at step 0, ``lr`` at step ``warmup_steps``), then
        half-cosine ``lr -> lr * min_lr_ratio`` reached at ``total_steps``; constant ``lr`` after the warm-up when
        ``total_steps`` is None.
        """
        if self.total_steps is None:
            return linear_warmup_then_constant(global_step, self.warmup_steps, 0.0, self.lr)
        return cosine_with_warmup(global_step, self.total_steps, self.warmup_steps, self.lr,
                                  self.lr * self.min_lr_ratio)


# ---------------------------------------------------------------------------------------------------------------------
# Batching, augmentation, evaluation
# ---------------------------------------------------------------------------------------------------------------------


def _collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack contract items: ``image`` -> ``[B, 1, ...]``, ``label`` -> ``[B, ...]``, ids/indices -> lists."""
    out: dict[str, Any] = {"image": torch.stack([torch.as_tensor(it["image"], dtype=torch.float32) for it in items])}
    if all("label" in it and it["label"] is not None for it in items):
        out["label"] = torch.stack([torch.as_tensor(it["label"]).long() for it in items])
    for k in ("volume_id", "slice_index"):
        if all(k in it for it in items):
            out[k] = [it[k] for it in items]
    return out


def _seg_labels(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Labels ``[B, H, W]`` (a singleton channel ``[B, 1, H, W]`` is squeezed)."""
    if y.ndim == x.ndim and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != x.shape[:1] + x.shape[2:]:
        raise ValueError(f"segmentation labels {tuple(y.shape)} do not match images {tuple(x.shape)}")
    return y


def _augment(
    x: torch.Tensor, y: torch.Tensor | None, flip: bool, rot90: bool, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample random flips / 90-degree rotations on the last two axes of images ``[B, C, ..., H, W]`` and,
    for segmentation, labels ``[B, ..., H, W]`` (transformed identically)."""
    if not (flip or rot90):
        return x, y
    xs, ys = list(x.unbind(0)), (list(y.unbind(0)) if y is not None else None)
    square = x.shape[-1] == x.shape[-2]
    for i in range(len(xs)):
        r = torch.rand(2, generator=g)
        k = int(torch.randint(0, 4, (1,), generator=g)) if rot90 and square else 0
        dims = []
        if flip and r[0] < 0.5:
            dims.append(-1)
        if flip and r[1] < 0.5:
            dims.append(-2)
        for t_list in ([xs] if ys is None else [xs, ys]):
            t = t_list[i]
            if dims:
                t = t.flip(dims)
            if k:
                t = torch.rot90(t, k, dims=(-2, -1))
            t_list[i] = t
    return torch.stack(xs), (torch.stack(ys) if ys is not None else None)


#: public name of the fine-tuning augmentation (U-Net inpainting pretraining uses the same one)
augment_flip_rot90 = _augment


def _num_classes(model_cfg: Mapping[str, Any]) -> int:
    return int(model_cfg["num_classes"])


def _loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    task: str,
    num_classes: int,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    ignore_empty: bool = True,
) -> dict:
    """Evaluate ``model`` on every item of ``dataset`` (eval mode, no gradients).

    Args:
        model: segmentation (``[B, C, H, W] -> [B, K, H, W]``) or classification (``-> [B, K]``) model.
        dataset: contract items with labels (2D slices with ``volume_id``/``slice_index``, or images).
        task: "segmentation" or "classification".
        num_classes: K.
        batch_size: evaluation batch size.
        device: torch device.
        num_workers: DataLoader workers.
        ignore_empty: MONAI Dice ``ignore_empty`` semantics.

    Returns:
        segmentation: :meth:`SegmentationMetric.compute` (``dice``, ``dice_per_class``, ``per_volume``,
        ``num_volumes``); classification: :meth:`ClassificationMetric.compute` (``accuracy``,
        ``balanced_accuracy``, ``auc``, ``num_samples``, ``per_sample``).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    was_training = model.training
    model.eval()
    metric: SegmentationMetric | ClassificationMetric = (
        SegmentationMetric(num_classes, ignore_empty) if task == "segmentation" else ClassificationMetric()
    )
    try:
        for batch in _loader(dataset, batch_size, num_workers):
            if "label" not in batch:
                raise ValueError("evaluation items need a 'label'")
            x = batch["image"].to(device)
            logits = model(x).cpu()
            if task == "segmentation":
                y = _seg_labels(batch["label"], batch["image"])
                metric.update(logits.argmax(dim=1), y, batch.get("volume_id"), batch.get("slice_index"))
            else:
                metric.update(logits, batch["label"].reshape(-1))  # logits: balanced accuracy and AUC too
    finally:
        model.train(was_training)
    return metric.compute()


def _coerce_state(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in sd.items()}


def evaluate_checkpoint(
    model_cfg: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    dataset: Dataset,
    task: str,
    batch_size: int = 16,
    device: str = "cpu",
    ignore_empty: bool = True,
) -> dict:
    """Held-out evaluation of a saved model (the CLI's ``evaluate``).

    Args:
        model_cfg: ``build_model`` config the checkpoint was trained with.
        state_dict: the model's full ``state_dict`` or only its federated keys (tensors or numpy arrays); every
            federated key is required, non-federated ones (``num_batches_tracked``, a frozen backbone) are optional
            and keep their freshly built values (a frozen backbone comes from ``model_cfg["pretrained"]``).
        dataset: labelled contract items.
        task: "segmentation" or "classification".
        batch_size: evaluation batch size.
        device: torch device.
        ignore_empty: MONAI Dice ``ignore_empty`` semantics.

    Returns:
        see :func:`evaluate_model`.

    Raises:
        ValueError: missing federated keys, keys the model does not have, or shape mismatches (all named).
    """
    model = build_model(model_cfg)
    sd = _coerce_state(state_dict)
    own = model.state_dict()
    missing = sorted(set(federated_keys(model)) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in sd
             and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint does not fit model {dict(model_cfg).get('arch')!r}: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), shape mismatches {wrong[:3]}"
        )
    skipped = sorted(set(own) - set(sd) - {k for k in own if k.endswith("num_batches_tracked")})
    if skipped:
        logger.info("checkpoint lacks %d non-federated key(s) (kept as built), e.g. %s", len(skipped), skipped[:3])
    model.load_state_dict(sd, strict=False)
    model.to(device)
    return evaluate_model(model, dataset, task, _num_classes(model_cfg), batch_size, device, 0, ignore_empty)


# ---------------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------------


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Cross-entropy weights ``n / (K n_k)`` with ``K`` the classes present (scikit-learn's ``compute_class_weight(
    "balanced")``); a class absent from ``labels`` gets 0.

    Raises:
        ValueError: no label, or a label outside ``range(num_classes)``.
    """
    if not labels:
        raise ValueError("class_weighting='balanced' needs labelled training items")
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).double()
    if counts.numel() > num_classes:
        raise ValueError(f"labels outside range(num_classes={num_classes})")
    present = int((counts > 0).sum())
    w = torch.where(counts > 0, counts.sum() / (present * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.float()


def _labels_of(dataset: Dataset) -> list[int]:
    """Classification labels of a dataset: from its entries when it has them (MedMNIST), else by reading items."""
    entries = getattr(dataset, "entries", None)
    if entries is not None and all("label" in e for e in entries):
        return [int(e["label"]) for e in entries]
    return [int(dataset[i]["label"]) for i in range(len(dataset))]  # type: ignore[arg-type]


def _round_seed(seed: int, global_step: int) -> int:
    """Seed of the RNG streams of one ``train_steps`` call; distinct per (seed, global_step)."""
    return (int(seed) * 1_000_003 + int(global_step)) % (2**63)


class FinetuneMethod(MethodBase):
    """Supervised fine-tuning as a :class:`~fl_plugins.engine.method.Method`: the network, its loss, its LR schedule.

    The wire keys are the network's own ``state_dict`` keys (no wrapper prefix: :meth:`state_module`); the
    taxonomy is the module docstring's table (federated = :func:`federated_keys`, site = the rest).

    Args:
        config: settings (``config.model`` is the network's ``build_model`` config; built under ``config.seed``).
    """

    def __init__(self, config: FinetuneConfig) -> None:
        super().__init__(config)
        self.task = config.task
        self.num_classes = _num_classes(config.model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = build_model(config.model)
        if self.task == "segmentation":
            # MONAI defaults otherwise: Dice over all channels incl. background, lambda_dice = lambda_ce = 1
            self.loss_fn: nn.Module = DiceCELoss(to_onehot_y=True, softmax=True)
        else:
            self.loss_fn = nn.CrossEntropyLoss()
        self._federated = federated_keys(self.model)

    def state_module(self) -> nn.Module:
        return self.model

    def state_taxonomy(self) -> dict[str, list[str]]:
        keys = list(self.model.state_dict())
        fed = set(self._federated)
        return {"federated": sorted(fed), "site": sorted(k for k in keys if k not in fed), "rebuilt": []}

    def federated_state_dict(self) -> dict[str, torch.Tensor]:
        return self._subset(self._federated)  # in state_dict order

    def load_federated_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Strict load of the federated keys (key set, shapes, finite values; nothing half-loaded); unexpected keys
        that are the network's site-local state get the server-side ``exclude_vars`` hint."""
        try:
            super().load_federated_state_dict(sd)
        except ValueError as e:
            unexpected = set(sd) - set(self._federated)
            if unexpected and unexpected <= set(self.model.state_dict()):
                raise ValueError(f"{e}; the unexpected keys are site-local state -- exclude them on the server "
                                 f"(persistor exclude_vars={non_federated_regex(self.model)!r})") from None
            raise

    def parameter_groups(self) -> list[dict[str, Any]]:
        """One group of the trainable parameters; the weight decay stays ``config.weight_decay`` (not scheduled)."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def training_step(
        self, batch: Mapping[str, Any], global_step: int, rng: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one labelled batch ``{"image": [B, C, H, W], "label": [B, H, W] | [B]}``, augmented (flips,
        90-degree rotations) with ``rng``. Stats: ``loss``, ``batch_size``."""
        if "label" not in batch:
            raise ValueError("training items need a 'label' (unlabelled items cannot be used for fine-tuning)")
        x, y = batch["image"], batch["label"]
        if self.task == "segmentation":
            y = _seg_labels(y, x)
            if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                raise ValueError(
                    f"segmentation labels must be in [0, {self.num_classes - 1}], got [{int(y.min())}, {int(y.max())}]"
                )
            x, y = _augment(x, y, self.config.aug_flip, self.config.aug_rot90, rng)
            loss = self.loss_fn(self.model(x), y.unsqueeze(1))
        else:
            y = y.reshape(-1)
            x, _ = _augment(x, None, self.config.aug_flip, self.config.aug_rot90, rng)
            loss = self.loss_fn(self.model(x), y)
        return loss, {"loss": float(loss.detach()), "batch_size": float(x.shape[0])}

    def lr_at(self, global_step: int) -> float:
        return self.config.lr_at(global_step)

    @property
    def clip_grad(self) -> float | None:
        return self.config.grad_clip

    def backbone(self) -> nn.Module:
        """The ViT backbone of ViT models; the whole network for the U-Net (its export is the whole network)."""
        return getattr(self.model, "backbone", self.model)


class FinetuneTrainer:
    """Model + site-persistent optimizer for local supervised training in FL rounds.

    Args:
        config: settings.
        train_dataset: labelled contract items (2D slices ``image [1, S, S]`` + ``label [S, S]``, or
            classification images ``image [1, H, W]`` + scalar ``label``).
        val_dataset: labelled items for :meth:`evaluate` (None: ``evaluate()`` needs a dataset).

    Attributes:
        model: the network (see :func:`fl_plugins.models.factory.build_model`).
        optimizer: AdamW/Adam over the trainable parameters; its state persists across rounds on the site.
        total_local_steps: optimizer steps taken so far by this trainer.
    """

    def __init__(self, config: FinetuneConfig, train_dataset: Dataset, val_dataset: Dataset | None = None) -> None:
        self.config = config
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.task = config.task
        self.num_classes = _num_classes(config.model)
        self.device = torch.device(config.device)
        self.method = FinetuneMethod(config).to(self.device)
        self.model = self.method.model
        self.loss_fn = self.method.loss_fn
        self.optimizer = build_optimizer(self.method, kind=config.optimizer, weight_decay=config.weight_decay)
        if config.class_weighting == "balanced":
            self.class_weights = balanced_class_weights(_labels_of(train_dataset), self.method.num_classes)
            self.method.loss_fn = nn.CrossEntropyLoss(weight=self.class_weights.to(self.device))
            logger.info("class-balanced loss: weights %s", [round(float(w), 3) for w in self.class_weights])
        self._federated = self.method._federated
        self.total_local_steps = 0

    # -- federated state --------------------------------------------------------------------------------------------

    def federated_keys(self) -> list[str]:
        """The federated ``state_dict`` keys (see the module docstring)."""
        return list(self._federated)

    def federated_state(self) -> dict[str, torch.Tensor]:
        """Copies (CPU) of the federated tensors, by ``state_dict`` key."""
        sd = self.model.state_dict()
        return {k: sd[k].detach().to("cpu", copy=True) for k in self._federated}

    def load_federated_state(self, state: Mapping[str, Any]) -> None:
        """Load the global federated state in place (the optimizer keeps referencing the same parameters).

        Args:
            state: exactly the federated keys (tensors or numpy arrays).

        Raises:
            ValueError: see :meth:`FinetuneMethod.load_federated_state_dict`.
        """
        self.method.load_federated_state_dict(state)

    def _batches(self, g: torch.Generator) -> Iterator[dict[str, Any]]:
        ds = self.train_dataset
        n = len(ds)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("the training dataset is empty")
        loader = DataLoader(
            ds,
            batch_size=self.config.batch_size,
            shuffle=True,
            generator=g,
            num_workers=self.config.num_workers,
            collate_fn=_collate,
            drop_last=n >= self.config.batch_size,  # no ragged last batch (BatchNorm on tiny batches)
        )
        while True:  # cycle: a new pass reshuffles with the same generator
            yield from loader

    def train_steps(self, num_steps: int, global_step: int) -> dict:
        """Run exactly ``num_steps`` optimizer steps.

        The LR of local step ``i`` is ``config.lr_at(global_step + i)``; shuffling, augmentation and dropout are
        seeded from ``(config.seed, global_step)``, so a round is reproducible from the received state.

        Args:
            num_steps: optimizer steps to take, >= 1.
            global_step: server-owned global step of the first local step (``round * steps_per_round``).

        Returns:
            ``{"loss": mean training loss, "num_samples": samples seen, "steps": num_steps, "lr": last LR}``.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if global_step < 0:
            raise ValueError(f"global_step must be >= 0, got {global_step}")
        t0 = time.perf_counter()
        seed = _round_seed(self.config.seed, global_step)
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            torch.manual_seed(seed)
            stats = run_local_steps(self.method, self._batches(g), self.optimizer, num_steps, global_step, rng=g)
        self.total_local_steps += num_steps
        mean_loss, lr = stats["loss"], stats["lr"]
        samples = int(round(stats["batch_size"] * num_steps))
        logger.info(
            "trained %d steps (global %d..%d) on %d samples: mean loss %.4f, last lr %.3g, %.1f s",
            num_steps, global_step, global_step + num_steps - 1, samples, mean_loss, lr, time.perf_counter() - t0,
        )
        return {"loss": mean_loss, "num_samples": samples, "steps": num_steps, "lr": lr}

    def evaluate(self, dataset: Dataset | None = None) -> dict:
        """Evaluate the current model.

        Args:
            dataset: labelled items; default the validation dataset.

        Returns:
            segmentation ``{"dice": float, "dice_per_class": [K-1 floats]}``, classification
            ``{"accuracy", "balanced_accuracy", "auc"}`` (floats; AUC NaN with one class present); ``{}`` (with a
            warning) when there is nothing to evaluate.
        """
        ds = self.val_dataset if dataset is None else dataset
        if ds is None or len(ds) == 0:  # type: ignore[arg-type]
            logger.warning("no evaluation data: skipping evaluation")
            return {}
        t0 = time.perf_counter()
        res = evaluate_model(self.model, ds, self.task, self.num_classes, self.config.batch_size, self.device,
                             self.config.num_workers, self.config.ignore_empty)
        if self.task == "segmentation":
            out = {"dice": res["dice"], "dice_per_class": res["dice_per_class"]}
            logger.info("evaluated %d volumes: dice %.4f %s (%.1f s)", res["num_volumes"], res["dice"],
                        [round(d, 4) for d in res["dice_per_class"]], time.perf_counter() - t0)
        else:
            out = {k: res[k] for k in ("accuracy", "balanced_accuracy", "auc")}
            logger.info("evaluated %d samples: accuracy %.4f, balanced accuracy %.4f, macro AUC %.4f (%.1f s)",
                        res["num_samples"], res["accuracy"], res["balanced_accuracy"], res["auc"],
                        time.perf_counter() - t0)
        return out

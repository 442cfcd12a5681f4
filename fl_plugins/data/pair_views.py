"""Two independently augmented views of one image (SimCLR-style positive pairs) on 1-channel medical images.

Per image ``[C, S, S]`` two views ``[C, G, G]``, each drawn on its own: ``RandomResizedCrop`` (bicubic, antialiased)
+ horizontal flip, then the photometric augmentation of the multi-crop views (intensity jitter in place of colour
jitter, Gaussian blur, Gaussian noise, optional solarisation of view 2; no colour / grey-scale operation, the images
have one channel). The pieces are :class:`~fl_plugins.data.views.MultiCropTransform`'s: a pair is its two global
crops with no local crop (``n_local_crops = 0``), so every augmentation, its [V]/[R] source and its value range are
the table of :mod:`fl_plugins.data.views`; blur probabilities are ``blur_probs[0]`` (view 1) and ``blur_probs[1]``
(view 2), the third (local crops) is unused.

Randomness: as the multi-crop views, the draws come from torch's global RNG, so ``torch.manual_seed`` (and
DataLoader's per-worker seeding) make the views reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fl_plugins.data.view_config import MultiCropConfig, multicrop_views
from fl_plugins.data.views import MultiCropTransform

__all__ = ["PAIR_VIEW_KEYS", "PairViewTransform", "pair_collate", "pair_view_config"]

#: the batch keys of the two views (:func:`pair_collate`)
PAIR_VIEW_KEYS = ("view1", "view2")
#: view settings that have no meaning for a pair (there are no local crops)
_NOT_PAIR_SETTINGS = ("local_crop_scale",)


def pair_view_config(image_size: int, method_views: Mapping[str, Any] | None = None,
                     settings: Mapping[str, Any] | None = None) -> MultiCropConfig:
    """The settings of a pair of ``image_size`` views: the method's view values, then the job's view ``settings``.

    Args:
        image_size: side ``G`` of both views (the crop size; no local crops, no patch constraint).
        method_views: the method's defaults for view settings (any of
            :data:`~fl_plugins.data.view_config.VIEW_SETTING_FIELDS` but ``local_crop_scale``, e.g.
            ``global_crop_scale``, ``hflip_prob``, ``blur_probs``).
        settings: the job's view settings; they override ``method_views`` of the same name.

    Raises:
        ValueError: naming the field: ``local_crop_scale`` (pairs have no local crops), a crop size or crop count
            (the method sets them), an unknown field or a value :class:`MultiCropConfig` rejects.
    """
    for where, values in (("the method's view values", method_views), ("view settings", settings)):
        bad = sorted(set(values or {}) & set(_NOT_PAIR_SETTINGS))
        if bad:
            raise ValueError(f"{where}: {bad[0]!r}={dict(values or {})[bad[0]]!r} is not a setting of two-view "
                             "pairs (they have no local crops); the crop scale of both views is 'global_crop_scale'")
    owned = {"global_crop_size": image_size, "local_crop_size": image_size, "n_local_crops": 0, "patch_size": 1}
    return multicrop_views({**owned, **dict(method_views or {})}, settings)


class PairViewTransform:
    """``[C, S, S]`` float tensor -> ``(view1, view2)``, two independently augmented ``[C, G, G]`` views.

    Args:
        config: :class:`MultiCropConfig` with ``n_local_crops = 0`` (:func:`pair_view_config`); None =
            ``pair_view_config(64)``.

    Raises:
        ValueError: ``config.n_local_crops`` is not 0; at call time an input that is not ``[C, S, S]``.
    """

    def __init__(self, config: MultiCropConfig | None = None) -> None:
        config = config if config is not None else pair_view_config(64)
        if config.n_local_crops != 0:
            raise ValueError(f"pair views take no local crops: n_local_crops={config.n_local_crops} must be 0 "
                             "(use pair_view_config)")
        self.config = config
        self._views = MultiCropTransform(config)

    def __call__(self, image: Tensor) -> tuple[Tensor, Tensor]:
        view1, view2 = self._views(image)
        return view1, view2


def pair_collate(batch: Sequence[Sequence[Tensor]]) -> dict[str, Tensor]:
    """``B`` pairs ``(view1, view2)`` of ``[C, G, G]`` -> ``{"view1": [B, C, G, G], "view2": [B, C, G, G]}``."""
    if not batch:
        raise ValueError("empty batch")
    bad = [i for i, sample in enumerate(batch) if len(sample) != 2]
    if bad:
        raise ValueError(f"pair_collate takes (view1, view2) pairs; sample {bad[0]} has {len(batch[bad[0]])} views")
    return {key: torch.stack([sample[v] for sample in batch]) for v, key in enumerate(PAIR_VIEW_KEYS)}

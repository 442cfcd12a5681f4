"""Federated contrastive learning of the finetune_seg_unet U-Net encoder on slices of volumes: FCL (feature exchange
and global structural matching, methods-spec 7; the FCLController runs an extract_features phase before every
training task) and FCLOpt (methods-spec 7.8, reconstructed: BYOL-style, no negatives, no feature exchange; the
target averaged, or predicted by PTNU with DP uploads). One builder for both families; what differs is a table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fl_plugins.flare.jobs.assembly import build_fedavg_job
from fl_plugins.flare.jobs.base import FLSettings, JobSpec, non_federated_regex_of, with_step_horizon
from fl_plugins.models.unet import UNET_DEFAULTS

__all__ = ["SPECS", "FCL_EXCHANGE"]

#: what leaves a site each round besides the weights (FCLHandler / FCLController arguments; docs/privacy_fcl.md)
FCL_EXCHANGE = {
    "enabled": True,  # false: the no-exchange baseline (local terms only, FedAvg)
    "share_features": True,  # a site's datalist "feature_sharing" can only tighten these
    "max_features": 1024,  # bound on features per site per round [R: 7.4 example, 1,000 per client]
    "feature_noise_std": 0.0,  # Gaussian noise per coordinate before re-normalising (0 = off)
    "feature_dtype": "float32",  # or "float16" (half the bytes)
    "timeout": 0,  # seconds for the extraction answers (0 = no limit)
}
#: the CPU-scale settings both families start from
_DEFAULTS = {"backbone": {"kind": "unet_encoder"}, "image_size": 64, "volumes_per_batch": 8, "lr": 3e-4}


def _fcl_args(s: dict[str, Any], method: Any, fl: FLSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """FCL's handler and controller arguments beyond the shared ones: the feature exchange."""
    from fl_plugins.flare.fcl_handler import FEATURE_DTYPES

    ex = dict(s["exchange"])
    unknown = sorted(set(ex) - set(FCL_EXCHANGE))
    if unknown:
        raise ValueError(f"unknown exchange setting(s) {unknown}; known: {sorted(FCL_EXCHANGE)}")
    ex = {**FCL_EXCHANGE, **ex}
    if ex["feature_dtype"] not in FEATURE_DTYPES:
        raise ValueError(f"exchange.feature_dtype must be one of {sorted(FEATURE_DTYPES)}, got {ex['feature_dtype']!r}")
    handler = {"share_features": ex["share_features"], "max_features": ex["max_features"],
               "feature_noise_std": ex["feature_noise_std"], "feature_dtype": ex["feature_dtype"]}
    controller = {"feature_dim": method.config.proj_dim, "num_partitions": method.config.num_partitions,
                  "max_features_per_site": ex["max_features"], "exchange": ex["enabled"],
                  "exchange_timeout": ex["timeout"]}
    return handler, controller


def _fclopt_args(s: dict[str, Any], method: Any, fl: FLSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """FCLOpt's handler and controller arguments beyond the shared ones: PTNU and the DP threshold."""
    from fl_plugins.flare.fclopt_handler import check_dp_threshold

    ptnu = method.config.target_mode == "ptnu"
    delta = check_dp_threshold(s.get("dp_threshold"), "dp_threshold")
    if delta is not None and not ptnu:
        raise ValueError("dp_threshold needs fclopt.target_mode='ptnu' (set dp_threshold=null for FCLOpt alone)")
    if ptnu and fl.quantization:
        raise ValueError(f"fclopt.target_mode='ptnu' needs unquantised weights (every party predicts the target from "
                         f"the same float32 values): set fl.quantization=null, got {fl.quantization!r}")
    controller = {"ptnu": ptnu, "dp": delta is not None, "target_momentum": method.config.target_momentum,
                  "local_steps": s["steps_per_round"]}
    return {"dp_threshold": delta}, controller


#: family -> (its own handler and controller arguments, what it needs fl.controller to be for)
_FAMILIES: dict[str, tuple[Callable[..., tuple[dict[str, Any], dict[str, Any]]], str]] = {
    "fcl": (_fcl_args, "its feature exchange"),
    "fclopt": (_fclopt_args, "its accounting and PTNU"),
}


def _builder(name: str, s: dict[str, Any]) -> Any:
    from fl_plugins.methods import build

    family = SPEC_BY_NAME[name].method
    extra_args, why = _FAMILIES[family]
    fl = FLSettings(**s["fl"])
    if fl.controller != family:
        raise ValueError(f"job {name!r} needs fl.controller={family!r} ({why}), got {fl.controller!r}")
    cfg = dict(s[family])
    cfg.setdefault("seed", fl.seed)
    cfg = with_step_horizon(cfg, s["steps_per_round"], fl.num_rounds)
    method = build(family, dict(cfg))  # validates every setting when the job is built
    handler_args, controller_args = extra_args(s, method, fl)
    args = {"config": cfg, "steps_per_round": s["steps_per_round"], "total_rounds": fl.num_rounds, **handler_args}
    return build_fedavg_job(name, family, args, fl, method=family, method_config=cfg,
                            exclude_vars=non_federated_regex_of(method), controller_args=controller_args)


def _two_d(_: dict[str, Any]) -> int:
    return 2  # slices of volumes (a Decathlon datalist in 2D mode)


def _spec(name: str, family: str, recipe: str, description: str, section: dict[str, Any],
          extra_defaults: dict[str, Any], extra_open: dict[str, Any]) -> JobSpec:
    from fl_plugins.flare.jobs.base import load_ref

    config_cls = {"fcl": "fl_plugins.methods.fcl:FCLConfig", "fclopt": "fl_plugins.methods.fclopt:FCLOptConfig"}
    return JobSpec(
        name=name, recipe=recipe,
        description=f"{description}, of the finetune_seg_unet U-Net encoder on unlabelled slices of volumes; "
        "export-backbone -> finetune_seg_unet --pretrained",
        defaults={"fl": {"num_rounds": 2, "min_clients": 2, "key_metric": None, "controller": family},
                  family: {**_DEFAULTS, **section}, "steps_per_round": 5, **extra_defaults},
        builder=_builder, handler=family, workflow=family, data="pretrain", dims=_two_d,
        jobs_by_dims={2: name}, method=family, section=family,
        # every config field (--set fcl.temperature=0.2) and the U-Net settings of the encoder
        open_keys={family: load_ref(config_cls[family])().to_dict(),
                   f"{family}.backbone": {"kind": "unet_encoder", **UNET_DEFAULTS}, **extra_open})


SPECS = [
    _spec("fcl_pretrain", "fcl", "FCLRecipe", "Federated contrastive learning with feature exchange and global "
          "structural matching (FCL), FedAvg; privacy settings (what leaves a site besides the weights): "
          "exchange.max_features, exchange.feature_noise_std, exchange.feature_dtype (docs/privacy_fcl.md)",
          {}, {"exchange": dict(FCL_EXCHANGE)}, {}),
    _spec("fcl_noexchange_pretrain", "fcl", "FCLNoExchangeRecipe", "Federated contrastive learning without feature "
          "exchange (the baseline: local terms only), FedAvg", {}, {"exchange": {**FCL_EXCHANGE, "enabled": False}},
          {}),
    _spec("fclopt_pretrain", "fclopt", "FCLOptRecipe", "Communication-efficient federated contrastive learning: "
          "FCLOpt (no negatives, no feature exchange; online, predictor and target averaged); bytes per site and "
          "round in TensorBoard and communication.json", {"target_mode": "fedavg"}, {"dp_threshold": None},
          {"": {"dp_threshold": 1e-3}}),
    _spec("fclopt_ptnu_dp_pretrain", "fclopt", "FCLOptPTNUDPRecipe", "Communication-efficient federated "
          "contrastive learning: FCLOpt + PTNU (the target is predicted by every party, never downloaded) + DP (a "
          "site uploads its target only when it strays from the prediction by more than dp_threshold; PTNU alone: "
          "--set dp_threshold=null); bytes per site and round in TensorBoard and communication.json",
          {"target_mode": "ptnu"}, {"dp_threshold": 1e-3}, {"": {"dp_threshold": 1e-3}}),
]
SPEC_BY_NAME = {s.name: s for s in SPECS}

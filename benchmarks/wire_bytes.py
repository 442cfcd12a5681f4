"""Bytes a client sends per round for a DINO/DINOv2 job, against the raw parameter payload.

Serialises exactly what the DINO executor returns from ``train`` (``FLModelUtils.to_shareable`` of the
``FLModel``) with FLARE's own serializer (FOBS, what goes on the wire), for each federation mode, in float32 and
after FLARE's ``ModelQuantizer(float16)`` filter (the optional fp16 transfer of the jobs). Raw payload =
4 bytes x number of federated elements. Target: within 2 % of the raw payload; fp16 about halves it.

    python benchmarks/wire_bytes.py [--depth 6 --out-dim 1024]
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--out-dim", type=int, default=1024)
    ap.add_argument("--variant", default="dino", choices=["dino", "dinov2"])
    args = ap.parse_args()

    import numpy as np
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils
    from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer
    from nvflare.fuel.utils import fobs

    from fl_plugins.flare.job_builder import JOBS
    from fl_plugins.methods.dino import DINOConfig, DINOMethod
    from fl_plugins.wire import META_NUM_STEPS

    common_decomposers.register()  # numpy arrays on the wire, as in a FLARE site process
    base = dict(JOBS[f"{args.variant}_pretrain"].defaults["dino"])
    base["backbone"] = dict(base["backbone"], depth=args.depth)
    base["out_dim"] = args.out_dim
    print(f"{args.variant}: ViT depth {args.depth}, K={args.out_dim}")
    print(f"{'mode':4s} {'elements':>12s} {'raw MB':>9s} {'fp32 wire MB':>13s} {'ratio':>7s} {'fp16 wire MB':>13s} "
          f"{'fp16/raw':>8s}")
    for mode in ("A", "B", "C"):
        method = DINOMethod(DINOConfig.from_dict(dict(base, federation_mode=mode)))
        params = {k: v.numpy().astype(np.float32) for k, v in method.federated_state_dict().items()}
        n = sum(v.size for v in params.values())
        raw = 4 * n
        model = FLModel(params=params, params_type=ParamsType.FULL, metrics={"knn_accuracy": 0.5},
                        meta={META_NUM_STEPS: 100, "ssl_loss": 1.0})
        wire32 = len(fobs.dumps(FLModelUtils.to_shareable(model)))
        q = ModelQuantizer(quantization_type="float16")
        shareable16 = q.process(FLModelUtils.to_shareable(model), FLContext())
        wire16 = len(fobs.dumps(shareable16))
        print(f"{mode:4s} {n:12,d} {raw / 1e6:9.2f} {wire32 / 1e6:13.2f} {wire32 / raw:7.4f} {wire16 / 1e6:13.2f} "
              f"{wire16 / raw:8.4f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Issue 10: CNN and ViT classifiers on imbalanced real data (BreastMNIST, PneumoniaMNIST, AdrenalMNIST3D), 3 seeds.
set -uo pipefail
cd "$(dirname "$0")/.."
R=${R:-runs/cls}
run() {  # name job data extra...
  local name=$1 job=$2 data=$3; shift 3
  for s in 0 1 2; do
    local ws=$R/ws_${name}_s$s
    [ -f $R/${name}_test_s$s.json ] && continue
    /usr/bin/time -f "$name seed $s: %e s" python3 -m fl_plugins.cli simulate --job $job --data $R/$data -w $ws --sites 3 \
      --threads 3 --rounds 10 --set trainer.steps_per_round=30 --set trainer.class_weighting=balanced \
      --set fl.key_metric=val_balanced_accuracy --set fl.seed=$s "$@" --clean --quiet > $R/${name}_s$s.log 2>&1 \
      || { echo "$name seed $s FAILED"; tail -5 $R/${name}_s$s.log; continue; }
    python3 -m fl_plugins.cli evaluate --checkpoint $ws/server/simulate_job/app_server/best_FL_global_model.pt \
      --data $R/$data --split test --out $R/${name}_test_s$s.json > /dev/null 2>>$R/${name}_s$s.log \
      || echo "$name seed $s: evaluate FAILED"
  done
}
run breast_cnn finetune_cls_cnn breastmnist
run breast_vit finetune_cls breastmnist
run pneu_cnn finetune_cls_cnn pneumoniamnist_reconstructed
run pneu_vit finetune_cls pneumoniamnist_reconstructed
run adrenal_cnn finetune_cls_cnn adrenalmnist3d --set model.spatial_dims=3
run adrenal_vit finetune_cls adrenalmnist3d --set model.spatial_dims=3
echo done

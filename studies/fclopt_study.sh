#!/usr/bin/env bash
# Issue 14: FCLOpt, FCLOpt+PTNU, FCLOpt+PTNU+DP (and PTNU+DP with the predictor kept on the sites) pretrained on
# ACDC in the FLARE simulator (the real controllers and their byte accounting), each backbone exported, then the FCL
# study's fine-tuning protocol (SEEDS paired seeds, default 5; 1 labelled patient per site, early stopping) for them
# and for random init. Resumable: finished pretrainings and fine-tuning runs are skipped.
#   R=runs/fclopt ROUNDS=40 STEPS=20 bash studies/fclopt_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
R=${R:-runs/fclopt}; DATA=${DATA:-runs/acdc3}; ROUNDS=${ROUNDS:-40}; STEPS=${STEPS:-20}; SEEDS=${SEEDS:-0 1 2 3 4}
FT_ROUNDS=${FT_ROUNDS:-80}; PATIENCE=${PATIENCE:-8}
mkdir -p "$R"
pretrain() {  # name job extra-settings...
  local name=$1 job=$2; shift 2
  [ -f "$R/$name.pt" ] && return 0
  local ws=$R/ws_$name
  python3 -m fl_plugins.cli simulate --job "$job" --data "$DATA" -w "$ws" --sites 3 --threads 3 --rounds "$ROUNDS" \
    --set steps_per_round="$STEPS" "$@" --clean --quiet > "$R/pretrain_$name.log" 2>&1
  local app=$ws/server/simulate_job/app_server
  cp "$app/communication.json" "$R/communication_$name.json"
  python3 -m fl_plugins.cli export-backbone --checkpoint "$app/FL_global_model.pt" --job "$ws" --out "$R/$name.pt"
}
pretrain fclopt fclopt_pretrain
pretrain fclopt_ptnu fclopt_ptnu_dp_pretrain --set dp_threshold=null
pretrain fclopt_ptnu_dp fclopt_ptnu_dp_pretrain
pretrain fclopt_ptnu_dp_lp fclopt_ptnu_dp_pretrain --set fclopt.local_predictor=true
finetune() {  # out-name study-arguments...: the FCL study's fine-tuning protocol, one labelled patient per site
  local out=$1; shift
  # shellcheck disable=SC2086
  python3 studies/pretrain_finetune_study.py --threads 1 finetune --job finetune_seg_unet --data "$DATA" \
    --labelled 1 --seeds $SEEDS --steps 25 --max-rounds "$FT_ROUNDS" --patience "$PATIENCE" \
    --set model.num_classes=4 "$@" --out "$R/ft_${out}_l1.json"
}
finetune random --arms random  # random init: the same recipe, seeds and labelled patients
for name in fclopt fclopt_ptnu fclopt_ptnu_dp fclopt_ptnu_dp_lp; do
  finetune "$name" --pretrained "$R/$name.pt" --arms pretrained
done
echo done

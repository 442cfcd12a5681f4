#!/usr/bin/env bash
# Issue 12: the stage-wise job on a 4-site POC system (synthetic tasks with 2, 3, 5 and 2 classes), 3 stages, K = 4.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs/mu_poc4}
rm -rf $R; mkdir -p $R
python3 - <<PY
from fl_plugins.data.synthetic import generate_synthetic_multitask
from fl_plugins.flare.job_builder import build_job
generate_synthetic_multitask("$R/data", class_counts=(2, 3, 5, 2), images_per_site=120, size=28, seed=0)
build_job("meduniverse_stagewise", {"fl": {"min_clients": 4},
                                   "stagewise": {"num_stages": 3, "k_per_stage": 4}}).export_job("$R/jobs")
PY
python3 poc/poc.py --root $R/poc prepare --num-sites 4 --datalist "$R/data/{site}/datalist.json"
python3 poc/poc.py --root $R/poc start --timeout 240
python3 poc/poc.py --root $R/poc submit $R/jobs/meduniverse_stagewise --download $R/results --timeout 900 | tee $R/submit.json
python3 poc/poc.py --root $R/poc stop

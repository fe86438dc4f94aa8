#!/usr/bin/env bash
# One prepared pass on a lent GPU machine (no network): GPU correctness tests, the throughput
# benchmark on both shapes, and a short `attnlm fit` of configs/small.yaml (bf16-mixed, compiled).
# Wheels missing on that machine travel in .whl/ (see the device tool's README). Results land in
# $OUT (or /tmp/gpu_out).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi -L
python3 -c "import torch, lightning, datasets, tokenizers, jsonargparse; print('torch', torch.__version__, 'lightning', lightning.__version__, 'datasets', datasets.__version__, 'gpu', torch.cuda.get_device_name())"

echo "== gpu tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/gpu 2>&1 | tail -15

echo "== throughput (bare loop vs Lightning)"
timeout 240 python3 bench/train_throughput.py --device cuda --repeats 2 \
  --steps nanogpt-cpu=200,small=60 --warmup nanogpt-cpu=20,small=10 \
  --json "$OUT/train_throughput.json" --plot "$OUT/train_throughput.png" 2>&1 | grep -v Warning | tail -40

echo "== attnlm fit configs/small.yaml (1 GPU, 300 steps, compiled)"
timeout 200 python3 -m training.cli fit --config configs/small.yaml --trainer.devices 1 \
  --trainer.max_steps 300 --trainer.val_check_interval 150 --trainer.limit_val_batches 10 \
  --trainer.log_every_n_steps 50 --trainer.enable_progress_bar false \
  --data.corpus_sentences 200000 --data.num_workers 4 --trainer.default_root_dir /tmp/small 2>&1 | grep -v Warning | tail -15
cp /tmp/small/logs/version_0/metrics.csv "$OUT/small_metrics.csv" 2>/dev/null
python3 - <<'PY'
import csv
for r in csv.DictReader(open("/tmp/small/logs/version_0/metrics.csv")):
    if r.get("tokens_per_sec") or r.get("val_loss"):
        print({k: v[:8] for k, v in r.items() if v})
PY

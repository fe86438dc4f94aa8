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

# -- issue 14: GPT-2 124M on one GPU, the small config to a stated val loss, DDP on every GPU --
echo "== 124M shape, one GPU, bf16-mixed + compile: tokens/s and MFU vs the measured bf16 peak"
timeout 300 python3 bench/train_throughput.py --device cuda --compile --shapes gpt2-124m \
  --precisions bf16-mixed --repeats 1 --float32-matmul-precision high \
  --json "$OUT/train_124m.json" 2>&1 | grep -v Warning | tail -20

echo "== configs/gpt2-124m.yaml itself: 6 optimizer steps of 524,288 tokens on one GPU"
timeout 400 python3 -m training.cli fit --config configs/gpt2-124m.yaml --trainer.devices 1 \
  --trainer.max_steps 6 --trainer.log_every_n_steps 2 --trainer.enable_progress_bar false \
  --global_batch.val_every_steps 6 --data.corpus_sentences 300000 \
  --trainer.default_root_dir /tmp/g124 2>&1 | grep -v Warning | tail -12
python3 - <<'PY'
import csv
for r in csv.DictReader(open("/tmp/g124/logs/version_0/metrics.csv")):
    if r.get("tokens_per_sec") or r.get("val_loss"):
        print({k: v[:8] for k, v in r.items() if v})
PY

echo "== small config (nanoGPT Shakespeare-char shape) on the built-in corpus, all GPUs (DDP): time to val loss"
START=$(date +%s)
timeout 300 python3 -m training.cli fit --config configs/small.yaml --trainer.devices -1 \
  --trainer.max_steps 1000 --trainer.val_check_interval 100 --trainer.limit_val_batches 10 \
  --trainer.log_every_n_steps 50 --trainer.enable_progress_bar false --model.compile true \
  --data.corpus_sentences 200000 --trainer.default_root_dir /tmp/smallddp 2>&1 | grep -v Warning | tail -8
echo "wall $(( $(date +%s) - START )) s (compile and data included)"
python3 - <<'PY'
import csv
rows = list(csv.DictReader(open("/tmp/smallddp/logs/version_0/metrics.csv")))
for r in rows:
    if r.get("val_loss"):
        print("step", r["step"], "val_loss", r["val_loss"][:6])
speeds = [float(r["tokens_per_sec"]) for r in rows if r.get("tokens_per_sec")]
print("tokens/s (all GPUs), median of logged windows:", sorted(speeds)[len(speeds) // 2] if speeds else None)
PY

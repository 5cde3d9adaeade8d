#!/usr/bin/env bash
# Everything this project measures on a lent GPU machine, in one run (see README "Benchmarks").
# Usage there: OUT=<results dir> bash bench/gpu_session.sh   (Fashion-MNIST IDX files in
# $DINO_FASHION_MNIST_ROOT). Writes JSON/log files to $OUT; each step has its own time limit.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
step() { echo "=== $(date +%T) $*" | tee -a "$OUT/steps.log"; }

step env
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, torchvision, onnxruntime as o; print(torch.__version__, torchvision.__version__, o.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"
nproc | tee -a "$OUT/env.txt"

PART=${PART:-all}
if [ "$PART" = all ] || [ "$PART" = 1 ]; then
step "train throughput (reference-style vs optimised, bf16)"
timeout 120 python3 bench/train_throughput.py > "$OUT/train_bf16.jsonl" 2> "$OUT/train_bf16.err"
tail -3 "$OUT/train_bf16.err"; cat "$OUT/train_bf16.jsonl"

step "bundled model: measure one epoch, then train to fit the budget"
FMNIST_ARGS=(--config configs/pretrain/tiny_fashion_mnist.yaml --augment_device gpu --progress false)
rm -rf /tmp/probe
timeout 60 python3 -m training.pretrain "${FMNIST_ARGS[@]}" --epochs 1 --warmup_epochs 0 --output_dir /tmp/probe \
  > "$OUT/probe.log" 2>&1
EPOCH_S=$(python3 -c "import json;r=[json.loads(l) for l in open('/tmp/probe/log_steps.jsonl')];rr=r[1:] or r;print(round(1.2*60000/(sum(x['img_per_s'] for x in rr)/len(rr)),2))" 2>/dev/null || echo 8)
EPOCHS=$(python3 -c "print(max(5, min(${MAX_EPOCHS:-60}, int(${TRAIN_BUDGET_S:-180} / max(float('$EPOCH_S'), 0.5)))))")
step "epoch took ${EPOCH_S}s -> training ${EPOCHS} epochs"
rm -rf /tmp/run /tmp/repo
timeout $(( ${TRAIN_BUDGET_S:-180} + 90 )) python3 -m training.pretrain "${FMNIST_ARGS[@]}" \
  --epochs "$EPOCHS" --output_dir /tmp/run --export_to /tmp/repo/dino_default \
  > "$OUT/train_fmnist.log" 2>&1
tail -5 "$OUT/train_fmnist.log"
tail -c 20000 "$OUT/train_fmnist.log" > "$OUT/train_fmnist.tail" && rm "$OUT/train_fmnist.log"
cp /tmp/run/log.txt "$OUT/fmnist_log.txt" 2>/dev/null
cp /tmp/run/config.yaml "$OUT/fmnist_config.yaml" 2>/dev/null
cp /tmp/repo/dino_default/1/model.onnx "$OUT/model.onnx" 2>/dev/null

if [ "${SKIP_KNN:-0}" != 1 ]; then
step "k-NN of the exported model on Fashion-MNIST (ONNX Runtime, CPU)"
timeout 90 python3 -m training.eval_knn --onnx /tmp/repo/dino_default/1/model.onnx \
  --dataset fashion-mnist --output "$OUT/knn.json" > "$OUT/knn.log" 2>&1
tail -8 "$OUT/knn.log"
fi
rm -f "$OUT/train_bf16.err" "$OUT/probe.log"
fi

if [ "$PART" = all ] || [ "$PART" = 2 ]; then
step "train throughput with torch.compile"
timeout 150 python3 bench/train_throughput.py --compile --aug_images 8 \
  > "$OUT/train_compile.jsonl" 2> "$OUT/train_compile.err"
tail -3 "$OUT/train_compile.err"; cat "$OUT/train_compile.jsonl"

step "train throughput, fp16 + GradScaler in the optimised step"
timeout 90 python3 bench/train_throughput.py --precision fp16 --aug_images 8 \
  > "$OUT/train_fp16.jsonl" 2> "$OUT/train_fp16.err"
cat "$OUT/train_fp16.jsonl"

fi
step done

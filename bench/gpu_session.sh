#!/usr/bin/env bash
# Everything this project measures on a lent GPU machine, in one prepared run (README
# "Benchmarks"). Usage there: OUT=<results dir> PART=<stages> bash bench/gpu_session.sh
#
# PART is a comma-separated list of stages (default: bench,fmnist):
#   bench   training-step throughput: the reference-style step against our variants
#           ($VARIANTS, default bf16,fp16,compile,compile-reduce-overhead), then the
#           augmentation paths.
#   fmnist  train the bundled Fashion-MNIST model for $TRAIN_BUDGET_S seconds (at most
#           $MAX_EPOCHS epochs; extra flags in $FMNIST_EXTRA), export it, k-NN unless
#           SKIP_KNN=1. IDX files in $DINO_FASHION_MNIST_ROOT (carry .device/fmnist).
#   serve   the service on onnxruntime-gpu: /readyz must report CUDAExecutionProvider, then
#           bench/serve_throughput.py --device cuda. The wheel is too large for one call: run
#           `PART=stage bash bench/gpu_session.sh` once per part, carrying
#           .device/ort/part-0N (N = 0..3), then the serve stage carrying .device/wheels
#           (the serve extra's pure-Python and small binary wheels, used when the machine
#           lacks them). Stage files live in /tmp/ort-parts between calls.
# Only 8 files come back from $OUT: every stage keeps to its share.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
PART=${PART:-bench,fmnist}
mkdir -p "$OUT"
step() { echo "=== $(date +%T) $*" | tee -a "$OUT/steps.log"; }
want() { [[ ",$PART," == *",$1,"* ]]; }

if want stage; then
  mkdir -p /tmp/ort-parts
  for part in .device/ort/part-0*; do
    [ -f "$part" ] && cp "$part" /tmp/ort-parts/ && echo "staged $(basename "$part")"
  done
  ls -la /tmp/ort-parts
  exit 0
fi

step env
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import sys, torch, torchvision, onnxruntime as o; print(sys.version.split()[0], torch.__version__, torchvision.__version__, o.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"
nproc | tee -a "$OUT/env.txt"

if want bench; then
  step "train throughput: reference-style step vs ${VARIANTS:=bf16,fp16,compile,compile-reduce-overhead}"
  timeout "${BENCH_TIMEOUT_S:-420}" python3 bench/train_throughput.py --variants "$VARIANTS" \
    --aug_images 8 > "$OUT/train_bench.jsonl" 2> "$OUT/train_bench.err"
  grep -v "^W" "$OUT/train_bench.err" | tail -5; cat "$OUT/train_bench.jsonl"
  rm -f "$OUT/train_bench.err"
fi

if want fmnist; then
  step "bundled model: measure one epoch, then train to fit the budget"
  # FMNIST_EXTRA: more pretrain flags, for example "--compile true" (measured by the probe too).
  read -r -a EXTRA <<< "${FMNIST_EXTRA:-}"
  FMNIST_ARGS=(--config configs/pretrain/tiny_fashion_mnist.yaml --augment_device gpu --progress false "${EXTRA[@]}")
  rm -rf /tmp/probe
  timeout 60 python3 -m training.pretrain "${FMNIST_ARGS[@]}" --epochs 1 --warmup_epochs 0 --output_dir /tmp/probe \
    > /tmp/probe.log 2>&1
  EPOCH_S=$(python3 -c "import json;r=[json.loads(l) for l in open('/tmp/probe/log_steps.jsonl')];rr=r[1:] or r;print(round(1.2*60000/(sum(x['img_per_s'] for x in rr)/len(rr)),2))" 2>/dev/null || echo 8)
  EPOCHS=$(python3 -c "print(max(5, min(${MAX_EPOCHS:-60}, int(${TRAIN_BUDGET_S:-180} / max(float('$EPOCH_S'), 0.5)))))")
  step "epoch took ${EPOCH_S}s -> training ${EPOCHS} epochs"
  rm -rf /tmp/run /tmp/repo
  timeout $(( ${TRAIN_BUDGET_S:-180} + 90 )) python3 -m training.pretrain "${FMNIST_ARGS[@]}" \
    --epochs "$EPOCHS" --output_dir /tmp/run --export_to /tmp/repo/dino_default \
    > /tmp/train_fmnist.log 2>&1
  tail -5 /tmp/train_fmnist.log
  tail -c 20000 /tmp/train_fmnist.log > "$OUT/train_fmnist.tail"
  cp /tmp/run/log.txt "$OUT/fmnist_log.txt" 2>/dev/null
  cp /tmp/run/config.yaml "$OUT/fmnist_config.yaml" 2>/dev/null
  cp /tmp/repo/dino_default/1/model.onnx "$OUT/model.onnx" 2>/dev/null
  if [ "${SKIP_KNN:-0}" != 1 ]; then
    step "k-NN of the exported model on Fashion-MNIST (ONNX Runtime, CPU)"
    timeout 90 python3 -m training.eval_knn --onnx /tmp/repo/dino_default/1/model.onnx \
      --dataset fashion-mnist --output "$OUT/knn.json" > /tmp/knn.log 2>&1
    tail -8 /tmp/knn.log
  fi
fi

if want serve; then
  step "onnxruntime-gpu from the staged parts"
  if [ ! -d /tmp/ortgpu/onnxruntime ]; then
    cat /tmp/ort-parts/part-0* > /tmp/ort-gpu.tar.xz
    (cd /tmp && sha256sum -c "$OLDPWD/.device/ort/ort-gpu.tar.xz.sha256" 2>/dev/null) \
      || echo "sha256 file not carried; checking the archive by extracting it"
    mkdir -p /tmp/ortgpu && tar -xJf /tmp/ort-gpu.tar.xz -C /tmp/ortgpu || { echo "bad archive"; exit 1; }
  fi
  if ! python3 -c "import fastapi, uvicorn, pydantic_settings, multipart, prometheus_client, httpx" 2>/dev/null; then
    pip install --quiet --no-deps --target /tmp/svcdeps .device/wheels/*.whl
  fi
  NV=$(python3 -c "import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))" 2>/dev/null)
  LIBS=$(ls -d "$NV"/nvidia/*/lib 2>/dev/null | tr '\n' ':')
  export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
  export PYTHONPATH="/tmp/ortgpu:/tmp/svcdeps:$PWD"
  python3 -c "import onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())" \
    | tee -a "$OUT/env.txt"
  step "service on CUDA: readiness, provider, throughput vs the raw session"
  timeout "${SERVE_TIMEOUT_S:-300}" python3 bench/serve_throughput.py --device cuda \
    --concurrency 1,16,64 --seconds 10 --json-out "$OUT/serve_cuda.json" > /tmp/serve.log 2>&1
  echo "exit $?"; tail -40 /tmp/serve.log
fi
step done

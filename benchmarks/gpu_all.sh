#!/usr/bin/env bash
# Every GPU measurement the README and issues 2-6 still wait for, on one CUDA machine.
#
#   bash benchmarks/gpu_all.sh            # all sections, in order (about 1-2 GPU hours)
#   bash benchmarks/gpu_all.sh speed      # one section: smoke|speed|demo|table|semimtl|pascal
#
# Each section writes benchmarks/results/*_cuda*.json (+ .md) with the GPU name, the torch
# version and its command, and takes under 10 minutes on an H100 except `table` (the 48-run
# NYUv2-sized synthetic comparison; lower train.epochs via EPOCHS=... to fit a time budget).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
R=benchmarks/results
EPOCHS=${EPOCHS:-40}

smoke() {  # the GPU-only code paths: tests that skip without CUDA, and the CLI on cuda
  $PY -m pytest -q -p no:warnings tests/test_speed.py tests/test_xtc.py tests/test_ddp.py
  work=$(mktemp -d)
  mtpsl data synth --out "$work/data" --n-train 16 --n-val 8 --height 96 --width 128
  mtpsl train --config synthetic_demo --run-dir "$work/run" dataset.root="$work/data" \
    method.name=xtc train.epochs=2 train.device=cuda train.amp=bf16 train.channels_last=true \
    train.compile=true train.deterministic=false train.progress=false
  cp "$work/run/final_metrics.json" "$R/smoke_cuda_final_metrics.json"
}

speed() {
  for batch in 2 32; do
    $PY benchmarks/bench_train.py --device cuda --batch-size "$batch" --amp bf16 --channels-last \
      --steps 50 --warmup 10 --out "$R/bench_train_cuda_onelabel_b${batch}.json"
  done
  $PY benchmarks/bench_train.py --device cuda --batch-size 2 --regime full --amp bf16 \
    --channels-last --steps 50 --warmup 10 --out "$R/bench_train_cuda_full_b2.json"
  $PY benchmarks/bench_train.py --device cuda --batch-size 2 --steps 30 --warmup 5 \
    --out "$R/bench_train_cuda_onelabel_b2_fp32.json"
  $PY benchmarks/bench_train.py --device cuda --batch-size 32 --amp bf16 --channels-last \
    --compile --skip-per-sample --steps 50 --warmup 20 \
    --out "$R/bench_train_cuda_onelabel_b32_compile.json"
  $PY benchmarks/bench_eval.py --device cuda --height 288 --width 384 --batch-size 16 \
    --out "$R/bench_eval_cuda.json"
}

demo() {
  $PY benchmarks/grid_run.py --device cuda
}

table() {
  $PY benchmarks/grid_run.py --device cuda --preset synthetic_benchmark --n-train 795 \
    --n-val 654 --height 144 --width 192 "train.epochs=$EPOCHS" train.amp=bf16 \
    train.channels_last=true train.deterministic=false
}

semimtl() {
  $PY benchmarks/grid_run.py --device cuda --preset synthetic_semimtl --height 64 --width 128
}

pascal() {
  $PY benchmarks/grid_run.py --device cuda --preset synthetic_table3 --n-train 400 \
    --n-val 200 --height 128 --width 128 dataset.options.size=[128,128] model.name=resnet \
    model.backbone.depth=18 model.options.head=deeplab compare.variants.xtc.options.mapper=resnet18
}

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(smoke speed demo semimtl pascal table)
for s in "${sections[@]}"; do
  case "$s" in
    smoke|speed|demo|table|semimtl|pascal) echo "== $s"; "$s" ;;
    *) echo "unknown section $s; choose from smoke speed demo table semimtl pascal" >&2; exit 2 ;;
  esac
done

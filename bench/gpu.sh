#!/usr/bin/env bash
# The GPU checks of a lent machine in one call (under 8 minutes on one H200): the engine against
# transformers on the real 2B config with its variants, then the job's GPU stage against the engine alone.
# Every figure goes to bench/gpu-results.txt (and is printed).
set -uo pipefail
cd "$(dirname "$0")/.."
out=bench/gpu-results.txt
python3 -m pip install -q -e . >/dev/null 2>&1 || true
{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"
  echo "== engine vs transformers (real 2B config, random bf16 weights)"
  timeout 330 python3 bench/gpu_engine.py --requests 512 --hf-time-budget 100 --hf-batch 32 \
    --min-side 224 --max-side 896 --variants auto,triton-nographs,sdpa-nographs --profile 32
  echo "== job's GPU stage vs the engine alone (mid-size random checkpoint, 96 pages)"
  timeout 150 python3 bench/infer_stage.py --device cuda --dtype bfloat16 --pages 96 --new-tokens 64
} 2>&1 | tee "$out"

#!/usr/bin/env bash
# One device call that checks and measures everything that needs a GPU (about 9 minutes on one H100):
# the GPU tests, then `heavylift bench` against DeepSpeed ZeRO-3 offload and FSDP2 offload.
# Carry: .wheels (pytest wheels) and .bench (the peers' harness folder, copied from the shared bench).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}
pip install -q --no-index --no-deps .wheels/*.whl 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python -m pytest -q -s tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "error|passed|failed|Error"
timeout 420 python -m heavylift bench --model qwen3-4b --seq 4096 --mbs 4 --steps 3 \
  --peers-dir .bench/bench --peers "${PEERS:-deepspeed-zero3-offload,fsdp2-offload}" --peer-timeout 200 \
  --out "$OUT" 2>&1 | tail -25

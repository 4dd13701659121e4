#!/usr/bin/env bash
# The device calls of one session, each under 10 minutes on one H100 (run from the repo root on the box;
# carry .wheels (pytest wheels) and .bench (the shared peers' folder copied to .bench/bench)):
#
#   PART=tests   tests/gpu (engine equivalence, race, pinning, formats' GPU tail, compiled bf16 vs fp32)
#   PART=bench   heavylift bench against FSDP2 offload, DeepSpeed ZeRO-3 offload and SuperOffload, then
#                the shared floor probe (stock HF forward+backward) on the same machine
#   PART=train   issue 3/4/5: a preset run with metrics, report PNGs and a checkpoint, a resume from it that
#                saves again (keeping one), an export of that (save/resume/export timings, peak host RSS), and `heavylift estimate` for the same case beside what train measured
#
# HEAVYLIFT_COMMIT names the commit (the tree travels without .git). Logs land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}
pip install -q --no-index --no-deps .wheels/*.whl 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "${PART:-tests}" in
tests)
  timeout 420 python -m pytest -q -s tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "error|passed|failed|Error|:"
  ;;
bench)
  mkdir -p "$OUT/r"
  timeout 480 python -m heavylift bench --model qwen3-4b --seq 4096 --mbs 4 --steps 3 \
    --peers-dir .bench/bench --peers "${PEERS:-fsdp2-offload,deepspeed-zero3-offload,deepspeed-superoffload}" \
    --peer-timeout "${PEER_TIMEOUT:-110}" --out "$OUT/r" > "$OUT/bench.log" 2>&1
  (cd .bench/bench && timeout 100 python floor_probe.py) > "$OUT/floor_probe.log" 2>&1
  tail -25 "$OUT/bench.log"; tail -2 "$OUT/floor_probe.log"
  ;;
train)
  R="$OUT/run"; M=${MODEL:-qwen3-4b}; C=${CKPT:-/tmp/ckpt}
  timeout 100 python -m heavylift estimate --model "$M" --gpus 1 --seq 2048 --mbs 4 > "$OUT/estimate.log" 2>&1
  /usr/bin/time -v timeout 300 python -m heavylift train --model "$M" --seq_len 2048 \
    --engine.batch.micro_batch_size 4 --max_steps ${STEPS:-12} --eval_every 6 --out_dir "$R" \
    --checkpoint_dir "$C" --save_every ${STEPS:-12} > "$OUT/train.log" 2>&1
  timeout 60 python -m heavylift report "$R" >> "$OUT/train.log" 2>&1
  cp "$R"/*.png "$R"/metrics.jsonl "$OUT/" 2>/dev/null
  /usr/bin/time -v timeout 150 python -m heavylift train --model "$M" --seq_len 2048 \
    --engine.batch.micro_batch_size 4 --max_steps $(( ${STEPS:-12} + 2 )) --out_dir "$R-resumed" \
    --checkpoint_dir "$C" --resume auto --keep_checkpoints 1 > "$OUT/resume.log" 2>&1
  /usr/bin/time -v timeout 120 python -m heavylift export "$C/step-$(( ${STEPS:-12} + 2 ))" /tmp/hf_out --dtype bf16 \
    > "$OUT/export.log" 2>&1
  grep -h -E "heavylift:|Maximum resident|Elapsed|rror" "$OUT/train.log" "$OUT/resume.log" "$OUT/export.log"
  tail -30 "$OUT/estimate.log"
  ;;
esac

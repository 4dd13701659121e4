#!/usr/bin/env bash
# The device calls of one session, each under 10 minutes on one H100 (run from the repo root on the box;
# carry .wheels (pytest wheels) and .bench (the shared peers' folder copied to .bench/bench)):
#
#   PART=tests   tests/gpu (engine equivalence, race, pinning, formats' GPU tail, compiled bf16 vs fp32)
#   PART=bench   heavylift bench against FSDP2 offload, DeepSpeed ZeRO-3 offload and SuperOffload, then
#                the shared floor probe (stock HF forward+backward) on the same machine
#   PART=multi   issue 4/5 on GPUS ranks (train + checkpoint, export, resume on half the ranks), nvidia-h200-x4
#   PART=scale   issue 7: bench --gpus COUNTS (weak scaling), PEERS at the largest count, nvidia-h200-x4
#   PART=big     issue 6: kernel speed per format, qwen3-14b in FMT on one GPU (nvidia-h200)
#   PART=nvme    issue 6: qwen3-4b with NVME_RATIO of the host state on disk vs all in RAM (nvidia-h200)
#   PART=assist  issue 6/8: offload.gpu_assist phases (auto first, 0 = off) on clipped steps: qwen3-4b with 80% of the
#                params stepped on the host (fp32), then qwen3-14b in int8-moments (nvidia-h200)
#   PART=accuracy issue 6 item 2 at a larger scale: the qwen3-4b shape (random init: the box has no network)
#                trained on the bundled data in each of FORMATS (3 fit a call: ~2.5 min each), every bucket's
#                state on the host (ratio 1.0: the host kernels, not the GPU tail's)
#   PART=llama8b issue 8: the llama-3-8b shape, fp32 state, seq 4096 x 1 x accum 8 (32K tokens per step)
#   PART=saveattn issue 8: engine.save_attention off/on, qwen3-4b seq 4096 x 4 capped as an 80 GB card (GPU_MEM)
#   PART=hostaccmem the live GPU blocks of each accumulation path between micro-batches (benchmarks/hostacc_memory.py)
#   PART=hostacc issue 8: offload.accumulate device vs host, llama-3-8b shape with accum 8 capped as an 80 GB card
#   PART=small   issue 8: the small-batch case (8K tokens per step) with the automatic tail against none
#   PART=largest issue 6: per state format (FORMATS), the largest layer count of the qwen3-14b width the planner
#                fits on this box (seq 4096 x 2), then two steps of it (benchmarks/largest_model.py --try)
#   PART=70b     issue 7: estimate + bench of the Llama-70B shape on 4 GPUs in FMT (nvidia-h200-x4)
#   PART=train   issue 3/4/5: a preset run with metrics, report PNGs and a checkpoint, a resume from it that
#                saves again (keeping one), an export of that (save/resume/export timings, peak host RSS), and `heavylift estimate` for the same case beside what train measured
#
# HEAVYLIFT_COMMIT names the commit (the tree travels without .git). Logs land in $OUT.
# SAVE_ATTN=1 (bench) runs heavylift with engine.save_attention. BENCH_STEPS (bench, default 5) timed steps for
# heavylift and each peer: the lent box's CPU drifts from step to step, and the median of 5 steadies the figure.
# HEAVYLIFT_BIND_CORES=on (any part) pins one rank too: the training thread on its own core, the optimizer's on the rest.
# GPU_MEM=78.5 (bench, llama8b, small, assist) caps heavylift's allocator as on an 80 GB card (engine.gpu_memory_gib);
# GPU_CARD=79.1 (largest; an 80 GB card as torch reports it) plans and tries the largest model for a card of that size.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}
pip install -q --no-index --no-deps .wheels/*.whl 2>/dev/null
# fields FILE KEY...: the given keys of each final record of a step benchmark's JSON lines
fields() { python -c "import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r.get('stage') != 'steps': print(sys.argv[1][-16:], *(r.get(k) for k in sys.argv[2:]))" "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "${PART:-tests}" in
tests)
  timeout 420 python -m pytest -q -s ${TESTS:-tests/gpu} 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "error|passed|failed|Error|:"
  ;;
bench)
  mkdir -p "$OUT/r"
  timeout ${BENCH_TIMEOUT:-480} python -m heavylift bench --model qwen3-4b --seq 4096 --mbs 4 --steps ${BENCH_STEPS:-5} \
    --peers-dir .bench/bench --peers "${PEERS:-fsdp2-offload,deepspeed-zero3-offload,deepspeed-superoffload}" \
    --peer-timeout "${PEER_TIMEOUT:-110}" --budget-s "${BENCH_BUDGET:-0}" ${GPU_MEM:+--gpu-memory-gib $GPU_MEM} \
    ${SAVE_ATTN:+--save-attention} --out "$OUT/r" > "$OUT/bench.log" 2>&1
  # FLOOR=0 skips the shared floor probe (the stock model's fwd+bwd), when an earlier call on the box has it
  [ "${FLOOR:-1}" = 0 ] || (cd .bench/bench && timeout 100 python floor_probe.py) > "$OUT/floor_probe.log" 2>&1
  tail -25 "$OUT/bench.log"; tail -2 "$OUT/floor_probe.log" 2>/dev/null
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
multi)
  # issue 4's multi-GPU case and issue 5 on GPUs: train on N ranks with a checkpoint, export it, resume
  # it on N/2 ranks (another world size), each with peak RSS; the estimate for the same case beside it.
  N=${GPUS:-4}; H=$(( N / 2 )); M=${MODEL:-qwen3-4b}; C=/tmp/ckpt$N; S=${STEPS:-8}
  TR="torchrun --standalone --nproc_per_node"
  timeout 100 python -m heavylift estimate --model "$M" --gpus $N --seq 2048 --mbs 4 > "$OUT/estimate$N.log" 2>&1
  /usr/bin/time -v timeout 240 $TR $N -m heavylift train --model "$M" --seq_len 2048 \
    --engine.batch.micro_batch_size 4 --max_steps $S --out_dir /tmp/run$N --checkpoint_dir $C --save_every $S \
    > "$OUT/train$N.log" 2>&1
  /usr/bin/time -v timeout 120 python -m heavylift export $C/step-$S /tmp/hf$N --dtype bf16 > "$OUT/export$N.log" 2>&1
  timeout 100 python -c "import sys, time, torch, transformers as t; s = time.time(); \
m = t.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16); \
print(f'from_pretrained: {sum(p.numel() for p in m.parameters()) / 1e9:.2f} B params in {time.time() - s:.0f} s')" \
    /tmp/hf$N >> "$OUT/export$N.log" 2>&1
  /usr/bin/time -v timeout 200 $TR $H -m heavylift train --model "$M" --seq_len 2048 \
    --engine.batch.micro_batch_size 4 --max_steps $(( S + 2 )) --out_dir /tmp/run$H --resume $C/step-$S \
    > "$OUT/resume$H.log" 2>&1
  cp /tmp/run$N/metrics.jsonl "$OUT/metrics$N.jsonl"; cp /tmp/run$H/metrics.jsonl "$OUT/metrics$H.jsonl"
  for f in train$N export$N resume$H; do echo "== $f"; tr '\r' '\n' < "$OUT/$f.log" | \
    grep -E "^step|heavylift:|from_pretrained|Maximum resident|Elapsed|rror" | grep -v "^train:" | tail -14; done
  grep -E "peak|placement|fits" "$OUT/estimate$N.log"
  ;;
scale)
  # issue 7: heavylift's weak scaling (tokens per GPU fixed) and, with PEERS, the peers at the largest count
  mkdir -p "$OUT/r"
  timeout 560 python -m heavylift bench --model qwen3-4b --seq 4096 --mbs 4 --steps 3 --gpus "${COUNTS:-1,2,4}" \
    --peers-dir .bench/bench --peers "${PEERS:-}" --peer-timeout "${PEER_TIMEOUT:-150}" --out "$OUT/r" \
    > "$OUT/scale.log" 2>&1
  tail -30 "$OUT/scale.log"
  ;;
big)
  # issue 6: CPU kernel speed per format on this box's cores; the qwen3-14b shape on one GPU in a compact
  # format (FMT, default int8-moments); then the same with part of the state on NVMe (NVME_RATIO)
  python benchmarks/kernel_speed.py --params 200000000 --reps 3 --machine "$(nvidia-smi -L | head -1)" \
    > "$OUT/kernels.jsonl" 2> "$OUT/kernels.err"
  mkdir -p "$OUT/r"
  timeout 330 python -m heavylift bench --model qwen3-14b --seq 4096 --mbs 1 --accum ${ACCUM:-2} --steps 3 \
    --state-format "${FMT:-int8-moments}" --peers "" --out "$OUT/r" > "$OUT/big.log" 2>&1
  tail -20 "$OUT/big.log"; cat "$OUT/kernels.jsonl"
  ;;
nvme)
  # issue 6: qwen3-4b with NVME_RATIO of the host state on the box's disk, against the same run in RAM
  mkdir -p /tmp/nvme
  for dev in cpu nvme; do
    timeout 250 python -m heavylift.benchmark.step --model qwen3-4b --seq 4096 --mbs 4 --warmup 3 --steps 2 --ratio 0.8 \
      $( [ $dev = nvme ] && echo --nvme-path /tmp/nvme --nvme-ratio ${NVME_RATIO:-0.5} ) > "$OUT/step-$dev.jsonl" 2> "$OUT/step-$dev.err"
    tail -c 600 "$OUT/step-$dev.jsonl"; echo
  done
  ;;
assist)
  # ASSISTS / ASSISTS14: the shares for qwen3-4b / qwen3-14b (none: skip that model)
  [ "${ASSISTS:-auto,0,0.4}" = none ] || timeout ${T4B:-270} python -m heavylift.benchmark.step --model qwen3-4b --seq 4096 --mbs 4 --warmup 3 --steps 3 \
    --ratio 0.8 --gpu-assist "${ASSISTS:-auto,0,0.4}" ${GPU_MEM:+--gpu-memory-gib $GPU_MEM} > "$OUT/assist-4b.jsonl" 2> "$OUT/assist-4b.err"
  [ "${ASSISTS14:-auto,0}" = none ] || timeout ${T14B:-300} python -m heavylift.benchmark.step --model qwen3-14b --seq 4096 --mbs 1 --accum 2 --warmup 3 \
    --steps 2 --state-format int8-moments --gpu-assist "${ASSISTS14:-auto,0}" ${GPU_MEM:+--gpu-memory-gib $GPU_MEM} \
    > "$OUT/assist-14b.jsonl" 2> "$OUT/assist-14b.err"
  for f in assist-4b assist-14b; do
    fields "$OUT/$f.jsonl" gpu_assist step_s forward_wait_s fwd_bwd_in_step_s boundary_step_s speculation floor; tail -2 "$OUT/$f.err"
  done
  ;;
accuracy)
  timeout 575 python benchmarks/format_accuracy.py --out-dir /tmp/acc --eval-every 4 --max-steps 12 \
    --formats "${FORMATS:-fp32,bf16-master-int8,int8-moments}" -- --model qwen3-4b \
    --seq_len 512 --engine.batch.micro_batch_size 4 --engine.offload.ratio 1.0 > "$OUT/accuracy.log" 2>&1
  cp /tmp/acc/accuracy.json /tmp/acc/train_loss.png "$OUT/" 2>/dev/null; tail -8 "$OUT/accuracy.log"
  ;;
llama8b)
  mkdir -p "$OUT/r"
  timeout ${L8B_TIMEOUT:-560} python -m heavylift bench --model llama-8b --seq 4096 --mbs 1 --accum 8 --steps 3 \
    --peers "" ${GPU_MEM:+--gpu-memory-gib $GPU_MEM} --out "$OUT/r" > "$OUT/llama8b.log" 2>&1
  tail -20 "$OUT/llama8b.log"
  ;;
hostacc)
  # offload.accumulate device vs host on the llama-3-8b shape, seq 4096 x 1 x accum 8, as on an 80 GB card:
  # the host sums give the card back the host buckets' 2 B/param of accumulated gradients (the tail grows)
  for where in device host; do
    timeout ${HOSTACC_TIMEOUT:-270} python -m heavylift.benchmark.step --model llama-8b --seq 4096 --mbs 1 --accum 8 \
      --warmup 4 --steps 2 --accumulate $where --gpu-memory-gib ${GPU_MEM:-78.5} > "$OUT/acc-$where.jsonl" 2> "$OUT/acc-$where.err"
    fields "$OUT/acc-$where.jsonl" accumulate step_s forward_wait_s fwd_bwd_in_step_s boundary_step_s tail_buckets \
      buckets peak_gpu_gib alloc_retries floor
    tail -2 "$OUT/acc-$where.err"
  done
  ;;
saveattn)
  # engine.save_attention off and on: qwen3-4b at seq 4096 x 4 (issue 8's case), capped as an 80 GB card
  for tag in plain saved; do
    timeout ${SA_TIMEOUT:-270} python -m heavylift.benchmark.step --model qwen3-4b --seq 4096 --mbs 4 --warmup 4 --steps 3 \
      --gpu-memory-gib ${GPU_MEM:-78.5} $( [ $tag = saved ] && echo --save-attention ) > "$OUT/sa-$tag.jsonl" 2> "$OUT/sa-$tag.err"
    fields "$OUT/sa-$tag.jsonl" save_attention step_s forward_wait_s fwd_bwd_in_step_s tail_buckets blocks_recomputing \
      peak_gpu_gib alloc_retries floor
    tail -2 "$OUT/sa-$tag.err"
  done
  ;;
hostaccmem)
  # what each accumulation path leaves allocated between micro-batches, by the code that allocated it
  timeout 200 python benchmarks/hostacc_memory.py > "$OUT/hostacc_memory.log" 2>&1; tail -40 "$OUT/hostacc_memory.log"
  ;;
small)
  # 8K tokens per step: the CPU optimizer bounds it; what the automatic GPU tail buys against no tail
  for ratio in -1 1.0; do
    timeout ${SMALL_TIMEOUT:-270} python -m heavylift.benchmark.step --model qwen3-4b --seq 2048 --mbs 4 --warmup 4 --steps 3 \
      --ratio $ratio ${GPU_MEM:+--gpu-memory-gib $GPU_MEM} > "$OUT/small-ratio$ratio.jsonl" 2> "$OUT/small-ratio$ratio.err"
    tail -c 700 "$OUT/small-ratio$ratio.jsonl"; echo
  done
  ;;
largest)
  # one format per call: a 13-25 B try takes minutes (init pins ~110 GiB; 200 s was not enough in session 4)
  timeout 570 python benchmarks/largest_model.py --formats "${FORMATS:-bf16-master-int8}" --try \
    --timeout "${TRY_TIMEOUT:-540}" ${GPU_CARD:+--gpu-mem-gib $GPU_CARD} --logs "$OUT" > "$OUT/largest.jsonl" 2> "$OUT/largest.err"
  cat "$OUT/largest.jsonl"; tail -5 "$OUT/largest.err"
  ;;
70b)
  # issue 7: the Llama-3.3-70B shape on 4 GPUs, seq 4096, clip 1.0, in the format the planner picks for
  # 512 GiB (bf16-master-int8); the estimate first, then heavylift's step benchmark (no peers: none fits)
  timeout 60 python -m heavylift estimate --model llama-3-70b --gpus 4 --seq 4096 --mbs 1 > "$OUT/estimate70b.log" 2>&1
  tail -25 "$OUT/estimate70b.log"
  mkdir -p "$OUT/r"
  timeout 540 python -m heavylift bench --model llama-70b --gpus 4 --seq 4096 --mbs 1 --accum ${ACCUM:-8} --steps 2 \
    --state-format "${FMT:-bf16-master-int8}" --peers "" --out "$OUT/r" > "$OUT/70b.log" 2>&1
  tail -25 "$OUT/70b.log"
  ;;
esac

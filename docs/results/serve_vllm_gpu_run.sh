#!/usr/bin/env bash
# The GPU campaign behind docs/results/serve-h200-vllm.md: tokenrig launches, load-tests and scrapes
# vLLM 0.26.0 serving a synthetic llama2-7b (dummy weights) on an H200, cross-checked against `vllm bench serve`
# on the same server, and llama2-70b at TP=2 where the host has two GPUs.
#
# Two tracks run side by side, one per GPU (one after the other on a one-GPU host), each in priority order:
#   A (GPU 0): a bf16 server started with `tokenrig serve` and kept up: tokenrig vs `vllm bench serve` at
#      1/32/128 streams on /v1/completions, the /metrics page under load, fixed-512x128 (chat route) at
#      1/8/32/128/256 streams, chat, rag (prefix caching on), mooncake_replay, the SLO search on chat; then
#      attention backends TRITON_ATTN and FLASHINFER (each its own server) at 1/32 streams.
#   B (GPU 1): `tokenrig loadtest --backend vllm` launching its own server: GPTQ, AWQ, FP8 at 1/32 streams,
#      rag with prefix caching off, then the hf backend's SLO search on chat.
#   Then, with two GPUs and time left (ELAPSED_CAP_S), llama2-70b bf16 at TP=2 with the multicast safeguard.
# Everything lands in $RES (default /tmp/results); `collect` in the device call tars it into $OUT. The campaign
# runs detached (setsid) so it survives between device calls on a warm host; progress in $RES/progress.log.
#
# On the host: vLLM's wheels unpacked in /tmp/site (scripts/stage_vllm.sh), the load generator's wheels
# in /tmp/site2 (.whl: locust 2.47 and what the image lacks), this checkout as the working directory.
set -u
RES=${RES:-/tmp/results}
ELAPSED_CAP_S=${ELAPSED_CAP_S:-1100}  # no 70B phase after this many seconds of campaign
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  VLLM_CACHE_ROOT=/tmp/vllm-cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache \
  TOKENRIG_MODELS=/tmp/models VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=1
export PYTHONPATH=/tmp/site:/tmp/site2:$PWD
PY=${PY:-python3}
START=$(date +%s)
HERE=$PWD/docs/results
FIXED=$HERE/serve-fixed-512x128.yaml COMPLETIONS=$HERE/serve-completions-512x128.yaml
SLO="ttft_p99=500ms,tpot_p99=50ms"
LIMITS="--concurrency 64 --max-model-len 2048 --max-num-seqs 256"  # KV for 64 x 2048; batches up to 256
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$RES/progress.log"; }
cli() { $PY -m tokenrig.cli "$@"; }

healthy() {  # $1 port, $2 pid of the tokenrig serve process: wait up to 600 s
  for _ in $(seq 1 1200); do
    curl -sf "http://127.0.0.1:$1/health" > /dev/null && return 0
    kill -0 "$2" 2> /dev/null || return 1
    sleep 0.5
  done
  return 1
}

bench() {  # $1 port, $2 streams, $3 prompts, $4 tag: vLLM's own benchmark on the same route and shape
  $PY -m vllm.entrypoints.cli.main bench serve --backend openai --base-url "http://127.0.0.1:$1" \
    --endpoint /v1/completions --model llama2-7b --tokenizer "$TOKENRIG_MODELS/llama2-7b-config" \
    --dataset-name random --random-input-len 512 --random-output-len 128 --random-range-ratio 0 --ignore-eos \
    --max-concurrency "$2" --num-prompts "$3" --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 \
    --save-result --save-detailed --result-dir "$RES/bench-$4" --result-filename "c$2.json" \
    > "$RES/bench-$4-c$2.log" 2>&1
  log "bench $4 c=$2: $(grep -E 'Output token throughput|Median TTFT|P99 TTFT|Median TPOT' "$RES/bench-$4-c$2.log" | tr -s ' ' | tr '\n' ';')"
}

track_a() {  # GPU $1
  export CUDA_VISIBLE_DEVICES=$1
  local port=8000
  log "A: tokenrig serve vllm bf16 (default attention) on GPU $1"
  # python itself in the background (not a shell function), so $! is the process SIGTERM must reach
  $PY -m tokenrig.cli serve --backend vllm --gpu h200 --model 7b $LIMITS --port $port > "$RES/serve-bf16.log" 2>&1 &
  local server=$!
  if ! healthy $port $server; then log "A: bf16 server never healthy"; tail -30 "$RES/serve-bf16.log"; return 1; fi
  log "A: healthy: $(grep -h '^served:' "$RES/serve-bf16.log")"
  lt() { cli loadtest --url "http://127.0.0.1:$port" --backend vllm --gpu h200 --model 7b "$@" --request-timeout 120 \
           > "$RES/lt-$label.log" 2>&1; log "A: $label done: $(grep -c '' "$RES/lt-$label.log") lines"; }
  label=xcheck-tokenrig; lt --scenario "$COMPLETIONS" --users sweep --sweep 1,32,128 --results "$RES/xcheck"
  bench $port 1 40 bf16
  bench $port 32 480 bf16
  # the /metrics page while requests run (the benchmark spends ~20 s importing vLLM before it sends)
  (for _ in $(seq 1 90); do sleep 1; curl -s "http://127.0.0.1:$port/metrics" > "$RES/metrics.tmp"
     grep -q '^vllm:num_requests_running{.*} [1-9]' "$RES/metrics.tmp" && { sleep 5
       curl -s "http://127.0.0.1:$port/metrics" > "$RES/vllm-0.26.0-metrics-under-load.txt"; break; }; done) &
  bench $port 128 1024 bf16
  label=fixed-chat; lt --scenario "$FIXED" --users sweep --sweep 1,8,32,128,256 --duration 15 --warmup 3 \
    --results "$RES/bf16-fixed"
  label=chat; lt --scenario chat --users 32 --duration 20 --warmup 4 --results "$RES/bf16-chat"
  label=rag-prefix-on; lt --scenario rag --rate 8 --duration 20 --warmup 4 --results "$RES/rag-prefix-on"
  label=mooncake; lt --scenario mooncake_replay --duration 30 --warmup 5 --results "$RES/mooncake"
  label=findmax-vllm; lt --scenario chat --find-max --slo "$SLO" --rate 4 --max-step 25 --precision 0.15 \
    --tail-samples 2 --results "$RES/findmax-vllm"
  curl -s "http://127.0.0.1:$port/metrics" > "$RES/vllm-0.26.0-metrics-after.txt"
  kill -TERM $server; wait $server
  for attention in TRITON_ATTN FLASHINFER; do
    log "A: attention $attention"
    cli loadtest --backend vllm --gpu h200 --model 7b $LIMITS --attention $attention --scenario "$FIXED" \
      --users sweep --sweep 1,32 --duration 15 --warmup 3 --request-timeout 120 --results "$RES/attn-$attention" \
      > "$RES/lt-attn-$attention.log" 2>&1
    log "A: attention $attention done"
  done
}

track_b() {  # GPU $1
  export CUDA_VISIBLE_DEVICES=$1
  for quant in gptq awq fp8; do
    log "B: $quant"
    cli loadtest --backend vllm --gpu h200 --model 7b $LIMITS --quant $quant --scenario "$FIXED" \
      --users sweep --sweep 1,32 --duration 15 --warmup 3 --request-timeout 120 --results "$RES/quant-$quant" \
      > "$RES/lt-quant-$quant.log" 2>&1
    log "B: $quant done: $(grep -h 'served:' "$RES/lt-quant-$quant.log")"
  done
  log "B: rag, prefix caching off"
  cli loadtest --backend vllm --gpu h200 --model 7b $LIMITS --no-prefix-caching --scenario rag --rate 8 \
    --duration 20 --warmup 4 --request-timeout 120 --results "$RES/rag-prefix-off" > "$RES/lt-rag-prefix-off.log" 2>&1
  log "B: hf backend SLO search on chat (sdpa, CUDA graphs, 1024-token KV padding)"
  cli loadtest --backend hf --gpu h200 --model 7b --attention sdpa --cuda-graphs --kv-padding-tokens 1024 \
    --concurrency 64 --max-model-len 2048 --scenario chat --find-max --slo "$SLO" --rate 1 --max-step 25 \
    --precision 0.15 --tail-samples 2 --request-timeout 120 --results "$RES/findmax-hf" > "$RES/lt-findmax-hf.log" 2>&1
  log "B: done"
}

phase_70b() {
  export CUDA_VISIBLE_DEVICES=0,1
  log "70B: llama2-70b bf16 TP=2, multicast safeguard (tokenrig's default at TP>1)"
  cli loadtest --backend vllm --gpu h200 --model 70b --tp 2 --gpu-memory-utilization 0.85 --concurrency 32 \
    --max-model-len 2048 --scenario "$FIXED" --users sweep --sweep 1,32 --duration 20 --warmup 4 \
    --request-timeout 180 --results "$RES/tp2-70b" > "$RES/lt-tp2-70b.log" 2>&1
  log "70B: done"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RES/card.txt" 2>&1
$PY -c "import torch, transformers, vllm, locust, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
  'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'vllm', vllm.__version__, 'locust', locust.__version__)" \
  >> "$RES/card.txt" 2>&1
cat "$RES/card.txt"
nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu --format=csv,noheader -l 2 > "$RES/gpu.csv" 2>&1 &
GPUS=$(nvidia-smi -L | wc -l)
log "campaign on $GPUS GPU(s)"
if [ "$GPUS" -ge 2 ]; then
  track_a 0 & A=$!
  track_b 1 & B=$!
  wait $A $B
  if [ $(( $(date +%s) - START )) -lt "$ELAPSED_CAP_S" ]; then phase_70b; else log "no time left for 70B TP=2"; fi
else
  track_a 0; track_b 0
fi
log "campaign finished"
touch "$RES/DONE"

#!/usr/bin/env bash
# The GPU campaign planned for docs/results/engines-h100.md: vLLM 0.26.0 against SGLang 0.5.17 on one card (an H100;
# the same on an H200 with CARD=h200), a synthetic llama2-7b with dummy weights, every run launched by tokenrig.
# NOT RUN YET: no result of it exists. It runs on one GPU, in priority order:
#   1. SGLang bf16, one server kept up (`tokenrig serve`): fixed-512x128 at 1/32/128 streams, then
#      `python -m sglang.bench_serving` on the same server and shape (the cross-check: docs/results/vllm_crosscheck.py
#      read tokenrig's records with the benchmark's definitions for vLLM), its /metrics page under load (a captured
#      page to put beside the built one in tests/fixtures), the chat SLO search (ttft_p99=500ms,tpot_p99=50ms,
#      default steps) and rag with its radix cache on.
#   2. vLLM bf16, the same without the cross-check (done for vLLM on the H200), rag with its prefix cache on.
#   3. FP8 (online, both engines): fixed-512x128 at 1/32/128 streams; tokenrig's served-weights check proves FP8.
#   4. rag with prefix caching off on both (the baseline for the hit rates and TTFT of 1 and 2).
#   5. attention backends: SGLang fa3 (the default, in 1), flashinfer, triton; vLLM FLASH_ATTN (default), FLASHINFER,
#      TRITON_ATTN; at 1/32 streams.
# Everything lands in $RES (default /tmp/results-engines), progress in $RES/progress.log; run it detached (setsid) so
# it survives between device calls, and tar $RES into $OUT when $RES/DONE exists.
#
# On the host: `ldd --version` shows glibc >= 2.34 (the sglang wheel is manylinux_2_34); vLLM's wheels unpacked in
# /tmp/site, SGLang's (scripts/stage_sglang.sh) in /tmp/site-sglang, the load generator's in /tmp/site2, this
# checkout as the working directory. SGLang runs with its folder first on PYTHONPATH, vLLM without it.
#
# How to run it from a machine without the GPU, one device call at a time (the host keeps /tmp while warm):
#   1. here: scripts/stage_sglang.sh -> .stage-sglang/part00..part10 (11 parts, 584 MiB; checked 2026-12-07), and
#      vLLM's and the load generator's parts as for docs/results/serve_vllm_gpu_run.sh;
#   2. one call per part, carrying it: mkdir -p /tmp/stage-sglang && cp .stage-sglang/partNN /tmp/stage-sglang/;
#   3. cat /tmp/stage-sglang/part* > /tmp/sglang.tar && tar xf /tmp/sglang.tar -C /tmp && python3 -c "import glob,
#      zipfile; [zipfile.ZipFile(w).extractall('/tmp/site-sglang') for w in glob.glob('/tmp/sglang-wheels/*.whl')]"
#      (vLLM's into /tmp/site the same way), then: setsid docs/results/engines_h100_gpu_run.sh > /dev/null 2>&1 &
#   4. later calls: tail /tmp/results-engines/progress.log; once /tmp/results-engines/DONE exists,
#      tar czf "$OUT/engines.tgz" -C /tmp results-engines
#   5. here: tables with `tokenrig loadtest --compare`, the cross-check with docs/results/vllm_crosscheck.py's
#      method against sglang.bench_serving's --output-details file, into docs/results/engines-h100.md; then
#      `tokenrig capacity --from docs/results --engine sglang ...` reads the find-max runs.
set -u
RES=${RES:-/tmp/results-engines}
CARD=${CARD:-h100-sxm}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  VLLM_CACHE_ROOT=/tmp/vllm-cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache \
  TOKENRIG_MODELS=/tmp/models VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=1
VLLM_PATH=/tmp/site:/tmp/site2:$PWD
SGLANG_PATH=/tmp/site-sglang:/tmp/site:/tmp/site2:$PWD
PY=${PY:-python3}
START=$(date +%s)
HERE=$PWD/docs/results
FIXED=$HERE/serve-fixed-512x128.yaml COMPLETIONS=$HERE/serve-completions-512x128.yaml
SLO="ttft_p99=500ms,tpot_p99=50ms"
LIMITS="--concurrency 64 --max-model-len 2048 --max-num-seqs 256"  # KV for 64 x 2048; batches up to 256
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$RES/progress.log"; }
engine_path() { if [ "$1" = sglang ]; then echo "$SGLANG_PATH"; else echo "$VLLM_PATH"; fi; }
cli() { PYTHONPATH=$(engine_path "$ENGINE") $PY -m tokenrig.cli "$@"; }

healthy() {  # $1 port, $2 pid of the tokenrig serve process: wait up to 600 s
  for _ in $(seq 1 1200); do
    curl -sf "http://127.0.0.1:$1/health" > /dev/null && return 0
    kill -0 "$2" 2> /dev/null || return 1
    sleep 0.5
  done
  return 1
}

sglang_bench() {  # $1 port, $2 streams, $3 prompts: SGLang's own benchmark, same route (/v1/completions) and shape
  PYTHONPATH=$SGLANG_PATH $PY -m sglang.bench_serving --backend sglang-oai --base-url "http://127.0.0.1:$1" \
    --model llama2-7b --tokenizer "$TOKENRIG_MODELS/llama2-7b-config" --dataset-name random-ids \
    --random-input-len 512 --random-output-len 128 --random-range-ratio 1.0 --max-concurrency "$2" \
    --num-prompts "$3" --output-file "$RES/bench-sglang/c$2.jsonl" --output-details > "$RES/bench-sglang-c$2.log" 2>&1
  log "sglang.bench_serving c=$2: $(grep -E 'Output token throughput|Median TTFT|P99 TTFT|Median TPOT' \
    "$RES/bench-sglang-c$2.log" | tr -s ' ' | tr '\n' ';')"
}

kept_up() {  # $1 engine: one bf16 server, the load shapes that share it
  ENGINE=$1
  local port=8000
  log "$ENGINE: tokenrig serve bf16 (default attention)"
  PYTHONPATH=$(engine_path "$ENGINE") $PY -m tokenrig.cli serve --backend "$ENGINE" --gpu "$CARD" --model 7b $LIMITS \
    --port $port > "$RES/serve-$ENGINE-bf16.log" 2>&1 &
  local server=$!
  if ! healthy $port $server; then
    log "$ENGINE: server never healthy"; tail -30 "$RES/serve-$ENGINE-bf16.log"; return 1
  fi
  log "$ENGINE: healthy: $(grep -h '^served:' "$RES/serve-$ENGINE-bf16.log")"
  lt() { cli loadtest --url "http://127.0.0.1:$port" --backend "$ENGINE" --gpu "$CARD" --model 7b "$@" \
           --request-timeout 120 > "$RES/lt-$ENGINE-$label.log" 2>&1; log "$ENGINE: $label done"; }
  label=fixed; lt --scenario "$FIXED" --users sweep --sweep 1,32,128 --duration 15 --warmup 3 \
    --results "$RES/$ENGINE-bf16-fixed"
  if [ "$ENGINE" = sglang ]; then
    label=xcheck-tokenrig; lt --scenario "$COMPLETIONS" --users sweep --sweep 1,32,128 --results "$RES/xcheck-sglang"
    mkdir -p "$RES/bench-sglang"
    sglang_bench $port 1 40
    sglang_bench $port 32 480
    (for _ in $(seq 1 90); do sleep 1; curl -s "http://127.0.0.1:$port/metrics" > "$RES/metrics.tmp"
       grep -q '^sglang:num_running_reqs{.*} [1-9]' "$RES/metrics.tmp" && { sleep 5
         curl -s "http://127.0.0.1:$port/metrics" > "$RES/sglang-0.5.17-metrics-under-load.txt"; break; }; done) &
    sglang_bench $port 128 1024
  fi
  label=findmax; lt --scenario chat --find-max --slo "$SLO" --results "$RES/$ENGINE-findmax"
  label=rag-prefix-on; lt --scenario rag --rate 8 --duration 20 --warmup 4 --results "$RES/$ENGINE-rag-prefix-on"
  kill -TERM $server; wait $server
  cp "$RES/serve-$ENGINE-bf16.log" "$RES/$ENGINE-startup.log" 2> /dev/null
  cp results/serve/"$ENGINE"-llama2-7b-bf16-"$CARD".log "$RES/$ENGINE-server.log" 2> /dev/null
}

launched() {  # $1 engine, $2 label, then loadtest arguments: tokenrig launches its own server for the run
  ENGINE=$1 label=$2; shift 2
  log "$ENGINE: $label"
  cli loadtest --backend "$ENGINE" --gpu "$CARD" --model 7b $LIMITS "$@" --request-timeout 120 \
    --results "$RES/$ENGINE-$label" > "$RES/lt-$ENGINE-$label.log" 2>&1
  log "$ENGINE: $label done: $(grep -h 'served:' "$RES/lt-$ENGINE-$label.log")"
}

{ ldd --version | head -1; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } \
  > "$RES/card.txt" 2>&1
PYTHONPATH=$VLLM_PATH $PY -c "import torch, vllm, sys; print('python', sys.version.split()[0],
  'torch', torch.__version__,
  'cuda', torch.version.cuda, 'vllm', vllm.__version__)" >> "$RES/card.txt" 2>&1
PYTHONPATH=$SGLANG_PATH $PY -c "import sglang, sgl_kernel, transformers; print('sglang', sglang.__version__,
  'sgl_kernel', sgl_kernel.__version__, 'transformers', transformers.__version__)" >> "$RES/card.txt" 2>&1
cat "$RES/card.txt"
nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu --format=csv,noheader -l 2 > "$RES/gpu.csv" 2>&1 &
export CUDA_VISIBLE_DEVICES=0
kept_up sglang
kept_up vllm
for engine in sglang vllm; do
  launched $engine fp8 --quant fp8 --scenario "$FIXED" --users sweep --sweep 1,32,128 --duration 15 --warmup 3
done
for engine in sglang vllm; do
  launched $engine rag-prefix-off --no-prefix-caching --scenario rag --rate 8 --duration 20 --warmup 4
done
for attention in flashinfer triton; do
  launched sglang "attn-$attention" --attention $attention --scenario "$FIXED" --users sweep --sweep 1,32 \
    --duration 15 --warmup 3
done
for attention in FLASHINFER TRITON_ATTN; do
  launched vllm "attn-$attention" --attention $attention --scenario "$FIXED" --users sweep --sweep 1,32 \
    --duration 15 --warmup 3
done
log "campaign finished"
touch "$RES/DONE"

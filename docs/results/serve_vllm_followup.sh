#!/usr/bin/env bash
# The GPU follow-up campaign behind docs/results/serve-h200-vllm-followup.md: vLLM 0.26.0 on one H200, TP=1 only
# (no NVLink multicast), synthetic llama2 models with `--load-format dummy`. One 7B server started by
# `tokenrig serve` serves checks 1, 2, 4, 6 and 3 through `tokenrig loadtest --url`; then check 5 starts its own.
#
#   1. fresh prompts every run: the same chat load test (16 users, 60 s) twice without --seed,
#      then once with run 1's recorded seed; TTFT and the prefix-cache hit rate per run, from the server's
#      /metrics counters read before and after each run (and from summary.json's window). Then a short pair
#      with one fixed seed (12 s each), small enough for the KV cache to hold the first run's prompts.
#   2. one /metrics page captured while run 1's requests are running (the test fixture under load).
#   4. tokenrig against `vllm bench serve` at 1/32/128 streams, 512 in / 128 out on /v1/completions, both
#      greedy (temperature 0) and forced to 128 tokens (tokenrig: min_tokens = max_tokens + ignore_eos;
#      bench: --ignore-eos --extra-body '{"min_tokens": 128}').
#   6. the Mooncake replay through --url (the server's 2,048-token context sizes the prompts).
#   3. the SLO search on chat with default step lengths from --rate 8, cut where the 13B check's reserve begins.
#   5. 13B bf16 at TP 1 with 64 users, chat, 90 s (tokenrig loadtest starts the server).
#
# Knobs (environment):
#   TOTAL_S=1650       seconds of campaign the device time allows (the last check ends by then, or is cut)
#   RESERVE_5_S=330    seconds kept for check 5 (13B cold start ~200 s, 90 s of load, shutdown)
#   CHECKS="1 4 6 3 5" which checks, in this order (2 runs inside 1)
# Each run writes its own directory under $RES as it finishes; progress in $RES/progress.log.
#
# On the host: vLLM's installed tree in /tmp/site (scripts/stage_vllm.sh, re-packed), the load generator's
# wheels in /tmp/site2 (.whl), this checkout as the working directory; run detached:
#   setsid nohup bash docs/results/serve_vllm_followup.sh > /tmp/campaign.log 2>&1 < /dev/null &
set -u
RES=${RES:-/tmp/results}
TOTAL_S=${TOTAL_S:-1650}
RESERVE_5_S=${RESERVE_5_S:-330}
CHECKS=${CHECKS:-1 4 6 3 5}
mkdir -p "$RES/logs" "$RES/metrics"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  VLLM_CACHE_ROOT=/tmp/vllm-cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache \
  TOKENRIG_MODELS=/tmp/models VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 CUDA_VISIBLE_DEVICES=0
export PYTHONPATH=/tmp/site:/tmp/site2:$PWD
PY=${PY:-python3}
START=$(date +%s)
HERE=$PWD/docs/results
COMPLETIONS=$HERE/serve-completions-512x128.yaml
SLO="ttft_p99=500ms,tpot_p99=50ms"
LIMITS="--concurrency 64 --max-model-len 2048 --max-num-seqs 256"  # the first campaign's 7B server
PORT=8000
URL=http://127.0.0.1:$PORT
SERVER=
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$RES/progress.log"; }
cli() { $PY -m tokenrig.cli "$@"; }
elapsed() { echo $(( $(date +%s) - START )); }

healthy() {  # $1 pid of the server process: wait up to 600 s
  for _ in $(seq 1 1200); do
    curl -sf "$URL/health" > /dev/null && return 0
    kill -0 "$1" 2> /dev/null || return 1
    sleep 0.5
  done
  return 1
}

newest() { ls -td "$1"/*/ 2> /dev/null | head -1; }  # the run directory a load test just wrote

page() { curl -s "$URL/metrics" > "$RES/metrics/$1.txt"; }  # one /metrics page, by name

report_run() {  # $1 label, $2 run dir, $3 page before, $4 page after: seed, TTFT, prefix-cache hits per run
  $PY - "$@" <<'EOF' | tee -a "$RES/progress.log"
import json, sys, pathlib
from tokenrig.serve.scrape import parse_metrics
label, run = sys.argv[1], pathlib.Path(sys.argv[2])
pages = [pathlib.Path(p) for p in sys.argv[3:5]]
try:
    meta = json.loads((run / "metadata.json").read_text())
    s = json.loads((run / "summary.json").read_text())
except Exception as error:  # noqa: BLE001 - report what is there
    print(f"{label}: no summary ({error})"); sys.exit()
ttft = (s.get("latency_s") or {}).get("ttft") or {}
ms = lambda k: f"{ttft[k] * 1000:.1f}" if isinstance(ttft.get(k), (int, float)) else "-"
srv = s.get("server") or {}
q = (srv.get("prefix_cache_queries") or {}).get("increase")
h = (srv.get("prefix_cache_hits") or {}).get("increase")
whole = ""
if len(pages) == 2 and all(p.exists() for p in pages):
    before, after = (parse_metrics(p.read_text()) for p in pages)
    try:
        dq = after["prefix_cache_queries"] - before["prefix_cache_queries"]
        dh = after["prefix_cache_hits"] - before["prefix_cache_hits"]
        whole = f"; whole run from /metrics: {dh:.0f}/{dq:.0f} = {dh / dq:.3f}" if dq else "; no queries"
    except KeyError:
        whole = "; a /metrics page without prefix-cache counters"
req = s.get("requests", {})
print(f"{label}: dir={run.name} seed={meta.get('seed')} ({meta.get('seed_source')}) ok={req.get('ok')} "
      f"failed={req.get('failed')} TTFT p50={ms('p50')} ms p99={ms('p99')} ms; window hits/queries={h}/{q} "
      f"= {h / q if q else float('nan'):.3f}{whole}")
EOF
}

seed_of() { $PY -c "import json,sys; print(json.load(open(sys.argv[1] + '/metadata.json'))['seed'])" "$1"; }

start_7b() {
  log "7B server: tokenrig serve --backend vllm --gpu h200 --model 7b $LIMITS"
  # python itself in the background (not a shell function), so $! is the process SIGTERM must reach
  $PY -m tokenrig.cli serve --backend vllm --gpu h200 --model 7b $LIMITS --port $PORT > "$RES/logs/serve-7b.log" 2>&1 &
  SERVER=$!
  if ! healthy $SERVER; then log "7B server never healthy"; tail -40 "$RES/logs/serve-7b.log" >> "$RES/progress.log"; return 1; fi
  log "7B healthy: $(grep -h '^served:' "$RES/logs/serve-7b.log")"
}

stop_7b() {
  [ -n "$SERVER" ] || return 0
  page final-7b
  kill -TERM "$SERVER"; wait "$SERVER"
  SERVER=
  for _ in $(seq 1 60); do  # until vLLM's engine process has given the GPU back
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    [ "${used:-0}" -lt 2000 ] && break; sleep 1
  done
  log "7B server stopped; GPU memory used ${used:-?} MiB"
}

lt() {  # $1 label, then loadtest options: against the 7B server, labelled with its backend/GPU/model
  local label=$1; shift
  cli loadtest --url "$URL" --backend vllm --gpu h200 --model 7b --request-timeout 120 "$@" \
    > "$RES/logs/lt-$label.log" 2>&1
  local rc=$?
  log "$label: rc=$rc; $(grep -E '^(FAILED|run |results|tokenrig: error)' "$RES/logs/lt-$label.log" | head -3 | tr '\n' ';')"
}

check1() {
  log "check 1: three chat runs of 60 s at 16 users (runs 1-2 fresh seeds, run 3 run 1's seed), then a 12-s pair"
  # check 2: the /metrics page while run 1's requests run and the KV cache holds them
  (for _ in $(seq 1 150); do sleep 1; curl -s "$URL/metrics" > "$RES/metrics/poll.tmp"
     grep -qE '^vllm:num_requests_running\{.*\} ([2-9]|1[0-9])' "$RES/metrics/poll.tmp" && { sleep 10
       page vllm-0.26.0-metrics-under-load; break; }; done; rm -f "$RES/metrics/poll.tmp") &
  local chat="--scenario chat --users 16 --duration 60" r1 seed
  page before-run1
  lt seed-run1 $chat --results "$RES/seed-run1"; page after-run1
  r1=$(newest "$RES/seed-run1"); report_run run1 "$r1" "$RES/metrics/before-run1.txt" "$RES/metrics/after-run1.txt"
  lt seed-run2 $chat --results "$RES/seed-run2"; page after-run2
  report_run run2 "$(newest "$RES/seed-run2")" "$RES/metrics/after-run1.txt" "$RES/metrics/after-run2.txt"
  seed=$(seed_of "$r1"); log "1: run 1's seed: $seed"
  lt seed-run3 $chat --seed "$seed" --results "$RES/seed-run3"; page after-run3
  report_run run3 "$(newest "$RES/seed-run3")" "$RES/metrics/after-run2.txt" "$RES/metrics/after-run3.txt"
  local short="--scenario chat --users 16 --duration 12 --seed 20261130"
  lt seed-pair-a $short --results "$RES/seed-pair-a"; page after-pair-a
  report_run pair-a "$(newest "$RES/seed-pair-a")" "$RES/metrics/after-run3.txt" "$RES/metrics/after-pair-a.txt"
  lt seed-pair-b $short --results "$RES/seed-pair-b"; page after-pair-b
  report_run pair-b "$(newest "$RES/seed-pair-b")" "$RES/metrics/after-pair-a.txt" "$RES/metrics/after-pair-b.txt"
  log "1: done"
}

bench() {  # $1 streams, $2 prompts: vLLM's own benchmark on the same route and shape, greedy, 128 tokens forced
  $PY -m vllm.entrypoints.cli.main bench serve --backend openai --base-url "$URL" \
    --endpoint /v1/completions --model llama2-7b --tokenizer "$TOKENRIG_MODELS/llama2-7b-config" \
    --dataset-name random --random-input-len 512 --random-output-len 128 --random-range-ratio 0 --ignore-eos \
    --temperature 0 --extra-body '{"min_tokens": 128}' \
    --max-concurrency "$1" --num-prompts "$2" --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 \
    --save-result --save-detailed --result-dir "$RES/bench" --result-filename "c$1.json" \
    > "$RES/logs/bench-c$1.log" 2>&1
  log "bench c=$1 rc=$?: $(grep -E 'Output token throughput|Median TTFT|P99 TTFT|Median TPOT' "$RES/logs/bench-c$1.log" | tr -s ' ' | tr '\n' ';')"
}

check4() {
  log "check 4: cross-check, tokenrig then vllm bench serve at 1/32/128 streams"
  lt xcheck --scenario "$COMPLETIONS" --users sweep --sweep 1,32,128 --results "$RES/xcheck"
  bench 1 40
  bench 32 480
  bench 128 1024
  log "4: done"
}

check6() {
  log "check 6: Mooncake replay through --url, 45 s"
  lt mooncake --scenario mooncake_replay --duration 45 --warmup 5 --results "$RES/mooncake"
  report_run mooncake "$(newest "$RES/mooncake")"
}

check3() {
  local cap=$(( TOTAL_S - RESERVE_5_S - $(elapsed) ))
  log "check 3: SLO search from 8 req/s, default step lengths, cut after $cap s"
  [ "$cap" -gt 90 ] || { log "3: not started (under 90 s before check 5's reserve)"; return; }
  mkdir -p "$RES/findmax-7b"
  timeout --signal=TERM --kill-after=20 "$cap" $PY -m tokenrig.cli loadtest --url "$URL" --backend vllm --gpu h200 \
    --model 7b --scenario chat --find-max --slo "$SLO" --rate 8 --request-timeout 120 \
    --results "$RES/findmax-7b" > "$RES/logs/lt-findmax-7b.log" 2>&1
  log "3: rc=$? (124 = cut at the cap); $(grep -iE 'max|rate' "$RES/logs/lt-findmax-7b.log" | tail -3 | tr '\n' ';')"
}

check5() {
  stop_7b
  log "check 5: 13B bf16, 64 users, chat, 90 s (tokenrig loadtest starts the server)"
  mkdir -p "$RES/13b-64u"
  cli loadtest --backend vllm --gpu h200 --model 13b --scenario chat --users 64 --duration 90 \
    --results "$RES/13b-64u" > "$RES/logs/lt-13b-64u.log" 2>&1
  log "5: rc=$? $(grep -hE '^(fit|load):' "$RES/logs/lt-13b-64u.log" | tr '\n' ';')"
  log "5: vLLM says: $(grep -rh 'GPU KV cache size\|Maximum concurrency' "$RES/13b-64u" | sed 's/.*INFO//' | tr '\n' ';')"
  report_run 13b "$(newest "$RES/13b-64u")"
}

nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu --format=csv,noheader -l 2 > "$RES/gpu.csv" 2>&1 &
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
 $PY -c "import torch, transformers, vllm, locust, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
  'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'vllm', vllm.__version__, 'locust', locust.__version__)"
) > "$RES/card.txt" 2>&1 &
start_7b || CHECKS=5
for c in $CHECKS; do
  if [ "$(elapsed)" -ge "$TOTAL_S" ]; then log "check $c: not started (time up)"; continue; fi
  "check$c"
done
stop_7b
log "campaign finished"
cat "$RES/card.txt" >> "$RES/progress.log"
touch "$RES/DONE"

#!/usr/bin/env bash
# The GPU follow-up campaign behind docs/results/serve-h200-vllm-followup.md: checks today's issue-17 fixes on
# real vLLM 0.26.0 (synthetic llama2 models, `--load-format dummy`), one H200, TP=1 only (no NVLink multicast).
#
#   1. fresh prompts every run (issue 17 item 1): one 7B server; the same chat load test twice without --seed,
#      then once with run 1's recorded seed; prefix-cache hit rate from the server block of summary.json;
#      one /metrics page captured while run 1's requests are running.
#   2. 13B bf16 at TP 1 with 64 users (issue 17 item 9: the fit planner no longer sizes KV for every user at
#      full context).
#   3. the SLO search on chat with the current search rules (issue 14 leftover), capped by ELAPSED_CAP_S.
#
# Knobs (environment):
#   DUR=60            seconds of load per check-1 run (the brief's 60; lower it when device time is short)
#   EAGER=0           1: start the 7B server with vLLM directly, with tokenrig's own command line plus
#                     --enforce-eager (no torch.compile, no CUDA graphs): a cold start in well under a minute
#                     instead of ~3.5 min; then the check-1 numbers are eager-mode numbers
#   CHECKS="1 2 3"    which checks, in this order (most valuable first)
#   ELAPSED_CAP_S=540 no new check starts after this many seconds of campaign; the search is cut there too
# Each run writes its own directory under $RES as it finishes; progress in $RES/progress.log.
#
# On the host: vLLM's wheels unpacked in /tmp/site (../shared/gpu/stage_vllm.sh), the load generator's wheels
# in /tmp/site2 (.whl), this checkout as the working directory; run detached:
#   setsid nohup bash docs/results/serve_vllm_followup.sh > /tmp/campaign.log 2>&1 < /dev/null &
set -u
RES=${RES:-/tmp/results}
DUR=${DUR:-60}
EAGER=${EAGER:-0}
CHECKS=${CHECKS:-1 2 3}
ELAPSED_CAP_S=${ELAPSED_CAP_S:-540}
mkdir -p "$RES/logs"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  VLLM_CACHE_ROOT=/tmp/vllm-cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache \
  TOKENRIG_MODELS=/tmp/models VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 CUDA_VISIBLE_DEVICES=0
export PYTHONPATH=/tmp/site:/tmp/site2:$PWD
PY=${PY:-python3}
START=$(date +%s)
SLO="ttft_p99=500ms,tpot_p99=50ms"
PORT=8000
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$RES/progress.log"; }
cli() { $PY -m tokenrig.cli "$@"; }
left() { echo $(( ELAPSED_CAP_S - ($(date +%s) - START) )); }

healthy() {  # $1 port, $2 server pid: wait up to 600 s
  for _ in $(seq 1 1200); do
    curl -sf "http://127.0.0.1:$1/health" > /dev/null && return 0
    kill -0 "$2" 2> /dev/null || return 1
    sleep 0.5
  done
  return 1
}

newest() { ls -td "$1"/*/ 2> /dev/null | head -1; }  # the run directory a load test just wrote

report_run() {  # $1 label, $2 run dir: TTFT p50/p99 and the prefix-cache hit rate, from summary.json
  $PY - "$1" "$2" <<'EOF' | tee -a "$RES/progress.log"
import json, sys, pathlib
label, run = sys.argv[1], pathlib.Path(sys.argv[2])
try:
    meta = json.loads((run / "metadata.json").read_text())
    s = json.loads((run / "summary.json").read_text())
except Exception as error:  # noqa: BLE001 - report what is there
    print(f"{label}: no summary ({error})"); sys.exit()
def find(d, *keys):
    for k in keys:
        d = d.get(k, {}) if isinstance(d, dict) else {}
    return d
seed = meta.get("seed")
ttft = (s.get("latency_s") or {}).get("ttft") or {}
ms = lambda k: f"{ttft[k] * 1000:.1f}" if isinstance(ttft.get(k), (int, float)) else "-"
srv = s.get("server") or {}
q = (srv.get("prefix_cache_queries") or {}).get("increase")
h = (srv.get("prefix_cache_hits") or {}).get("increase")
rate = f"{h / q:.3f}" if q else "-"
req = s.get("requests", {})
print(f"{label}: dir={run.name} seed={seed} ({meta.get('seed_source')}) ok={req.get('ok')} failed={req.get('failed')} "
      f"TTFT p50={ms('p50')} ms p99={ms('p99')} ms; prefix cache hits/queries={h}/{q} = {rate}")
EOF
}

seed_of() {  # the seed a run recorded in metadata.json
  $PY - "$1" <<'EOF'
import json, sys, pathlib
m = json.loads((pathlib.Path(sys.argv[1]) / "metadata.json").read_text())
def walk(d):
    if isinstance(d, dict):
        for k, v in d.items():
            if k == "seed" and isinstance(v, int):
                return v
            r = walk(v)
            if r is not None:
                return r
    return None
print(walk(m))
EOF
}

check1() {
  log "check 1: 7B server (EAGER=$EAGER), three chat runs of $DUR s at 16 users"
  local server
  if [ "$EAGER" = 1 ]; then
    # tokenrig's own vLLM command line (printed by --dry-run), plus --enforce-eager
    local cmd
    cmd=$(cli serve --backend vllm --gpu h200 --model 7b --port $PORT --dry-run 2>&1 | sed -n 's/^command: .* serve //p')
    # (the dry run prints `vllm serve ARGS` where vLLM is not installed, `PYTHON -m vllm.entrypoints.cli.main
    # serve ARGS` where it is: the first campaign matched only the first and started vLLM with no model)
    [ -n "$cmd" ] || { log "1: no vLLM command line from the dry run"; return 1; }
    $PY -c "from tokenrig.profiles import resolve_model; from tokenrig.serve.checkpoint import config_dir; \
      print(config_dir(resolve_model('7b')))" >> "$RES/progress.log" 2>&1
    cli serve --backend vllm --gpu h200 --model 7b --port $PORT --dry-run > "$RES/logs/serve-7b-dryrun.log" 2>&1
    log "1: vllm serve $cmd --enforce-eager"
    # shellcheck disable=SC2086
    $PY -m vllm.entrypoints.cli.main serve $cmd --enforce-eager > "$RES/logs/serve-7b.log" 2>&1 &
    server=$!
  else
    $PY -m tokenrig.cli serve --backend vllm --gpu h200 --model 7b --port $PORT > "$RES/logs/serve-7b.log" 2>&1 &
    server=$!
  fi
  if ! healthy $PORT $server; then log "1: 7B server never healthy"; tail -40 "$RES/logs/serve-7b.log" >> "$RES/progress.log"; return 1; fi
  log "1: healthy"
  # the /metrics page while requests run (run 1)
  (for _ in $(seq 1 120); do sleep 1; curl -s "http://127.0.0.1:$PORT/metrics" > "$RES/metrics.tmp"
     grep -q '^vllm:num_requests_running{.*} [1-9]' "$RES/metrics.tmp" && { sleep 3
       curl -s "http://127.0.0.1:$PORT/metrics" > "$RES/vllm-0.26.0-metrics-under-load.txt"; break; }; done
   rm -f "$RES/metrics.tmp") &
  # --backend/--gpu/--model: the run is labelled, and the requests name the served model (without --model they
  # ask for "tiny", and vLLM answers 404)
  local lt="loadtest --url http://127.0.0.1:$PORT --backend vllm --gpu h200 --model 7b --scenario chat --users 16 --duration $DUR"
  mkdir -p "$RES/seed-run1" "$RES/seed-run2" "$RES/seed-run3"
  cli $lt --results "$RES/seed-run1" > "$RES/logs/lt-seed-run1.log" 2>&1; log "1: run 1 rc=$?"
  local r1; r1=$(newest "$RES/seed-run1"); report_run run1 "$r1"
  cli $lt --results "$RES/seed-run2" > "$RES/logs/lt-seed-run2.log" 2>&1; log "1: run 2 rc=$?"
  report_run run2 "$(newest "$RES/seed-run2")"
  local seed; seed=$(seed_of "$r1"); log "1: run 1's seed: $seed"
  cli $lt --seed "$seed" --results "$RES/seed-run3" > "$RES/logs/lt-seed-run3.log" 2>&1; log "1: run 3 (--seed $seed) rc=$?"
  report_run run3 "$(newest "$RES/seed-run3")"
  curl -s "http://127.0.0.1:$PORT/metrics" > "$RES/vllm-0.26.0-metrics-after.txt"
  kill -TERM $server; wait $server
  log "1: done"
}

check2() {
  log "check 2: 13B bf16, 64 users, TP chosen by the planner"
  mkdir -p "$RES/13b-64u"
  cli loadtest --backend vllm --gpu h200 --model 13b --scenario chat --users 64 --duration 90 \
    --results "$RES/13b-64u" > "$RES/logs/lt-13b-64u.log" 2>&1
  log "2: rc=$? $(grep -hE '^(fit|load|served|command):' "$RES/logs/lt-13b-64u.log" | tr '\n' ';')"
  report_run 13b "$(newest "$RES/13b-64u")"
}

check3() {
  local cap; cap=$(left)
  log "check 3: SLO search, $cap s left of the cap"
  [ "$cap" -gt 120 ] || { log "3: not started (under 120 s left)"; return; }
  mkdir -p "$RES/findmax-7b"
  timeout --signal=TERM --kill-after=20 "$cap" $PY -m tokenrig.cli loadtest --backend vllm --gpu h200 --model 7b \
    --scenario chat --find-max --slo "$SLO" --rate 4 --results "$RES/findmax-7b" > "$RES/logs/lt-findmax-7b.log" 2>&1
  log "3: rc=$? (124 = cut by the cap)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RES/card.txt" 2>&1
$PY -c "import torch, transformers, vllm, locust, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
  'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'vllm', vllm.__version__, 'locust', locust.__version__)" \
  >> "$RES/card.txt" 2>&1
cat "$RES/card.txt" >> "$RES/progress.log"
nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu --format=csv,noheader -l 2 > "$RES/gpu.csv" 2>&1 &
for c in $CHECKS; do
  if [ "$(left)" -le 0 ]; then log "check $c: not started (cap reached)"; continue; fi
  "check$c"
done
log "campaign finished"
touch "$RES/DONE"

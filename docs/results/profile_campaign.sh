#!/usr/bin/env bash
# The operator breakdowns behind docs/results/serve-breakdown-h100-h200.md: vLLM 0.26.0 (bf16, FP8, AWQ) at 1, 32
# and 128 streams and the hf engine at 1, 8 and 32, each step traced for PROFILE_STEPS engine steps by the engine's
# own profiler (`tokenrig loadtest --profile-steps`), on the fixed 512-in / 128-out chat load. TP 1: no multicast.
#
#   GPU=h100-sxm TOTAL_S=600 bash docs/results/profile_campaign.sh
#
# Each configuration is one `tokenrig loadtest --users sweep --sweep ...` that launches and stops its own server; a
# configuration gets what is left of TOTAL_S. Every step's summary.json carries its breakdown; every trace is also
# slimmed (scripts/trim_trace.py: only the fields the breakdown reads) into $RES/slim/, so the breakdowns can be
# classified again without the GPU, and the first 1-stream vLLM bf16 trace is cut to 8 engine steps into
# $RES/fixture-trace.json.gz, the CPU tests' fixture.
# Progress in $RES/progress.log; DONE at the end.
#
# On the host, after the staging of capacity_campaign.sh (vLLM in /tmp/site, wheels in /tmp/site2), from a fresh
# copy of the checkout (a device call's working directory), detached:
#   rm -rf /tmp/tr2 && mkdir -p /tmp/tr2 && tar cf - --exclude=.stage --exclude=.whl --exclude=.git . | tar xf - -C /tmp/tr2
#   cd /tmp/tr2 && (RES=/tmp/results2 TOTAL_S=600 setsid nohup bash docs/results/profile_campaign.sh \
#       > /tmp/campaign2.log 2>&1 < /dev/null & echo $! > /tmp/campaign.pid)
#   RES=/tmp/results2 bash /tmp/tr2/docs/results/collect_campaign.sh 560      # then again until DONE
set -u
RES=${RES:-/tmp/results2}
GPU=${GPU:-h100-sxm}
TOTAL_S=${TOTAL_S:-600}
PROFILE_STEPS=${PROFILE_STEPS:-48}
CONFIGS=${CONFIGS:-vllm-bf16 vllm-fp8 hf-bf16 vllm-awq}
VLLM_SWEEP=${VLLM_SWEEP:-1,32,128}  # the streams of each vLLM configuration's steps
DURATION=${DURATION:-20}  # seconds of each step, WARMUP of them before the profile is asked for
WARMUP=${WARMUP:-5}
LIMITS="--concurrency 128 --max-model-len 2048 --max-num-seqs 256"
source "$(dirname "$0")/campaign_common.sh"
FIXED=$PWD/docs/results/serve-fixed-512x128.yaml

config_args() {  # configuration -> backend, weight format, stream counts
  case $1 in
    vllm-bf16) echo "--backend vllm --quant bf16 --sweep $VLLM_SWEEP $LIMITS" ;;
    vllm-fp8) echo "--backend vllm --quant fp8 --sweep $VLLM_SWEEP $LIMITS" ;;
    vllm-awq) echo "--backend vllm --quant awq --sweep $VLLM_SWEEP $LIMITS" ;;
    hf-bf16) echo "--backend hf --quant bf16 --sweep 1,8,32 --max-model-len 2048" ;;
    *) return 1 ;;
  esac
}

describe_card

for config in $CONFIGS; do
  args=$(config_args "$config") || { log "$config: unknown configuration"; continue; }
  cap=$(left)
  [ "$cap" -gt 120 ] || { log "$config: not started ($cap s left)"; continue; }
  log "$config: tokenrig loadtest --gpu $GPU --model 7b $args --users sweep --profile-steps $PROFILE_STEPS (cap $cap s)"
  mkdir -p "$RES/$config"
  timeout --signal=TERM --kill-after=60 "$cap" $PY -m tokenrig.cli loadtest --gpu "$GPU" --model 7b $args \
    --scenario "$FIXED" --users sweep --duration "$DURATION" --warmup "$WARMUP" --profile-steps "$PROFILE_STEPS" \
    --request-timeout 120 --results "$RES/$config" > "$RES/logs/$config.log" 2>&1
  log "$config: rc=$? (124 = cut at the cap)"
  grep -E "^operator breakdown|^  GEMM|^  attention|^  GPU idle|^  steps by kind|^profile:" "$RES/logs/$config.log" \
    | head -40 >> "$RES/progress.log"
  mkdir -p "$RES/slim"
  for trace in "$RES/$config"/*/traces/*.pt.trace.json.gz; do
    [ -f "$trace" ] && $PY scripts/trim_trace.py "$trace" "$RES/slim/$config-$(basename "$trace" .pt.trace.json.gz).json.gz" \
      --steps $(( PROFILE_STEPS - 1 )) >> "$RES/progress.log" 2>&1
  done
  if [ "$config" = vllm-bf16 ] && [ ! -f "$RES/fixture-trace.json.gz" ]; then
    first=$(ls -t "$RES"/vllm-bf16/*/traces/*.pt.trace.json.gz 2> /dev/null | tail -1)
    [ -n "$first" ] && $PY scripts/trim_trace.py "$first" "$RES/fixture-trace.json.gz" --steps 8 >> "$RES/progress.log" 2>&1
  fi
  wait_gpu_free
done
finish

#!/usr/bin/env bash
# The SLO searches behind docs/results/capacity-holdout.json: vLLM 0.26.0 on one GPU (TP 1, so no NVLink multicast),
# synthetic llama2 models with `--load-format dummy`, each search started by `tokenrig loadtest`, which launches
# and stops its own server. Default step lengths (1,000 requests a step), the chat SLO of the capacity docs.
#
#   GPU=h100-sxm JOBS="7b-bf16 7b-fp8 13b-bf16" TOTAL_S=1000 bash docs/results/capacity_campaign.sh
#
# Each job is one `--find-max` search into $RES/findmax-<job>; a job gets what is left of TOTAL_S (a search cut at
# its cap is stopped with SIGTERM and keeps the steps it finished). Progress in $RES/progress.log; DONE at the end.
#
# On the host: vLLM's installed tree in /tmp/site and the load generator's wheels in /tmp/site2
# (scripts/stage_vllm.sh), this checkout as the working directory; run it detached:
#   setsid nohup bash docs/results/capacity_campaign.sh > /tmp/campaign.log 2>&1 < /dev/null &
set -u
RES=${RES:-/tmp/results}
GPU=${GPU:-h100-sxm}
BACKEND=${BACKEND:-vllm}  # sim: the same searches against the simulated engine, to try the script without a GPU
TOTAL_S=${TOTAL_S:-1000}
JOBS=${JOBS:-7b-bf16 7b-fp8 13b-bf16 7b-awq 7b-bf16-code}
SLO=${SLO:-ttft_p99=500ms,tpot_p99=50ms}
LIMITS=${LIMITS-"--concurrency 64 --max-model-len 2048 --max-num-seqs 256"}  # as the H200 searches' server
source "$(dirname "$0")/campaign_common.sh"

RATE_SCALE=${RATE_SCALE:-1}  # first rates are set for an H100; an H200 serves ~1.3x (7B bf16 chat: 18.1 vs 14.1)

# job name -> model, weight format, scenario, first rate (near the expected knee, so the search brackets it soon)
job_args() {
  local args rate
  case $1 in
    7b-bf16) args="--model 7b --quant bf16 --scenario chat"; rate=12 ;;
    7b-fp8) args="--model 7b --quant fp8 --scenario chat"; rate=14 ;;
    7b-awq) args="--model 7b --quant awq --scenario chat"; rate=10 ;;
    13b-bf16) args="--model 13b --quant bf16 --scenario chat"; rate=8 ;;
    7b-bf16-code) args="--model 7b --quant bf16 --scenario code_completion"; rate=12 ;;
    *) return 1 ;;
  esac
  echo "$args --rate $(awk "BEGIN { printf \"%.1f\", $rate * $RATE_SCALE }")"
}

describe_card

for job in $JOBS; do
  args=$(job_args "$job") || { log "$job: unknown job"; continue; }
  cap=$(left)
  [ "$cap" -gt 150 ] || { log "$job: not started ($cap s left)"; continue; }
  log "$job: tokenrig loadtest --backend $BACKEND --gpu $GPU $args $LIMITS --find-max --slo $SLO (cap $cap s)"
  mkdir -p "$RES/findmax-$job"
  timeout --signal=TERM --kill-after=60 "$cap" $PY -m tokenrig.cli loadtest --backend "$BACKEND" --gpu "$GPU" $args $LIMITS \
    --find-max --slo "$SLO" --request-timeout 120 --results "$RES/findmax-$job" > "$RES/logs/$job.log" 2>&1
  log "$job: rc=$? (124 = cut at the cap); $(grep -E 'max rate|no rate|bracket' "$RES/logs/$job.log" | tail -2 | tr '\n' ';')"
  wait_gpu_free
done
finish

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
mkdir -p "$RES/logs"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  VLLM_CACHE_ROOT=/tmp/vllm-cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache \
  TOKENRIG_MODELS=/tmp/models VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 CUDA_VISIBLE_DEVICES=0
export PYTHONPATH=/tmp/site:/tmp/site2:$PWD
PY=${PY:-python3}
START=$(date +%s)
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$RES/progress.log"; }

# job name -> model, weight format, scenario, first rate (near the expected knee, so the search brackets it soon)
job_args() {
  case $1 in
    7b-bf16) echo "--model 7b --quant bf16 --scenario chat --rate 12" ;;
    7b-fp8) echo "--model 7b --quant fp8 --scenario chat --rate 14" ;;
    7b-awq) echo "--model 7b --quant awq --scenario chat --rate 10" ;;
    13b-bf16) echo "--model 13b --quant bf16 --scenario chat --rate 8" ;;
    7b-bf16-code) echo "--model 7b --quant bf16 --scenario code_completion --rate 12" ;;
    *) return 1 ;;
  esac
}

nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu,clocks.sm --format=csv,noheader -l 2 > "$RES/gpu.csv" 2>&1 &
SMI=$!
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers, vllm, locust, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'vllm', vllm.__version__, 'locust', locust.__version__)"
} > "$RES/card.txt" 2>&1
log "card: $(tr '\n' ' ' < "$RES/card.txt")"

for job in $JOBS; do
  args=$(job_args "$job") || { log "$job: unknown job"; continue; }
  cap=$(( TOTAL_S - ($(date +%s) - START) ))
  [ "$cap" -gt 150 ] || { log "$job: not started ($cap s left)"; continue; }
  log "$job: tokenrig loadtest --backend $BACKEND --gpu $GPU $args $LIMITS --find-max --slo $SLO (cap $cap s)"
  mkdir -p "$RES/findmax-$job"
  timeout --signal=TERM --kill-after=60 "$cap" $PY -m tokenrig.cli loadtest --backend "$BACKEND" --gpu "$GPU" $args $LIMITS \
    --find-max --slo "$SLO" --request-timeout 120 --results "$RES/findmax-$job" > "$RES/logs/$job.log" 2>&1
  log "$job: rc=$? (124 = cut at the cap); $(grep -E 'max rate|no rate|bracket' "$RES/logs/$job.log" | tail -2 | tr '\n' ';')"
  for _ in $(seq 1 60); do  # until the engine process has given the GPU back
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    [ "${used:-0}" -lt 2000 ] && break; sleep 1
  done
done
kill "$SMI" 2> /dev/null
log "campaign done"
touch "$RES/DONE"

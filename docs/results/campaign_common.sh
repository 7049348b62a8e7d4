# Sourced by the GPU campaign scripts beside it (capacity_campaign.sh, profile_campaign.sh): the environment of an
# offline GPU host (vLLM's tree in /tmp/site, the load generator's wheels in /tmp/site2, caches in /tmp, NVLink
# multicast off), the progress log, the card's description, and waiting until a stopped engine gave the GPU back.
# Expects RES (the results folder).
mkdir -p "$RES/logs"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  VLLM_CACHE_ROOT=/tmp/vllm-cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache \
  TOKENRIG_MODELS=/tmp/models VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 CUDA_VISIBLE_DEVICES=0 \
  VLLM_RPC_TIMEOUT=600000
export PYTHONPATH=/tmp/site:/tmp/site2:$PWD
PY=${PY:-python3}
START=$(date +%s)
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$RES/progress.log"; }
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }  # seconds of the campaign's budget left

describe_card() {  # the card, driver and software versions -> $RES/card.txt and the log; GPU samples -> gpu.csv
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu,clocks.sm --format=csv,noheader -l 2 \
    > "$RES/gpu.csv" 2>&1 &
  SMI=$!
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, transformers, vllm, locust, sys; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'vllm', vllm.__version__,
'locust', locust.__version__)"
  } > "$RES/card.txt" 2>&1
  log "card: $(tr '\n' ' ' < "$RES/card.txt")"
}

wait_gpu_free() {  # until a stopped engine's processes have given the GPU's memory back (at most 60 s)
  for _ in $(seq 1 60); do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    [ "${used:-0}" -lt 2000 ] && return; sleep 1
  done
}

finish() {
  kill "$SMI" 2> /dev/null
  log "campaign done"
  touch "$RES/DONE"
}

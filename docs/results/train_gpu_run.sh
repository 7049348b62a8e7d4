#!/usr/bin/env bash
# The 8-GPU training matrix (tokenrig/scenarios/matrix/eight-gpu.yaml) on the GPUs this host has, under one time
# budget, most important first: Llama-2 7B pre-training with ZeRO-2/3 on 1, 2, 4 (and 8) GPUs, then 13B on 2,
# 4 (and 8), then Llama-2 70B LoRA with ZeRO-3 across all the GPUs. Behind docs/results/train-h200x4-2026-11-28.md
# (4 H200s); on an 8-GPU host the same script runs the whole matrix: make train-gpu-run
#
#   NGPU      GPUs to use (default: every GPU torch sees; 4 or more)
#   BUDGET_S  seconds for all runs (default 3600): a run starts only if its minimum is left, and is stopped
#             like a Ctrl-C (measured steps kept, status `interrupted`) when the budget ends
#   P1_S      seconds the first phase (1- and 2-GPU runs, side by side) may take (default 1200)
#   RES, OUT  run directories / results.tgz, comparison.md, card.txt, gpu.csv, not-run.txt
#   WHEELS    folder of wheels to install first (the device machine lacks deepspeed, pydantic, hjson)
#   EXTRA     overrides for every run, e.g. the CPU rehearsal below
#
# Phase 1 runs the 1- and 2-GPU points side by side, each on its own GPUs and its own CPU cores (taskset),
# because every one of them fits in one slot of the 4-GPU phase's time; everything on 4 GPUs or more runs
# alone. 13B on 1 GPU is not run: full training state alone is 16 bytes/parameter x 13.0e9 = 208 GB > 150.8 GB
# (an H200's 143,771 MiB); nor 13B ZeRO-2 on 2 GPUs (below). Other cards: check the fit the same way first.
# Rehearse on CPU (gloo ranks, tiny model):
#   NGPU=4 EXTRA="--gpu cpu --model tiny --seq-len 128" OUT=/tmp/o RES=/tmp/r bash docs/results/train_gpu_run.sh
set -u
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-3600} P1_S=${P1_S:-1200}
RES=${RES:-/tmp/results} OUT=${OUT:-results/gpu-run} EXTRA=${EXTRA:-}
MATRIX=${MATRIX:-eight-gpu}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
START=$SECONDS
DEADLINE=$((START + BUDGET_S))
mkdir -p "$RES" "$OUT"
# shellcheck source=train_setup.sh
. "$(dirname "$0")/train_setup.sh"
NGPU=${NGPU:-$($PY -c "import torch; print(torch.cuda.device_count())")}
if [ "$NGPU" -lt 4 ]; then echo "needs 4 or more GPUs (NGPU=$NGPU); for 1-2 GPUs: tokenrig train --matrix scaling-7b"; exit 2; fi

{ date -u +"%F %T UTC"; nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm --format=csv
  nvidia-smi topo -m; echo "cpus $(nproc)"; free -g | head -2
  $PY -c "import sys, torch, transformers, deepspeed, peft; print('python', sys.version.split()[0], 'torch', torch.__version__,
  'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None,
  'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'peft', peft.__version__)" 2> /dev/null
} > "$OUT/card.txt" 2>&1
cat "$OUT/card.txt"
# GPU memory, utilisation, power and clock once a second (on CPU a stand-in, so a rehearsal has the same processes)
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu,power.draw,clocks.sm --format=csv,noheader -l 1 \
    > "$OUT/gpu.csv" 2> /dev/null &
else
  while sleep 1; do :; done &
fi
SMI=$!

# run numbers in the matrix, looked up by (model, mode, zero, gpus) so the script follows the YAML
run_number() {
  $PY -c "import sys
from tokenrig.train.matrix import expand, load_matrix
m, mode, z, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
print(*[i for i, s in enumerate(expand(load_matrix('$MATRIX')), 1)
        if s.model_profile.key == m and s.mode == mode and s.zero == z and s.gpus == n])" "$@"
}

save() {  # results so far to $OUT (a run may end while another is writing: one at a time)
  (
    flock 9
    tar czf "$OUT/.results.tgz" -C "$RES" . 2> /dev/null && mv "$OUT/.results.tgz" "$OUT/results.tgz"
    $PY -m tokenrig.cli train --compare "$RES" --results "$OUT" > /dev/null 2>&1
  ) 9> "$RES/.save.lock"
}

# one matrix point: NAME DEVICES CPUS END MIN_S MODEL MODE ZERO GPUS [overrides...]
point() {
  local name=$1 devices=$2 cpus=$3 end=$4 min=$5 model=$6 mode=$7 zero=$8 gpus=$9
  shift 9
  local left=$((end - SECONDS)) number
  number=$(run_number "$model" "$mode" "$zero" "$gpus")
  if [ -z "$number" ]; then echo "$(date +%T) NO RUN $name in $MATRIX.yaml"; return; fi
  if [ "$left" -lt "$min" ]; then
    echo "$(date +%T) NOT RUN $name: ${left}s left, needs ${min}s" | tee -a "$OUT/not-run.txt"
    return
  fi
  local pin=()
  [ -n "$cpus" ] && pin=(taskset -c "$cpus")
  echo "$(date +%T) START $name: GPUs $devices${cpus:+, CPUs $cpus}, stopped after $((left - 10)) s:" \
       "tokenrig train --matrix $MATRIX --runs $number $* $EXTRA"
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=$devices timeout -s INT -k 100 $((left - 10)) "${pin[@]}" \
    $PY -m tokenrig.cli train --matrix "$MATRIX" --runs "$number" "$@" $EXTRA --results "$RES/$name" \
    > "$RES/$name.log" 2>&1
  local rc=$?
  echo "$(date +%T) END $name (exit $rc): $(grep -E ': (ok|oom|error|interrupted)$' "$RES/$name.log" | tail -1)"
  grep -E "^  (step time|tokens/s|MFU|GPU memory|breakdown) " "$RES/$name.log" | sed 's/^/    /'
  grep -A3 "did not finish" "$RES/$name.log" | tail -2
  save
}

# CPU sets for the side-by-side phase: a quarter of the cores for each 1-GPU run, half for each 2-GPU run
CORES=$(nproc) Q=$(($(nproc) / 4))
cpus() { command -v taskset > /dev/null && [ "$Q" -ge 2 ] && echo "$(($1 * Q))-$(($2 * Q - 1))"; }
P1_END=$((START + P1_S < DEADLINE ? START + P1_S : DEADLINE))

echo "$(date +%T) phase 1: 1- and 2-GPU points side by side ($CORES CPUs)"
(
  point 7b-z2-1gpu 0 "$(cpus 0 1)" "$DEADLINE" 60 llama2-7b pretrain 2 1 &
  point 7b-z3-1gpu 1 "$(cpus 1 2)" "$DEADLINE" 60 llama2-7b pretrain 3 1 &
  wait
  point 13b-z3-2gpu 0,1 "$(cpus 0 2)" "$P1_END" 90 llama2-13b pretrain 3 2
) &
QUEUE_A=$!
(
  point 7b-z2-2gpu 2,3 "$(cpus 2 4)" "$DEADLINE" 60 llama2-7b pretrain 2 2
  point 7b-z3-2gpu 2,3 "$(cpus 2 4)" "$DEADLINE" 60 llama2-7b pretrain 3 2
  # not 13B ZeRO-2 on 2 GPUs: the 7B runs' peaks (138.1, 75.4, 45.0 GiB on 1, 2, 4 GPUs) fit
  # 12.7 GiB + 125.4 GiB / GPUs; scaled by parameters (x 1.93) that is 24.5 + 242 / 2 = 145.6 GiB > 140.4 GiB
) &
QUEUE_B=$!
wait "$QUEUE_A" "$QUEUE_B"  # these two only: a bare `wait` would wait for the sampler above, i.e. forever

echo "$(date +%T) phase 2: 4 GPUs and more, one run at a time"
# 7B at every size before any 13B; 13B tries ZeRO-3 first (ZeRO-2 is the tighter fit)
for model in "7b 60 2 3" "13b 90 3 2"; do
  read -r size budget first second <<< "$model"
  for n in 4 8; do
    [ "$n" -le "$NGPU" ] || continue
    all=$(seq -s, 0 $((n - 1)))
    for zero in "$first" "$second"; do
      point "$size-z$zero-${n}gpu" "$all" "" "$DEADLINE" "$budget" "llama2-$size" pretrain "$zero" "$n"
    done
  done
done
# 70B LoRA across every GPU (the matrix asks for 8; fewer here is an override of gpus only)
all=$(seq -s, 0 $((NGPU - 1)))
point 70b-lora-z3-${NGPU}gpu "$all" "" "$DEADLINE" 180 llama2-70b lora 3 8 --gpus "$NGPU"

kill "$SMI" 2> /dev/null
save
echo "$(date +%T) done in $((SECONDS - START)) s"
cat "$OUT/comparison.md" 2> /dev/null
[ -f "$OUT/not-run.txt" ] && { echo "not run for lack of time:"; cat "$OUT/not-run.txt"; }
exit 0

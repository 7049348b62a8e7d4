#!/usr/bin/env bash
# The MFU ladder of Llama-2 7B pre-training (seq 2048) on ONE GPU, then the study-7b matrix points that fit the
# card, under one time budget. Each rung is its own `tokenrig train` run with its own results directory:
#   base       ZeRO-2, b1x2048, 8-step accumulation, SDPA (auto), torch's fused AdamW: the best measured so far
#   sdpa-*     + one SDPA kernel (--sdpa-backend cudnn, then flash)
#   compile    + torch.compile of each decoder block (--compile)
#   liger      + Liger-Kernel's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy (--liger)
#   optimizer  + DeepSpeed's FusedAdam instead of torch's fused AdamW (--optimizer deepspeed-fused)
#   sync       + no wait for the GPU inside the measured steps (--sync-every 7: CUDA events time each step)
#   bMxA       + other micro-batch x accumulation (BATCHES), each checked against the memory planner first
# A rung's flag is kept for the rungs after it only if that run finished `ok` and trained more tokens/s than the
# best kept so far; a flag this host cannot run is refused by tokenrig in one line (exit 2) and logged as such.
# The ladder and each matrix point run only if `tokenrig train --fit` says they fit the card (7B pre-training
# without offload does not fit 80 GB: on an H100 the ladder is skipped and the matrix keeps LoRA, QLoRA, offload).
#
#   GPU       GPU profile (default: from nvidia-smi's name, h200 or h100-sxm; cpu without nvidia-smi)
#   BUDGET_S  seconds for all runs (default 1500): a run starts only if MIN_S (default 150) are left, and is
#             stopped like a Ctrl-C (measured steps kept, status `interrupted`) when the budget ends
#   BATCHES   micro-batch x accumulation candidates of the last rung (default "2x8 1x16 2x16")
#   MATRIX    the matrix whose fitting points follow the ladder (default study-7b; MATRIX= for none)
#   RES, OUT  run directories / results.tgz, comparison.md, card.txt, gpu.csv, ladder.txt, not-run.txt
#   WHEELS    folder of wheels to install first (docs/results/train_wheels.sh downloads them; the device image
#             lacks deepspeed, pydantic, hjson, liger-kernel)
#   EXTRA     overrides for every run, e.g. the CPU rehearsal below
# Ctrl-C or SIGTERM stops the run in progress the way Ctrl-C stops `tokenrig train` (its measured steps kept),
# starts nothing more, and still writes the comparison and results.tgz.
# Rehearse on CPU (tiny model, one step after one warm-up, no accumulation, so every run takes seconds):
#   EXTRA="--gpu cpu --model tiny --seq-len 128 --warmup-steps 1 --steps 1 --profile-steps 0 --grad-accum 1" \
#     MIN_S=5 OUT=/tmp/o RES=/tmp/r bash docs/results/train_mfu_campaign.sh
set -u
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-1500} MIN_S=${MIN_S:-150}
RES=${RES:-/tmp/results} OUT=${OUT:-results/mfu-campaign} EXTRA=${EXTRA:-}
MATRIX=${MATRIX-study-7b} BATCHES=${BATCHES:-2x8 1x16 2x16}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache \
  TRITON_CACHE_DIR=/tmp/triton-cache
START=$SECONDS
DEADLINE=$((START + BUDGET_S))
mkdir -p "$RES" "$OUT"
log() { echo "$(date +%T) +$((SECONDS - START))s $*" | tee -a "$OUT/progress.log"; }
# shellcheck source=train_setup.sh
. "$(dirname "$0")/train_setup.sh"
if [ -z "${GPU:-}" ]; then
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1)" in
    *H200*) GPU=h200 ;; *H100*) GPU=h100-sxm ;; "") GPU=cpu ;;
    *) echo "unknown GPU: set GPU to a profile of tokenrig gpus"; exit 2 ;;
  esac
fi

{ date -u +"%F %T UTC"; nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm --format=csv
  echo "cpus $(nproc)"; free -g | head -2
  $PY -c "import sys, importlib.metadata as m
print('python', sys.version.split()[0], *(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'deepspeed',
      'peft', 'triton', 'liger-kernel') if __import__('importlib.util').util.find_spec(p.replace('-', '_'))))"
} > "$OUT/card.txt" 2>&1
log "card: $(tr '\n' ' ' < "$OUT/card.txt")"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu,power.draw,clocks.sm --format=csv,noheader -l 1 \
    > "$OUT/gpu.csv" 2> /dev/null &
else
  while sleep 1; do :; done &  # a stand-in, so a rehearsal has the same processes
fi
SMI=$!

STOP=0 RUN_PID=
# the run in progress is in timeout's process group, out of reach of the terminal's Ctrl-C: pass it on once
trap 'STOP=1; [ -n "$RUN_PID" ] && kill -INT "$RUN_PID" 2> /dev/null' INT TERM

save() {  # results so far to $OUT
  tar czf "$OUT/.results.tgz" -C "$RES" . 2> /dev/null && mv "$OUT/.results.tgz" "$OUT/results.tgz"
  $PY -m tokenrig.cli train --compare "$RES" --results "$OUT" > /dev/null 2>&1
}

fits() {  # does this run fit the card, as the memory planner says
  $PY -m tokenrig.cli train "$@" --gpu "$GPU" $EXTRA --fit 2> /dev/null | head -1 | grep -q ": fits ("
}

tokens_per_s() {  # of a finished run directory tree: its tokens/s if it ended ok, else 0
  $PY -c "import json, pathlib, sys
runs = [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).rglob('summary.json')]
print(next((r['tokens_per_s'] for r in runs if r.get('status') == 'ok' and r.get('tokens_per_s')), 0))" "$1"
}

RC=0
run() {  # NAME FLAGS...: one `tokenrig train` into $RES/NAME, stopped like Ctrl-C when the budget ends; 1 if not run
  local name=$1 left=$((DEADLINE - SECONDS))
  shift
  if [ "$STOP" = 1 ]; then return 1; fi
  if [ "$left" -lt "$MIN_S" ]; then
    log "NOT RUN $name: ${left}s left, needs ${MIN_S}s" | tee -a "$OUT/not-run.txt"; return 1
  fi
  log "START $name: tokenrig train $* $EXTRA (stopped after $((left - 10)) s)"
  # shellcheck disable=SC2086
  timeout -s INT -k 100 $((left - 10)) $PY -m tokenrig.cli train "$@" $EXTRA --results "$RES/$name" \
    > "$RES/$name.log" 2>&1 &
  RUN_PID=$!
  wait "$RUN_PID"; RC=$?
  while kill -0 "$RUN_PID" 2> /dev/null; do wait "$RUN_PID"; RC=$?; done  # a trapped signal ends `wait` early
  RUN_PID=
  log "END $name (exit $RC): $(grep -E ': (ok|oom|error|interrupted)$' "$RES/$name.log" | tail -1)"
  [ "$RC" = 2 ] && log "  REFUSED: $(grep 'tokenrig: error' "$RES/$name.log" | tail -1)"
  grep -E "^  (step time|tokens/s|MFU|GPU memory|cost|breakdown) " "$RES/$name.log" | sed 's/^/    /'
  save
}

# the ladder: each rung adds its flags to the best kept so far
BASE=(--model llama2-7b --mode pretrain --zero 2 --micro-batch 1 --seq-len 2048 --grad-accum 8 --attention sdpa
      --warmup-steps 2 --steps 5 --profile-steps 1)
KEPT=() BEST=0 BATCH=()
rung() {  # NAME FLAGS...: returns 0 if the rung beat the best so far
  local name=$1 got
  shift
  run "$name" --gpu "$GPU" "${BASE[@]}" "${KEPT[@]}" "${BATCH[@]}" "$@" || return 1
  got=$(tokens_per_s "$RES/$name")
  if awk "BEGIN {exit !($got > $BEST)}"; then
    echo "$name: $got tok/s, kept: ${KEPT[*]} ${BATCH[*]} $*" >> "$OUT/ladder.txt"
    BEST=$got
    return 0
  fi
  echo "$name: $got tok/s (exit $RC), not kept (best $BEST): $*" >> "$OUT/ladder.txt"
  return 1
}

if fits "${BASE[@]}"; then
  log "ladder: 7B pre-training on one $GPU"
  rung base
  for backend in cudnn flash; do
    if rung "sdpa-$backend" --sdpa-backend "$backend"; then KEPT+=(--sdpa-backend "$backend"); break; fi
  done
  for step in "compile --compile" "liger --liger" "optimizer --optimizer deepspeed-fused" "sync --sync-every 7"; do
    read -r name flags <<< "$step"
    # shellcheck disable=SC2086
    rung "$name" $flags && KEPT+=($flags)
  done
  for shape in $BATCHES; do
    micro=${shape%x*} accumulation=${shape#*x}
    candidate=(--micro-batch "$micro" --grad-accum "$accumulation")
    if ! fits "${BASE[@]}" "${KEPT[@]}" "${candidate[@]}"; then
      log "NOT RUN b$shape: the planner says it does not fit" | tee -a "$OUT/not-run.txt"; continue
    fi
    rung "b$shape" "${candidate[@]}" && BATCH=("${candidate[@]}")
  done
  log "ladder best: $BEST tok/s with ${KEPT[*]} ${BATCH[*]}"
else
  log "NOT RUN ladder: 7B pre-training without offload does not fit one $GPU, as the planner says:" \
    | tee -a "$OUT/not-run.txt"
  $PY -m tokenrig.cli train --gpu "$GPU" "${BASE[@]}" $EXTRA --fit | tee -a "$OUT/not-run.txt"
fi

if [ -n "$MATRIX" ] && [ "$STOP" = 0 ]; then
  numbers=$($PY -m tokenrig.cli train --matrix "$MATRIX" --gpu "$GPU" $EXTRA --fit | grep -E '^[0-9]+: .*: fits \(' \
            | cut -d: -f1 | tr '\n' ' ')
  log "matrix $MATRIX on $GPU: runs that fit: ${numbers:-none}"
  for number in $numbers; do
    run "matrix-$number" --matrix "$MATRIX" --runs "$number" --gpu "$GPU"
  done
fi

kill "$SMI" 2> /dev/null
save
log "done in $((SECONDS - START)) s"
cat "$OUT/ladder.txt" 2> /dev/null
cat "$OUT/comparison.md" 2> /dev/null
[ -f "$OUT/not-run.txt" ] && { echo "not run:"; cat "$OUT/not-run.txt"; }
[ "$STOP" = 1 ] && exit 130
exit 0

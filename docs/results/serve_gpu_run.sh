#!/usr/bin/env bash
# The GPU run behind docs/results/serve-h200-hf.md, as sent to the device machine (one H200):
# synthetic llama2-7b on tokenrig's hf backend, attention sdpa vs eager, then GPTQ 4-bit; for each a
# load test at 1, 8, 32 concurrent streams and a Poisson rate at 90% of the 32-stream request rate.
# Run from a directory holding tokenrig/ and this file's scenario; wheels in $WHEELS; results to $OUT.
# Rehearse the same flow on CPU first (no device time): GPU=cpu MODEL=tiny DURATION=4 WHEELS= OUT=/tmp/o bash ...
set -u
GPU=${GPU:-h200} MODEL=${MODEL:-llama2-7b} DURATION=${DURATION:-14} RES=${RES:-/tmp/results}
export PYTHONUNBUFFERED=1 TOKENRIG_MODELS=${TOKENRIG_MODELS:-/tmp/models} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
  # gptqmodel's regex engine is a C extension built from its sdist there: built while the bf16 checkpoint is written
  (timeout 240 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
    "$WHEELS"/sdist/pypcre-0.6.4.tar.gz > "$OUT/pypcre-build.log" 2>&1 || echo "pypcre (gptqmodel's regex) did not build") &
  PYPCRE=$!
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
# everything the load generator imports, before any device time goes to checkpoints and servers
$PY -c "import tokenrig.loadgen.runner, tokenrig.cli" || { echo "load generator does not import: stop"; exit 3; }
SCENARIO=$PWD/serve-fixed-512x128.yaml
mkdir -p "$RES"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv 2>&1 | tee "$OUT/card.txt"
$PY -c "import torch, transformers, locust, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
  'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'locust', locust.__version__)" | tee -a "$OUT/card.txt"
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 1 > "$OUT/gpu.csv" 2>&1 &
SMI=$!
cli() { $PY -m tokenrig.cli "$@"; }
time cli model make "$MODEL"
[ -n "${PYPCRE:-}" ] && wait "$PYPCRE"
# GPTQ only where gptqmodel imports (7.7 declares torch>=2.14.1; its torch kernels are what can run here)
if $PY -c "import gptqmodel, optimum" 2> "$OUT/gptqmodel-import.log"; then GPTQ=1; time cli model make "$MODEL" --quant gptq
else GPTQ=0; echo "gptqmodel does not import: no GPTQ configuration"; tail -3 "$OUT/gptqmodel-import.log"; fi

run_config() {  # $1 = label, rest = server flags
  local label=$1; shift
  if curl -sf http://127.0.0.1:8000/health > /dev/null; then echo "port 8000 already served: stop"; exit 4; fi
  echo "=== $label: $(date +%T) tokenrig serve --backend hf --gpu $GPU --model $MODEL $LIMITS $*"
  # python itself in the background (not a shell function), so $! is the process that SIGTERM must reach
  $PY -m tokenrig.cli serve --backend hf --gpu "$GPU" --model "$MODEL" $LIMITS --port 8000 "$@" \
    > "$RES/serve-$label.log" 2>&1 &
  local server=$!
  for _ in $(seq 1 240); do
    curl -sf http://127.0.0.1:8000/health > /dev/null && break
    kill -0 $server 2> /dev/null || { echo "server for $label exited"; tail -20 "$RES/serve-$label.log"; return 1; }
    sleep 0.5
  done
  grep -h "hf engine ready" "$RES/serve-$label.log" results/serve/*.log 2> /dev/null | tail -1
  local common=(loadtest --url http://127.0.0.1:8000 --backend hf --gpu "$GPU" --model "$MODEL" "$@"
                --scenario "$SCENARIO" --results "$RES/$label" --duration "$DURATION" --warmup 3)
  for users in 1 8 32; do
    echo "--- $label users=$users $(date +%T)"; nvidia-smi --query-gpu=memory.used --format=csv,noheader 2> /dev/null
    cli "${common[@]}" --users $users 2>&1 | tail -12
  done
  local rps
  rps=$($PY -c "import json,glob; s=json.load(open(sorted(glob.glob('$RES/$label/*/summary.json'))[-1]));
print(round(0.9 * s['throughput']['requests_per_s'], 2))")
  echo "--- $label poisson rate=$rps (90% of the 32-stream request rate) $(date +%T)"
  if [ "$rps" = "0.0" ]; then echo "no request ended inside the 32-stream window: no Poisson step"
  else cli "${common[@]}" --rate "$rps" 2>&1 | tail -12; fi
  nvidia-smi --query-gpu=memory.used --format=csv,noheader 2> /dev/null
  kill -TERM $server; wait $server  # tokenrig serve stops its server on SIGTERM (SIGINT is ignored under `&`)
  if curl -sf http://127.0.0.1:8000/health > /dev/null; then echo "port 8000 still served after $label: stop"; exit 4; fi
}
# one GPU: KV room for 64 streams of up to 1024 tokens (the scenario's 512 + 128), the rest of the card's budget too
LIMITS="--concurrency 64 --max-model-len 1024"
run_config sdpa --attention sdpa
run_config eager --attention eager
# gptqmodel's own kernel choice on Hopper (Machete) downloads CUTLASS and JIT-builds: name a kernel instead
if [ "$GPTQ" = 1 ]; then
  run_config gptq --attention sdpa --quant gptq --quant-kernel "${GPTQ_KERNEL:-gptq_triton}" ||
    run_config gptq-torch --attention sdpa --quant gptq --quant-kernel gptq_torch
fi
kill $SMI
cp /tmp/models/*/tokenrig-checkpoint.json "$RES/" 2> /dev/null; cp results/serve/*.log "$RES/" 2> /dev/null
tar czf "$OUT/results.tgz" -C "$(dirname "$RES")" "$(basename "$RES")"

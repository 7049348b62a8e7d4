#!/usr/bin/env bash
# The GPU run behind docs/results/serve-h200-hf.md, as sent to the device machine (one H200):
# synthetic llama2-7b on tokenrig's hf backend, attention sdpa vs eager, then GPTQ and AWQ 4-bit; for each a
# load test at 1, 8, 32 concurrent streams and a Poisson rate at 90% of the 32-stream request rate.
# CONFIGS picks the server configurations (sdpa eager gptq awq, each with -graphs for CUDA graphs), STREAMS the closed-loop
# steps (the Poisson step follows the last), DECODE (DECODE_GPTQ, DECODE_AWQ) the batch-1
# engine configurations benchmarks/hf_decode.py times first (none when empty).
# Run from a directory holding tokenrig/, benchmarks/ and this file's scenario; wheels in $WHEELS; results
# to $OUT, re-packed after every load step so a run cut short still returns what it measured.
# Rehearse the same flow on CPU first (no device time): GPU=cpu MODEL=tiny DURATION=4 WHEELS= OUT=/tmp/o bash ...
set -u
GPU=${GPU:-h200} MODEL=${MODEL:-llama2-7b} DURATION=${DURATION:-25} WARMUP=${WARMUP:-4} RES=${RES:-/tmp/results}
CONFIGS=${CONFIGS-sdpa eager gptq} STREAMS=${STREAMS-1 8 32} POISSON=${POISSON:-1} DECODE=${DECODE:-}
GPTQ_KERNEL=${GPTQ_KERNEL:-gptq_triton} AWQ_KERNEL=${AWQ_KERNEL:-gemm_triton}
BASES=" $(for config in $CONFIGS; do printf '%s ' "${config%-graphs}"; done)"  # the configurations without -graphs
export PYTHONUNBUFFERED=1 TOKENRIG_MODELS=${TOKENRIG_MODELS:-/tmp/models} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
  # gptqmodel's regex engine is a C extension built from its sdist there: built while the bf16 checkpoint is written
  case "$BASES" in *" gptq "*|*" awq "*) (timeout 240 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
    "$WHEELS"/sdist/pypcre-0.6.4.tar.gz > "$OUT/pypcre-build.log" 2>&1 || echo "pypcre (gptqmodel's regex) did not build") &
    PYPCRE=$!;;
  esac
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
pack() { cp results/serve/*.log "$RES/" 2> /dev/null; tar czf "$OUT/results.tgz" -C "$(dirname "$RES")" "$(basename "$RES")"; }
# the bf16 checkpoint only where a bf16 server or the bf16 decode benchmark reads it (70-90 s of device time)
case "$BASES" in *" sdpa "*|*" eager "*) BF16=1;; *) BF16=${DECODE:+1};; esac
[ -n "$BF16" ] && time cli model make "$MODEL"
if [ -n "$DECODE" ]; then
  echo "=== batch-1 decode through the engine, no HTTP: $DECODE $(date +%T)"
  $PY benchmarks/hf_decode.py --gpu "$GPU" --model "$MODEL" --configs $DECODE --output-tokens 64 --repeats 2 \
    --out "$RES/decode-bf16" 2>&1 | grep -v "^\.\.\."
  pack
fi
[ -n "${PYPCRE:-}" ] && wait "$PYPCRE"
# 4-bit checkpoints only where asked and gptqmodel imports (7.7 declares torch>=2.14.1; its torch and Triton
# kernels are what can run here)
QUANTIZED=""
for quant in gptq awq; do
  case "$BASES" in *" $quant "*)
    if $PY -c "import gptqmodel, optimum" 2> "$OUT/gptqmodel-import.log"; then
      time cli model make "$MODEL" --quant $quant && QUANTIZED="$QUANTIZED $quant"
    else echo "gptqmodel does not import: no $quant configuration"; tail -3 "$OUT/gptqmodel-import.log"; fi;;
  esac
done
made() { case " $QUANTIZED " in *" $1 "*) return 0;; esac; return 1; }
for quant in $QUANTIZED; do  # DECODE_GPTQ / DECODE_AWQ: batch-1 engine configurations of that checkpoint
  configs_var=DECODE_${quant^^} kernel_var=${quant^^}_KERNEL
  configs=${!configs_var:-} kernel=${!kernel_var}
  [ -z "$configs" ] && continue
  echo "=== batch-1 decode, $quant 4-bit ($kernel kernel): $configs $(date +%T)"
  $PY benchmarks/hf_decode.py --gpu "$GPU" --model "$MODEL" --quant $quant --quant-kernel "$kernel" \
    --configs $configs --output-tokens 64 --repeats 2 --out "$RES/decode-$quant" 2>&1 | grep -v "^\.\.\."
  pack
done

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
  local server_log  # the engine's own log, named by tokenrig serve's banner
  server_log=$(sed -n 's/.*; log: \(.*\); Ctrl-C.*/\1/p' "$RES/serve-$label.log")
  grep -h "hf engine ready" "$server_log" | tail -1
  local common=(loadtest --url http://127.0.0.1:8000 --backend hf --gpu "$GPU" --model "$MODEL" "$@"
                --scenario "$SCENARIO" --results "$RES/$label" --duration "$DURATION" --warmup "$WARMUP"
                --request-timeout 60)
  for users in $STREAMS; do
    echo "--- $label users=$users $(date +%T)"; nvidia-smi --query-gpu=memory.used --format=csv,noheader 2> /dev/null
    cli "${common[@]}" --users $users 2>&1 | tail -12
    pack
  done
  local rps
  rps=$($PY -c "import json,glob; s=json.load(open(sorted(glob.glob('$RES/$label/*/summary.json'))[-1]));
print(round(0.9 * s['throughput']['requests_per_s'], 2))")
  echo "--- $label poisson rate=$rps (90% of the 32-stream request rate) $(date +%T)"
  if [ "$POISSON" = 0 ]; then echo "no Poisson step (POISSON=0)"
  elif [ "$rps" = "0.0" ]; then echo "no request ended inside the 32-stream window: no Poisson step"
  else cli "${common[@]}" --rate "$rps" 2>&1 | tail -12; pack; fi
  nvidia-smi --query-gpu=memory.used --format=csv,noheader 2> /dev/null
  kill -TERM $server; wait $server  # tokenrig serve stops its server on SIGTERM (SIGINT is ignored under `&`)
  if curl -sf http://127.0.0.1:8000/health > /dev/null; then echo "port 8000 still served after $label: stop"; exit 4; fi
}
# one GPU: KV room for 64 streams of up to 1024 tokens (the scenario's 512 + 128), the rest of the card's budget too
LIMITS="--concurrency 64 --max-model-len 1024"
# CUDA graphs pad each step's KV read: to 1024-token multiples here, not transformers' 16384
GRAPHS="--cuda-graphs --kv-padding-tokens 1024"
for config in $CONFIGS; do
  base=${config%-graphs} graphs=""
  [ "$base" != "$config" ] && graphs=$GRAPHS
  case $base in
    sdpa|eager) run_config "$config" --attention "$base" $graphs;;
    # gptqmodel's own kernel choice on Hopper (Machete) downloads CUTLASS and JIT-builds: name a kernel instead,
    # falling back to its plain torch kernel
    gptq) made gptq && { run_config "$config" --attention sdpa --quant gptq --quant-kernel "$GPTQ_KERNEL" $graphs ||
            run_config "$config-torch" --attention sdpa --quant gptq --quant-kernel gptq_torch $graphs; };;
    awq) made awq && { run_config "$config" --attention sdpa --quant awq --quant-kernel "$AWQ_KERNEL" $graphs ||
            run_config "$config-torch" --attention sdpa --quant awq --quant-kernel torch_awq $graphs; };;
    *) echo "unknown configuration $config";;
  esac
done
kill $SMI 2> /dev/null  # gone already where there is no nvidia-smi
for dir in "$TOKENRIG_MODELS"/*/; do cp "$dir/tokenrig-checkpoint.json" "$RES/checkpoint-$(basename "$dir").json" 2> /dev/null; done
pack

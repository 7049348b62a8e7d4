#!/usr/bin/env bash
# Download the wheels `tokenrig train` needs that the offline GPU image lacks, for its Python 3.12 (x86_64), into
# one folder, for WHEELS= of train_mfu_campaign.sh / train_gpu_run.sh. The image brings torch 2.11 (+cu130, with
# triton), transformers 5.17, peft, accelerate, numpy, psutil, pyyaml, tqdm, packaging, typing-extensions.
#
#   deepspeed 0.19.8      PyPI has only its sdist: built here into a pure-Python wheel (ops built on first use
#                         there: CPU Adam for offload, FusedAdam for --optimizer deepspeed-fused, needing nvcc)
#   hjson, msgpack, einops, py-cpuinfo, ninja, nvidia-ml-py   DeepSpeed's imports and its op builds
#   pydantic, pydantic-core, annotated-types, typing-inspection   tokenrig's TrainSpec (and DeepSpeed's config)
#   liger-kernel          --liger (triton kernels)
#   bitsandbytes          --mode qlora; only with QLORA=1 (it is the one large wheel: 43 MB)
# Every wheel is --no-deps: nothing here may pull a torch. Usage: bash docs/results/train_wheels.sh [DIR]
# (default .train-wheels). Measured: 6.5 MB for the 12 wheels, 48 MB with bitsandbytes, under the 64 MiB one
# device call may carry.
set -eu
DIR=${1:-.train-wheels}
PY=${PY:-python3}
mkdir -p "$DIR"
BINARY=(hjson msgpack einops py-cpuinfo ninja nvidia-ml-py "pydantic==2.14.4" "pydantic-core==2.50.5"
        annotated-types typing-inspection "liger-kernel==0.8.5")
[ "${QLORA:-0}" = 1 ] && BINARY+=("bitsandbytes==0.50.2")
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
$PY -m pip download -q --python-version 3.12 --implementation cp --abi cp312 "${PLATFORMS[@]}" --only-binary :all: \
  --no-deps -d "$DIR" "${BINARY[@]}"
# deepspeed's setup.py imports torch: build with this environment's (CPU) torch, no ops compiled in
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "deepspeed==0.19.8"
ls -l "$DIR"
du -sh "$DIR"

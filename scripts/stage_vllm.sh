#!/usr/bin/env bash
# Stage vLLM 0.26.0 for an offline GPU host: the pinned wheels, in parts small enough to carry one by one.
#
#   scripts/stage_vllm.sh                  # in the project checkout: writes .stage/part00, part01, ...
#   PART_SIZE=2G STAGE_DIR=/mnt/usb scripts/stage_vllm.sh
#
# What it does: downloads the wheels pinned in scripts/vllm-0.26.0-host-requirements.txt (vLLM 0.26.0, CUDA 13
# build, and the packages it needs that a host with torch 2.11 lacks) for CPython 3.12 / manylinux x86_64,
# drops two files of the vLLM wheel that an H100/H200 never loads (FlashAttention 2's 305 MB library: Hopper
# runs FlashAttention 3; the optional Rust frontend binary vllm-rs), tars the wheels and splits the tar into
# $STAGE_DIR/partNN of $PART_SIZE each (default .stage/, 58M). Keep .stage/ out of commits.
#
# On the GPU host, with the parts copied to /tmp/stage/ (no pip or network needed there):
#   cat /tmp/stage/part* > /tmp/vllm.tar && tar xf /tmp/vllm.tar -C /tmp && \
#   python3 -c "import glob, zipfile
#   for wheel in glob.glob('/tmp/vllm-wheels/*.whl'): zipfile.ZipFile(wheel).extractall('/tmp/site')"
#   export PYTHONPATH=/tmp/site    # then `tokenrig serve/loadtest --backend vllm` runs it (docs/serving.md)
# Python's zipfile stands in for `unzip`, which such hosts often lack. With the wheels unzipped there is no
# `vllm` script: tokenrig runs `python -m vllm.entrypoints.cli.main`. Checked on an H200 (2026-11-30): vLLM
# 0.26.0 imports with torch 2.11.0+cu130 and transformers 5.17, picks FlashAttention 3 and serves.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${STAGE_DIR:-.stage}
part_size=${PART_SIZE:-58M}
work=$(mktemp -d /tmp/vllm-stage.XXXX); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/vllm-wheels" "$out"
plats=""; for n in 5 12 17 24 26 27 28 31 34 35; do plats="$plats --platform manylinux_2_${n}_x86_64"; done
grep -v '^#' "$here/vllm-0.26.0-host-requirements.txt" > "$work/req.txt"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $plats --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
  -d "$work/vllm-wheels" -r "$work/req.txt" 2>&1 | grep -v "is ignored" || true
n=$(ls "$work/vllm-wheels"/*.whl | wc -l)
expected=$(wc -l < "$work/req.txt")
[ "$n" -eq "$expected" ] || { echo "downloaded $n wheels, expected $expected" >&2; exit 1; }
zip -q -d "$work"/vllm-wheels/vllm-0.26.0-*.whl 'vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so' 'vllm/vllm-rs'
tar cf "$work/vllm.tar" -C "$work" vllm-wheels
rm -f "$out"/part*
split -b "$part_size" -d "$work/vllm.tar" "$out/part"
ls -l "$out"; md5sum "$work/vllm.tar"
echo "carry each of: $(cd "$out" && ls part* | sed "s#^#$out/#" | tr '\n' ' ')"

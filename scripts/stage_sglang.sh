#!/usr/bin/env bash
# Stage SGLang 0.5.17 for an offline GPU host, in parts of at most 58 MiB each (one part per transfer).
#
#   scripts/stage_sglang.sh                 # in the project checkout: writes .stage-sglang/partNN
#   STAGE_SHARED=1 scripts/stage_sglang.sh  # also the 54 wheels it shares with vLLM 0.26 (a host without vLLM's)
#
# What it stages: the wheels deploy/gpu/sglang-0.5.17-extra.txt pins (63, about 610 MB: what SGLang needs beyond
# vLLM 0.26.0's staged set; sglang-kernel alone is 383 MB, 342 MB of it FlashAttention 3, which Hopper runs),
# downloaded for CPython 3.12 / manylinux x86_64 and checked against deploy/gpu/sglang-0.5.17-extra-wheel-files.txt,
# tarred and split into $STAGE_DIR/partNN (default .stage-sglang; keep it out of commits: .git/info/exclude).
# SGLang 0.5.12-0.5.17 pin torch==2.11.0, the GPU image's; its sglang-kernel 0.4.5 was built with nvcc 13.0.
#
# On the GPU host:
#   ldd --version | head -1      # the sglang wheel is manylinux_2_34: glibc 2.34 or newer, else it will not load
#   cat /tmp/stage/part* > /tmp/sglang.tar && tar xf /tmp/sglang.tar -C /tmp && python3 -c "import glob, zipfile
#   [zipfile.ZipFile(w).extractall('/tmp/site-sglang') for w in glob.glob('/tmp/sglang-wheels/*.whl')]"
#   # its own folder FIRST on the path: several of its pins (transformers 5.12.1, openai, fastapi, ...) differ from
#   # vLLM's; vLLM's unpacked set (/tmp/site) after it supplies the 54 shared wheels
#   export PYTHONPATH=/tmp/site-sglang:/tmp/site
#   python3 -c "import sglang, sgl_kernel; print(sglang.__version__)"
#   tokenrig serve --backend sglang --gpu h100-sxm --model 7b        # python -m sglang.launch_server ...
# There is no `unzip` on the host; Python's zipfile is.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
lists="$root/deploy/gpu"
out=${STAGE_DIR:-.stage-sglang}
work=$(mktemp -d /tmp/sglang-stage.XXXX); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/sglang-wheels" "$out"
grep -v '^#' "$lists/sglang-0.5.17-extra.txt" > "$work/req.txt"
expected=$(grep -c . "$lists/sglang-0.5.17-extra-wheel-files.txt")
if [ "${STAGE_SHARED:-0}" = 1 ]; then
  grep -v '^#' "$lists/sglang-0.5.17-shared-with-vllm.txt" >> "$work/req.txt"
  expected=$(wc -l < "$work/req.txt")
fi
# newest platform first: pip then takes the newest build a package offers, the one the lists name (oldest first,
# apache-tvm-ffi came as its manylinux2014 build instead of the listed manylinux_2_28 one)
plats=""; for n in 35 34 31 28 27 26 24 17 12 5; do plats="$plats --platform manylinux_2_${n}_x86_64"; done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $plats --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
  -d "$work/sglang-wheels" -r "$work/req.txt" 2>&1 | grep -v "is ignored" || true
n=$(ls "$work/sglang-wheels"/*.whl | wc -l)
[ "$n" -eq "$expected" ] || { echo "downloaded $n wheels, expected $expected" >&2; exit 1; }
# the extra set must be exactly the files the list names (a different build would change what the host loads)
missing=$(cd "$work/sglang-wheels" && for f in $(cat "$lists/sglang-0.5.17-extra-wheel-files.txt"); do
  [ -f "$f" ] || echo "$f"; done)
[ -z "$missing" ] || { echo "not downloaded as listed: $missing" >&2; exit 1; }
tar cf "$work/sglang.tar" -C "$work" sglang-wheels
rm -f "$out"/part*
split -b 58M -d "$work/sglang.tar" "$out/part"
ls -l "$out"; md5sum "$work/sglang.tar"
echo "carry each of: $(cd "$out" && ls part* | sed "s#^#$out/#" | tr '\n' ' ')"

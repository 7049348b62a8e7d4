# Sourced by the training GPU scripts beside it (train_gpu_run.sh, train_mfu_campaign.sh): install the carried
# wheels (WHEELS, a folder; train_wheels.sh downloads them) into /tmp/site, and check that `tokenrig train`
# imports, else exit 3 with the error's last lines. Expects PY and OUT.
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import tokenrig.train.session, tokenrig.train.worker, deepspeed, peft" 2> "$OUT/import-error.txt" \
  || { echo "tokenrig train does not import:"; tail -5 "$OUT/import-error.txt"; exit 3; }
rm -f "$OUT/import-error.txt"

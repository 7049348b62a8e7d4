#!/usr/bin/env bash
# In a device call: wait for serve_vllm_followup.sh (detached) until it is DONE or $1 seconds have passed,
# packing /tmp/results into $OUT/results.tgz every few seconds, so a call cut at its limit still brings back
# everything finished so far (requests.jsonl over 4 MB stays behind).
deadline=$(( $(date +%s) + ${1:-60} ))
pack() {
  tar czf "$OUT/results.tgz.tmp" -C /tmp --exclude='*.tmp' \
    $(cd /tmp/results && find . -name requests.jsonl -size +4M | sed 's#^\./#--exclude=results/#') \
    results campaign.log 2> /dev/null
  mv -f "$OUT/results.tgz.tmp" "$OUT/results.tgz"
  cp /tmp/results/progress.log "$OUT/progress.log" 2> /dev/null
}
while [ ! -f /tmp/results/DONE ] && [ "$(date +%s)" -lt "$deadline" ]; do
  pack; sleep 4
done
pack
cat /tmp/results/progress.log

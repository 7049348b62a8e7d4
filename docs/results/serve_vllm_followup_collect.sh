#!/usr/bin/env bash
# In a device call: wait for serve_vllm_followup.sh (detached; its pid in /tmp/campaign.pid) until it is DONE or
# $1 seconds have passed, packing /tmp/results into $OUT/results.tgz every few seconds, so a call cut at its
# limit still brings back everything finished so far. Request records travel only for the cross-check (xcheck/),
# which re-reads them; every other run keeps its summary, metadata and server metrics.
deadline=$(( $(date +%s) + ${1:-60} ))
pack() {
  tar czf "$OUT/results.tgz.tmp" -C /tmp --exclude='*.tmp' \
    $(cd /tmp && find results -name 'requests.jsonl*' -not -path '*/xcheck/*' | sed 's#^#--exclude=#') \
    results campaign.log 2> /dev/null
  mv -f "$OUT/results.tgz.tmp" "$OUT/results.tgz"
  cp /tmp/results/progress.log "$OUT/progress.log" 2> /dev/null
}
echo "campaign pid $(cat /tmp/campaign.pid 2> /dev/null): $(ps -o pid=,etime=,args= -p "$(cat /tmp/campaign.pid 2> /dev/null)" 2> /dev/null || echo 'not running')"
while [ ! -f /tmp/results/DONE ] && [ "$(date +%s)" -lt "$deadline" ]; do
  pack; sleep 5
done
pack
ls -l "$OUT"
cat /tmp/results/progress.log

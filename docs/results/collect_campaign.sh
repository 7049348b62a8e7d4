#!/usr/bin/env bash
# In a device call: wait for a detached campaign (its pid in /tmp/campaign.pid, its results in $RES, default
# /tmp/results) until
# it writes DONE or $1 seconds have passed, packing /tmp/results into $OUT/results.tgz every 10 s, so a call cut at
# its limit still brings back everything finished so far. Profiler traces (*.pt.trace.json.gz) stay on the host
# except those named in $KEEP_TRACES (paths under $RES's folder); every run's requests.jsonl travels (capacity re-judges steps from it).
# The archive comes back in parts of 15 MiB (a device call returns files of at most 16 MiB):
#   cat results.tgz.part* | tar xzf -
deadline=$(( $(date +%s) + ${1:-60} ))
RES=${RES:-/tmp/results}
pack() {
  tar czf /tmp/results.tgz.tmp -C "$(dirname "$RES")" --exclude='*.tmp' --exclude='*.pt.trace.json.gz' \
    "$(basename "$RES")" ${KEEP_TRACES:-} 2> /dev/null
  rm -f "$OUT"/results.tgz.part*
  split -b 15M -d /tmp/results.tgz.tmp "$OUT/results.tgz.part"
  cp "$RES/progress.log" "$OUT/progress.log" 2> /dev/null
}
echo "campaign pid $(cat /tmp/campaign.pid 2> /dev/null): $(ps -o pid=,etime=,args= -p "$(cat /tmp/campaign.pid 2> /dev/null)" 2> /dev/null || echo 'not running')"
while [ ! -f "$RES/DONE" ] && [ "$(date +%s)" -lt "$deadline" ]; do
  pack; sleep 10
done
pack
ls -l "$OUT"
tail -30 "$RES/progress.log"

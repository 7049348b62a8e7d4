#!/usr/bin/env bash
# One card's measurements for the capacity model as one detached job: the operator profiles (profile_campaign.sh,
# into $RES/profiles) and then the SLO searches (capacity_campaign.sh, into $RES), within TOTAL_S seconds, at most
# PROFILE_S of them for the profiles. The collector (collect_campaign.sh) waits for $RES/DONE.
#
#   GPU=h200 RATE_SCALE=1.3 TOTAL_S=1500 PROFILE_S=600 JOBS="7b-fp8 13b-bf16 7b-awq 7b-bf16-code" \
#     setsid nohup bash docs/results/card_campaign.sh > /tmp/campaign.log 2>&1 < /dev/null &
set -u
RES=${RES:-/tmp/results}
TOTAL_S=${TOTAL_S:-1500}
PROFILE_S=${PROFILE_S:-600}
here=$(cd "$(dirname "$0")" && pwd)
start=$(date +%s)
RES=$RES/profiles TOTAL_S=$PROFILE_S bash "$here/profile_campaign.sh"
RES=$RES TOTAL_S=$(( TOTAL_S - ($(date +%s) - start) )) bash "$here/capacity_campaign.sh"

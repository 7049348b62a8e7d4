"""Load-generator health: whether the client, not the server, shaped a step's result.

A step is invalid when its sends fell behind the schedule, a load-generator process streamed more chunks
than one core times exactly (the ceiling: measured by loadgen/ceiling.py, else the figure shipped with
tokenrig), the client's CPU was saturated, or arrivals waited for a free user or were never sent. An open
loop whose in-flight cap was reached while the client had time to spare is the server's verdict on the
rate instead (server saturated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tokenrig.metrics.distribution import distribution
from tokenrig.metrics.records import RequestRecord
from tokenrig.metrics.run_summary import Distribution, LoadGenerator, WorkerCpu

if TYPE_CHECKING:
    from tokenrig.metrics.summary import RunFacts, WindowCounts

# 64 streams at 10 ms a token, measured on a shared 2-vCPU VM: TTFT p50 within 1 ms of the truth in every
# run, ITL p99 within 2.5 ms in 2 of 5 (+1.8 to +3.0 ms); at 128 streams and above the ITL goal held once
CHUNKS_PER_S_PER_CORE = 6_000
# Load-generator health thresholds: past these the client, not the server, shaped the result.
# A send more than MAX_HEALTHY_LAG_S late is a late send; more than 1 % of them (and more than one: p99 of
# a dozen sends is their maximum, and one VM hiccup does not make a saturated client) invalidates a run.
MAX_HEALTHY_LAG_S = 0.010
# ... or more than this share of the median gap between arrivals, whichever is longer: at 2 req/s a send 20 ms
# late still leaves the arrival process the planned one (a Poisson gap's own spread is the whole gap), while
# an idle vCPU of a shared VM took 7-26 ms to wake (2-core development VM, 2026-11-30); latency counts from
# the due time whatever the lag
LATE_SHARE_OF_GAP = 0.1
MAX_LATE_SEND_FRACTION = 0.01
MAX_HEALTHY_CLIENT_CPU = 0.90
# Below this share of a core the client had time to spare: late sends were the host's doing (another busy
# process, a paused VM), and more workers would not have sent them on time
IDLE_CLIENT_CPU = 0.5
# Open loop: every scheduled arrival must go out; fewer sent means the client fell behind or stopped.
MIN_SENT_FRACTION = 0.99


@dataclass(frozen=True)
class Ceiling:
    chunks_per_s: int  # per load-generator process (one core)
    source: str  # where the figure comes from, for every message that cites it


SHIPPED = Ceiling(CHUNKS_PER_S_PER_CORE, "docs/results/loadgen-capacity.md")


def load_generator_health(measured: list[RequestRecord], facts: RunFacts, counts: WindowCounts,
                          workers: list[WorkerCpu] | None = None) -> LoadGenerator:
    """The load generator's figures over the step's measured requests, and whether they leave the step valid."""
    lag = distribution(r.send_lag_s for r in measured)
    # arrivals, not requests: later turns of a conversation are not part of the arrival process
    arrivals_sent = sum(1 for r in measured if r.turn == 0)
    achieved_rate = arrivals_sent / counts.seconds
    slot_late = sum(r.slot_late for r in measured)
    chunks_per_process = counts.chunks / counts.seconds / facts.load_processes
    # The open loop's in-flight cap reached while the client had time to spare: the server answers slower
    # than requests arrive, so arrivals queue for a free slot. That is the server's verdict on the rate (seen
    # at 40 req/s on a 16-req/s simulated server, client at 11 % of a core), not the load generator's fault;
    # the sends that waited for a slot are late because of it, so only the others judge the client.
    server_saturated = (slot_late > 0 and facts.client_cpu_fraction < IDLE_CLIENT_CPU
                        and chunks_per_process <= facts.ceiling.chunks_per_s)
    judged_sends = [r for r in measured if not (server_saturated and r.slot_late)]

    late_sends = _late_sends(measured, judged_sends, lag)
    problems = [late_sends] if late_sends else []
    if chunks_per_process > facts.ceiling.chunks_per_s:
        problems.append(f"{chunks_per_process:,.0f} streamed chunks/s per load-generator process, above the "
                        f"{facts.ceiling.chunks_per_s:,} one core times exactly ({facts.ceiling.source})")
    if facts.client_cpu_fraction > MAX_HEALTHY_CLIENT_CPU:
        problems.append(f"load generator CPU {facts.client_cpu_fraction:.0%} of a core")
    if slot_late and not server_saturated:
        problems.append(f"{slot_late} requests waited for a free user (open-loop safety cap reached)")
    if (facts.scheduled_in_window and arrivals_sent < MIN_SENT_FRACTION * facts.scheduled_in_window
            and not server_saturated):  # arrivals still queued for a slot when the load ended
        problems.append(f"sent {arrivals_sent} of {facts.scheduled_in_window} scheduled arrivals")
    saturation = (f"{slot_late} of {len(measured)} arrivals found every in-flight slot taken (the open loop's "
                  f"cap{f' of {facts.in_flight_cap}' if facts.in_flight_cap else ''}) while the load generator "
                  f"used {facts.client_cpu_fraction:.0%} of a core: the server completed "
                  f"{counts.completions / counts.seconds:.2f} req/s of the {facts.target_rate or achieved_rate:.2f} "
                  "offered" if server_saturated else None)
    late_sends_only = bool(late_sends) and len(problems) == 1
    measured_only: dict[str, Any] = {}  # recorded only where there is something to say
    if saturation:
        measured_only["server_saturated"] = saturation
    if workers is not None:
        measured_only["workers"] = workers
    return LoadGenerator(
        schedule_lag_s=lag,
        target_rate_rps=facts.target_rate,
        achieved_send_rate_rps=achieved_rate,
        scheduled_arrivals=facts.scheduled_in_window,
        sent_arrivals=arrivals_sent,
        slot_late_requests=slot_late,
        client_cpu_fraction=facts.client_cpu_fraction,
        chunks_per_s_per_process=chunks_per_process,
        chunks_per_s_ceiling=facts.ceiling.chunks_per_s,
        valid=not problems,
        problems=problems,
        late_sends_only=late_sends_only,
        remedy=_remedy(problems, late_sends_only, facts.client_cpu_fraction),
        **measured_only,
    )


def _late_sends(measured: list[RequestRecord], judged_sends: list[RequestRecord],
                lag: Distribution | None) -> str | None:
    """The problem when sends fell behind the schedule: more than MAX_LATE_SEND_FRACTION of them (and more than
    one) later than MAX_HEALTHY_LAG_S or LATE_SHARE_OF_GAP of the typical gap between arrivals; else None."""
    due_times = sorted(r.scheduled_at for r in measured if r.turn == 0)
    typical_gap = float(np.median(np.diff(due_times))) if len(due_times) > 1 else 0.0
    late_after_s = max(MAX_HEALTHY_LAG_S, LATE_SHARE_OF_GAP * typical_gap)
    late_sends = sum(1 for r in judged_sends if r.send_lag_s > late_after_s)
    if late_sends <= max(1, MAX_LATE_SEND_FRACTION * len(judged_sends)):
        return None
    return (f"{late_sends} of {len(judged_sends)} sends more than {late_after_s * 1000:.0f} ms late "
            f"(schedule lag p99 {(lag.p99 if lag else 0.0) * 1000:.1f} ms)")


def _remedy(problems: list[str], late_sends_only: bool, client_cpu: float) -> str | None:
    """What to do about an invalid run: more load generators when the client was busy, a quieter host when
    its only fault is late sends while it sat mostly idle (seen on a shared H200 host: 7 of 632 sends late at
    13 % of a core, where --workers auto chose one process anyway)."""
    if not problems:
        return None
    if late_sends_only and client_cpu < IDLE_CLIENT_CPU:
        return (f"the load generator was not busy ({client_cpu:.0%} of a core): something else on this host "
                "delayed its sends; rerun on a quieter host, or give it a core of its own (taskset)")
    return "add load-generator workers (--workers N) or lower the load"

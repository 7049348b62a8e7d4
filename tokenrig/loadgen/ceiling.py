"""How many streamed chunks one load-generator core times exactly, and how many a plan asks for.

The ceiling is measured by benchmarks/loadgen.py against a server whose own send log is the truth
(docs/results/loadgen-capacity.md): the highest chunk rate at which one core kept TTFT p50 within
1 ms and chunk-gap ITL p99 within 2.5 ms of the truth. `tokenrig loadtest` compares a plan's
expected chunk rate with it before starting, and the summary's validity check compares the
measured rate per load-generator process with it after.
"""

from __future__ import annotations

import math
import os

from tokenrig.loadgen.plan import LoadPlan, trace_schedule
from tokenrig.loadgen.scenario import Scenario

# 64 streams at 10 ms a token, measured on a shared 2-vCPU VM: TTFT p50 within 1 ms of the truth in every
# run, ITL p99 within 2.5 ms in 2 of 5 (+1.8 to +3.0 ms); at 128 streams and above the ITL goal held once
CHUNKS_PER_S_PER_CORE = 6_000
# A closed loop's chunk rate depends on the server's decode speed, unknown before the run: one token
# every 10 ms per stream (7-13B models on one GPU at moderate batch) unless the sim server says otherwise.
ASSUMED_TPOT_S = 0.010


def expected_chunk_rate(scenario: Scenario, tpot_s: float = ASSUMED_TPOT_S) -> float:
    """Streamed chunks per second the plan asks the load generator to time, at most one per token."""
    load = scenario.load
    if load.type == "concurrency":
        return load.users / tpot_s
    if load.type == "trace":
        return sum(row.output_tokens for _, row in trace_schedule(load)) / load.duration_s
    return LoadPlan(load).target_rate * (scenario.mean_tokens("output_tokens") or 0.0)


def workers_needed(chunk_rate: float) -> int:
    return max(1, math.ceil(chunk_rate / CHUNKS_PER_S_PER_CORE))


def free_cores() -> int:
    """Cores this process may use, less one for everything else on the machine (the master, a local server)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def capacity_advice(chunk_rate: float, workers: int | None, auto: bool = False) -> str | None:
    """What to say before a run whose expected chunk rate exceeds what its load processes time exactly."""
    processes = workers or 1
    if chunk_rate <= CHUNKS_PER_S_PER_CORE * processes:
        return None
    needed = workers_needed(chunk_rate)
    advice = (f"this plan streams about {chunk_rate:,.0f} chunks/s; one load-generator core times about "
              f"{CHUNKS_PER_S_PER_CORE:,} chunks/s exactly (docs/results/loadgen-capacity.md), so "
              f"{processes} load process{'es' if processes > 1 else ''} would distort the latencies: "
              f"it needs --workers {needed}")
    if needed > free_cores():
        advice += f"; this machine has {free_cores()} free core(s): add workers on other machines, or lower the load"
    elif not auto:
        advice += " (or --workers auto)"
    return advice

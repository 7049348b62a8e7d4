"""How many streamed chunks one load-generator core times exactly, and how many a plan asks for.

The ceiling is measured by benchmarks/loadgen.py against a server whose own send log is the truth
(docs/results/loadgen-capacity.md): the highest chunk rate at which one core kept TTFT p50 within
1 ms and chunk-gap ITL p99 within 2.5 ms of the truth. `make bench-loadgen` saves the figure it
measured on this machine (`save_ceiling`); without one, the figure shipped with tokenrig applies.
`tokenrig loadtest` compares a plan's expected chunk rate with it before starting, and the
summary's validity check compares the measured rate per load-generator process with it after.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

from tokenrig.loadgen.plan import RateCurve, trace_schedule
from tokenrig.loadgen.scenario import CLOSED_LOOP_TYPES, Scenario
from tokenrig.metrics.health import SHIPPED, Ceiling

CEILING_FILE_ENV = "TOKENRIG_LOADGEN_CEILING"  # where the machine's measured ceiling is kept, if not the default
# A closed loop's chunk rate depends on the server's decode speed, unknown before the run: one token
# every 10 ms per stream (7-13B models on one GPU at moderate batch) unless the sim server says otherwise.
ASSUMED_TPOT_S = 0.010


def ceiling_file() -> Path:
    override = os.environ.get(CEILING_FILE_ENV)
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tokenrig" / "loadgen-ceiling.json"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else what the platform says)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def this_machine() -> str:
    """Host name, CPU model and core count: a measurement kept in a home directory shared by several machines
    applies only to the one it was taken on."""
    return f"{platform.node()} / {cpu_model()} / {os.cpu_count()} CPUs"


def per_core_ceiling() -> Ceiling:
    """This machine's measured ceiling if `make bench-loadgen` saved one here, else the shipped figure."""
    path = ceiling_file()
    try:
        saved = json.loads(path.read_text())
        if saved["machine"] != this_machine():
            return SHIPPED
        return Ceiling(int(saved["chunks_per_s"]), f"measured on this machine {saved['measured']}, {path}")
    except (OSError, ValueError, KeyError, TypeError):
        return SHIPPED


def save_ceiling(chunks_per_s: float, measured: str) -> Path:
    """Keep this machine's measured ceiling for later runs; `measured` says when and by what."""
    path = ceiling_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"chunks_per_s": int(chunks_per_s), "machine": this_machine(),
                                "measured": measured}, indent=2) + "\n")
    return path


def expected_chunk_rate(scenario: Scenario, tpot_s: float = ASSUMED_TPOT_S) -> float:
    """Streamed chunks per second the plan asks the load generator to time, at most one per token."""
    load = scenario.load
    if load.type in CLOSED_LOOP_TYPES:
        assert load.users is not None  # LoadPlanSpec's validation gives every closed-loop plan its users
        return load.users / tpot_s
    if load.type == "trace":
        return sum(row.output_tokens for _, row in trace_schedule(load)) / load.duration_s
    # the mean rate from the plan's spec, not from its arrivals: a plan of --rate 1e9 is not drawn to be judged
    if load.stages:
        mean_rate = RateCurve(load.stages).total_u / load.duration_s
    else:
        assert load.rate is not None  # LoadPlanSpec's validation: an open-loop plan has stages or a rate
        mean_rate = load.rate
    return mean_rate * (scenario.mean_tokens("output_tokens") or 0.0)


# Past this many times what its load processes time exactly, a plan is refused before it starts: the latencies
# would be the load generator's, and drawing or spawning it would hold the machine for minutes (--rate 1e9,
# --users 100000)
REFUSED_OVERLOAD = 10


def refusal(chunk_rate: float, processes: int, ceiling: Ceiling) -> str | None:
    """Why a plan is beyond what `processes` load-generator processes can do at all (None: it is not)."""
    if chunk_rate <= REFUSED_OVERLOAD * ceiling.chunks_per_s * processes:
        return None
    return (f"this plan streams about {chunk_rate:,.0f} chunks/s, over {REFUSED_OVERLOAD} times what {processes} "
            f"load-generator process{'es time' if processes > 1 else ' times'} exactly "
            f"({ceiling.chunks_per_s:,} chunks/s each, {ceiling.source}); "
            f"it needs --workers {workers_needed(chunk_rate, ceiling)} "
            f"(this machine has {free_cores()} free core(s))")


def workers_needed(chunk_rate: float, ceiling: Ceiling) -> int:
    return max(1, math.ceil(chunk_rate / ceiling.chunks_per_s))


def free_cores() -> int:
    """Cores this process may use, less one for everything else on the machine (the master, a local server)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def capacity_advice(chunk_rate: float, workers: int | None, ceiling: Ceiling, auto: bool = False) -> str | None:
    """What to say before a run whose expected chunk rate exceeds what its load processes time exactly."""
    processes = workers or 1
    if chunk_rate <= ceiling.chunks_per_s * processes:
        return None
    needed = workers_needed(chunk_rate, ceiling)
    advice = (f"this plan streams about {chunk_rate:,.0f} chunks/s; one load-generator core times about "
              f"{ceiling.chunks_per_s:,} chunks/s exactly ({ceiling.source}), so "
              f"{processes} load process{'es' if processes > 1 else ''} would distort the latencies: "
              f"it needs --workers {needed}")
    if needed > free_cores():
        advice += f"; this machine has {free_cores()} free core(s): add workers on other machines, or lower the load"
    elif not auto:
        advice += " (or --workers auto)"
    return advice

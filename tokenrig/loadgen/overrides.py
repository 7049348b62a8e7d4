"""The load a run applies: a scenario's load plan with the command line's settings laid over it.

`LoadOverrides` gathers what `tokenrig loadtest` was told about the load (--users, --rate (inf: the
throughput mode), --max-in-flight, --arrival, --burstiness, --duration, --warmup, --seed, --sweep,
--find-max and the search's settings, --quick); `plan_run` checks that they agree and returns the
scenario with its load replaced, the load profile they ask for (a single run, a sweep, the SLO search)
and where the run's seed came from. Every refusal is a UsageError worded for the flags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import ValidationError

from tokenrig.errors import UsageError
from tokenrig.loadgen.load_profiles import QUICK_MIN_STEP_S, QUICK_TAIL_SAMPLES, FindMax, LoadProfile, SingleRun, Sweep
from tokenrig.loadgen.scenario import Scenario, with_run_seed
from tokenrig.metrics.slo import Slo

SWEEP_USERS = "sweep"  # --users sweep: the --sweep values are user counts, not rates


@dataclass(frozen=True)
class LoadOverrides:
    """The command line's load settings; None leaves the scenario's own."""

    users: int | str | None = None  # closed loop with this many users, or SWEEP_USERS
    rate: float | None = None  # open loop at this many requests/s; math.inf: the throughput mode
    max_in_flight: int | None = None  # open loop's cap on requests in flight; the throughput mode's streams
    arrival: str = "poisson"  # the open loop's arrival process, with --rate
    burstiness: float | None = None
    duration_s: float | None = None
    warmup_s: float | None = None
    seed: int | None = None
    sweep: str | None = None  # comma-separated rates or user counts, as typed
    find_max: bool = False
    precision: float = 0.05
    tail_samples: int | None = None  # None: FindMax's, or QUICK_TAIL_SAMPLES with `quick`
    max_step_s: float = 300.0
    quick: bool = False  # --quick: a first look, fewer samples per step


@dataclass(frozen=True)
class RunPlan:
    """What a load test runs: the scenario as overridden, its profile, and where its seed came from."""

    scenario: Scenario
    profile: LoadProfile
    seed_source: str  # "--seed", "scenario" or "random"


def plan_run(scenario: Scenario, overrides: LoadOverrides, slos: list[Slo] | None) -> RunPlan:
    """`scenario` with `overrides` applied, or UsageError naming the flags that do not go together."""
    load, seed_source = with_run_seed(scenario.load, overrides.seed)
    sweep_users = overrides.users == SWEEP_USERS
    users = None if sweep_users else overrides.users
    rate = overrides.rate
    if rate and users:
        raise UsageError("give --users (closed loop) or --rate (open loop), not both")
    if rate == math.inf:  # the throughput mode: one saturating run
        if overrides.find_max or overrides.sweep:
            raise UsageError("--rate inf is the throughput mode, one run saturating the server: drop "
                             f"{'--find-max' if overrides.find_max else '--sweep'}")
        if overrides.burstiness is not None:
            raise UsageError("--burstiness shapes open-loop arrivals; --rate inf sends as fast as the server takes "
                             "requests: drop it")
        load = load.as_throughput()
        rate = None
    profile: LoadProfile = SingleRun()
    if overrides.find_max and overrides.sweep:
        raise UsageError("give --find-max (search for the highest rate within the SLOs) or --sweep (run the "
                         "rates given), not both")
    if overrides.find_max:
        if not slos:
            raise UsageError("--find-max needs --slo, e.g. --slo ttft_p99=500ms,tpot_p99=50ms")
        if overrides.quick and overrides.tail_samples is not None:
            raise UsageError("--quick sets the samples per step (--tail-samples 3): give one of them")
        tail = FindMax.tail_samples if overrides.tail_samples is None else overrides.tail_samples
        tail, shortest = (QUICK_TAIL_SAMPLES, QUICK_MIN_STEP_S) if overrides.quick else (tail, FindMax.min_step_s)
        profile = FindMax(start_rate=rate or 1.0, precision=overrides.precision, tail_samples=tail,
                          min_step_s=shortest, max_step_s=overrides.max_step_s)
    elif overrides.quick:
        raise UsageError("--quick is a setting of --find-max: add --find-max --slo ...")
    elif overrides.sweep:
        values = sweep_values(overrides.sweep)
        profile = Sweep(loads=tuple(values), users=sweep_users)
        if not sweep_users and load.type == "concurrency" and not rate:
            rate = values[0]  # a rate sweep runs open loop
    if users:
        load = load.as_closed_loop(int(users))
    if rate:
        load = load.as_open_loop(rate, overrides.arrival)
    if overrides.max_in_flight is not None and load.type == "concurrency":
        raise UsageError("--max-in-flight caps an open loop (--rate) or sets --rate inf's requests in flight; "
                         "a closed loop has --users")
    updates = {k: v for k, v in {"duration_s": overrides.duration_s, "warmup_s": overrides.warmup_s,
                                 "burstiness": overrides.burstiness,
                                 "max_in_flight": overrides.max_in_flight}.items() if v is not None}
    _check_window({**load.model_dump(), **updates}, overrides)
    try:
        load = type(load).model_validate({**load.model_dump(), **updates})
    except ValidationError as error:
        problems = "; ".join(f"{FLAGS.get('.'.join(map(str, e['loc'])), 'load.' + '.'.join(map(str, e['loc'])))}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in error.errors())
        raise UsageError(f"invalid load settings: {problems}") from None
    if isinstance(profile, FindMax):
        profile.check_window(load)  # before a server starts
    return RunPlan(scenario.model_copy(update={"load": load}), profile, seed_source)


# the flag that sets each load field, for messages about them
FLAGS = {"duration_s": "--duration", "warmup_s": "--warmup", "burstiness": "--burstiness", "rate": "--rate",
         "users": "--users"}


def _check_window(load: dict, overrides: LoadOverrides) -> None:
    """The measured window is what is left of the duration after warm-up and cool-down: refuse none, by flag.
    (A plan of stages takes its duration from them.)"""
    if load.get("stages"):
        return
    duration, warmup, cooldown = load["duration_s"], load["warmup_s"], load["cooldown_s"]
    if warmup + cooldown < duration:
        return
    duration_from = "--duration" if overrides.duration_s is not None else "the scenario's load.duration_s"
    warmup_from = "--warmup" if overrides.warmup_s is not None else "the scenario's load.warmup_s"
    raise UsageError(f"{duration_from} {duration:g} s leaves nothing to measure after the warm-up ({warmup_from} "
                     f"{warmup:g} s) and cool-down (the scenario's load.cooldown_s {cooldown:g} s): give "
                     f"--duration above {warmup + cooldown:g}, or a shorter --warmup")


def sweep_values(text: str) -> list[float]:
    """--sweep's comma-separated numbers."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--sweep takes comma-separated numbers, not {text!r}") from None
    if not all(math.isfinite(value) and value > 0 for value in values):
        raise UsageError(f"--sweep takes finite numbers above 0, not {text!r} (--rate inf is the throughput mode)")
    return values

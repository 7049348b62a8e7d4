"""The load a run applies: a scenario's load plan with the command line's settings laid over it.

`LoadOverrides` gathers what `tokenrig loadtest` was told about the load (--users, --rate, --arrival,
--burstiness, --duration, --warmup, --seed, --sweep, --find-max and the search's settings); `plan_run`
checks that they agree and returns the scenario with its load replaced, the load profile they ask for
(a single run, a sweep or the SLO search) and where the run's seed came from. Every refusal is a
ScenarioError worded for the flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from tokenrig.loadgen.load_profiles import FindMax, LoadProfile, SingleRun, Sweep
from tokenrig.loadgen.scenario import Scenario, ScenarioError, with_run_seed
from tokenrig.report.slo import Slo

SWEEP_USERS = "sweep"  # --users sweep: the --sweep values are user counts, not rates


@dataclass(frozen=True)
class LoadOverrides:
    """The command line's load settings; None leaves the scenario's own."""

    users: int | str | None = None  # closed loop with this many users, or SWEEP_USERS
    rate: float | None = None  # open loop at this many requests/s
    arrival: str = "poisson"  # the open loop's arrival process, with --rate
    burstiness: float | None = None
    duration_s: float | None = None
    warmup_s: float | None = None
    seed: int | None = None
    sweep: str | None = None  # comma-separated rates or user counts, as typed
    find_max: bool = False
    precision: float = 0.05
    tail_samples: int = 10
    max_step_s: float = 300.0


@dataclass(frozen=True)
class RunPlan:
    """What a load test runs: the scenario as overridden, its profile, and where its seed came from."""

    scenario: Scenario
    profile: LoadProfile
    seed_source: str  # "--seed", "scenario" or "random"


def plan_run(scenario: Scenario, overrides: LoadOverrides, slos: list[Slo] | None) -> RunPlan:
    """`scenario` with `overrides` applied, or ScenarioError naming the flags that do not go together."""
    load, seed_source = with_run_seed(scenario.load, overrides.seed)
    sweep_users = overrides.users == SWEEP_USERS
    users = None if sweep_users else overrides.users
    rate = overrides.rate
    if rate and users:
        raise ScenarioError("give --users (closed loop) or --rate (open loop), not both")
    profile: LoadProfile = SingleRun()
    if overrides.find_max and overrides.sweep:
        raise ScenarioError("give --find-max (search for the highest rate within the SLOs) or --sweep (run the "
                            "rates given), not both")
    if overrides.find_max:
        if not slos:
            raise ScenarioError("--find-max needs --slo, e.g. --slo ttft_p99=500ms,tpot_p99=50ms")
        profile = FindMax(start_rate=rate or 1.0, precision=overrides.precision, tail_samples=overrides.tail_samples,
                          max_step_s=overrides.max_step_s)
    elif overrides.sweep:
        values = sweep_values(overrides.sweep)
        profile = Sweep(loads=tuple(values), users=sweep_users)
        if not sweep_users and load.type == "concurrency" and not rate:
            rate = values[0]  # a rate sweep runs open loop
    if users:
        load = load.model_copy(update={"type": "concurrency", "users": users, "rate": None, "stages": None,
                                       "trace": None})
    if rate:
        load = load.model_copy(update={"type": overrides.arrival, "rate": rate, "stages": None, "trace": None,
                                       "ramp_s": 0})
    updates = {k: v for k, v in {"duration_s": overrides.duration_s, "warmup_s": overrides.warmup_s,
                                 "burstiness": overrides.burstiness}.items() if v is not None}
    _check_window({**load.model_dump(), **updates}, overrides)
    try:
        load = type(load).model_validate({**load.model_dump(), **updates})
    except ValidationError as error:
        problems = "; ".join(f"{FLAGS.get('.'.join(map(str, e['loc'])), 'load.' + '.'.join(map(str, e['loc'])))}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in error.errors())
        raise ScenarioError(f"invalid load settings: {problems}") from None
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
    raise ScenarioError(f"{duration_from} {duration:g} s leaves nothing to measure after the warm-up ({warmup_from} "
                        f"{warmup:g} s) and cool-down (the scenario's load.cooldown_s {cooldown:g} s): give "
                        f"--duration above {warmup + cooldown:g}, or a shorter --warmup")


def sweep_values(text: str) -> list[float]:
    """--sweep's comma-separated numbers."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ScenarioError(f"--sweep takes comma-separated numbers, not {text!r}") from None

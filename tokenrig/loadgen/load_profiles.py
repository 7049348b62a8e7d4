"""Load profiles: the load each step of a run applies, chosen from the results of the steps before it.

A profile answers `next_step(base, slos, steps)` with the next step's plan (the rate or user count it is
named by, and the whole load plan: seed and length included), or None once the run is over. `SingleRun`
runs the scenario's own load once; `Sweep` steps through a fixed list of rates or user counts; `FindMax`
(--find-max, the SLO search) probes open-loop rates x2 or x4 with short steps until one misses an SLO or the
server saturates, then places full steps where the SLO percentile, interpolated against the rate between the
steps that bracket it, crosses its threshold, until the bracket is within `precision`; it states the knee's
95 % interval, between the rates certainly met and certainly missed. `walk` drives a profile with any
`measure(plan) -> StepResult`: a live server (loadtest.py), a replayed one (capacity/simulate.py), a test's
function. (GPU and model profiles are tokenrig/profiles/.)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, ClassVar

from tokenrig.errors import UsageError
from tokenrig.loadgen.scenario import LoadPlanSpec
from tokenrig.metrics.slo import Slo
from tokenrig.metrics.verdict import StepResult, step_duration
from tokenrig.report.console import LATE_BUT_JUDGED


@dataclass(frozen=True)
class StepPlan:
    """One step: the value it is named and judged by, and the load plan it runs."""

    value: float | None  # req/s, or users in a user sweep; None: a single run's own load, whatever its shape
    load: LoadPlanSpec
    stop_early: bool = False  # an SloWatch may end the step once its verdict is certain
    probe: bool = False  # a short first look of the SLO search, not a full verdict


@dataclass(frozen=True)
class SearchStepPlan(StepPlan):
    """A step of a sweep or SLO search: always at a rate or user count."""

    value: float


class LoadProfile(ABC):
    """What the steps of one run apply."""

    @abstractmethod
    def next_step(self, base: LoadPlanSpec, slos: list[Slo] | None, steps: list[StepResult]) -> StepPlan | None:
        """The step after `steps` (those run so far, in order) over the scenario's load `base`; None: done."""

    @abstractmethod
    def metadata(self) -> dict | None:
        """The settings metadata.json records as "search"."""


class SingleRun(LoadProfile):
    """A plain run: the scenario's load, once, as the scenario (and the command line) shaped it."""

    def next_step(self, base: LoadPlanSpec, slos: list[Slo] | None, steps: list[StepResult]) -> StepPlan | None:
        return None if steps else StepPlan(None, base)

    def metadata(self) -> None:
        return None


class Search(LoadProfile):
    """Several steps, each at one rate or user count, each with its own seed (the scenario's + step), so it
    sends prompts no earlier step sent: a server's prefix cache does not carry one step's prompts into the
    next and flatter its TTFT. `document` is the walk as search.json records it."""

    mode: ClassVar[str]  # search.json's and metadata.json's "mode"
    users: bool = False  # the values are concurrencies, not rates
    stop_early: ClassVar[bool] = False

    @abstractmethod
    def next_value(self, steps: list[StepResult]) -> float | None:
        """The rate or user count after `steps`; None: done."""

    @abstractmethod
    def step_load(self, base: LoadPlanSpec, value: float, slos: list[Slo] | None, step: int) -> LoadPlanSpec:
        """The load plan of step `step` (0-based) at `value`."""

    @abstractmethod
    def step_line(self, steps: list[StepResult]) -> str:
        """The progress line announcing the last of `steps`."""

    def conclusion(self, steps: list[StepResult]) -> dict:
        """What search.json says of the walk besides its steps."""
        return {}

    def next_step(self, base: LoadPlanSpec, slos: list[Slo] | None,
                  steps: list[StepResult]) -> SearchStepPlan | None:
        value = self.next_value(steps)
        if value is None:
            return None
        return SearchStepPlan(value, self.step_load(base, value, slos, len(steps)), self.stop_early)

    def label(self, value: float) -> str:
        """The step directory's name after its number."""
        return f"{'users' if self.users else 'rate'}-{value:.4g}"

    def document(self, steps: list[StepResult]) -> dict:
        """search.json of a finished walk."""
        return {"mode": self.mode, **self.conclusion(steps), "steps": [step.row() for step in steps]}


# A probe step runs until this many requests have been due, between PROBE_MIN_S and PROBE_MAX_S after its warm-up:
# enough to see a server far past its capacity or its SLO, not to judge a tail percentile; the steps that bound
# the answer are full ones. A probe whose percentiles are under FAR_BELOW of their thresholds while the server
# kept up is followed by one at FAR_GROWTH x its rate (a queue's latency is flat until near its knee), else 2x.
PROBE_REQUESTS, PROBE_MIN_S, PROBE_MAX_S = 20, 1.0, 5.0
FAR_BELOW, FAR_GROWTH = 0.5, 4.0
# an interpolated rate stays this share of the precision away from the bracket's ends, so that each full step
# can close the bracket: a step there that lands on the far side of the knee leaves a bracket within precision
END_CLEARANCE = 0.5
# --quick: samples beyond the judged percentile per step (300 requests for a p99), and the shortest full step
QUICK_TAIL_SAMPLES, QUICK_MIN_STEP_S = 3, 3.0


@dataclass(frozen=True)
class FindMax(Search):
    """--find-max: the highest open-loop rate meeting every SLO. Probe steps (PROBE_REQUESTS requests each) go
    x2 (x4 while far under the SLOs) from `start_rate` until one misses; then full steps, each long enough that
    the percentile it judges has `tail_samples` samples beyond it (10 beyond p99 = 1000 requests) and ended as
    soon as its verdict is certain (SloWatch), are placed where the percentile interpolated against the rate
    between the bracketing steps crosses the threshold (regula falsi on log(percentile / threshold), the
    Illinois variant), until the rates that met and missed are within `precision`, both judged by full steps
    (or the one above missed for certain).
    A step whose one fault was late sends is run again once; if it is late again, its verdict counts, and the
    search says so."""

    mode: ClassVar[str] = "find-max"
    stop_early: ClassVar[bool] = True
    start_rate: float = 1.0
    precision: float = 0.05
    tail_samples: int = 10
    min_step_s: float = 10.0
    max_step_s: float = 300.0
    max_steps: int = 16

    def check_window(self, base: LoadPlanSpec) -> None:
        """Refuse a longest step that leaves nothing to measure after `base`'s warm-up and its cool-down."""
        warmup, cooldown = base.warmup_s, min(base.cooldown_s, self.max_step_s / 4)  # as open_loop_step cuts it
        if warmup + cooldown >= self.max_step_s:
            shortest = min(warmup * 4 / 3, warmup + base.cooldown_s)  # where M - min(cooldown, M / 4) passes warmup
            raise UsageError(f"--max-step {self.max_step_s:g} s leaves nothing to measure after the warm-up "
                             f"({warmup:g} s) and cool-down ({cooldown:g} s): give --max-step above {shortest:g}, "
                             "or a shorter --warmup")

    def next_step(self, base: LoadPlanSpec, slos: list[Slo] | None,
                  steps: list[StepResult]) -> SearchStepPlan | None:
        self.check_window(base)
        result = self.conclude(steps)
        if result.next_rate is None:
            return None
        load = self.step_load(base, result.next_rate, slos, len(steps), probe=result.next_probe)
        return SearchStepPlan(result.next_rate, load, self.stop_early, probe=result.next_probe)

    def step_load(self, base: LoadPlanSpec, value: float, slos: list[Slo] | None, step: int,
                  probe: bool = False) -> LoadPlanSpec:
        if not slos:
            duration = base.duration_s
        elif probe:
            probing_s = min(max(PROBE_MIN_S, PROBE_REQUESTS / value), PROBE_MAX_S)
            duration = min(base.warmup_s + probing_s, self.max_step_s)
        else:
            duration = step_duration(slos, value, self.tail_samples, base.warmup_s, self.min_step_s, self.max_step_s)
        return open_loop_step(base, value, duration, base.seed + step)

    def next_value(self, steps: list[StepResult]) -> float | None:
        return self.conclude(steps).next_rate

    def conclude(self, steps: list[StepResult]) -> SearchResult:
        """Where the walk of `steps` stands: its bracket and knee interval, and the next rate or why it stops."""
        if not steps:
            return SearchResult(steps, next_rate=self.start_rate, next_probe=True)
        judged, notes = _counted_steps(steps)
        # A full step that missed where a probe had met: this server's overload shows only in full steps (a large
        # batch absorbs a short probe's queue), so no probe's "met" bounds the answer and the search goes on with
        # full steps only (13B on an H100: probes met at 8 and 16 req/s, full steps missed down to 8; capacity 7.3)
        probes_refuted = _probes_refuted(judged)
        counted = [step for step in judged if not (probes_refuted and step.probe and step.slo_met)]
        last = steps[-1]
        best, failing = _bracket(counted)
        result = SearchResult(steps, best.load if best is not None else None,
                              failing.load if failing is not None else None, notes=notes)
        if not any(step is last for step in judged):  # the last step is no verdict: run it again, or stop
            if last.late_sends_only:
                result.next_rate, result.next_probe = last.load, last.probe
                return result
            health = last.summary.load_generator
            result.stop_reason = (f"load generator invalid at {last.load:.3g} req/s ({'; '.join(health.problems)}): "
                                  f"{health.remedy}")
            return result.with_knee(counted)
        if best is None or failing is None:  # probing: up while every step met the SLOs, /2 while none did
            if failing is not None and best is None and failing.load / 2 < self.start_rate / 64:
                result.stop_reason = f"SLOs missed even at {failing.load:.3g} req/s"
            elif len(steps) >= self.max_steps:
                result.stop_reason = "step limit reached while probing"
            else:
                result.next_rate = _probe_rate(best, failing)
                result.next_probe = not probes_refuted
            return result.with_knee(counted)
        # the bracket's own test: 10.5 / 10 - 1 is 0.0500...04 in floating point, above a 5 % precision
        bracketed = failing.load <= best.load * (1 + self.precision) * (1 + 1e-9)
        surely_missed = failing.certainty is not None and failing.certainty.verdict == "missed"
        unsure_end = best if best.probe else failing if failing.probe and not surely_missed else None
        if len(steps) >= self.max_steps:
            result.stop_reason = f"step limit reached (bracket {failing.load / best.load - 1:.1%} wide)"
        elif bracketed and unsure_end is not None:  # a first look bounds the answer: judge it with a full step
            result.next_rate = unsure_end.load
        elif not bracketed:
            result.next_rate = next_rate(counted, self.precision)
        else:
            result.stop_reason = f"bracketed within {failing.load / best.load - 1:.1%}"
        return result.with_knee(counted)

    def step_line(self, steps: list[StepResult]) -> str:
        step = steps[-1]
        verdict = "meets SLOs" if step.slo_met else ("saturated" if step.saturated else "misses SLOs")
        certainty = step.certainty
        sureness = "" if certainty is None or step.saturated or step.probe else f", {certainty.describe()}"
        kind = "probe" if step.probe else "step"
        return (f"{kind} {len(steps)}: {step.load:.3g} req/s -> {verdict}{sureness}"
                + ("" if step.valid else f" ({LATE_BUT_JUDGED})" if step.judged
                   else " (load generator late: run again)" if step.late_sends_only else " (load generator INVALID)"))

    def conclusion(self, steps: list[StepResult]) -> dict:
        result = self.conclude(steps)
        return {"max_rate_meeting_slos": result.best, "lowest_failing_rate": result.lowest_failing,
                "knee_rps": result.knee, "knee_ci95_rps": result.knee_interval,
                "samples_beyond_percentile": self.tail_samples, "stop_reason": result.reason(), "notes": result.notes}

    def metadata(self) -> dict:
        return {"mode": self.mode, "loads": None, "sweep_users": False, **asdict(self)}


@dataclass(frozen=True)
class Sweep(Search):
    """--sweep: one step per value, in the order given, each as long as the scenario's load."""

    mode: ClassVar[str] = "sweep"
    loads: tuple[float, ...] = ()
    users: bool = False

    def next_value(self, steps: list[StepResult]) -> float | None:
        return self.loads[len(steps)] if len(steps) < len(self.loads) else None

    def step_load(self, base: LoadPlanSpec, value: float, slos: list[Slo] | None, step: int) -> LoadPlanSpec:
        if self.users:
            return base.as_closed_loop(int(value), seed=base.seed + step)
        return open_loop_step(base, value, base.duration_s, base.seed + step)

    def step_line(self, steps: list[StepResult]) -> str:
        return f"step {len(steps)}: {steps[-1].load:g} {'users' if self.users else 'req/s'} done"

    def metadata(self) -> dict:
        # the block has always carried the find-max settings too (their defaults here): one shape for readers
        return {"mode": self.mode, "loads": list(self.loads), "sweep_users": self.users, **asdict(FindMax())}


@dataclass
class SearchResult:
    """Where a find-max walk stands: its steps, the bracket, the knee (interpolated between the bracketing steps)
    and its 95 % interval, and the next rate or the reason it stopped."""

    steps: list[StepResult] = field(default_factory=list)
    best: float | None = None  # highest rate that met every SLO, below every rate that missed one
    lowest_failing: float | None = None
    stop_reason: str = ""
    next_rate: float | None = None
    next_probe: bool = False
    knee: float | None = None  # where the worst SLO's percentile, interpolated, meets its threshold
    knee_interval: tuple[float | None, float | None] | None = None  # 95 %; None at an end: unbounded there
    notes: list[str] = field(default_factory=list)

    def with_knee(self, counted: list[StepResult]) -> SearchResult:
        """The knee between the bracketing steps, and its interval: above the highest rate certainly met, below
        the lowest certainly missed (each certain at 95 %, one-sided 97.5 %)."""
        best, failing = _bracket(counted)
        if best is not None and failing is not None:
            self.knee = crossing(best, failing)
        surely = {verdict: [step.load for step in counted if step.certainty and step.certainty.verdict == verdict]
                  for verdict in ("met", "missed")}
        high = min(surely["missed"], default=None)
        low = max((rate for rate in surely["met"] if high is None or rate < high), default=None)
        if low is not None or high is not None:
            self.knee_interval = (low, high)
        return self

    def reason(self) -> str:
        """The stop reason, with the knee's interval when there is one."""
        if self.knee is None or self.knee_interval is None:
            return self.stop_reason
        low, high = self.knee_interval
        interval = (f"{low:.3g} to {high:.3g} req/s" if low is not None and high is not None
                    else f"above {low:.3g} req/s" if low is not None else f"below {high:.3g} req/s")
        return f"{self.stop_reason}; knee {self.knee:.3g} req/s by interpolation, 95 %: {interval}"


def _counted_steps(steps: list[StepResult]) -> tuple[list[StepResult], list[str]]:
    """The steps whose verdicts the search uses, and notes on those it used despite late sends: a step is
    counted when judged, or when its one fault was late sends for the second time running at its rate
    (a busy host: the search goes on and says so). A step with other faults is never counted."""
    counted, notes = [], []
    for index, step in enumerate(steps):
        if step.judged:
            counted.append(step)
        elif step.late_sends_only and index and steps[index - 1].late_sends_only \
                and steps[index - 1].load == step.load and not any(s is steps[index - 1] for s in counted):
            counted.append(step)
            lag = step.summary.load_generator.schedule_lag_s
            notes.append(f"{step.load:.3g} req/s: sends late twice running (lag up to "
                         f"{lag.max * 1000 if lag else 0:.0f} ms): its verdict is counted, as the load it offered "
                         "was at most that much later and lighter")
    return counted, notes


def _probes_refuted(steps: list[StepResult]) -> bool:
    """Whether a full step missed the SLOs at a rate no higher than one a probe met."""
    probe_met = max((step.load for step in steps if step.probe and step.slo_met), default=None)
    return probe_met is not None and any(not step.probe and not step.slo_met and step.load <= probe_met
                                         for step in steps)


def _bracket(steps: list[StepResult]) -> tuple[StepResult | None, StepResult | None]:
    """The step at the lowest rate that missed, and the one at the highest rate that met below it; of a probe and a
    full step at one rate, the full step (else the full step that judged a probe's rate again left the probe as the
    bracket's end, and the search ran that full step again until its step limit)."""
    missed = [step for step in steps if not step.slo_met]
    failing = min(missed, key=lambda step: (step.load, step.probe), default=None)
    met = [step for step in steps if step.slo_met and (failing is None or step.load < failing.load)]
    return max(met, key=lambda step: (step.load, not step.probe), default=None), failing


def _probe_rate(best: StepResult | None, failing: StepResult | None) -> float:
    """The next probe's rate: half the lowest that missed; else above the highest that met, x4 after a probe far
    under the SLOs."""
    if failing is not None:
        return failing.load / 2
    # no counted step missed, so no full one did: no probe was refuted, and the last step, counted, met
    assert best is not None, "a walk whose counted steps all met has a highest"
    far = (margin := best.margin()) is not None and margin < math.log(FAR_BELOW)
    return best.load * (FAR_GROWTH if far and best.probe else 2.0)


def crossing(met: StepResult, missed: StepResult) -> float | None:
    """The rate where the line through the two steps' margins (StepResult.margin: log(percentile / threshold))
    crosses 0; None when it does not rise from one to the other (a step with no percentile, or the higher
    one no higher)."""
    low, high = met.margin(), missed.margin()
    if low is None or high is None or high <= low:
        return None
    return met.load + (missed.load - met.load) * -low / (high - low)


def next_rate(steps: list[StepResult], precision: float) -> float:
    """Where to measure next in a bracket wider than `precision`: the crossing of the bracketing steps'
    margins (regula falsi), where the end kept while the other end moved twice running counts half as far
    from the threshold each time (Illinois), kept END_CLEARANCE x precision away from each end; the
    geometric midpoint when the margins say nothing."""
    best, failing = _bracket(steps)
    assert best is not None and failing is not None, "next_rate is asked only within a bracket"
    weight = {id(best): 1.0, id(failing): 1.0}
    moved = []  # which end each step became, in order
    for index, step in enumerate(steps):
        bracket = _bracket(steps[:index + 1])
        moved.append("met" if step is bracket[0] else "missed" if step is bracket[1] else None)
    run = 0
    for side in reversed(moved):
        if side != moved[-1]:
            break
        run += 1
    stale = failing if moved[-1] == "met" else best
    weight[id(stale)] = 0.5 ** max(0, run - 1)
    low, high = best.margin(), failing.margin()
    low_end, high_end = best.load * (1 + END_CLEARANCE * precision), failing.load / (1 + END_CLEARANCE * precision)
    if low is None or high is None or high <= low or low_end >= high_end:
        return math.sqrt(best.load * failing.load)
    low, high = low * weight[id(best)], high * weight[id(failing)]
    rate = best.load + (failing.load - best.load) * -low / (high - low)
    return min(max(rate, low_end), high_end)


def open_loop_step(base: LoadPlanSpec, rate: float, duration_s: float, seed: int) -> LoadPlanSpec:
    """`base` as an open loop at `rate` for `duration_s` (its arrival process kept when it has one), validated."""
    step = base.as_open_loop(rate, duration_s=duration_s, cooldown_s=min(base.cooldown_s, duration_s / 4), seed=seed)
    return LoadPlanSpec.model_validate(step.model_dump())


def profile_from_metadata(block: dict) -> Search:
    """The search a run directory's metadata.json "search" block records (every version of the block)."""
    if block["mode"] == "sweep":
        return Sweep(loads=tuple(block["loads"]), users=bool(block.get("sweep_users")))
    return FindMax(**{f.name: block[f.name] for f in fields(FindMax) if f.name in block})


def walk(profile: Search, base: LoadPlanSpec, slos: list[Slo] | None,
         measure: Callable[[SearchStepPlan], StepResult], progress: Callable[[str], None] = print) -> list[StepResult]:
    """Run `profile`'s steps with `measure` until it is done, announcing each step as it ends."""
    steps: list[StepResult] = []
    while (plan := profile.next_step(base, slos, steps)) is not None:
        step = measure(plan)
        step.probe = plan.probe
        steps.append(step)
        progress(profile.step_line(steps))
    return steps

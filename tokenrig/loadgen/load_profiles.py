"""Load profiles: the load each step of a run applies, chosen from the results of the steps before it.

A profile answers `next_step(base, slos, steps)` with the next step's plan (the rate or user count it is
named by, and the whole load plan: seed and length included), or None once the run is over. `SingleRun`
runs the scenario's own load once; `Sweep` steps through a fixed list of rates or user counts; `FindMax`
(--find-max, the SLO search) probes open-loop rates ×2 until a step misses an SLO or the server saturates,
then bisects between the last rate that met every SLO and the first that did not, until they are within
`precision`. `walk` drives a profile with any `measure(plan) -> StepResult`: a live server (loadtest.py),
a replayed one (capacity/simulate.py), a test's function. (GPU and model profiles are tokenrig/profiles/.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, ClassVar

from tokenrig.loadgen.scenario import OPEN_LOOP_TYPES, LoadPlanSpec
from tokenrig.loadgen.search import StepResult, step_duration
from tokenrig.report.console import LATE_BUT_JUDGED
from tokenrig.report.slo import Slo


@dataclass(frozen=True)
class StepPlan:
    """One step: the value it is named and judged by, and the load plan it runs."""

    value: float | None  # req/s, or users in a user sweep; None: a single run's own load, whatever its shape
    load: LoadPlanSpec
    stop_early: bool = False  # an SloWatch may end the step once one of its SLOs is already lost


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

    def next_step(self, base: LoadPlanSpec, slos: list[Slo] | None, steps: list[StepResult]) -> StepPlan | None:
        value = self.next_value(steps)
        if value is None:
            return None
        return StepPlan(value, self.step_load(base, value, slos, len(steps)), self.stop_early)

    def label(self, value: float) -> str:
        """The step directory's name after its number."""
        return f"{'users' if self.users else 'rate'}-{value:.4g}"

    def document(self, steps: list[StepResult]) -> dict:
        """search.json of a finished walk."""
        return {"mode": self.mode, **self.conclusion(steps), "steps": [step.row() for step in steps]}


@dataclass(frozen=True)
class FindMax(Search):
    """--find-max: the highest open-loop rate meeting every SLO. Each step runs long enough that the
    percentile it judges has `tail_samples` samples beyond it (10 beyond p99 = 1000 requests), and stops
    early once an SLO is already lost."""

    mode: ClassVar[str] = "find-max"
    stop_early: ClassVar[bool] = True
    start_rate: float = 1.0
    precision: float = 0.05
    tail_samples: int = 10
    min_step_s: float = 10.0
    max_step_s: float = 300.0
    max_steps: int = 16

    def step_load(self, base: LoadPlanSpec, value: float, slos: list[Slo] | None, step: int) -> LoadPlanSpec:
        duration = (step_duration(slos, value, self.tail_samples, base.warmup_s, self.min_step_s, self.max_step_s)
                    if slos else base.duration_s)
        return open_loop_step(base, value, duration, base.seed + step)

    def next_value(self, steps: list[StepResult]) -> float | None:
        return self.conclude(steps).next_rate

    def conclude(self, steps: list[StepResult]) -> SearchResult:
        """Where the walk of `steps` stands: its bracket, and the next rate or why it stops."""
        if not steps:
            return SearchResult(steps, next_rate=self.start_rate)
        last = steps[-1]
        if not last.judged:  # only the last step can be: it ends the walk
            best, failing = _bracket(steps[:-1])
            health = last.summary.load_generator
            return SearchResult(steps, best, failing, f"load generator invalid at {last.load:.3g} req/s "
                                                      f"({'; '.join(health.problems)}): {health.remedy}")
        best, failing = _bracket(steps)
        if best is None or failing is None:  # probing: ×2 while every step met the SLOs, /2 while none did
            rate = last.load * 2 if last.slo_met else last.load / 2
            if not last.slo_met and rate < self.start_rate / 64:
                return SearchResult(steps, best, failing, f"SLOs missed even at {failing:.3g} req/s")
            if len(steps) >= self.max_steps:
                return SearchResult(steps, best, failing, "step limit reached while probing")
            return SearchResult(steps, best, failing, next_rate=rate)
        # the bisection's own test: 10.5 / 10 - 1 is 0.0500...04 in floating point, above a 5 % precision
        bracketed = failing <= best * (1 + self.precision)
        if not bracketed and len(steps) < self.max_steps:
            return SearchResult(steps, best, failing, next_rate=(best + failing) / 2)
        gap = failing / best - 1
        return SearchResult(steps, best, failing, f"bracketed within {gap:.1%}" if bracketed
                            else f"step limit reached (bracket {gap:.1%} wide)")

    def step_line(self, steps: list[StepResult]) -> str:
        step = steps[-1]
        verdict = "meets SLOs" if step.slo_met else ("saturated" if step.saturated else "misses SLOs")
        return (f"step {len(steps)}: {step.load:.3g} req/s -> {verdict}"
                + ("" if step.valid else f" ({LATE_BUT_JUDGED})" if step.judged else " (load generator INVALID)"))

    def conclusion(self, steps: list[StepResult]) -> dict:
        result = self.conclude(steps)
        return {"max_rate_meeting_slos": result.best, "lowest_failing_rate": result.lowest_failing,
                "stop_reason": result.stop_reason}

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
            return base.model_copy(update={"type": "concurrency", "users": int(value), "rate": None,
                                           "stages": None, "trace": None, "seed": base.seed + step})
        return open_loop_step(base, value, base.duration_s, base.seed + step)

    def step_line(self, steps: list[StepResult]) -> str:
        return f"step {len(steps)}: {steps[-1].load:g} {'users' if self.users else 'req/s'} done"

    def metadata(self) -> dict:
        # the block has always carried the find-max settings too (their defaults here): one shape for readers
        return {"mode": self.mode, "loads": list(self.loads), "sweep_users": self.users, **asdict(FindMax())}


@dataclass
class SearchResult:
    """Where a find-max walk stands: its steps, the bracket, and the next rate or the reason it stopped."""

    steps: list[StepResult] = field(default_factory=list)
    best: float | None = None  # highest rate that met every SLO
    lowest_failing: float | None = None
    stop_reason: str = ""
    next_rate: float | None = None


def _bracket(steps: list[StepResult]) -> tuple[float | None, float | None]:
    """The last rate that met the SLOs and the last that missed them: the walk only ever narrows them."""
    met = [step.load for step in steps if step.slo_met]
    missed = [step.load for step in steps if not step.slo_met]
    return (met[-1] if met else None), (missed[-1] if missed else None)


def open_loop_step(base: LoadPlanSpec, rate: float, duration_s: float, seed: int) -> LoadPlanSpec:
    """`base` as an open loop at `rate` for `duration_s` (its arrival process kept when it has one)."""
    open_type = base.type if base.type in OPEN_LOOP_TYPES else "poisson"
    return LoadPlanSpec.model_validate({**base.model_dump(), "type": open_type, "rate": rate,
                                        "stages": None, "trace": None, "duration_s": duration_s,
                                        "cooldown_s": min(base.cooldown_s, duration_s / 4), "seed": seed})


def profile_from_metadata(block: dict) -> Search:
    """The search a run directory's metadata.json "search" block records (every version of the block)."""
    if block["mode"] == "sweep":
        return Sweep(loads=tuple(block["loads"]), users=bool(block.get("sweep_users")))
    return FindMax(**{f.name: block[f.name] for f in fields(FindMax) if f.name in block})


def walk(profile: Search, base: LoadPlanSpec, slos: list[Slo] | None,
         measure: Callable[[StepPlan], StepResult], progress=print) -> list[StepResult]:
    """Run `profile`'s steps with `measure` until it is done, announcing each step as it ends."""
    steps: list[StepResult] = []
    while (plan := profile.next_step(base, slos, steps)) is not None:
        steps.append(measure(plan))
        progress(profile.step_line(steps))
    return steps

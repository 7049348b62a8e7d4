"""SLO search and sweeps: which load a server sustains while meeting its SLOs.

`find_max_rate` probes open-loop rates exponentially (×2) until a step misses an SLO or the
server saturates, then bisects between the last rate that met every SLO and the first that did
not, until they are within `precision`. Each step runs long enough that the percentile it
judges has `tail_samples` samples beyond it (10 beyond p99 = 1000 requests); a step whose SLO
is already lost (its percentile cannot be met whatever the remaining requests measure) stops early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokenrig.loadgen.records import RequestRecord
from tokenrig.loadgen.scenario import LoadPlanSpec
from tokenrig.report.run_summary import RunSummary
from tokenrig.report.slo import Slo, samples_for

# A server is saturated when it completes fewer requests than were sent: the queue grows. Over a window,
# completions trail sends by the growth of the requests in flight; for a server that keeps up the two counts
# differ only by chance (Poisson-like: standard deviation ~ sqrt(sends + completions), ~10 % at 150 requests),
# so a deficit counts when it is larger than both SATURATION_DEFICIT of the sends and SATURATION_SIGMAS of that.
SATURATION_DEFICIT = 0.1
SATURATION_SIGMAS = 3.0


@dataclass
class SearchOptions:
    """--sweep (fixed list of rates or user counts) or --find-max (SLO search over rates)."""

    mode: str  # "sweep" | "find-max"
    loads: list[float] | None = None  # sweep values
    sweep_users: bool = False  # the sweep values are concurrencies, not rates
    start_rate: float = 1.0
    precision: float = 0.05
    tail_samples: int = 10
    min_step_s: float = 10.0
    max_step_s: float = 300.0
    max_steps: int = 16

    def step_load(self, base: LoadPlanSpec, value: float, slos: list[Slo] | None, step: int) -> LoadPlanSpec:
        """The load plan of step `step` (0-based) at `value`: users, or an open-loop rate long enough for its SLOs.

        Each step has its own seed (the scenario's + step), so it sends prompts no earlier step sent: a
        server's prefix cache does not carry one step's prompts into the next and flatter its TTFT."""
        seed = base.seed + step
        if self.sweep_users:
            return base.model_copy(update={"type": "concurrency", "users": int(value), "rate": None,
                                           "stages": None, "trace": None, "seed": seed})
        open_type = base.type if base.type in ("poisson", "constant", "gamma") else "poisson"
        duration = (step_duration(slos, value, self.tail_samples, base.warmup_s, self.min_step_s, self.max_step_s)
                    if slos and self.mode == "find-max" else base.duration_s)
        return LoadPlanSpec.model_validate({**base.model_dump(), "type": open_type, "rate": value,
                                            "stages": None, "trace": None, "duration_s": duration,
                                            "cooldown_s": min(base.cooldown_s, duration / 4), "seed": seed})


@dataclass
class StepResult:
    load: float  # rate (req/s) or users
    summary: RunSummary
    stopped_early: bool = False

    @property
    def slo_met(self) -> bool:
        """Every SLO met over a step the server kept up with: a server that falls behind meets latency SLOs
        only until its queue has grown, so that rate is not sustainable whatever the step's percentiles say."""
        return (self.summary.slo is not None and self.summary.slo.all_met and not self.stopped_early
                and not self.saturated and not self.interrupted)

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C or SIGTERM: its few requests are no verdict on the rate, met or missed."""
        return self.summary.interrupted

    @property
    def valid(self) -> bool:
        return self.summary.load_generator.valid

    @property
    def saturated(self) -> bool:
        """Errors, or completions behind arrivals by more than chance over the window: the server fell behind."""
        window_s = self.summary.window.seconds
        sent = self.summary.load_generator.achieved_send_rate_rps * window_s
        completed = self.summary.throughput.requests_per_s * window_s
        deficit = sent - completed
        return (self.stopped_early or self.summary.requests.failed > 0
                or deficit > max(SATURATION_DEFICIT * sent, SATURATION_SIGMAS * math.sqrt(sent + completed)))

    def row(self) -> dict:
        latency, slo = self.summary.latency_s, self.summary.slo
        ttft, tpot = latency.ttft, latency.tpot
        return {
            "load": self.load,
            "achieved_rps": self.summary.load_generator.achieved_send_rate_rps,
            "completed_rps": self.summary.throughput.requests_per_s,
            "output_tokens_per_s": self.summary.throughput.output_tokens_per_s,
            "goodput_rps": slo.goodput_rps if slo else None,
            "ttft_p50_s": ttft.p50 if ttft else None, "ttft_p99_s": ttft.p99 if ttft else None,
            "tpot_p50_s": tpot.p50 if tpot else None, "tpot_p99_s": tpot.p99 if tpot else None,
            "slo_met": self.slo_met, "saturated": self.saturated, "stopped_early": self.stopped_early,
            "interrupted": self.interrupted,
            "loadgen_valid": self.valid,
            "slos": {name: verdict.model_dump(include={"value_s", "met", "samples", "confidence"})
                     for name, verdict in (slo.slos if slo else {}).items()},
        }


@dataclass
class SearchResult:
    steps: list[StepResult] = field(default_factory=list)
    best: float | None = None  # highest rate that met every SLO
    lowest_failing: float | None = None
    stop_reason: str = ""

    def document(self) -> dict:
        return {"max_rate_meeting_slos": self.best, "lowest_failing_rate": self.lowest_failing,
                "stop_reason": self.stop_reason, "steps": [step.row() for step in self.steps]}


def step_duration(slos: list[Slo], rate: float, tail_samples: int, warmup_s: float, min_s: float,
                  max_s: float) -> float:
    """Seconds a step at `rate` needs for `tail_samples` samples beyond the highest judged percentile."""
    needed = max(samples_for(slo.percentile, tail_samples) for slo in slos)
    return min(max(min_s, warmup_s + needed / rate), max_s)


def find_max_rate(measure, start_rate: float, precision: float = 0.05, max_steps: int = 16,
                  progress=print) -> SearchResult:
    """`measure(rate) -> StepResult`; returns the highest rate meeting every SLO and the curve walked."""
    result = SearchResult()

    def run(rate: float) -> StepResult:
        step = measure(rate)
        result.steps.append(step)
        verdict = "meets SLOs" if step.slo_met else ("saturated" if step.saturated else "misses SLOs")
        progress(f"step {len(result.steps)}: {rate:.3g} req/s -> {verdict}"
                 + ("" if step.valid else " (load generator INVALID)"))
        return step

    rate = start_rate
    while len(result.steps) < max_steps:  # exponential probe
        step = run(rate)
        if not step.valid:
            result.stop_reason = f"load generator saturated at {rate:.3g} req/s: add --workers"
            return result
        if step.slo_met:
            result.best = rate
            if result.lowest_failing is not None:
                break
            rate *= 2
        else:
            result.lowest_failing = rate
            if result.best is not None:
                break
            rate /= 2
            if rate < start_rate / 64:
                result.stop_reason = f"SLOs missed even at {result.lowest_failing:.3g} req/s"
                return result
    while (len(result.steps) < max_steps and result.best is not None and result.lowest_failing is not None
           and result.lowest_failing > result.best * (1 + precision)):  # bisection
        rate = (result.best + result.lowest_failing) / 2
        step = run(rate)
        if not step.valid:
            result.stop_reason = f"load generator saturated at {rate:.3g} req/s: add --workers"
            return result
        if step.slo_met:
            result.best = rate
        else:
            result.lowest_failing = rate
    if result.best is not None and result.lowest_failing is not None:
        gap = result.lowest_failing / result.best - 1
        # the bisection's own test: 10.5 / 10 - 1 is 0.0500...04 in floating point, above a 5 % precision
        bracketed = result.lowest_failing <= result.best * (1 + precision)
        result.stop_reason = (f"bracketed within {gap:.1%}" if bracketed
                              else f"step limit reached (bracket {gap:.1%} wide)")
    elif not result.stop_reason:
        result.stop_reason = "step limit reached while probing"
    return result


class SloWatch:
    """A record sink that decides early when a step has already missed an SLO: when, of all the step's
    scheduled requests, enough violate it that the percentile's own order statistic is a violation
    even if every later request is fast. Fewer violations than that may still leave the percentile
    under the threshold (39 x 20 ms and 1 x 60 ms: p99 44.4 ms), so the step runs on."""

    def __init__(self, slos: list[Slo], expected_requests: int):
        self.slos = slos
        self.expected = expected_requests
        self.violations = {slo.name: 0 for slo in slos}

    def write(self, record: RequestRecord) -> None:
        if not record.in_window:
            return
        for slo in self.slos:
            if slo.metric == "itl":
                continue  # judged per token, not per request
            value = slo.request_value(record) if record.ok else math.inf
            if value is not None and value > slo.threshold_s:
                self.violations[slo.name] += 1

    def close(self) -> None:
        pass

    def decided(self) -> bool:
        return any(self.violations[slo.name] >= violations_that_miss(slo.percentile, self.expected)
                   for slo in self.slos if slo.metric != "itl")


def violations_that_miss(percentile: float, samples: int) -> int:
    """Values above the threshold that make a percentile of `samples` values miss it whatever the others are.

    numpy's percentile interpolates between the order statistics at ranks floor(h) and floor(h) + 1 (from 0),
    h = (samples - 1) * percentile / 100; it is certainly above the threshold once the value at floor(h) is,
    that is once samples - floor(h) values are."""
    return samples - math.floor((samples - 1) * percentile / 100 + 1e-9)

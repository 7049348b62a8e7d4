"""A search step's verdict: whether the server kept up with a load and met its SLOs at it, and how sure that is.

`StepResult` judges one measured step (SLOs met, saturated, interrupted, load generator valid; met, missed or
marginal at 95 %, metrics/slo.threshold_verdict) and is its row in search.json; `step_duration` sizes an SLO
step so that the percentile it judges has `tail_samples` samples beyond it; `SloWatch` ends a step once its
verdict is certain: an SLO already lost (its percentile cannot be met whatever the remaining requests
measure, or its exceedances are too many for chance), or every SLO certainly met even if every request still
pending missed it. The walks over steps are loadgen/load_profiles.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tokenrig.metrics.records import RequestRecord
from tokenrig.metrics.registry import METRICS, Metric, stepped_metrics
from tokenrig.metrics.run_summary import RunSummary
from tokenrig.metrics.slo import Slo, ThresholdVerdict, samples_for, tail_design_effect, threshold_verdict

# A server is saturated when it completes fewer requests than were sent: the queue grows. Over a window,
# completions trail sends by the growth of the requests in flight; for a server that keeps up the two counts
# differ only by chance (Poisson-like: standard deviation ~ sqrt(sends + completions), ~10 % at 150 requests),
# so a deficit counts when it is larger than both SATURATION_DEFICIT of the sends and SATURATION_SIGMAS of that.
SATURATION_DEFICIT = 0.1
SATURATION_SIGMAS = 3.0
# A step looked at while it runs is judged at a stricter confidence than at its end, since it is looked at
# many times, and only once this fraction of its samples is in: a host hiccup makes a run of consecutive
# slow requests that, early in a step, the binomial rule (which takes samples as independent) reads as certain.
WATCH_CONFIDENCE = 0.998
WATCH_MIN_FRACTION = 0.25
STEP_PERCENTILES = ("p50", "p99")  # a step row's percentiles of each stepped metric (metrics/registry.py)


@dataclass
class StepResult:
    load: float  # rate (req/s) or users
    summary: RunSummary
    stopped_early: bool = False  # ended once an SLO was already lost
    probe: bool = False  # a short step of the search's probe for a bracket: its verdict is a first look

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
    def judged(self) -> bool:
        """Whether the step is a verdict on its rate: its load generator was valid, or its one fault was late
        sends and the step failed by more than they explain. A late send offers the load later and lighter,
        never heavier, and adds its lag to that request's TTFT and E2E (measured from the due time), not to
        TPOT or ITL; so a server that fell behind, or an SLO missed beyond the largest lag, is the server's
        (seen at 8 req/s on a 4.5-req/s server: sends up to 88 ms late, TTFT p90 1.28 s against 200 ms)."""
        health = self.summary.load_generator
        if health.valid:
            return True
        if not health.late_sends_only or self.interrupted:
            return False
        lag = health.schedule_lag_s.max if health.schedule_lag_s else 0.0
        missed_beyond_lag = any(
            verdict.value_s is not None
            and verdict.value_s - (lag if _from_due_time(name) else 0.0) > verdict.threshold_s
            for name, verdict in (self.summary.slo.slos if self.summary.slo else {}).items())
        return not self.slo_met and (missed_beyond_lag or self.fell_behind)

    @property
    def late_sends_only(self) -> bool:
        """The load generator's one fault was sends past the late rule (a busy host's hiccup, typically)."""
        return not self.valid and self.summary.load_generator.late_sends_only and not self.interrupted

    @property
    def certainty(self) -> ThresholdVerdict | None:
        """The step's SLOs together, exactly: missed when the server fell behind or erred, or one SLO's
        percentile is certainly over its threshold, met when every one is certainly under, else marginal with
        the chance that all are met (the product of theirs). A step stopped early is judged on what it
        measured: certain that its own percentile misses is not certain that the server's does. None: no SLO."""
        slo = self.summary.slo
        if slo is None:
            return None
        if self.summary.requests.failed > 0 or self.fell_behind:
            return ThresholdVerdict("missed", 0.0, 0.95)
        verdicts = [_slo_certainty(name, verdict) for name, verdict in slo.slos.items()]
        if not verdicts:
            return ThresholdVerdict("met" if slo.all_met else "missed", float(slo.all_met), 0.95)
        probability = math.prod(v.probability_met for v in verdicts)
        if any(v.verdict == "missed" for v in verdicts):
            return ThresholdVerdict("missed", probability, 0.95)
        return ThresholdVerdict("met" if all(v.verdict == "met" for v in verdicts) else "marginal", probability, 0.95)

    def margin(self) -> float | None:
        """How far the step's worst SLO percentile lies from its threshold, log(value / threshold); None when no
        SLO has a value."""
        slo = self.summary.slo
        margins = [math.log(max(verdict.value_s, 1e-9) / verdict.threshold_s)
                   for verdict in (slo.slos.values() if slo else []) if verdict.value_s is not None]
        return max(margins) if margins else None

    @property
    def fell_behind(self) -> bool:
        """Completions behind sends by more than chance over the window."""
        window_s = self.summary.window.seconds
        sent = self.summary.load_generator.achieved_send_rate_rps * window_s
        completed = self.summary.throughput.requests_per_s * window_s
        return sent - completed > max(SATURATION_DEFICIT * sent, SATURATION_SIGMAS * math.sqrt(sent + completed))

    @property
    def saturated(self) -> bool:
        """Errors, or completions behind arrivals by more than chance over the window: the server fell behind."""
        return self.stopped_early or self.summary.requests.failed > 0 or self.fell_behind

    def row(self) -> dict:
        latency, slo = self.summary.latency_s, self.summary.slo
        return {
            "load": self.load,
            "achieved_rps": self.summary.load_generator.achieved_send_rate_rps,
            "completed_rps": self.summary.throughput.requests_per_s,
            "output_tokens_per_s": self.summary.throughput.output_tokens_per_s,
            "goodput_rps": slo.goodput_rps if slo else None,
            **{f"{metric.name}_{key}_s": getattr(latency.get(metric.name), key, None)
               for metric, key in step_columns()},
            "slo_met": self.slo_met, "saturated": self.saturated, "stopped_early": self.stopped_early,
            "interrupted": self.interrupted, "probe": self.probe, "late_sends_only": self.late_sends_only,
            "certainty": certainty.verdict if (certainty := self.certainty) else None,
            "probability_met": certainty.probability_met if certainty else None,
            "loadgen_valid": self.valid, "judged": self.judged,
            "slos": {name: verdict.model_dump(include={"value_s", "met", "samples", "beyond_threshold",
                                                       "design_effect", "ci95_s", "confidence"})
                     for name, verdict in (slo.slos if slo else {}).items()},
        }


def step_columns() -> list[tuple[Metric, str]]:
    """Every step table's latency columns, (metric, percentile key): each stepped metric's STEP_PERCENTILES."""
    return [(metric, key) for metric in stepped_metrics() for key in STEP_PERCENTILES]


def _from_due_time(slo_name: str) -> bool:
    """Whether an SLO's metric counts from the due time, so that a late send adds its lag to it."""
    metric = METRICS.get(slo_name.rsplit("_p", 1)[0])
    return metric is not None and metric.from_due_time


def _slo_certainty(name: str, verdict) -> ThresholdVerdict:
    """One SLO's exact verdict; a summary from before the count beyond the threshold was kept has only its point."""
    if verdict.beyond_threshold is None:
        return ThresholdVerdict("met" if verdict.met else "missed", float(verdict.met), 0.95)
    percentile = float(name.rsplit("_p", 1)[1])
    return threshold_verdict(verdict.samples, verdict.beyond_threshold, percentile,
                             design_effect=verdict.design_effect or 1.0)


def step_duration(slos: list[Slo], rate: float, tail_samples: int, warmup_s: float, min_s: float,
                  max_s: float) -> float:
    """Seconds a step at `rate` needs for `tail_samples` samples beyond the highest judged percentile."""
    needed = max(samples_for(slo.percentile, tail_samples) for slo in slos)
    return min(max(min_s, warmup_s + needed / rate), max_s)


class SloWatch:
    """A record sink that decides early when a step's verdict is already certain.

    Missed: when, of all the step's scheduled requests, enough violate an SLO that the percentile's own order
    statistic is a violation even if every later request is fast (fewer may still leave the percentile under
    the threshold: 39 x 20 ms and 1 x 60 ms have p99 44.4 ms), or, past WATCH_MIN_FRACTION of them, when the
    violations are too many for chance at WATCH_CONFIDENCE (counting the samples as fewer when slow ones come
    in runs, metrics/slo.tail_design_effect). Met: with `pending()` (requests due in the window
    and not yet recorded), once every SLO is certainly met at WATCH_CONFIDENCE even counting each pending
    request as a violation, so stopping cannot drop the slow requests a queue is still holding."""

    def __init__(self, slos: list[Slo], expected_requests: int, pending: Callable[[], int] | None = None):
        self.slos = [slo for slo in slos if not slo.spec.per_token]  # ITL is judged per token, not per request
        self.judges_every_slo = len(self.slos) == len(slos)
        self.expected = expected_requests
        self.pending = pending
        self.seen = 0
        self.violations = {slo.name: 0 for slo in self.slos}
        self.values: dict[str, list[float]] = {slo.name: [] for slo in self.slos}  # in the order they ended
        self.verdict: str | None = None  # "met" or "missed" once decided

    def write(self, record: RequestRecord) -> None:
        if not record.in_window:
            return
        self.seen += 1
        for slo in self.slos:
            value = slo.request_value(record) if record.ok else math.inf
            if value is not None:
                self.values[slo.name].append(value)
                if value > slo.threshold_s:
                    self.violations[slo.name] += 1

    def close(self) -> None:
        pass

    def decided(self) -> bool:
        if self.verdict is None:
            self.verdict = self._verdict()
        return self.verdict is not None

    def _verdict(self) -> str | None:
        if any(self.violations[slo.name] >= violations_that_miss(slo.percentile, self.expected) for slo in self.slos):
            return "missed"
        if self.seen < WATCH_MIN_FRACTION * self.expected:
            return None
        effects = {slo.name: tail_design_effect(np.asarray(self.values[slo.name])) for slo in self.slos}
        if any(threshold_verdict(self.seen, self.violations[slo.name], slo.percentile, WATCH_CONFIDENCE,
                                 effects[slo.name]).verdict == "missed" for slo in self.slos):
            return "missed"
        if self.pending is None or not self.judges_every_slo or not self.slos:
            return None
        pending = self.pending()
        if all(threshold_verdict(self.seen + pending, self.violations[slo.name] + pending, slo.percentile,
                                 WATCH_CONFIDENCE, effects[slo.name]).verdict == "met" for slo in self.slos):
            return "met"
        return None


def violations_that_miss(percentile: float, samples: int) -> int:
    """Values above the threshold that make a percentile of `samples` values miss it whatever the others are.

    numpy's percentile interpolates between the order statistics at ranks floor(h) and floor(h) + 1 (from 0),
    h = (samples - 1) * percentile / 100; it is certainly above the threshold once the value at floor(h) is,
    that is once samples - floor(h) values are."""
    return samples - math.floor((samples - 1) * percentile / 100 + 1e-9)

"""Service-level objectives: parsing `ttft_p99=500ms,...`, judging them with a confidence
statement, and goodput (requests/s meeting every SLO, DistServe's definition).

A percentile estimated from n samples is uncertain; the judgment gives the distribution-free
95 % confidence interval of the percentile (from the order statistics, via the binomial
distribution of how many samples fall below the true percentile) and how many samples lay
beyond it, so "p99 met" from 150 requests is not mistaken for a solid result. `threshold_verdict`
is the same question asked exactly: from how many of n samples exceed the threshold, is the
percentile certainly under it, certainly over it, or marginal (and how likely met)? — counting
n samples as fewer independent ones when they came clustered (`tail_design_effect`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta, binom

from tokenrig.metrics.distribution import percentile_interval
from tokenrig.metrics.records import RequestRecord
from tokenrig.metrics.registry import METRICS, Metric
from tokenrig.metrics.run_summary import SloJudgement, SloVerdict

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


class SloError(ValueError):
    pass


@dataclass(frozen=True)
class Slo:
    metric: str  # a registered metric's name (metrics/registry.py)
    percentile: float  # e.g. 99
    threshold_s: float

    @property
    def name(self) -> str:
        return f"{self.metric}_p{self.percentile:g}"

    @property
    def spec(self) -> Metric:
        return METRICS[self.metric]

    def request_value(self, record: RequestRecord) -> float | None:
        """The per-request figure goodput judges: TTFT, TPOT, E2E, or the request's own ITL percentile."""
        return self.spec.request_value(record, self.percentile)


def parse_slos(text: str) -> list[Slo]:
    """'ttft_p99=500ms,tpot_p99=50ms' -> [Slo(...), ...]; each threshold above 0 with its unit (us, ms or s),
    each metric and percentile once: `ttft_p99=500` is 500 what? and two ttft_p99 leave the judge to guess."""
    slos: list[Slo] = []
    names = "|".join(map(re.escape, METRICS))
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(rf"({names})_p(\d+(?:\.\d+)?)\s*=\s*(\d+(?:\.\d+)?)\s*(us|ms|s)?", part)
        if not match:
            raise SloError(f"cannot read SLO {part!r}: write METRIC_pPCT=VALUE(us|ms|s) with METRIC one of "
                           f"{', '.join(METRICS)}, e.g. ttft_p99=500ms,tpot_p99=50ms")
        metric, percentile, value, unit = match.groups()
        if unit is None:
            raise SloError(f"SLO {part!r} has no unit: write {part}ms or {part}s")
        if not 0 < float(percentile) < 100:
            raise SloError(f"SLO {part!r}: the percentile must be between 0 and 100")
        if float(value) <= 0:
            raise SloError(f"SLO {part!r}: the threshold must be above 0")
        slo = Slo(metric, float(percentile), float(value) * _UNITS[unit])
        if any(earlier.name == slo.name for earlier in slos):
            raise SloError(f"SLO {slo.name} is given twice: keep one")
        slos.append(slo)
    if not slos:
        raise SloError("no SLO given")
    return slos


def recorded_slos(metadata: dict) -> list[Slo]:
    """The SLOs a run was judged against, from its metadata.json ('ttft_p99<=0.5s' per SLO)."""
    texts = metadata.get("slos") or []
    return parse_slos(",".join(text.replace("<=", "=") for text in texts)) if texts else []


def samples_for(percentile: float, beyond: int) -> int:
    """Samples needed so that `beyond` of them are expected past the percentile (10 past p99: 1000)."""
    return math.ceil(beyond * 100 / (100 - percentile) - 1e-9)  # 1e-9: 5 / (1 - 0.9) is 50.000000000000014


@dataclass(frozen=True)
class ThresholdVerdict:
    """Where a percentile stands against its threshold, from a sample: "met" or "missed" when the exact
    two-sided confidence interval of the percentile lies on one side of the threshold, else "marginal";
    `probability_met` is the posterior probability that it is met (uniform prior on the exceedance rate)."""

    verdict: str  # met | missed | marginal
    probability_met: float
    confidence: float

    @property
    def certain(self) -> bool:
        return self.verdict != "marginal"

    def describe(self) -> str:
        if self.certain:
            return f"{self.verdict} at {self.confidence:.0%}"
        return f"marginal ({self.probability_met:.0%} likely met)"


def threshold_verdict(samples: int, beyond_threshold: int, percentile: float,
                      confidence: float = 0.95, design_effect: float = 1.0) -> ThresholdVerdict:
    """The percentile is at or under the threshold exactly when at most a fraction 1 - percentile of the
    distribution exceeds it; the count beyond it in `samples` independent draws is binomial. The order-statistic
    confidence interval of the percentile lies under the threshold when even that fraction would rarely leave
    so few beyond it (P(Bin(n, 1 - p) <= k) <= alpha), above it when it would rarely leave so many.

    Latencies out of a queue are not independent: slow requests come in runs (a burst of arrivals, a busy
    period), so n of them tell as much as n / `design_effect` independent ones (tail_design_effect), and the
    count beyond is scaled alike."""
    alpha = (1 - confidence) / 2
    tail = 1 - percentile / 100
    samples, beyond_threshold = round(samples / design_effect), round(beyond_threshold / design_effect)
    if samples == 0:
        return ThresholdVerdict("marginal", 0.5, confidence)
    if binom.cdf(beyond_threshold, samples, tail) <= alpha:
        verdict = "met"
    elif binom.sf(beyond_threshold - 1, samples, tail) <= alpha:
        verdict = "missed"
    else:
        verdict = "marginal"
    probability_met = float(beta.cdf(tail, beyond_threshold + 1, samples - beyond_threshold + 1))
    return ThresholdVerdict(verdict, probability_met, confidence)


def tail_design_effect(values: np.ndarray, batches: int = 10, level: float = 90) -> float:
    """How many times the variance of a tail fraction exceeds what independent samples would give (at least
    1), from `values` in the order they were sent: the fraction beyond their own `level` percentile in each of
    `batches` consecutive batches, its variance over the binomial one (batch means). The level is lower than
    the SLO's so that every batch has a few values beyond it; a queue's slow requests, clustered in busy
    periods, make it large (14 to 26 near the knee of a 16-slot queue), independent ones about 1."""
    size = values.size // batches
    if size < 10:
        return 1.0
    beyond = values[:size * batches] > np.percentile(values, level)
    fraction = beyond.mean()
    if fraction in (0.0, 1.0):
        return 1.0
    batch_fractions = beyond.reshape(batches, size).mean(axis=1)
    return max(1.0, float(batch_fractions.var(ddof=1) / (fraction * (1 - fraction) / size)))


def judge(records: list[RequestRecord], slos: list[Slo], window_s: float) -> SloJudgement:
    """Every SLO against the measured successful requests, plus goodput over the window."""
    ok = sorted((r for r in records if r.in_window and r.ok), key=lambda r: r.scheduled_at)
    measured = [r for r in records if r.in_window]
    verdicts = {}
    for slo in slos:
        values = np.asarray(slo.spec.values(ok), dtype=float)
        if values.size == 0:
            verdicts[slo.name] = SloVerdict(threshold_s=slo.threshold_s, value_s=None, met=False, samples=0,
                                            confidence="no samples")
            continue
        value = float(np.percentile(values, slo.percentile))
        interval = percentile_interval(values, slo.percentile)
        beyond = int(np.sum(values > value))
        beyond_threshold = int(np.sum(values > slo.threshold_s))
        design_effect = tail_design_effect(values)
        certainty = threshold_verdict(int(values.size), beyond_threshold, slo.percentile,
                                      design_effect=design_effect).describe()
        if interval is None:
            confidence = f"{certainty}: {values.size} samples, {beyond} beyond p{slo.percentile:g} (no 95 % interval)"
        else:
            confidence = f"{certainty}: 95 % interval [{interval[0] * 1e3:.1f}, {interval[1] * 1e3:.1f}] ms"
        verdicts[slo.name] = SloVerdict(threshold_s=slo.threshold_s, value_s=value, met=value <= slo.threshold_s,
                                        samples=int(values.size), beyond_percentile=beyond, ci95_s=interval,
                                        beyond_threshold=beyond_threshold, design_effect=design_effect,
                                        confidence=confidence)
    good = 0
    for record in ok:
        per_request = [slo.request_value(record) for slo in slos]
        if all(v is not None and v <= slo.threshold_s for v, slo in zip(per_request, slos)):
            good += 1
    return SloJudgement(slos=verdicts, all_met=all(v.met for v in verdicts.values()),
                        goodput_rps=good / window_s if window_s else 0.0, good_requests=good,
                        good_fraction=good / len(measured) if measured else 0.0)

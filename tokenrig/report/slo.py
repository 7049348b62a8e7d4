"""Service-level objectives: parsing `ttft_p99=500ms,...`, judging them with a confidence
statement, and goodput (requests/s meeting every SLO, DistServe's definition).

A percentile estimated from n samples is uncertain; the judgment gives the distribution-free
95 % confidence interval of the percentile (from the order statistics, via the binomial
distribution of how many samples fall below the true percentile) and how many samples lay
beyond it, so "p99 met" from 150 requests is not mistaken for a solid result.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from tokenrig.loadgen.records import RequestRecord
from tokenrig.report.run_summary import SloJudgement, SloVerdict
from tokenrig.report.summary import percentile_interval

METRICS = ("ttft", "tpot", "itl", "e2e")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


class SloError(ValueError):
    pass


@dataclass(frozen=True)
class Slo:
    metric: str  # ttft | tpot | itl | e2e
    percentile: float  # e.g. 99
    threshold_s: float

    @property
    def name(self) -> str:
        return f"{self.metric}_p{self.percentile:g}"

    def request_value(self, record: RequestRecord) -> float | None:
        """The per-request figure goodput judges: TTFT, TPOT, E2E, or the request's own ITL percentile."""
        if self.metric == "ttft":
            return record.ttft_s
        if self.metric == "e2e":
            return record.e2e_s
        if self.metric == "tpot":
            return record.tpot()
        gaps = record.itl_gaps()
        return float(np.percentile(gaps, self.percentile)) if gaps else None


def parse_slos(text: str) -> list[Slo]:
    """'ttft_p99=500ms,tpot_p99=50ms' -> [Slo(...), ...]; each threshold above 0 with its unit (us, ms or s),
    each metric and percentile once: `ttft_p99=500` is 500 what? and two ttft_p99 leave the judge to guess."""
    slos = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(ttft|tpot|itl|e2e)_p(\d+(?:\.\d+)?)\s*=\s*(\d+(?:\.\d+)?)\s*(us|ms|s)?", part)
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


def judge(records: list[RequestRecord], slos: list[Slo], window_s: float) -> SloJudgement:
    """Every SLO against the measured successful requests, plus goodput over the window."""
    ok = [r for r in records if r.in_window and r.ok]
    measured = [r for r in records if r.in_window]
    verdicts = {}
    for slo in slos:
        if slo.metric == "itl":
            values = np.asarray([g for r in ok for g in r.itl_gaps()], dtype=float)
        else:
            values = np.asarray([v for v in map(slo.request_value, ok) if v is not None], dtype=float)
        if values.size == 0:
            verdicts[slo.name] = SloVerdict(threshold_s=slo.threshold_s, value_s=None, met=False, samples=0,
                                            confidence="no samples")
            continue
        value = float(np.percentile(values, slo.percentile))
        interval = percentile_interval(values, slo.percentile)
        beyond = int(np.sum(values > value))
        if interval is None:
            confidence = f"low: {values.size} samples, {beyond} beyond p{slo.percentile:g} (no 95 % interval)"
        elif interval[1] <= slo.threshold_s or interval[0] > slo.threshold_s:
            confidence = f"95 %: interval [{interval[0] * 1e3:.1f}, {interval[1] * 1e3:.1f}] ms is on one side"
        else:
            confidence = (f"marginal: 95 % interval [{interval[0] * 1e3:.1f}, {interval[1] * 1e3:.1f}] ms "
                          "contains the threshold")
        verdicts[slo.name] = SloVerdict(threshold_s=slo.threshold_s, value_s=value, met=value <= slo.threshold_s,
                                        samples=int(values.size), beyond_percentile=beyond, ci95_s=interval,
                                        confidence=confidence)
    good = 0
    for record in ok:
        values = [slo.request_value(record) for slo in slos]
        if all(v is not None and v <= slo.threshold_s for v, slo in zip(values, slos)):
            good += 1
    return SloJudgement(slos=verdicts, all_met=all(v.met for v in verdicts.values()),
                        goodput_rps=good / window_s if window_s else 0.0, good_requests=good,
                        good_fraction=good / len(measured) if measured else 0.0)

"""The metric registry: one entry per latency metric, read by everything that measures, judges or shows one.

An entry says how the metric is computed from a request's record, its unit, its SLO spelling (`ttft_p99=...`,
also its key under summary.json's `latency_s`), and its labels on the console, in the charts, in CSV files
and in Prometheus and Grafana. SLO parsing, the summary, goodput, the early stop, the console table, the
charts, `--compare`, the CSV export, the exporter and the dashboards iterate over `METRICS`, so a new metric
is its entry here, its computation (a RequestRecord figure) and its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from tokenrig.metrics.records import RequestRecord

PROMETHEUS_UNITS = {"s": "seconds"}  # Prometheus names carry the base unit spelled out


@dataclass(frozen=True)
class Metric:
    name: str  # the SLO's spelling (ttft_p99=500ms) and the metric's key in summary.json's latency_s
    label: str  # the console's, the charts' and the tables' name for it: TTFT
    title: str  # its Grafana panel's title
    description: str  # its Prometheus histogram's help text
    samples: Callable[[RequestRecord], list[float]]  # the values one successful request contributes
    row: int  # its place in the console's latency table and in the dashboard's panels
    unit: str = "s"
    per_token: bool = False  # a value per token: a request's own figure is its percentile of its samples
    from_due_time: bool = False  # counted from the request's due time, so a late send adds its lag to it
    csv_column: str | None = None  # requests.csv's column of a per-request value no record field holds already
    compared: bool = True  # a column of `loadtest --compare`'s table
    stepped: bool = False  # p50 and p99 columns of every step table (search.json rows, sweep and search charts)

    def request_value(self, record: RequestRecord, percentile: float) -> float | None:
        """The request's own figure, as goodput and the early stop judge it against an SLO at `percentile`."""
        values = self.samples(record)
        if not values:
            return None
        return float(np.percentile(values, percentile)) if self.per_token else values[0]

    def values(self, records: list[RequestRecord]) -> list[float]:
        """Every value the records contribute to the metric's distribution (ITL: each of their tokens')."""
        return [value for record in records for value in self.samples(record)]

    @property
    def prometheus_name(self) -> str:
        return f"tokenrig_request_{self.name}_{PROMETHEUS_UNITS[self.unit]}"


def _present(value: float | None) -> list[float]:
    return [] if value is None else [value]


METRICS: dict[str, Metric] = {metric.name: metric for metric in (
    Metric("ttft", "TTFT", "TTFT", "Time to first token, from the scheduled send time",
           lambda record: _present(record.ttft_s), row=0, from_due_time=True, stepped=True),
    Metric("tpot", "TPOT", "TPOT", "Time per output token after the first, per request",
           lambda record: _present(record.tpot()), row=2, csv_column="tpot_s", stepped=True),
    Metric("itl", "ITL", "Inter-token latency", "Inter-token latency, one observation per token",
           RequestRecord.itl_gaps, row=1, per_token=True),
    Metric("e2e", "E2E", "End-to-end latency", "End-to-end latency, from the scheduled send time",
           lambda record: _present(record.e2e_s), row=3, from_due_time=True, compared=False),
)}


def by_row() -> list[Metric]:
    """The metrics in the console table's and the dashboard's order."""
    return sorted(METRICS.values(), key=lambda metric: metric.row)


def compared_metrics() -> list[Metric]:
    """The metrics `loadtest --compare` and the report's comparison table show, p50 and p99 each."""
    return [metric for metric in METRICS.values() if metric.compared]


def stepped_metrics() -> list[Metric]:
    """The metrics every step table shows at p50 and p99 (search.json's rows, the sweep and search charts)."""
    return [metric for metric in METRICS.values() if metric.stepped]

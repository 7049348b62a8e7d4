"""The load generator's Prometheus exporter: a record sink plus live gauges.

`PrometheusSink` is one more sink of the RequestRecord stream (next to requests.jsonl): each
finished request feeds the latency histograms and the outcome/token counters. Gauges read the
running LoadContext at scrape time. Names follow Prometheus conventions (base units,
`_seconds`, `_total`) and every series carries run_id, scenario, backend, model and gpu labels.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from tokenrig.errors import UserError
from tokenrig.metrics.records import RequestRecord
from tokenrig.metrics.registry import by_row
from tokenrig.monitor.discovery import TargetFile


class ExporterPortError(UserError, OSError):
    """The exporter's port cannot be bound (taken, or not allowed)."""

# 1 ms .. 10 min, roughly 2.5x apart: resolves ITL milliseconds and minute-long E2E alike
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5,
                   0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
RUN_LABELS = ("run_id", "scenario", "backend", "model", "gpu")


class BulkHistogram:
    """One labelled Prometheus histogram fed a whole array at a time: a request's ITL gaps, one per token.
    prometheus_client's `observe` takes a lock and walks the buckets for each value, 120 µs for a 128-token
    request; here one searchsorted and one bincount. Exposed as the library's histogram family."""

    def __init__(self, name: str, documentation: str, label_names: list[str], label_values: list[str],
                 registry: CollectorRegistry, buckets: tuple[float, ...]):
        self.name, self.documentation = name, documentation
        self.label_names, self.label_values = label_names, label_values
        self.bounds = np.array([*buckets, np.inf])
        self.counts = np.zeros(self.bounds.size, dtype=np.int64)  # per bucket, not cumulative
        self.sum = 0.0
        registry.register(self)

    def observe_many(self, values) -> None:
        values = np.asarray(values, dtype=float)
        # the first bound >= value: Prometheus buckets are "less than or equal"
        self.counts += np.bincount(np.searchsorted(self.bounds, values), minlength=self.bounds.size)
        self.sum += float(values.sum())

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)
        family.add_metric(self.label_values, [(floatToGoString(bound), int(count))
                                              for bound, count in zip(self.bounds, np.cumsum(self.counts))],
                          self.sum)
        yield family


class SentCounter:
    """tokenrig_requests_sent_total: requests sent, counted at the send (the load context's count), so that its
    rate is the achieved send rate even while an overloaded server holds the requests. A distributed run's master
    sees only the records its workers ship: there it counts records, the most it knows."""

    def __init__(self, label_names: list[str], label_values: list[str], registry: CollectorRegistry):
        self.label_names, self.label_values = label_names, label_values
        self.ctx = None
        self.records = 0
        registry.register(self)

    def collect(self):
        family = CounterMetricFamily("tokenrig_requests_sent", "Requests sent (achieved rate = rate() of this)",
                                     labels=self.label_names)
        family.add_metric(self.label_values, max(self.ctx.sent if self.ctx else 0, self.records))
        yield family


class LoadgenMetrics:
    def __init__(self, labels: dict[str, str]):
        self.registry = CollectorRegistry()
        names = list(RUN_LABELS)
        self.label_values = [labels[name] for name in RUN_LABELS]

        def histogram(name, doc):
            family = Histogram(name, doc, names, buckets=LATENCY_BUCKETS, registry=self.registry)
            return family.labels(*self.label_values)

        # one histogram per registered metric: a per-token one takes a request's values in one call
        self.latency = {metric: (BulkHistogram(metric.prometheus_name, metric.description, names, self.label_values,
                                               self.registry, LATENCY_BUCKETS) if metric.per_token
                                 else histogram(metric.prometheus_name, metric.description))
                        for metric in by_row()}
        self.lag = histogram("tokenrig_schedule_lag_seconds", "Actual minus scheduled send time")
        self.requests = Counter("tokenrig_requests", "Finished requests by outcome", names + ["outcome"],
                                registry=self.registry)
        self.input_tokens = Counter("tokenrig_input_tokens", "Prompt tokens of successful requests", names,
                                    registry=self.registry).labels(*self.label_values)
        self.output_tokens = Counter("tokenrig_output_tokens", "Output tokens of successful requests", names,
                                     registry=self.registry).labels(*self.label_values)
        # in flight, not the Locust users: an open loop keeps its whole in-flight cap of users (512) at any rate
        self.in_flight = Gauge("tokenrig_requests_in_flight", "Requests sent and not yet finished", names,
                               registry=self.registry)
        self.target_rate = Gauge("tokenrig_target_request_rate", "Open-loop target arrival rate, requests per second",
                                 names, registry=self.registry)
        self.sent = SentCounter(names, self.label_values, self.registry)

    def bind(self, ctx) -> None:
        """Gauges and the sent counter read the live run state at scrape time."""
        labels = self.label_values
        self.in_flight.labels(*labels).set_function(lambda: ctx.in_flight)
        self.sent.ctx = ctx
        if ctx.plan.target_rate:
            self.target_rate.labels(*labels).set(ctx.plan.target_rate)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise ExporterPortError(f"--metrics-port {port}: {error.strerror or error} on {host}: choose a free "
                                    "port, or 0 for any") from None
        return server.server_port


class PrometheusSink:
    """Feeds every finished request into `LoadgenMetrics`."""

    def __init__(self, metrics: LoadgenMetrics):
        self.metrics = metrics

    def write(self, record: RequestRecord) -> None:
        m = self.metrics
        m.sent.records += 1
        m.lag.observe(max(record.send_lag_s, 0.0))
        outcome = "ok" if record.ok else ("aborted" if (record.error or "").startswith("aborted") else "error")
        m.requests.labels(*m.label_values, outcome).inc()
        if not record.ok:
            return
        for metric, histogram in m.latency.items():
            if isinstance(histogram, BulkHistogram):
                histogram.observe_many(metric.samples(record))
            else:
                for value in metric.samples(record):
                    histogram.observe(value)
        m.output_tokens.inc(record.output_tokens)
        m.input_tokens.inc(record.prompt_tokens_usage or record.prompt_tokens_sent)

    def close(self) -> None:
        pass


def wait_for_final_scrape(seconds: float) -> None:
    """Keep the exporter up briefly after the run so Prometheus scrapes the final counts."""
    if seconds > 0:
        time.sleep(seconds)


@contextlib.contextmanager
def live_loadgen_metrics(labels: dict[str, str], server_metrics_url: str | None, port: int,
                         targets_dir: Path, linger_s: float, progress=print):
    """Expose the run's metrics and announce them (and the server's /metrics) to Prometheus; yields the
    LoadgenMetrics, which a PrometheusSink in the record stream feeds and `bind` ties to the load's state."""
    metrics = LoadgenMetrics(labels)
    bound_port = metrics.serve(port)
    target_files = [TargetFile.announce(targets_dir, "loadgen", f"127.0.0.1:{bound_port}", labels)]
    if server_metrics_url:
        target_files.append(TargetFile.announce(targets_dir, "server", urlsplit(server_metrics_url).netloc, labels))
    progress(f"metrics: http://127.0.0.1:{bound_port}/metrics (Prometheus targets in {targets_dir})")
    try:
        yield metrics
    finally:
        wait_for_final_scrape(linger_s)
        for target in target_files:
            target.remove()

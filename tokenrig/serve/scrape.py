"""Server-side metrics during a load test: scrape the server's Prometheus /metrics at a fixed interval.

Each scrape becomes one line of server_metrics.jsonl (unix time + the engine's figures under
engine-neutral names: running/waiting requests, KV-cache usage, prefix-cache queries/hits, token
counters), read from the names each registered backend maps them to (serve/backends: vLLM's, which
tokenrig's own servers also export, SGLang's, TGI's), so a --url server of any of them is read too.
The summary puts gauge means/maxima and counter deltas over the steady-state window next to client
metrics. Each figure lists its names engine by engine, each engine's newest first, and takes the first
one a page has (vLLM 0.10 exported the old and the new KV-cache and prefix-cache names side by side).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tokenrig.serve.backends import metric_names

# engine-neutral name -> the sample names engines export it under (the backends' metric maps)
GAUGES = {figure: metric_names(figure) for figure in ("running", "waiting", "kv_cache_usage", "batch_tokens")}
COUNTERS = {figure: metric_names(figure) for figure in ("prefix_cache_queries", "prefix_cache_hits", "prompt_tokens",
                                                        "generation_tokens", "preemptions")}
_NAMES = {key: names for table in (GAUGES, COUNTERS) for key, names in table.items()}
_SAMPLE_NAMES = {name for names in _NAMES.values() for name in names}
_SAMPLE_PREFIXES = tuple(sorted(_SAMPLE_NAMES))


def parse_metrics(text: str) -> dict[str, float]:
    """The known figures of one /metrics page, summed over label sets (one model, one or more engines);
    of a figure's alternative names, the first the page has."""
    # Only the lines of those samples go to the parser. vLLM 0.26's page is ~50 KB, mostly histograms: parsed
    # whole it took 7.6 ms, 0.3 ms filtered first. The scraper runs in the load generator's event loop, where
    # a block that long delays every chunk arriving meanwhile (~180 of them at 24k chunks/s).
    wanted = "\n".join(line for line in text.splitlines() if line.startswith(_SAMPLE_PREFIXES))
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(wanted):
        for sample in family.samples:
            if sample.name in _SAMPLE_NAMES:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return {key: sums[next(name for name in names if name in sums)]
            for key, names in _NAMES.items() if any(name in sums for name in names)}


def fetch_metrics(metrics_url: str, timeout_s: float) -> dict[str, float]:
    """One /metrics page, parsed; OSError when unreachable, ValueError when it is not a valid page."""
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
        return parse_metrics(response.read().decode())


def wait_server_idle(metrics_url: str, timeout_s: float = 300, poll_s: float = 0.5, progress=print) -> None:
    """Before a step: wait until the server has no running or waiting requests (vLLM's, tokenrig's or TGI's
    names), so a step is not measured against the backlog the previous one left behind."""
    deadline, announced = time.monotonic() + timeout_s, False
    while time.monotonic() < deadline:
        try:
            figures = fetch_metrics(metrics_url, timeout_s=5)
        except OSError:
            return  # no metrics endpoint: nothing to wait on
        except ValueError as error:
            progress(f"  the server's /metrics page does not parse ({error}); not waiting for it to drain")
            return
        if "running" not in figures and "waiting" not in figures:
            return  # an engine that exports no queue figures: nothing to wait on
        busy = figures.get("running", 0.0) + figures.get("waiting", 0.0)
        if busy == 0:
            return
        if not announced:
            progress(f"  waiting for the server to drain {busy:.0f} requests left from the previous step")
            announced = True
        time.sleep(poll_s)
    progress(f"  server still busy after {timeout_s:.0f} s; measuring anyway")


class MetricsScraper:
    """Background thread (a greenlet under Locust's monkey-patching) appending one JSON line per scrape."""

    def __init__(self, metrics_url: str, out: Path, interval_s: float = 1.0):
        self.metrics_url = metrics_url
        self.out = out
        self.interval_s = interval_s
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-metrics", daemon=True)

    def __enter__(self) -> MetricsScraper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def scrape_once(self) -> dict:
        return {"t": time.time(), **fetch_metrics(self.metrics_url, timeout_s=max(self.interval_s, 2))}

    def _run(self) -> None:
        next_at = time.monotonic()
        with self.out.open("a", buffering=1) as sink:
            while not self._stop.is_set():
                try:
                    sink.write(json.dumps(self.scrape_once()) + "\n")
                except (OSError, ValueError):  # a busy or restarting server: count it, keep the interval
                    self.errors += 1
                next_at += self.interval_s  # fixed cadence, whatever one scrape took
                self._stop.wait(max(0.0, next_at - time.monotonic()))


def summarize_server_metrics(path: Path, window_start: float, window_end: float, errors: int = 0) -> dict | None:
    """Gauges: mean and max over the scrapes inside the window; counters: increase and rate over it."""
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    inside = [row for row in rows if window_start <= row["t"] < window_end]
    if not inside:
        return {"scrapes": len(rows), "scrapes_in_window": 0, "scrape_errors": errors}
    summary: dict = {"scrapes": len(rows), "scrapes_in_window": len(inside), "scrape_errors": errors}
    for key in GAUGES:
        values = [row[key] for row in inside if key in row]
        if values:
            summary[key] = {"mean": sum(values) / len(values), "max": max(values)}
    span = inside[-1]["t"] - inside[0]["t"]
    for key in COUNTERS:
        values = [row[key] for row in inside if key in row]
        if len(values) >= 2:
            increase = values[-1] - values[0]
            summary[key] = {"increase": increase, "per_s": increase / span if span > 0 else None}
    queries, hits = summary.get("prefix_cache_queries"), summary.get("prefix_cache_hits")
    if queries and hits and queries["increase"] > 0:
        summary["prefix_cache_hit_rate"] = hits["increase"] / queries["increase"]
    return summary

"""The load generator's exporter as Prometheus reads it: the ITL histogram, fed a request's gaps at once,
exposes what prometheus_client's own Histogram exposes when fed them one by one."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tokenrig.metrics.records import RequestRecord
from tokenrig.monitor.exporter import LATENCY_BUCKETS, RUN_LABELS, LoadgenMetrics, PrometheusSink

ITL = "tokenrig_request_itl_seconds"


def samples(registry: CollectorRegistry, family_name: str) -> dict:
    page = generate_latest(registry).decode()
    family = next(f for f in text_string_to_metric_families(page) if f.name == family_name)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for s in family.samples if not s.name.endswith("_created")}


def test_itl_histogram_fed_in_bulk_exposes_what_one_observation_a_gap_does():
    labels = {name: f"{name}-1" for name in RUN_LABELS}
    metrics = LoadgenMetrics(labels)
    sink = PrometheusSink(metrics)
    reference_registry = CollectorRegistry()
    reference = Histogram(ITL, "Inter-token latency, one observation per token", list(RUN_LABELS),
                          buckets=LATENCY_BUCKETS, registry=reference_registry).labels(*labels.values())
    rng = random.Random(5)
    observed = 0
    for request in range(40):
        # gaps of every magnitude, some exactly on a bucket bound (Prometheus buckets are "less than or equal"),
        # some chunks of several tokens, one past the last bound
        gaps = [rng.choice([rng.uniform(0, 0.03), rng.choice(LATENCY_BUCKETS), rng.uniform(0.03, 700)])
                for _ in range(rng.randint(1, 60))]
        offsets = [0.1]
        for gap in gaps:
            offsets.append(offsets[-1] + gap)
        tokens = [rng.choice([1, 1, 1, 2, 3]) for _ in offsets]
        record = RequestRecord(request_id=request, request_class="c", api="chat", scheduled_at=0.0, send_lag_s=0.0,
                               slot_late=False, in_window=True, prompt_tokens_sent=8, max_tokens=sum(tokens),
                               status=200, ttft_s=offsets[0], e2e_s=offsets[-1], chunk_offsets_s=offsets,
                               chunk_tokens=tokens, output_tokens_tokenizer=sum(tokens))
        sink.write(record)
        for gap in record.itl_gaps():
            reference.observe(gap)
            observed += 1
    ours, theirs = samples(metrics.registry, ITL), samples(reference_registry, ITL)
    assert ours.keys() == theirs.keys() and len(ours) == len(LATENCY_BUCKETS) + 3  # buckets, +Inf, count, sum
    for key, value in theirs.items():
        assert abs(ours[key] - value) <= 1e-9 * max(1.0, abs(value)), key
    assert next(value for (name, _), value in ours.items() if name == f"{ITL}_count") == observed > 500


def test_a_live_run_counts_sends_at_the_send_and_exports_requests_in_flight_not_users(tmp_path):
    """4 req/s against a server that takes 3 s to answer: a second into the run, requests were sent and none
    finished. The exporter counts them as sent (the achieved-rate panel must not wait for the server), and
    in flight; there is no Locust-user gauge, which read the open loop's cap (512) whatever the rate."""
    import re
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.conftest import DATA, REPO

    process = subprocess.Popen(
        [sys.executable, "-m", "tokenrig.cli", "loadtest", "--backend", "sim", "--sim-ttft-ms", "3000",
         "--sim-tpot-ms", "1", "--scenario", str(DATA / "timing.yaml"), "--rate", "4", "--arrival", "constant",
         "--duration", "3", "--warmup", "0", "--metrics-port", "0", "--prometheus-targets", str(tmp_path / "targets"),
         "--results", str(tmp_path / "runs")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        for line in process.stdout:
            found = re.search(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", line)
            if found:
                port = int(found.group(1))
            if port and line.strip().startswith("load:"):
                break
        time.sleep(1.8)  # the plan starts half a second after the load line; then 1.3 s of arrivals
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        process.terminate()  # a clean stop: the CLI stops the sim server it started
        process.communicate(timeout=60)
    values = {(s.name, s.labels.get("outcome")): s.value for f in text_string_to_metric_families(page)
              for s in f.samples}
    assert values[("tokenrig_requests_sent_total", None)] >= 3, page
    assert values[("tokenrig_requests_in_flight", None)] == values[("tokenrig_requests_sent_total", None)]
    assert values.get(("tokenrig_requests_total", "ok"), 0) == 0
    assert not any(name == "tokenrig_users" for name, _ in values)

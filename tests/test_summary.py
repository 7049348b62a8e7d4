import json
from pathlib import Path

import numpy as np
import pytest

from tokenrig.metrics.distribution import distribution
from tokenrig.metrics.records import RequestRecord
from tokenrig.metrics.run_summary import SCHEMA_VERSION, RunSummary, SummaryVersionError
from tokenrig.metrics.summary import RunFacts, summarize
from tokenrig.report.console import render


def record(i, scheduled_at, ttft, offsets, tokens, e2e, usage, error=None, lag=0.0, in_window=True):
    return RequestRecord(request_id=i, request_class="c", api="chat", scheduled_at=scheduled_at, send_lag_s=lag,
                         slot_late=False, in_window=in_window, prompt_tokens_sent=10, max_tokens=usage or 0,
                         status=200, error=error, ttft_s=ttft, e2e_s=e2e, chunk_offsets_s=offsets,
                         chunk_tokens=tokens, output_tokens_usage=usage, prompt_tokens_usage=12,
                         output_tokens_tokenizer=usage)


def test_itl_divides_each_gap_by_the_tokens_its_chunk_carried():
    r = record(1, 0.0, 0.1, [0.1, 0.12, 0.18], [1, 1, 3], 0.18, 5)
    assert r.itl_gaps() == pytest.approx([0.02, 0.02, 0.02, 0.02])
    assert r.tpot() == pytest.approx((0.18 - 0.1) / 4)


def test_percentiles_are_exact():
    values = list(range(1, 1001))
    stats = distribution(values)
    assert stats.p50 == np.percentile(values, 50) == 500.5
    assert stats.p99 == pytest.approx(990.01)
    assert stats.min == 1 and stats.max == 1000 and stats.count == 1000


def test_summary_windows_errors_and_health():
    start = 1000.0
    records = [
        record(1, start + 0.5, 0.1, [0.1, 0.2], [1, 1], 0.2, 2, in_window=False),  # warm-up
        record(2, start + 2.0, 0.2, [0.2, 0.3, 0.4], [1, 1, 1], 0.4, 3),
        record(3, start + 3.0, 0.3, [0.3, 0.5], [1, 1], 0.5, 2),
        record(4, start + 4.0, None, [], [], None, None, error="HTTP 500: boom"),
    ]
    facts = RunFacts(duration_s=10, warmup_s=1, cooldown_s=0, plan_start_unix=start, target_rate=None,
                     client_cpu_fraction=0.05)
    summary = summarize(records, facts)
    assert summary.requests.model_dump() == {"total": 4, "measured": 3, "ok": 2, "failed": 1, "cancelled": 0,
                                   "excluded_warmup_cooldown": 1, "errors_by_type": {"HTTP 500": 1},
                                   "error_examples": {"HTTP 500": "HTTP 500: boom"}, "error_rate": pytest.approx(1 / 3),
                                   "max_error_rate": 0.05, "too_many_errors": True}
    assert summary.latency_s.get("ttft").p50 == pytest.approx(0.25)
    # 5 tokens of requests 2 and 3 arrive in the 9-s window, plus none of request 1 (it ended at start+0.7)
    assert summary.throughput.output_tokens_per_s == pytest.approx(5 / 9)
    assert summary.load_generator.valid
    busy = summarize(records, RunFacts(10, 1, 0, start, None, client_cpu_fraction=0.97))
    assert not busy.load_generator.valid and "CPU" in busy.load_generator.problems[0]
    assert "INVALID RUN" in render(busy, "t") and "--workers" in render(busy, "t")
    assert summary.window.problem is None and "NO MEASUREMENT" not in render(summary, "t")


def test_a_window_shorter_than_every_request_says_so_instead_of_reporting_nothing():
    """32 users whose 21-s requests all went out in warm-up: nothing was scheduled in the 17-s window."""
    start = 1000.0
    records = [record(i, start, 0.5, [0.5, 21.0], [1, 1], 21.0, 2, in_window=False) for i in range(32)]
    summary = summarize(records, RunFacts(20, 3, 0, start, None, client_cpu_fraction=0.02))
    assert summary.requests.measured == 0 and summary.latency_s.get("ttft") is None
    assert summary.window.problem == ("no request was scheduled inside the 17.0-s window "
                                            "(requests took 21.0 s, median E2E); lengthen --duration")
    assert "NO MEASUREMENT: no request was scheduled" in render(summary, "t")


@pytest.mark.parametrize("sends, late, valid", [
    (12, 1, True),    # one VM hiccup among a short search step's dozen sends: its p99 lag is that hiccup
    (12, 2, False),   # two late sends in twelve: the client kept falling behind
    (400, 4, True),   # 1 % of sends late: lag p99 at the threshold
    (400, 5, False),  # more than 1 %: lag p99 past it
])
def test_late_sends_invalidate_a_run_past_one_percent_and_one_send(sends, late, valid):
    start = 1000.0
    records = [record(i, start + 1 + i * 0.02, 0.1, [0.1, 0.11], [1, 1], 0.11, 2, lag=0.015 if i < late else 0.001)
               for i in range(sends)]
    summary = summarize(records, RunFacts(duration_s=20, warmup_s=1, cooldown_s=0, plan_start_unix=start,
                                          target_rate=None, client_cpu_fraction=0.05))
    health = summary.load_generator
    assert health.valid is valid, health.problems
    if not valid:
        assert health.problems == [f"{late} of {sends} sends more than 10 ms late (schedule lag p99 "
                                   f"{health.schedule_lag_s.p99 * 1000:.1f} ms)"]
        # at 5 % of a core the client was not what fell behind: more workers would not help
        assert health.remedy.startswith("the load generator was not busy (5% of a core): something else on this host")


@pytest.mark.parametrize("lag, valid", [(0.030, True), (0.060, False)])
def test_at_a_low_rate_a_send_is_late_past_a_tenth_of_the_gap_between_arrivals(lag, valid):
    """2 req/s: arrivals 500 ms apart, so a send counts as late past 50 ms, not 10 ms."""
    start = 1000.0
    records = [record(i, start + 1 + i * 0.5, 0.1, [0.1, 0.11], [1, 1], 0.11, 2, lag=lag if i < 3 else 0.001)
               for i in range(100)]
    summary = summarize(records, RunFacts(duration_s=52, warmup_s=1, cooldown_s=0, plan_start_unix=start,
                                          target_rate=2.0, client_cpu_fraction=0.05))
    health = summary.load_generator
    assert health.valid is valid, health.problems
    if not valid:
        assert health.problems[0].startswith("3 of 100 sends more than 50 ms late")


def test_late_sends_from_a_busy_client_call_for_more_workers():
    start = 1000.0
    records = [record(i, start + 1 + i * 0.02, 0.1, [0.1, 0.11], [1, 1], 0.11, 2, lag=0.015 if i < 5 else 0.001)
               for i in range(400)]
    summary = summarize(records, RunFacts(duration_s=20, warmup_s=1, cooldown_s=0, plan_start_unix=start,
                                          target_rate=None, client_cpu_fraction=0.7))
    assert summary.load_generator.remedy == "add load-generator workers (--workers N) or lower the load"


def test_an_idle_client_that_sent_too_few_arrivals_is_not_told_to_find_a_quieter_host():
    """The one problem is arrivals not sent (the run's plan lost some); one send was late, below the rule."""
    start = 1000.0
    records = [record(i, start + 1 + i * 0.02, 0.1, [0.1, 0.11], [1, 1], 0.11, 2, lag=0.015 if i == 0 else 0.001)
               for i in range(400)]
    summary = summarize(records, RunFacts(duration_s=20, warmup_s=1, cooldown_s=0, plan_start_unix=start,
                                          target_rate=None, client_cpu_fraction=0.05, scheduled_in_window=950))
    health = summary.load_generator
    assert health.problems == ["sent 400 of 950 scheduled arrivals"]
    assert health.remedy == "add load-generator workers (--workers N) or lower the load"


def test_summary_json_keeps_its_shape_with_a_schema_version(tmp_path):
    start = 1000.0
    records = [record(i, start + 1 + i * 0.02, 0.1, [0.1, 0.11], [1, 1], 0.11, 2) for i in range(50)]
    summary = summarize(records, RunFacts(duration_s=20, warmup_s=1.0, cooldown_s=0.0, plan_start_unix=start,
                                          target_rate=None, client_cpu_fraction=0.05))
    summary.write(tmp_path / "summary.json")
    document = json.loads((tmp_path / "summary.json").read_text())
    assert list(document) == ["schema_version", "requests", "window", "latency_s", "throughput", "tokens",
                              "load_generator", "interrupted"]
    assert document["schema_version"] == SCHEMA_VERSION
    assert list(document["latency_s"]["ttft"]) == ["p50", "p90", "p95", "p99", "p99.9", "mean", "min", "max",
                                                   "count", "p99_ci95"]
    assert "workers" not in document["load_generator"]  # only a distributed run has workers
    assert RunSummary.read(tmp_path / "summary.json").to_json() == document


COMMITTED_SUMMARIES = sorted(Path("docs/results").rglob("summary.json"))
OLD_SUMMARIES = [path for path in COMMITTED_SUMMARIES if "schema_version" not in json.loads(path.read_text())]
VERSIONED_SUMMARIES = [path for path in COMMITTED_SUMMARIES if path not in OLD_SUMMARIES]


@pytest.mark.parametrize("path", OLD_SUMMARIES[::12], ids=lambda path: path.parent.name)
def test_summaries_written_before_the_schema_load_and_write_back_unchanged(path):
    document = json.loads(path.read_text())
    summary = RunSummary.from_json(document)
    assert summary.schema_version == 0 and summary.to_json() == document
    # fields the old files lack read as their defaults
    assert summary.requests.cancelled == 0 and summary.requests.error_examples == {}


@pytest.mark.parametrize("path", VERSIONED_SUMMARIES[::6], ids=lambda path: path.parent.name)
def test_committed_summaries_of_the_current_schema_load_and_write_back_unchanged(path):
    document = json.loads(path.read_text())
    summary = RunSummary.from_json(document)
    assert summary.schema_version == SCHEMA_VERSION == document["schema_version"]
    assert summary.to_json() == document


def test_a_summary_from_a_newer_tokenrig_is_refused_by_name():
    document = json.loads(OLD_SUMMARIES[0].read_text())
    with pytest.raises(SummaryVersionError, match="upgrade tokenrig"):
        RunSummary.from_json({**document, "schema_version": SCHEMA_VERSION + 1})


def test_a_step_stopped_early_ends_its_window_when_the_load_stopped():
    facts = RunFacts(duration_s=60, warmup_s=5, cooldown_s=2, plan_start_unix=100.0, target_rate=None,
                     client_cpu_fraction=0.0)
    assert facts.window() == (105.0, 158.0)
    stopped = RunFacts(**{**vars(facts), "stopped_after_s": 20.0})  # the cool-down still follows the stop
    assert stopped.window() == (105.0, 120.0)
    at_once = RunFacts(**{**vars(facts), "stopped_after_s": 1.0})  # never a window of no length
    assert at_once.window() == pytest.approx((105.0, 105.001))
    assert summarize([], at_once).window.seconds == pytest.approx(0.001)

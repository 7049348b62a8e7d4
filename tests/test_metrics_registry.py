"""The metric registry drives SLO parsing, the summary, the SLO verdicts, the early stop, the console, --compare,
requests.csv and the Prometheus exporter: a metric registered here, in the test alone, is parsed, summarised,
judged and shown with no other change. The metrics core imports none of the modules that read it."""

import ast
import csv
import json
from pathlib import Path

import pytest

from tokenrig.metrics.records import JsonlSink, RequestRecord
from tokenrig.metrics.registry import METRICS, Metric, by_row, compared_metrics, stepped_metrics
from tokenrig.metrics.run_summary import RunSummary
from tokenrig.metrics.slo import SloError, judge, parse_slos
from tokenrig.metrics.summary import RunFacts, summarize
from tokenrig.metrics.verdict import SloWatch, StepResult
from tokenrig.monitor.exporter import RUN_LABELS, LoadgenMetrics, PrometheusSink
from tokenrig.report.compare import compare_runs, markdown
from tokenrig.report.console import render, render_steps
from tokenrig.report.export import write_csv
from tokenrig.report.runs import find_runs

METRICS_CORE = Path(__file__).parents[1] / "tokenrig" / "metrics"
# the core's readers: it must import none of them
READERS = ("tokenrig.loadgen", "tokenrig.report", "tokenrig.capacity", "tokenrig.monitor", "tokenrig.cli",
           "tokenrig.loadtest")

# time after the first token: a metric tokenrig does not have, defined here alone
DECODE = Metric("decode", "DECODE", "Decode time", "Time after the first token, per request",
                lambda record: [] if record.e2e_s is None else [record.e2e_s - record.ttft_s], row=4,
                csv_column="decode_s", stepped=True)


def _quiet(line: str) -> None:
    pass


@pytest.fixture
def decode_metric(monkeypatch):
    monkeypatch.setitem(METRICS, DECODE.name, DECODE)
    return DECODE


def record(i: int, ttft: float, e2e: float, in_window: bool = True) -> RequestRecord:
    return RequestRecord(request_id=i, request_class="c", api="chat", scheduled_at=1000.0 + i, send_lag_s=0.0,
                         slot_late=False, in_window=in_window, prompt_tokens_sent=10, max_tokens=2, status=200,
                         ttft_s=ttft, e2e_s=e2e, chunk_offsets_s=[ttft, e2e], chunk_tokens=[1, 1],
                         output_tokens_usage=2, prompt_tokens_usage=10, output_tokens_tokenizer=2)


# decode times 1.0, 0.9, ..., 0.1 s, the slowest first: p50 0.55 s; 4 of 10 requests within 0.4 s
RECORDS = [record(i, 0.0, 0.1 * (11 - i)) for i in range(1, 11)]
FACTS = RunFacts(duration_s=12, warmup_s=0, cooldown_s=0, plan_start_unix=1000.0, target_rate=None,
                 client_cpu_fraction=0.05)


def test_the_shipped_metrics_in_their_orders():
    assert list(METRICS) == ["ttft", "tpot", "itl", "e2e"]  # summary.json's order
    assert [metric.name for metric in by_row()] == ["ttft", "itl", "tpot", "e2e"]  # the console's and Grafana's
    assert [metric.name for metric in compared_metrics()] == ["ttft", "tpot", "itl"]
    assert [metric.name for metric in stepped_metrics()] == ["ttft", "tpot"]
    assert METRICS["itl"].prometheus_name == "tokenrig_request_itl_seconds"


def test_a_per_token_metric_judges_a_request_by_its_own_percentile():
    slow_tail = RequestRecord(request_id=1, request_class="c", api="chat", scheduled_at=0.0, send_lag_s=0.0,
                              slot_late=False, in_window=True, prompt_tokens_sent=1, max_tokens=5, status=200,
                              ttft_s=0.1, e2e_s=0.5, chunk_offsets_s=[0.1, 0.11, 0.12, 0.13, 0.5],
                              chunk_tokens=[1] * 5, output_tokens_tokenizer=5)
    itl, ttft = METRICS["itl"], METRICS["ttft"]
    assert itl.values([slow_tail]) == pytest.approx([0.01, 0.01, 0.01, 0.37])
    assert itl.request_value(slow_tail, 50) == pytest.approx(0.01)
    assert itl.request_value(slow_tail, 100) == pytest.approx(0.37)
    assert ttft.request_value(slow_tail, 99) == 0.1


def test_an_unregistered_metric_is_no_slo():
    with pytest.raises(SloError, match="METRIC one of ttft, tpot, itl, e2e"):
        parse_slos("decode_p50=400ms")


def test_a_registered_metric_is_parsed_summarised_judged_and_stopped_on(decode_metric):
    slos = parse_slos("decode_p50=400ms,ttft_p99=1s")
    assert (slos[0].metric, slos[0].percentile, slos[0].threshold_s) == ("decode", 50, 0.4)

    summary = summarize(RECORDS, FACTS)
    assert summary.latency_s.get("decode").p50 == pytest.approx(0.55)
    assert RunSummary.from_json(summary.to_json()).latency_s.get("decode").count == 10  # summary.json keeps it

    verdicts = summarize(RECORDS, FACTS, slos).slo
    assert verdicts == judge(RECORDS, slos, window_s=12.0)
    assert verdicts.slos["decode_p50"].value_s == pytest.approx(0.55) and not verdicts.slos["decode_p50"].met
    assert verdicts.slos["ttft_p99"].met
    assert verdicts.good_requests == 4 and verdicts.goodput_rps == pytest.approx(4 / 12)

    # of 10 expected requests, 6 over 0.4 s: the median cannot be met whatever the other 4 measure
    watch = SloWatch(slos, expected_requests=10)
    for r in RECORDS[:5]:
        watch.write(r)
    assert not watch.decided()
    watch.write(RECORDS[5])
    assert watch.decided() and watch.verdict == "missed"


def test_a_registered_metric_is_shown_on_the_console_in_search_rows_in_compare_and_in_csv(decode_metric, tmp_path):
    summary = summarize(RECORDS, FACTS)
    decode_line = next(line for line in render(summary, "t").splitlines() if line.startswith("DECODE"))
    assert decode_line.split()[1] == "550.0"  # p50 in ms
    assert render(summary, "t").splitlines().index(decode_line) == 7  # after TTFT, ITL, TPOT and E2E

    row = StepResult(1.0, summarize(RECORDS, FACTS, parse_slos("decode_p50=400ms"))).row()
    assert row["decode_p50_s"] == pytest.approx(0.55) and row["decode_p99_s"] == pytest.approx(0.991)
    table = render_steps({"mode": "sweep", "steps": [row]}, "t", parse_slos("decode_p50=400ms"))
    header, line = table.splitlines()[2:4]
    assert "DECODE p50" in header and "DECODE p99" in header and "550.0" in line

    run = tmp_path / "run"
    run.mkdir()
    summary.write(run / "summary.json")
    (run / "metadata.json").write_text(json.dumps({"run_id": "run", "server": {"backend": "sim"}, "scenario": {}}))
    table = markdown(compare_runs([tmp_path]))
    assert "| DECODE p50 / p99 ms |" in table and "| 550.0 / 991.0 |" in table

    sink = JsonlSink(run / "requests.jsonl")
    for r in RECORDS:
        sink.write(r)
    sink.close()
    requests_csv, _ = write_csv(find_runs([run], progress=_quiet), tmp_path / "csv", progress=_quiet)
    with requests_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["decode_s"]) for row in rows] == pytest.approx([1.0 - 0.1 * i for i in range(10)])


def test_a_registered_metric_is_exported_to_prometheus(decode_metric):
    metrics = LoadgenMetrics({name: "x" for name in RUN_LABELS})
    sink = PrometheusSink(metrics)
    for r in RECORDS:
        sink.write(r)
    samples = {sample.name: sample.value for family in metrics.registry.collect() for sample in family.samples}
    assert samples["tokenrig_request_decode_seconds_count"] == 10
    assert samples["tokenrig_request_decode_seconds_sum"] == pytest.approx(5.5)


def test_the_metrics_core_imports_none_of_its_readers():
    for path in METRICS_CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(READERS), f"{path.name} imports {name}"

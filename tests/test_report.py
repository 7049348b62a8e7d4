"""`tokenrig report`: one offline HTML file opened in a real headless Chromium, CSV exports, and clear
reports of a run stopped by Ctrl-C and of a run in which no request succeeded."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.browser import CHARTS_JS, chromium, needs_chromium, wait_for_charts
from tests.conftest import DATA, REPO, run_cli, run_dir_of
from tests.test_reliability import FaultServer, error_reply
from tokenrig.metrics.records import RequestRecord, read_records
from tokenrig.report.charts import CDF_POINTS
from tokenrig.report.timeline import build

TIMING = str(DATA / "timing.yaml")


def _record(index, scheduled, lag, e2e, offsets, error=None):
    return RequestRecord(request_id=index, request_class="c", api="chat", scheduled_at=scheduled, send_lag_s=lag,
                         slot_late=False, in_window=True, prompt_tokens_sent=8, max_tokens=len(offsets),
                         error=error, ttft_s=offsets[0] if offsets else None, e2e_s=e2e, chunk_offsets_s=offsets,
                         chunk_tokens=[1] * len(offsets))


def test_timeline_counts_each_second_from_the_records_and_scrapes():
    records = [_record(1, 100.0, 0.1, 2.5, [0.5, 1.5, 2.5]),  # sent 100.1, tokens at 100.5/101.5/102.5, ends 102.5
               _record(2, 100.8, 0.0, 0.3, [0.3]),  # sent 100.8, ends 101.1
               _record(3, 101.2, 0.0, None, [], error="ConnectionRefusedError: refused")]  # fails at once, 101.2
    scrapes = [{"t": 100.0, "running": 0, "waiting": 0},
               {"t": 101.0, "running": 2, "waiting": 1, "kv_cache_usage": 0.5}]
    line = build(records, scrapes)
    assert line.t0 == 100.0 and line.seconds == [0.0, 1.0, 2.0]
    assert line.sent == [2, 1, 0]
    assert line.done == [0, 1, 1] and line.errors == [0, 1, 0]
    assert line.in_flight == [0, 2, 1]  # at 100.0 nothing sent yet; at 101.0 both; at 102.0 only the first
    assert line.output_tokens == [1, 2, 1]
    assert line.server["running"] == ([0.0, 1.0], [0, 2]) and line.server["kv_cache_usage"] == ([1.0], [0.5])


@needs_chromium
def test_report_opens_in_headless_chromium_with_every_chart_drawn(known_engine_runs, known_engine_capacity, tmp_path):
    train = run_cli("train", "--steps", "2", "--warmup-steps", "1", "--profile-steps", "1",
                    "--results", str(tmp_path / "train"), timeout=300)
    assert train.returncode == 0, train.stdout + train.stderr
    answered, capacity = known_engine_capacity.result, known_engine_capacity.json  # measured and projected rows
    assert answered.returncode == 0, answered.stdout + answered.stderr
    out = tmp_path / "report.html"
    result = run_cli("report", str(known_engine_runs["rtx3090"]), str(known_engine_runs["a800"]),
                     str(tmp_path / "train"), "-o", str(out), "--capacity", str(capacity))
    assert result.returncode == 0, result.stdout + result.stderr
    page = out.read_text()
    assert "<script src" not in page and "<link" not in page  # nothing fetched: plotly.js is inlined

    with chromium() as browser:
        browser.get(out.as_uri())
        wait_for_charts(browser)
        charts = browser.execute_script(CHARTS_JS)
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        height = browser.execute_script("return document.body.scrollHeight")
        browser.set_window_size(1400, min(height, 12000))
        browser.save_screenshot(str(tmp_path / "report.png"))
    assert errors == [], errors
    assert (tmp_path / "report.png").stat().st_size > 20_000
    assert len(charts) == page.count('class="plotly-graph-div"') >= 13
    for chart in charts:  # every chart drew every trace, and every trace has points
        assert chart["traces"] and chart["drawn"] == len(chart["traces"]), chart
        assert all(trace["points"] > 0 for trace in chart["traces"]), chart
    by_title = {chart["title"]: chart for chart in charts}

    a800 = known_engine_runs["a800"]
    search = json.loads((a800 / "search.json").read_text())
    walk = {t["name"]: t for t in by_title[f"{a800.name}: search walk"]["traces"]}
    verdicts = ("meets SLOs", "misses SLOs", "saturated")
    assert sum(walk[v]["points"] for v in verdicts if v in walk) == walk["walk"]["points"] == len(search["steps"])
    assert walk["ttft_p90"]["points"] == len(search["steps"])  # the judged percentile of each step, under its line
    cdfs = by_title[f"{a800.name}: latency distributions per step"]
    steps = sorted((a800 / "steps").iterdir())
    ttft = [t for t in cdfs["traces"] if t["name"] in {s.name for s in steps}][::4]  # each step's TTFT curve first
    for step, trace in zip(steps, ttft):
        measured = [r for r in read_records(step / "requests.jsonl") if r.in_window and r.ok]
        assert (trace["name"], trace["points"]) == (step.name, min(len(measured), CDF_POINTS))
    records = [r for s in steps for r in read_records(s / "requests.jsonl")]
    timeline = by_title[f"{a800.name}: per-second timeline (steady-state windows shaded)"]
    sums = {t["name"]: t["sum"] for t in timeline["traces"]}
    assert sums["sent"] == len(records) and sums["done"] == sum(r.ok for r in records)
    assert sums["output tok/s"] == sum(sum(r.chunk_tokens) for r in records)
    assert {"server running", "server waiting", "server KV usage"} <= set(sums)
    capacity_rows = json.loads(capacity.read_text())["rows"]
    assert by_title["goodput per replica (projected: ± held-out band)"]["traces"][0]["points"] == len(capacity_rows)
    train_dir = next((tmp_path / "train").iterdir())
    step_chart = next(c for c in charts if c["title"].endswith(": step time"))
    assert sum(t["points"] for t in step_chart["traces"]) == len((train_dir / "steps.jsonl").read_text().splitlines())
    assert any(c["title"].endswith(": module breakdown") for c in charts)
    assert "sweeps and searches, overlaid" in by_title


def _stopped_run(results: Path) -> Path:
    """A real load test stopped with SIGINT (Ctrl-C) while requests are in flight."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenrig.cli", "loadtest", "--backend", "sim", "--sim-ttft-ms", "50",
         "--sim-tpot-ms", "5", "--scenario", TIMING, "--users", "4", "--duration", "120", "--results", str(results)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        runs = list(results.iterdir()) if results.exists() else []
        if runs and (runs[0] / "requests.jsonl").exists() and (runs[0] / "requests.jsonl").stat().st_size:
            break
        time.sleep(0.2)
    time.sleep(1.5)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    return run_dir_of(subprocess.CompletedProcess([], 130, output, ""))


def test_report_on_a_stopped_run_and_a_run_where_nothing_succeeded(tmp_path):
    stopped = _stopped_run(tmp_path / "stopped")
    # a server that refuses every request (503): the run FAILED, and the report still shows it
    with FaultServer(lambda number, handler: error_reply(handler, 503, "unavailable")) as down:
        failed = run_cli("loadtest", "--url", down.url, "--backend", "sim", "--model", "tiny",
                         "--scenario", TIMING, "--rate", "5", "--duration", "3", "--warmup", "0",
                         "--results", str(tmp_path / "failed"))
    assert failed.returncode == 1 and "FAILED" in failed.stdout, failed.stdout + failed.stderr
    nothing = run_dir_of(failed)
    out, exports = tmp_path / "report.html", tmp_path / "csv"
    result = run_cli("report", str(stopped), str(nothing), "-o", str(out), "--csv", str(exports))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    page = out.read_text()
    assert "stopped early (Ctrl-C or a stop signal): the figures cover the requests finished before the stop" in page
    refused = read_records(nothing / "requests.jsonl")
    assert refused and not any(r.ok for r in refused)
    kinds = {r.error.split(":")[0] for r in refused}
    assert f"no request succeeded ({len(refused)} failed: {kinds.pop()} x{len(refused)})" in page
    assert f"{nothing.name}: per-second timeline" in page  # what was sent and refused, second by second
    assert f"{nothing.name}: latency distributions" not in page  # no latency to draw, and none invented

    with (exports / "requests.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    kept = read_records(stopped / "requests.jsonl")
    assert len(rows) == len(kept) + len(refused)
    assert {row["run_id"] for row in rows} == {stopped.name, nothing.name}
    assert all(row["ok"] == "False" and row["error"] for row in rows if row["run_id"] == nothing.name)
    with (exports / "summary.csv").open() as handle:
        summaries = {row["run_id"]: row for row in csv.DictReader(handle)}
    assert summaries[stopped.name]["interrupted"] == "True" and int(summaries[stopped.name]["requests.ok"]) > 0
    assert summaries[nothing.name]["requests.ok"] == "0"


def _summarised_run(run_dir: Path, ok: int, failed: int, slos=None, step: bool = False) -> Path:
    """A plain run directory as `tokenrig loadtest` leaves it (a step's, without metadata.json): records at
    10 req/s summarised by the real summariser, and the metadata a report reads."""
    from tokenrig.metrics.records import JsonlSink
    from tokenrig.metrics.slo import judge
    from tokenrig.metrics.summary import RunFacts, summarize

    run_dir.mkdir(parents=True)
    records = [_record(i, 1000.5 + i * 0.1, 0.0, 0.3 if i < ok else None, [0.1, 0.2, 0.3] if i < ok else [],
                       error=None if i < ok else "HTTP 503: unavailable") for i in range(ok + failed)]
    sink = JsonlSink(run_dir / "requests.jsonl")
    for record in records:
        sink.write(record)
    sink.close()
    summary = summarize(records, RunFacts(duration_s=(ok + failed) * 0.1 + 1, warmup_s=0.5, cooldown_s=0,
                                          plan_start_unix=1000.0, target_rate=10.0, client_cpu_fraction=0.05))
    if slos:
        summary.slo = judge(records, slos, summary.window.seconds)
    summary.write(run_dir / "summary.json")
    (run_dir / ("step.json" if step else "metadata.json")).write_text(json.dumps({
        "run_id": run_dir.name, "scenario": {"name": "timing"}, "created_unix": 1000.0,
        "server": {"backend": "sim", "model": "tiny", "gpu": "cpu"},
        "slos": [f"{slo.name}<={slo.threshold_s:g}s" for slo in slos or []]}))
    return run_dir


def test_a_failed_run_is_flagged_in_the_html_and_in_compare_and_a_training_run_is_skipped(tmp_path):
    """79 % of the requests failed: the report's notice and --compare's notes say FAILED; a training run
    among the results is skipped with a note, not a traceback."""
    from tokenrig.report.compare import compare_runs, markdown
    from tokenrig.report.html import write_report

    failed = _summarised_run(tmp_path / "results" / "failed", ok=21, failed=79)
    _summarised_run(tmp_path / "results" / "fine", ok=50, failed=0)
    training = tmp_path / "results" / "train-run"
    training.mkdir()
    (training / "metadata.json").write_text(json.dumps({"run_id": "train-run", "kind": "train", "spec": {}}))
    (training / "summary.json").write_text(json.dumps({"run_id": "train-run", "status": "ok", "tokens_per_s": 9.0}))

    notes = []
    rows = compare_runs([tmp_path / "results"], note=notes.append)
    assert [row["run_id"] for row in rows] == ["failed", "fine"]
    assert notes == [f"skipped {training}: a training run (tokenrig train --compare tables those)"]
    table = markdown(rows)
    assert "- failed (sim tiny cpu, bf16, ): FAILED: 79% of 100 measured requests failed" in table
    cli = run_cli("loadtest", "--compare", str(tmp_path / "results"))
    assert cli.returncode == 0 and "Traceback" not in cli.stderr and "skipped" in cli.stderr, cli.stderr

    page = write_report([failed, tmp_path / "results" / "fine"], tmp_path / "r.html", progress=lambda *_: None)
    assert '<div class="notice bad">FAILED: 79% of 100 measured requests failed' in page.read_text()
    assert "comparison of 2 load tests" in page.read_text()


def test_report_of_a_path_that_does_not_exist_refuses_with_exit_2(tmp_path):
    result = run_cli("report", str(tmp_path / "nonexistent"), "-o", str(tmp_path / "r.html"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("no such directory; give run directories (results/RUN_ID) or directories "
                                          "holding them (results/)")
    assert not (tmp_path / "r.html").exists()
    empty = run_cli("report", str(tmp_path), "-o", str(tmp_path / "r.html"))
    assert empty.returncode == 2 and "nothing to report" in empty.stderr and not (tmp_path / "r.html").exists()


def test_a_sweep_shows_the_percentile_its_slo_judges_and_the_comparison_counts_what_it_lists(tmp_path):
    """--sweep with --slo ttft_p90: the console's and the report's step tables have a TTFT p90 column; a
    comparison of a plain run and a sweep says so, not 'of 2 load tests' over a table of one."""
    from tokenrig.metrics.run_summary import RunSummary
    from tokenrig.metrics.slo import parse_slos
    from tokenrig.metrics.verdict import StepResult
    from tokenrig.report.console import render_steps
    from tokenrig.report.html import write_report

    slos = parse_slos("ttft_p90=1s")
    sweep = tmp_path / "sweep"
    rows = []
    for number, rate in enumerate((1, 2), start=1):
        step = _summarised_run(sweep / "steps" / f"{number:02d}-{rate}rps", ok=40, failed=0, slos=slos, step=True)
        rows.append(StepResult(rate, RunSummary.read(step / "summary.json")).row())
    (step / "step.json").rename(sweep / "metadata.json")
    (sweep / "search.json").write_text(json.dumps({"mode": "sweep", "steps": rows}))
    ttft_p90 = rows[0]["slos"]["ttft_p90"]["value_s"]

    console = render_steps({"mode": "sweep", "steps": rows}, "t", slos).splitlines()
    assert "TTFT p90" in console[2] and f"{ttft_p90 * 1000:.1f}" in console[3]
    plain = _summarised_run(tmp_path / "plain", ok=30, failed=0)
    page = write_report([plain, sweep], tmp_path / "r.html", progress=lambda *_: None).read_text()
    assert "<th>ttft_p90</th>" in page and f"<td>{ttft_p90 * 1000:.1f}</td>" in page
    assert "comparison of 1 load test and 1 sweep or search" in page


def test_charts_sort_curves_by_load_label_steps_keep_slo_labels_clear_and_draw_cancelled_apart():
    from tokenrig.metrics.records import CANCELLED
    from tokenrig.metrics.slo import parse_slos
    from tokenrig.report import charts

    # a search visits 8, 16, then 12 req/s: its curves join 8, 12, 16
    rows = [{"load": load, "completed_rps": load * 0.9, "goodput_rps": None, "ttft_p50_s": load / 1000,
             "ttft_p99_s": load / 500, "tpot_p50_s": 0.01, "tpot_p99_s": 0.02} for load in (8, 16, 12)]
    curves = charts.search_curves(rows, [], False, "c")
    assert all(list(trace.x) == sorted(trace.x) for trace in curves.data)
    assert list(curves.data[0].text) == ["step 1", "step 3", "step 2"]

    cdfs = charts.latency_cdfs({"run": {"ttft": [0.1, 0.2, 0.3]}}, parse_slos("ttft_p99=250ms"), "cdf")
    title = next(a for a in cdfs.layout.annotations if a.text == "TTFT (ms)")
    label = next(a for a in cdfs.layout.annotations if a.text.startswith("ttft_p99"))
    assert label.y < title.y - 0.2  # at the foot of the threshold line, not on the subplot's title

    records = [_record(1, 100.0, 0.0, 0.5, [0.2, 0.5]),
               _record(2, 100.5, 0.0, None, [0.1], error=CANCELLED),  # in flight when an early stop came
               _record(3, 100.6, 0.0, None, [], error="HTTP 500: boom")]
    line = build(records, [])
    assert line.errors == [1] and line.cancelled == [1]
    figure = charts.timeline(line, [("01-8rps", 0.0, 0.4), ("02-16rps", 0.5, 0.9)], "t")
    assert {a.text for a in figure.layout.annotations} >= {"01-8rps", "02-16rps"}
    assert {trace.name for trace in figure.data} >= {"errors", "cancelled"}

"""`tokenrig report`: run directories -> one self-contained HTML file that opens offline.

plotly.js is inlined once in the page head, every figure is a div drawn from data embedded next to
it, and the styles are inline: no CDN, nothing fetched. Sections, in order: a comparison of the
load tests when there are several (the `--compare` table, overlaid CDFs and sweep curves); the
capacity table when given; each load test (what to know before reading it, its configuration,
summary tables, latency CDFs, the per-second timeline with the server's scrapes, load-generator
health, and for sweeps and searches the step table, curves and search walk); the training runs
(comparison table, step times, module breakdown). Figures come from charts.py.
"""

from __future__ import annotations

import html
import json
import shlex
import time
from pathlib import Path

from tokenrig.metrics.health import MAX_HEALTHY_LAG_S
from tokenrig.metrics.registry import METRICS, compared_metrics
from tokenrig.metrics.run_summary import RunSummary
from tokenrig.metrics.slo import recorded_slos
from tokenrig.metrics.verdict import step_columns
from tokenrig.report import charts, timeline
from tokenrig.report.compare import run_row, server_label
from tokenrig.report.console import extra_slo_columns, loadgen_note, slo_value
from tokenrig.report.runs import LoadRun, LoadStep, NoRunsError, Runs, TrainRun, find_runs

STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 0 24px 48px; color: #222; }
h1 { margin-top: 28px; } h2 { margin-top: 40px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { margin-top: 24px; color: #444; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
.notice { border-left: 4px solid #e6a700; background: #fff8e1; padding: 6px 12px; margin: 8px 0; }
.notice.bad { border-color: #d62728; background: #fdecea; }
nav ul { columns: 2; font-size: 14px; } code { font-size: 12px; word-break: break-all; }
.meta { color: #666; font-size: 13px; }
"""


class Page:
    """The HTML body, built in order; figures become divs numbered chart-1, chart-2, ..."""

    def __init__(self):
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.charts = 0

    def section(self, anchor: str, title: str) -> None:
        self.toc.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def heading(self, text: str) -> None:
        self.parts.append(f"<h3>{html.escape(text)}</h3>")

    def text(self, text: str, css: str = "") -> None:
        self.parts.append(f'<p class="{css}">{html.escape(text)}</p>')

    def notice(self, text: str, bad: bool = False) -> None:
        self.parts.append(f'<div class="notice{" bad" if bad else ""}">{html.escape(text)}</div>')

    def table(self, headers: list[str], rows: list[list], text_columns: int = 1) -> None:
        def cell(tag, value, index):
            css = ' class="text"' if index < text_columns else ""
            return f"<{tag}{css}>{html.escape('' if value is None else str(value))}</{tag}>"

        head = "".join(cell("th", h, i) for i, h in enumerate(headers))
        body = "".join("<tr>" + "".join(cell("td", v, i) for i, v in enumerate(row)) + "</tr>" for row in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, figure) -> None:
        if figure is None:
            return
        self.charts += 1
        self.parts.append(figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{self.charts}",
                                         config={"displaylogo": False, "responsive": True}))

    def render(self, title: str, subtitle: str) -> str:
        from plotly.offline import get_plotlyjs

        toc = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in self.toc)
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
                f"<h1>{html.escape(title)}</h1><p class=\"meta\">{html.escape(subtitle)}</p>"
                f"<nav><ul>{toc}</ul></nav>{''.join(self.parts)}</body></html>")


def _ms(value) -> str:
    return "–" if value is None else f"{value * 1000:.1f}"


def _number(value, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


def latency_values(records) -> dict[str, list[float]]:
    """Per-request TTFT, TPOT, E2E and per-token ITL of the measured successful requests (docs/metrics.md)."""
    ok = [r for r in records if r.in_window and r.ok]
    return {metric.name: metric.values(ok) for metric in METRICS.values()}


def _summary_tables(page: Page, summary: RunSummary) -> None:
    latency = summary.latency_s
    page.table(["metric (ms)", "p50", "p90", "p99", "p99.9", "mean", "max", "n"],
               [[metric.label] + [_ms(getattr(latency.get(metric.name), k, None))
                                  for k in ("p50", "p90", "p99", "p99_9", "mean", "max")]
                + [getattr(latency.get(metric.name), "count", 0)] for metric in METRICS.values()])
    throughput, requests, window = summary.throughput, summary.requests, summary.window
    errors = ", ".join(f"{k} x{v}" for k, v in requests.errors_by_type.items()) or "none"
    page.table(["output tok/s", "req/s", "input tok/s", "ok", "failed", "warm-up/cool-down", "window s", "errors"],
               [[_number(throughput.output_tokens_per_s, ".1f"), _number(throughput.requests_per_s),
                 _number(throughput.input_tokens_per_s, ".1f"), requests.ok, requests.failed,
                 requests.excluded_warmup_cooldown, _number(window.seconds, ".1f"), errors]], text_columns=0)
    slo = summary.slo
    if slo:
        page.table(["SLO", "threshold ms", "measured ms", "met", "samples", "confidence"],
                   [[name, _ms(v.threshold_s), _ms(v.value_s), "met" if v.met else "MISSED", v.samples,
                     v.confidence] for name, v in slo.slos.items()])
        page.text(f"goodput {slo.goodput_rps:.2f} req/s meet every SLO ({slo.good_fraction:.0%} of measured "
                  "requests)")
    server = summary.server or {}
    gauges = [[key, _number(server[key]["mean"]), _number(server[key]["max"])]
              for key in ("running", "waiting", "kv_cache_usage", "batch_tokens") if key in server]
    if gauges:
        page.heading("server (scraped /metrics, steady-state window)")
        page.table(["gauge", "mean", "max"], gauges)


def _health_table(page: Page, summary: RunSummary) -> None:
    health = summary.load_generator
    lag = health.schedule_lag_s
    page.table(["valid", "lag p50 ms", "lag p99 ms", "lag max ms", "client CPU", "target req/s", "achieved req/s",
                "waited for a free user", "problems"],
               [["yes" if health.valid else "NO", _ms(lag and lag.p50), _ms(lag and lag.p99), _ms(lag and lag.max),
                 f"{health.client_cpu_fraction:.0%}", _number(health.target_rate_rps),
                 _number(health.achieved_send_rate_rps), health.slot_late_requests,
                 "; ".join(health.problems) or "none"]])


def _configuration(page: Page, run: LoadRun) -> None:
    metadata = run.metadata
    server = metadata.get("server") or {}
    scenario = metadata.get("scenario") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (metadata.get("versions") or {}).items())
    rows = [["server", server_label(server)], ["scenario", f"{scenario.get('name', '?')}: "
                                                           f"{(scenario.get('description') or '').strip()}"],
            ["SLOs", ", ".join(metadata.get("slos") or []) or "none"],
            ["command", shlex.join(server["command"]) if server.get("command") else server.get("url", "–")],
            ["host", f"{metadata.get('host', '?')} "
                     f"({metadata.get('platform', '?')}, {metadata.get('cpu_count', '?')} CPUs)"],
            ["versions", versions], ["git", metadata.get("git_sha") or "–"],
            ["started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(metadata["created_unix"]))
             if metadata.get("created_unix") else "–"]]
    page.table(["", ""], rows, text_columns=2)


def _step_windows(steps: list[LoadStep], t0: float) -> list[tuple[str, float, float]]:
    """Each step's steady-state window on the timeline's clock, labelled by its step (none for a plain run)."""
    return [(s.label if len(steps) > 1 else "", s.summary.window.start_unix - t0, s.summary.window.end_unix - t0)
            for s in steps if s.summary is not None]


def _load_run(page: Page, run: LoadRun, anchor: str) -> None:
    server = run.metadata.get("server") or {}
    page.section(anchor, f"load test {run.run_id}")
    page.text(f"{server_label(server)} | scenario {(run.metadata.get('scenario') or {}).get('name', '?')}", "meta")
    slos = recorded_slos(run.metadata)
    search = run.search
    if search and search.get("stop_reason") == "interrupted":
        page.notice("the sweep or search was stopped (Ctrl-C): the curve covers the steps finished before the stop")
    for step in run.steps:
        for note in step.notices():
            page.notice((f"{step.label}: " if search or len(run.steps) > 1 else "") + note,
                        bad=note.startswith(("no request", "FAILED", "INVALID", "no measurement")))
    if not run.steps:
        page.notice("no load step was recorded: the run stopped before its first step", bad=True)
    _configuration(page, run)
    records = [r for step in run.steps for r in step.records or []]
    if search is not None:
        users = bool((run.metadata.get("search") or {}).get("sweep_users"))
        page.heading(f"{search.get('mode', 'sweep')}: {len(search.get('steps') or [])} steps"
                     + (f" — max rate meeting every SLO {search['max_rate_meeting_slos']:.3g} req/s"
                        if search.get("max_rate_meeting_slos") is not None else ""))
        if search.get("stop_reason"):
            page.text(f"search: {search['stop_reason']}")
        extra = extra_slo_columns(slos)
        columns = step_columns()
        page.table(["step", "load", "sent/s", "done/s", "tok/s"] + [f"{metric.label} {key}" for metric, key in columns]
                   + [slo.name for slo in extra] + ["goodput", "verdict"],
                   [[i + 1, f"{row['load']:.4g}", _number(row["achieved_rps"]), _number(row["completed_rps"]),
                     _number(row["output_tokens_per_s"], ".0f")]
                    + [_ms(row[f"{metric.name}_{key}_s"]) for metric, key in columns]
                    + [_ms(slo_value(row, slo)) for slo in extra] + [_number(row["goodput_rps"]),
                     ("meets SLOs" if row["slo_met"] else "misses SLOs" if slos else "")
                     + (" saturated" if row["saturated"] else "") + (" stopped early" if row["stopped_early"] else "")
                     + loadgen_note(row)]
                    for i, row in enumerate(search.get("steps") or [])], text_columns=0)
        page.figure(charts.search_curves(search.get("steps") or [], slos, users, f"{run.run_id}: curves"))
        page.figure(charts.search_walk(search, slos, users, f"{run.run_id}: search walk"))
        page.figure(charts.latency_cdfs({s.label: latency_values(s.records) for s in run.steps if s.records},
                                        slos, f"{run.run_id}: latency distributions per step"))
    elif run.steps and run.steps[0].summary is not None:
        _summary_tables(page, run.steps[0].summary)
        page.figure(charts.latency_cdfs({run.run_id: latency_values(records)}, slos,
                                        f"{run.run_id}: latency distributions (CDF)"))
    elif records:
        page.figure(charts.latency_cdfs({run.run_id: latency_values(records)}, slos,
                                        f"{run.run_id}: latency distributions (CDF)"))
    profiled = {step.label: step.summary.breakdown for step in run.steps
                if step.summary is not None and step.summary.breakdown is not None}
    if profiled:
        page.heading("engine time by operator (profiled steps)")
        page.text(next(iter(profiled.values())).source, "meta")
        page.figure(charts.operator_breakdown(profiled, f"{run.run_id}: engine time by operator"))
    scrapes = [row for step in run.steps for row in step.scrapes]
    line = timeline.build(records, scrapes)
    page.figure(charts.timeline(line, _step_windows(run.steps, line.t0), f"{run.run_id}: per-second timeline "
                                "(steady-state windows shaded)"))
    page.heading("load generator health")
    for step in run.steps:
        if step.summary is not None:
            if len(run.steps) > 1:
                page.text(step.label, "meta")
            _health_table(page, step.summary)
    page.figure(charts.schedule_lag([r.send_lag_s for r in records if r.in_window], MAX_HEALTHY_LAG_S,
                                    f"{run.run_id}: schedule lag (CDF)"))


def _comparison(page: Page, runs: list[LoadRun]) -> None:
    plain = [run for run in runs if run.search is None and run.steps and run.steps[0].summary is not None]
    curves = {run.run_id: run.search["steps"] for run in runs if run.search and run.search.get("steps")}
    # the title counts what the section shows: a search is a curve, a run stopped before its summary nothing
    shown = ([f"{len(plain)} load test{'s' if len(plain) > 1 else ''}"] * bool(plain)
             + [f"{len(curves)} sweep{'s' if len(curves) > 1 else ''} or search{'es' if len(curves) > 1 else ''}"]
             * bool(curves))
    page.section("comparison", "comparison of " + " and ".join(shown or ["no finished load test"]))
    unshown = len(runs) - len(plain) - len(curves)
    if unshown:
        page.text(f"{unshown} more load test{'s' if unshown > 1 else ''} without a summary or steps: see "
                  "their own sections")
    if plain:
        rows, compared = [run_row(run.path) for run in plain], compared_metrics()
        page.table(["run", "config", "load", "window s", "ok", "failed"]
                   + [f"{metric.label} p50 / p99 ms" for metric in compared] + ["output tok/s", "req/s", "notes"],
                   [[r["run_id"], r["config"], r["load"], _number(r["window_s"], ".0f"), r["ok"], r["failed"]]
                    + [f"{_number(r[f'{metric.name}_p50_ms'], '.1f')} / {_number(r[f'{metric.name}_p99_ms'], '.1f')}"
                       for metric in compared]
                    + [_number(r["output_tokens_per_s"], ".1f"), _number(r["requests_per_s"]), "; ".join(r["notes"])]
                    for r in rows], text_columns=3)
    page.figure(charts.latency_cdfs({run.run_id: latency_values(run.steps[0].records) for run in plain
                                     if run.steps[0].records}, [], "latency distributions, overlaid"))
    page.figure(charts.sweep_overlay(curves, "sweeps and searches, overlaid"))


def _training(page: Page, runs: list[TrainRun]) -> None:
    from tokenrig.train.matrix import comparison_rows
    from tokenrig.train.spec import TrainSpec

    page.section("training", f"training runs ({len(runs)})")
    specs = [(run, TrainSpec.model_validate(run.metadata["spec"])) for run in runs if run.metadata.get("spec")]
    rows = comparison_rows([(spec, run.summary or {"status": "no summary.json (stopped before it was written)"})
                            for run, spec in specs])
    page.table(["run", "status", "step ms", "tok/s", "tok/s/GPU", "TFLOP/s/GPU", "MFU", "HFU", "$/B tok",
                "GPU alloc GiB", "host GiB", "loss", "comm share"],
               [[r["label"], r["status"], _number(r["step_ms"], ".0f"), _number(r["tokens_per_s"], ",.0f"),
                 _number(r["tokens_per_s_per_gpu"], ",.0f"), _number(r["tflops_per_gpu"], ".2f"),
                 _number(r["mfu"], ".1%"), _number(r["hfu"], ".1%"), _number(r["usd_per_billion_tokens"], ",.2f"),
                 _number(r["gpu_allocated_gib"], ".1f"),
                 _number(r["host_rss_gib"], ".2f"), _number(r["loss"], ".3f"), _number(r["comm_share"], ".1%")]
                for r in rows], text_columns=2)
    for run, spec in specs:
        page.heading(f"{spec.label()} ({run.run_id})")
        if run.summary is None:
            page.notice("no summary.json: the run stopped before it was summarised; its recorded steps are shown",
                        bad=True)
        elif run.summary.get("status") not in ("ok", None):
            page.notice(f"status {run.summary['status']}: {run.summary.get('message') or ''}",
                        bad=run.summary["status"] != "interrupted")
        page.figure(charts.training_steps(run.steps, f"{spec.label()}: step time"))
        if run.breakdown:
            page.figure(charts.breakdown(run.breakdown, f"{spec.label()}: module breakdown"))


def _capacity(page: Page, document: dict) -> None:
    from tokenrig.capacity.table import band_text, flat_rows

    q = document["question"]
    page.section("capacity", f"capacity: {q['model']}, scenario {q['scenario']}")
    slos = ", ".join(f"{name} ≤ {seconds * 1000:g} ms" for name, seconds in q["slos"].items())
    target = (f"{q['target_rps']:g} req/s, headroom {q['headroom']:.0%}" if q["target_rps"] is not None
              else "one replica")
    page.text(f"SLOs {slos}; sized for {target}. Measured rows come from --find-max runs; projected rows from the "
              "engine's calibrated roofline, ± its worst held-out error.")
    page.table(["GPU", "weights", "engine", "TP", "source", "goodput req/s", "band", "out tok/s", "replicas", "GPUs",
                "$/hour", "$/month", "$/M out", "$/M in", "kWh/M out", "basis"],
               [[r["gpu"], r["quant"], r["engine"], r["tp"], r["source"], _number(r["goodput_rps"]),
                 band_text(r["band"]) if r["source"] == "projected" else "–",
                 _number(r["goodput_output_tokens_per_s"], ".0f"), r["replicas"], r["gpus"],
                 _number(r["usd_per_hour"]), _number(r["usd_per_month"], ",.0f"),
                 _number(r["usd_per_million_output_tokens"]), _number(r["usd_per_million_input_tokens"], ".3f"),
                 _number(r["kwh_per_million_output_tokens"]), r["basis"]] for r in flat_rows(document)], text_columns=3)
    page.figure(charts.capacity(document["rows"], "goodput per replica (projected: ± held-out band)"))
    prices = "; ".join(f"{gpu} ${p['usd_per_hour']:.2f}/h ({'--price' if p['overridden'] else p['source']}, "
                       f"{p['date']})" for gpu, p in q["prices"].items())
    page.text(f"prices: {prices}")
    for note in document["notes"]:
        page.notice(note)


def write_report(paths: list[Path], out: Path, capacity: Path | None = None, csv_dir: Path | None = None,
                 title: str = "tokenrig report", progress=print) -> Path:
    runs: Runs = find_runs(paths, progress)
    page = Page()
    for skipped in runs.skipped:
        page.notice(f"skipped {skipped}")
    if len(runs.load) > 1:
        _comparison(page, runs.load)
    if capacity is not None:
        _capacity(page, json.loads(capacity.read_text()))
    for index, run in enumerate(runs.load, start=1):
        progress(f"report: load test {index}/{len(runs.load)} {run.run_id}")
        _load_run(page, run, f"run-{index}")
    if runs.train:
        _training(page, runs.train)
    if not runs.load and not runs.train and capacity is None:
        raise NoRunsError(f"no load-test or training run (metadata.json) under {', '.join(map(str, paths))}: "
                          "nothing to report")
    subtitle = (f"{len(runs.load)} load tests, {len(runs.train)} training runs; written "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} by tokenrig report")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page.render(title, subtitle))
    progress(f"report: {out} ({page.charts} charts, {out.stat().st_size / 1e6:.1f} MB, opens offline)")
    if csv_dir is not None:
        from tokenrig.report.export import write_csv

        write_csv(runs, csv_dir, progress)
    return out

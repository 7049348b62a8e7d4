"""The report's charts as plotly figures, each built from data alone (no file access, no HTML).

Plotly because its figures stay interactive in a single offline file (hover for the exact value,
zoom into a second of the timeline, hide a curve by its legend entry) with plotly.js inlined once,
and because it is a widely used, actively released library. CDF curves keep at most `CDF_POINTS`
points, evenly spaced in rank and always including the minimum and maximum, so a run of millions
of tokens still opens quickly; the exact percentiles are in the tables next to them.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tokenrig.breakdown.operators import LABELS as OPERATOR_LABELS
from tokenrig.breakdown.table import OperatorBreakdown
from tokenrig.metrics.registry import METRICS, stepped_metrics
from tokenrig.metrics.slo import Slo
from tokenrig.report.timeline import Timeline

CDF_POINTS = 2000
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
VERDICT_COLOURS = {"meets SLOs": "#2ca02c", "misses SLOs": "#d62728", "saturated": "#ff7f0e", "step": "#1f77b4"}


def _layout(figure: go.Figure, title: str, height: int) -> go.Figure:
    figure.update_layout(title={"text": title, "x": 0.01}, height=height, template="plotly_white",
                         margin={"l": 60, "r": 20, "t": 70, "b": 50})
    return figure


def cdf_points(values) -> tuple[list[float], list[float]]:
    """(sorted values, cumulative fraction) of at most CDF_POINTS points, min and max included; plain lists,
    so the page holds readable JSON arrays rather than plotly's base64-packed ones."""
    data = np.sort(np.asarray(values, dtype=float))
    ranks = np.unique(np.linspace(0, data.size - 1, min(CDF_POINTS, data.size)).round().astype(int))
    return data[ranks].tolist(), ((ranks + 1) / data.size).tolist()


def latency_cdfs(series: dict[str, dict[str, list[float]]], slos: list[Slo], title: str) -> go.Figure | None:
    """Each registered metric's distribution (ms: TTFT, TPOT, ITL, E2E), one curve per label, two plots a row,
    SLO thresholds as dashed lines."""
    if not any(values for per_metric in series.values() for values in per_metric.values()):
        return None
    metrics = list(METRICS.values())
    rows = -(-len(metrics) // 2)
    figure = make_subplots(rows=rows, cols=2, subplot_titles=[f"{metric.label} (ms)" for metric in metrics],
                           horizontal_spacing=0.08, vertical_spacing=0.28 / rows)
    for index, (label, per_metric) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        for position, metric in enumerate(metrics):
            name = metric.label
            values = per_metric.get(metric.name) or []
            if not values:
                continue
            x, y = cdf_points(np.asarray(values) * 1000)
            hover = f"{name} %{{x:.1f}} ms<br>%{{y:.1%}} of requests<extra>{label}</extra>"
            figure.add_trace(go.Scatter(x=x, y=y, mode="lines", name=label, legendgroup=label,
                                        showlegend=position == 0, line={"color": colour}, hovertemplate=hover),
                             row=position // 2 + 1, col=position % 2 + 1)
    for slo in slos:
        position = list(METRICS).index(slo.metric)
        figure.add_vline(x=slo.threshold_s * 1000, line_dash="dash", line_color="#555",
                         # at the foot of the line: at its top the label sat on the subplot's title
                         annotation_text=f"{slo.name} ≤ {slo.threshold_s * 1000:g} ms",
                         annotation_position="bottom right",
                         row=position // 2 + 1, col=position % 2 + 1)
    figure.update_yaxes(range=[0, 1.02], tickformat=".0%")
    return _layout(figure, title, 310 * rows)


def schedule_lag(lags_s: list[float], threshold_s: float, title: str) -> go.Figure | None:
    if not lags_s:
        return None
    x, y = cdf_points(np.asarray(lags_s) * 1000)
    figure = go.Figure(go.Scatter(x=x, y=y, mode="lines", name="send lag",
                                  hovertemplate="%{x:.2f} ms<br>%{y:.1%} of requests<extra></extra>"))
    figure.add_vline(x=threshold_s * 1000, line_dash="dash", line_color="#d62728",
                     annotation_text=f"late past {threshold_s * 1000:g} ms (more than 1 % late: invalid)")
    figure.update_xaxes(title="actual − scheduled send (ms)")
    figure.update_yaxes(tickformat=".0%", range=[0, 1.02])
    return _layout(figure, title, 320)


def timeline(tl: Timeline, windows: list[tuple[str, float, float]], title: str) -> go.Figure | None:
    """Per second: sent / done / errors / cancelled / in flight, output tokens, and the server's scraped state;
    each (label, start, end) steady-state window shaded and labelled (a sweep's or search's steps)."""
    if not tl.seconds:
        return None
    server_rows = [key for key in ("running", "waiting") if key in tl.server]
    has_kv = "kv_cache_usage" in tl.server
    rows = 2 + bool(server_rows) + has_kv
    titles = ["requests per second and in flight (client)", "output tokens per second (client)"]
    titles += ["server: running and waiting requests"] * bool(server_rows) + ["server: KV-cache usage"] * has_kv
    figure = make_subplots(rows=rows, cols=1, shared_xaxes=True, subplot_titles=titles, vertical_spacing=0.07)
    x = tl.seconds
    if any(tl.sent) or any(tl.done) or any(tl.errors):
        series = [("sent", tl.sent, "#1f77b4"), ("done", tl.done, "#2ca02c"), ("errors", tl.errors, "#d62728"),
                  ("in flight", tl.in_flight, "#7f7f7f")]
        if any(tl.cancelled):  # in flight when the load stopped (Ctrl-C, an early stop): not the server's errors
            series.insert(3, ("cancelled", tl.cancelled, "#bcbd22"))
        for name, values, colour in series:
            line = {"color": colour, "shape": "hv", "dash": "dot" if name == "in flight" else "solid"}
            figure.add_trace(go.Scatter(x=x, y=values, name=name, mode="lines", line=line), row=1, col=1)
        figure.add_trace(go.Scatter(x=x, y=tl.output_tokens, name="output tok/s", mode="lines",
                                    line={"color": "#9467bd", "shape": "hv"}), row=2, col=1)
    row = 3
    if server_rows:
        for key, colour in (("running", "#17becf"), ("waiting", "#ff7f0e")):
            if key in tl.server:
                times, samples = tl.server[key]
                figure.add_trace(go.Scatter(x=times, y=samples, name=f"server {key}", mode="lines+markers",
                                            marker={"size": 3}, line={"color": colour}), row=row, col=1)
        row += 1
    if has_kv:
        times, samples = tl.server["kv_cache_usage"]
        figure.add_trace(go.Scatter(x=times, y=samples, name="server KV usage", mode="lines+markers",
                                    marker={"size": 3}, line={"color": "#8c564b"}), row=row, col=1)
        figure.update_yaxes(tickformat=".0%", row=row, col=1)
    if not figure.data:
        return None
    for label, start, end in windows:
        label_it = {"annotation_text": label, "annotation_position": "top left", "annotation_font_size": 10}
        figure.add_vrect(x0=start, x1=end, fillcolor="#2ca02c", opacity=0.06, line_width=0,
                         **(label_it if label else {}))
    figure.update_xaxes(title="seconds since the first scheduled request", row=rows, col=1)
    return _layout(figure, title, 220 * rows + 80)


def search_curves(rows: list[dict], slos: list[Slo], users: bool, title: str) -> go.Figure | None:
    """Latency against throughput and throughput against offered load, one point per step."""
    if not rows:
        return None
    load_name = "users" if users else "offered req/s"
    stepped = stepped_metrics()
    throughput_col = len(stepped) + 1
    figure = make_subplots(rows=1, cols=throughput_col, horizontal_spacing=0.07, subplot_titles=(
        *(f"{metric.label} (ms) vs completed req/s" for metric in stepped),
        f"completed and goodput req/s vs {load_name}"))
    # a curve joins the steps by load, not in the order a search visited them (up, then bisecting back)
    order = sorted(range(len(rows)), key=lambda i: rows[i]["load"])
    done = [rows[i]["completed_rps"] for i in order]
    for col, metric in enumerate(stepped, start=1):
        for quantile, dash in (("p50", "dot"), ("p99", "solid")):
            values = [(rows[i][f"{metric.name}_{quantile}_s"] or np.nan) * 1000 for i in order]
            figure.add_trace(go.Scatter(x=done, y=values, mode="lines+markers", name=f"{metric.label} {quantile}",
                                        line={"dash": dash}, text=[f"step {i + 1}" for i in order]),
                             row=1, col=col)
        for slo in slos:
            if slo.metric == metric.name:
                figure.add_hline(y=slo.threshold_s * 1000, line_dash="dash", line_color="#d62728",
                                 annotation_text=f"{slo.name} ≤ {slo.threshold_s * 1000:g} ms", row=1, col=col)
    loads = [rows[i]["load"] for i in order]
    figure.add_trace(go.Scatter(x=loads, y=[rows[i]["completed_rps"] for i in order], mode="lines+markers",
                                name="completed req/s"), row=1, col=throughput_col)
    if any(row["goodput_rps"] is not None for row in rows):
        figure.add_trace(go.Scatter(x=loads, y=[rows[i]["goodput_rps"] or 0.0 for i in order], mode="lines+markers",
                                    name="goodput req/s (meeting every SLO)"), row=1, col=throughput_col)
    for col in range(1, throughput_col):
        figure.update_xaxes(title="completed req/s", row=1, col=col)
    figure.update_xaxes(title=load_name, row=1, col=throughput_col)
    return _layout(figure, title, 420)


def search_walk(document: dict, slos: list[Slo], users: bool, title: str) -> go.Figure | None:
    """The loads the sweep or search tried, in order, coloured by verdict, with the answer it reached;
    below, each step's judged SLO percentiles against their thresholds."""
    rows = document.get("steps") or []
    if not rows:
        return None

    def verdict(row):
        if not slos:
            return "step"
        if row["slo_met"]:
            return "meets SLOs"
        return "saturated" if row["saturated"] else "misses SLOs"

    verdicts = [verdict(row) for row in rows]
    steps = list(range(1, len(rows) + 1))
    figure = make_subplots(rows=1 + bool(slos), cols=1, shared_xaxes=True, vertical_spacing=0.1,
                           subplot_titles=["load tried at each step"] + ["SLO percentiles per step (ms)"] * bool(slos))
    figure.add_trace(go.Scatter(x=steps, y=[row["load"] for row in rows], mode="lines", line={"color": "#bbb"},
                                name="walk", hoverinfo="skip"), row=1, col=1)
    for name, colour in VERDICT_COLOURS.items():
        picked = [i for i, v in enumerate(verdicts) if v == name]
        if picked:
            figure.add_trace(go.Scatter(
                x=[i + 1 for i in picked], y=[rows[i]["load"] for i in picked], mode="markers", name=name,
                marker={"color": colour, "size": 11},
                hovertemplate="step %{x}: %{y:.3g}<extra>%{fullData.name}</extra>"), row=1, col=1)
    best = document.get("max_rate_meeting_slos")
    if best is not None:
        figure.add_hline(y=best, line_dash="dash", line_color="#2ca02c", row=1, col=1,
                         annotation_text=f"max rate meeting every SLO: {best:.3g} req/s")
    for index, slo in enumerate(slos):
        colour = PALETTE[index % len(PALETTE)]
        values = [((row["slos"].get(slo.name) or {}).get("value_s") or np.nan) * 1000 for row in rows]
        figure.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=slo.name, line={"color": colour}),
                         row=2, col=1)
        figure.add_hline(y=slo.threshold_s * 1000, line_dash="dash", line_color=colour, row=2, col=1,
                         annotation_text=f"{slo.name} ≤ {slo.threshold_s * 1000:g} ms")
    figure.update_xaxes(title="step", dtick=1, row=1 + bool(slos), col=1)
    figure.update_yaxes(title="users" if users else "offered req/s", row=1, col=1)
    return _layout(figure, title, 360 + 260 * bool(slos))


def sweep_overlay(curves: dict[str, list[dict]], title: str) -> go.Figure | None:
    """Several runs' sweeps or searches on one plot: output tok/s against each stepped metric's p99 (TTFT, TPOT)."""
    if not curves:
        return None
    stepped = stepped_metrics()
    figure = make_subplots(rows=1, cols=len(stepped),
                           subplot_titles=[f"{metric.label} p99 (ms) vs output tok/s" for metric in stepped])
    for index, (label, rows) in enumerate(curves.items()):
        rows = sorted(rows, key=lambda r: r["output_tokens_per_s"])
        colour = PALETTE[index % len(PALETTE)]
        for col, metric in enumerate(stepped, start=1):
            figure.add_trace(go.Scatter(x=[r["output_tokens_per_s"] for r in rows],
                                        y=[(r[f"{metric.name}_p99_s"] or np.nan) * 1000 for r in rows],
                                        mode="lines+markers",
                                        name=label, legendgroup=label, showlegend=col == 1, line={"color": colour}),
                             row=1, col=col)
    figure.update_xaxes(title="output tok/s")
    return _layout(figure, title, 420)


def training_steps(steps: list[dict], title: str) -> go.Figure | None:
    if not steps:
        return None
    figure = go.Figure()
    for phase, colour in (("warmup", "#bbbbbb"), ("measured", "#1f77b4"), ("profiled", "#ff7f0e")):
        picked = [s for s in steps if s["phase"] == phase]
        if picked:
            figure.add_trace(go.Scatter(x=[s["step"] for s in picked], y=[s["step_time_s"] * 1000 for s in picked],
                                        mode="markers+lines", name=phase, marker={"color": colour}))
    figure.update_xaxes(title="step")
    figure.update_yaxes(title="step time (ms)")
    return _layout(figure, title, 320)


def breakdown(document: dict, title: str) -> go.Figure | None:
    """Time per module category of a profiled step, stacked by phase where the profiler could tell."""
    rows = [row for row in document.get("rows") or [] if row.get("total_ms")]
    if not rows:
        return None
    rows = sorted(rows, key=lambda row: row["total_ms"])
    names = [row["category"] for row in rows]
    figure = go.Figure()
    for phase, colour in (("forward", "#1f77b4"), ("backward", "#ff7f0e"), ("optimizer", "#2ca02c")):
        values = [row.get(f"{phase}_ms") or 0.0 for row in rows]
        if any(values):
            figure.add_trace(go.Bar(y=names, x=values, orientation="h", name=phase, marker={"color": colour}))
    unphased = [row["total_ms"] if all(row.get(f"{p}_ms") is None for p in ("forward", "backward", "optimizer"))
                else 0.0 for row in rows]
    if any(unphased):
        figure.add_trace(go.Bar(y=names, x=unphased, orientation="h", name="no phase (idle, overlap)",
                                marker={"color": "#7f7f7f"}))
    figure.update_layout(barmode="relative")
    figure.update_xaxes(title=f"ms per profiled step ({document.get('device', '?')})")
    return _layout(figure, title, 120 + 28 * len(rows))


def capacity(rows: list[dict], title: str) -> go.Figure | None:
    """Goodput per replica of every configuration, projected ones with their held-out band as error bars."""
    if not rows:
        return None
    labels = [f"{r['gpu']} {r['quant']} {r['engine']} (TP {r['tp']})" for r in rows]
    bands = [r["goodput_rps"] * r["band"] if r["source"] == "projected" and r["band"] is not None
             and np.isfinite(r["band"]) else 0.0 for r in rows]
    figure = go.Figure(go.Bar(
        y=labels, x=[r["goodput_rps"] for r in rows], orientation="h",
        marker={"color": ["#1f77b4" if r["source"] == "measured" else "#aec7e8" for r in rows]},
        error_x={"type": "data", "array": bands, "visible": True},
        customdata=[f"{r['source']}, ${r['sizing']['usd_per_hour']:.2f}/h for the target" for r in rows],
        hovertemplate="%{y}<br>%{x:.2f} req/s per replica<br>%{customdata}<extra></extra>"))
    figure.update_xaxes(title="goodput per replica (req/s meeting every SLO)")
    figure.update_yaxes(autorange="reversed")
    return _layout(figure, title, 140 + 34 * len(rows))


def operator_breakdown(steps: dict[str, OperatorBreakdown], title: str) -> go.Figure | None:
    """Each profiled load step's engine time per engine step, stacked by operator class (largest at the base)."""
    if not steps:
        return None
    totals: dict[str, float] = {}
    for breakdown in steps.values():
        for name, row in breakdown.classes.items():
            totals[name] = totals.get(name, 0.0) + row.per_step_ms
    figure = go.Figure()
    for name in sorted(totals, key=lambda n: -totals[n]):
        figure.add_trace(go.Bar(x=list(steps), y=[b.classes[name].per_step_ms if name in b.classes else 0.0
                                                  for b in steps.values()], name=OPERATOR_LABELS.get(name, name)))
    figure.update_layout(barmode="stack")
    figure.update_yaxes(title="ms per engine step (profiled steps' mean)")
    return _layout(figure, title, 460)

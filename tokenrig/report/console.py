"""The console table a user reads at the end of a load test."""

from __future__ import annotations

from tokenrig.metrics.registry import by_row
from tokenrig.metrics.run_summary import THROUGHPUT_MODE_NOTE, Distribution, Requests, RunSummary, Tokens
from tokenrig.metrics.verdict import step_columns


def _ms(stats: Distribution | None, key: str) -> str:
    return f"{getattr(stats, key) * 1000:9.1f}" if stats else f"{'-':>9}"


def error_mix(errors_by_type: dict[str, int], top: int = 3) -> str:
    """'38 HTTP 503, 2 ReadTimeout': the most frequent error kinds first."""
    ranked = sorted(errors_by_type.items(), key=lambda item: -item[1])
    text = ", ".join(f"{count} {kind or 'unknown error'}" for kind, count in ranked[:top])
    rest = sum(count for _, count in ranked[top:])
    return text + (f", {rest} other" if rest else "")


def failed_line(requests: Requests) -> str:
    """The verdict of a run past --max-error-rate, with its most frequent error and one message of it."""
    kind = next(iter(sorted(requests.errors_by_type.items(), key=lambda item: -item[1])))[0]
    example = requests.error_examples.get(kind, kind)
    return (f"FAILED: {requests.error_rate:.0%} of {requests.measured} measured requests failed "
            f"(--max-error-rate {requests.max_error_rate:.0%}): {error_mix(requests.errors_by_type)}; "
            f"e.g. {example}")


def data_quality(tokens: Tokens, ok: int) -> str:
    """How far the tokens can be trusted: streamed counts against the server's usage, requests cut short."""
    checked = tokens.requests_checked_against_usage
    usage = (f"{tokens.usage_vs_tokenizer_mismatches} of {checked} requests' usage differs from the tokens "
             f"streamed (streamed counted)" if checked else "no server usage to check tokens against")
    return f"tokens       {usage}; {tokens.requests_short_of_max_tokens} of {ok} truncated (short of max_tokens)"


def render(summary: RunSummary, title: str) -> str:
    latency = summary.latency_s
    lines = [title, ""]
    if summary.load and summary.load.throughput_mode:
        lines += [THROUGHPUT_MODE_NOTE, ""]
    lines.append(f"{'metric (ms)':<12}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}{'max':>9}  n")
    uncertain = []  # metrics whose p99 has too few samples for a 95 % interval
    for metric in by_row():
        stats = latency.get(metric.name)
        cells = "".join(_ms(stats, key) for key in ("p50", "p90", "p99", "mean", "max"))
        if stats and stats.p99_uncertain:
            uncertain.append(f"{metric.label} ({stats.count})")
            cells = cells[:18] + f"{stats.p99 * 1000:8.1f}*" + cells[27:]
        lines.append(f"{metric.label:<12}{cells}  {stats.count if stats else 0}")
    if uncertain:
        lines.append(f"* p99 from too few samples for a 95 % confidence interval (about 380 needed): "
                     f"{', '.join(uncertain)}; indicative only, measure longer")
    throughput, requests = summary.throughput, summary.requests
    health = summary.load_generator
    lag = health.schedule_lag_s
    lines += [
        "",
        f"throughput   {throughput.output_tokens_per_s:.1f} output tok/s   "
        f"{throughput.requests_per_s:.2f} req/s   {throughput.input_tokens_per_s:.1f} input tok/s",
        f"requests     {requests.ok} ok, {requests.failed} failed"
        + (f" ({error_mix(requests.errors_by_type)})" if requests.failed else "")
        + (f", {requests.cancelled} cancelled (in flight when the load stopped)" if requests.cancelled else "")
        + f", {requests.excluded_warmup_cooldown} in warm-up/cool-down (excluded)",
        data_quality(summary.tokens, requests.ok),
        f"window       {summary.window.seconds:.1f} s steady state",
        f"client       lag p50 {_ms(lag, 'p50').strip()} ms p99 {_ms(lag, 'p99').strip()} ms, "
        f"CPU {health.client_cpu_fraction:.0%} of a core"
        + (f", target {health.target_rate_rps:.2f} req/s achieved {health.achieved_send_rate_rps:.2f}"
           if health.target_rate_rps else ""),
    ]
    slo = summary.slo
    if slo:
        for name, verdict in slo.slos.items():
            value = f"{verdict.value_s * 1000:.1f} ms" if verdict.value_s is not None else "-"
            lines.append(f"SLO {name:<10} {value} vs {verdict.threshold_s * 1000:g} ms: "
                         f"{'met' if verdict.met else 'MISSED'} ({verdict.confidence})")
        lines.append(f"goodput      {slo.goodput_rps:.2f} req/s meet every SLO "
                     f"({slo.good_fraction:.0%} of measured requests)")
    server = summary.server or {}
    if server.get("scrape_errors"):
        lines.append(f"server       {server['scrape_errors']} of {server['scrape_errors'] + server['scrapes']} scrapes "
                     "of its /metrics failed: server_metrics.jsonl has gaps")
    if requests.too_many_errors:
        lines.append(failed_line(requests))
    if summary.window.problem:
        lines.append(f"NO MEASUREMENT: {summary.window.problem}.")
    if not health.valid:
        lines.append(f"INVALID RUN: the load generator was the bottleneck ({'; '.join(health.problems)}). "
                     f"Remedy: {health.remedy}.")
    if health.server_saturated:
        lines.append(f"SERVER SATURATED: {health.server_saturated}. This rate is past what the server sustains; "
                     "lower --rate, or find the highest rate within SLOs with --find-max --slo.")
    if summary.interrupted:
        lines.append("interrupted: the summary covers the requests finished before Ctrl-C")
    return "\n".join(lines)


LATE_BUT_JUDGED = "load generator late, missed beyond its lag"


def loadgen_note(row: dict) -> str:
    """What a search step's row says of its load generator: nothing when valid; that the step's failure stands
    when its one fault was late sends that cannot explain it (verdict.StepResult.judged); else INVALID."""
    if row["loadgen_valid"]:
        return ""
    if row.get("judged"):
        return f" ({LATE_BUT_JUDGED})"
    return " (sends late: run again)" if row.get("late_sends_only") else " LOADGEN INVALID"




def extra_slo_columns(slos) -> list:
    """The SLOs judged at a percentile the step table does not show (ttft_p90, e2e_p99, ...): each gets its
    own column, so the figure an SLO was judged on stands next to the verdict."""
    return [slo for slo in slos or [] if slo.name not in {f"{metric.name}_{key}" for metric, key in step_columns()}]


def slo_value(row: dict, slo) -> float | None:
    """A step row's measured value of one SLO's percentile (seconds)."""
    return (row["slos"].get(slo.name) or {}).get("value_s")


def render_steps(document: dict, title: str, slos) -> str:
    """The curve a sweep or SLO search walked, one line per step, and its conclusion."""
    def ms(value):
        return f"{value * 1000:9.1f}" if value is not None else f"{'-':>9}"

    extra, columns = extra_slo_columns(slos), step_columns()
    lines = [f"{title} | {document['mode']}", "",
             f"{'load':>9}{'sent/s':>9}{'done/s':>9}{'tok/s':>9}"
             + "".join(f"{f'{metric.label} {key}':>9}" for metric, key in columns)
             + "".join(f"{slo.spec.label + f' p{slo.percentile:g}':>10}" for slo in extra)
             + f"{'goodput':>9}  verdict"]
    for row in document["steps"]:
        if slos:
            verdict = "meets SLOs" if row["slo_met"] else "misses SLOs"
        else:
            verdict = ""
        if row.get("interrupted"):
            verdict = "interrupted (no verdict)"
        elif row["saturated"]:
            verdict += " saturated" if not row["stopped_early"] else " stopped early (SLO already missed)"
        elif row.get("certainty") == "marginal" and not row.get("probe"):
            verdict += f" (marginal: {row['probability_met']:.0%} likely met)"
        if row.get("probe"):
            verdict += " [probe]"
        verdict += loadgen_note(row)
        goodput = f"{row['goodput_rps']:9.2f}" if row["goodput_rps"] is not None else f"{'-':>9}"
        lines.append(f"{row['load']:9.3g}{row['achieved_rps']:9.2f}{row['completed_rps']:9.2f}"
                     f"{row['output_tokens_per_s']:9.0f}"
                     + "".join(ms(row[f"{metric.name}_{key}_s"]) for metric, key in columns)
                     + "".join(f" {ms(slo_value(row, slo))}" for slo in extra) + f"{goodput}  {verdict.strip()}")
    if document["mode"] == "find-max":
        best = document.get("max_rate_meeting_slos")
        if document.get("stop_reason") == "interrupted":
            conclusion = "search interrupted: no max rate (an interrupted step is no verdict)"
        elif best is not None:
            conclusion = f"max rate meeting every SLO: {best:.3g} req/s"
        elif any(row["slo_met"] for row in document["steps"]):  # only on steps whose load generator was at fault
            conclusion = "no rate met every SLO with its load generator valid"
        else:
            conclusion = "no rate tried met every SLO"
        lines += ["", conclusion, f"search: {document.get('stop_reason', '')}"]
        lines += [f"note: {note}" for note in document.get("notes") or []]
        for name, verdict in (document["steps"][-1]["slos"] if document["steps"] else {}).items():
            lines.append(f"last step {name}: {verdict['samples']} samples, {verdict['confidence']}")
    return "\n".join(lines)

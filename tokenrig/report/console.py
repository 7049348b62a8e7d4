"""The console table a user reads at the end of a load test."""

from __future__ import annotations


def _ms(stats: dict | None, key: str) -> str:
    return f"{stats[key] * 1000:9.1f}" if stats else f"{'-':>9}"


def render(summary: dict, title: str) -> str:
    latency = summary["latency_s"]
    lines = [title, "", f"{'metric (ms)':<12}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}{'max':>9}  n"]
    for name in ("ttft", "itl", "tpot", "e2e"):
        stats = latency[name]
        cells = "".join(_ms(stats, key) for key in ("p50", "p90", "p99", "mean", "max"))
        lines.append(f"{name.upper():<12}{cells}  {stats['count'] if stats else 0}")
    throughput, requests = summary["throughput"], summary["requests"]
    health = summary["load_generator"]
    lag = health["schedule_lag_s"]
    lines += [
        "",
        f"throughput   {throughput['output_tokens_per_s']:.1f} output tok/s   "
        f"{throughput['requests_per_s']:.2f} req/s   {throughput['input_tokens_per_s']:.1f} input tok/s",
        f"requests     {requests['ok']} ok, {requests['failed']} failed"
        + (f" {requests['errors_by_type']}" if requests["failed"] else "")
        + f", {requests['excluded_warmup_cooldown']} in warm-up/cool-down (excluded)",
        f"window       {summary['window']['seconds']:.1f} s steady state",
        f"client       lag p50 {_ms(lag, 'p50').strip()} ms p99 {_ms(lag, 'p99').strip()} ms, "
        f"CPU {health['client_cpu_fraction']:.0%} of a core"
        + (f", target {health['target_rate_rps']:.2f} req/s achieved {health['achieved_send_rate_rps']:.2f}"
           if health["target_rate_rps"] else ""),
    ]
    if not health["valid"]:
        lines.append(f"INVALID RUN: the load generator was the bottleneck ({'; '.join(health['problems'])}). "
                     f"Remedy: {health['remedy']}.")
    if summary["interrupted"]:
        lines.append("interrupted: the summary covers the requests finished before Ctrl-C")
    return "\n".join(lines)

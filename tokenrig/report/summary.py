"""Summarise request records into the metrics defined in docs/metrics.md.

Percentiles are exact (numpy, linear interpolation between order statistics) over every
request of the steady-state window; ITL percentiles are over every inter-token gap of
those requests, each gap divided by the tokens its chunk carried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tokenrig.loadgen.records import RequestRecord

PERCENTILES = (50, 90, 95, 99, 99.9)
# Load-generator health thresholds: past these the client, not the server, shaped the result.
# A send more than MAX_HEALTHY_LAG_S late is a late send; more than 1 % of them (and more than one: p99 of
# a dozen sends is their maximum, and one VM hiccup does not make a saturated client) invalidates a run.
MAX_HEALTHY_LAG_S = 0.010
MAX_LATE_SEND_FRACTION = 0.01
MAX_HEALTHY_CLIENT_CPU = 0.90
# Open loop: every scheduled arrival must go out; fewer sent means the client fell behind or stopped.
MIN_SENT_FRACTION = 0.99
DEFAULT_MAX_ERROR_RATE = 0.05


Z_95 = 1.959964


def percentile_interval(values: np.ndarray, percentile: float) -> tuple[float, float] | None:
    """Distribution-free 95 % confidence interval of a percentile from sorted order statistics."""
    n = values.size
    p = percentile / 100
    spread = Z_95 * math.sqrt(n * p * (1 - p))
    low, high = math.floor(n * p - spread), math.ceil(n * p + spread)
    if low < 1 or high > n:
        return None  # too few samples for a two-sided interval at this percentile
    ordered = np.sort(values)
    return float(ordered[low - 1]), float(ordered[high - 1])


def distribution(values) -> dict | None:
    """Exact percentiles, mean, min, max, count, and p99's 95 % interval (None: too few samples for one)."""
    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        return None
    stats = {f"p{p:g}": float(np.percentile(data, p)) for p in PERCENTILES}
    stats.update(mean=float(data.mean()), min=float(data.min()), max=float(data.max()), count=int(data.size))
    interval = percentile_interval(data, 99)
    stats["p99_ci95"] = list(interval) if interval else None
    return stats


def itl_gaps(record: RequestRecord) -> list[float]:
    """Each chunk's gap to the previous one divided by its tokens, once per token (a chunk of none counts one)."""
    if len(record.chunk_offsets_s) < 2:
        return []
    counts = np.maximum(np.asarray(record.chunk_tokens[1:]), 1)
    return np.repeat(np.diff(record.chunk_offsets_s) / counts, counts).tolist()


def tpot(record: RequestRecord) -> float | None:
    if record.ttft_s is None or record.e2e_s is None or record.output_tokens < 2:
        return None
    return (record.e2e_s - record.ttft_s) / (record.output_tokens - 1)


@dataclass
class RunFacts:
    """What the summary needs besides the records."""

    duration_s: float
    warmup_s: float
    cooldown_s: float
    plan_start_unix: float
    target_rate: float | None
    client_cpu_fraction: float
    interrupted: bool = False
    scheduled_in_window: int | None = None  # open loop: arrivals the plan had due inside the window
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE  # past this fraction of failed requests the run FAILED


def summarize(records: list[RequestRecord], facts: RunFacts) -> dict:
    window_start = facts.plan_start_unix + facts.warmup_s
    window_end = facts.plan_start_unix + facts.duration_s - facts.cooldown_s
    measured = [r for r in records if r.in_window]
    ok = [r for r in measured if r.ok]
    cancelled = [r for r in measured if r.cancelled]
    failed = [r for r in measured if not r.ok and not r.cancelled]

    # Throughput counts what arrived inside the window, whenever the request was sent; a failed request's
    # tokens served no one, so they are not throughput.
    tokens_in_window = 0
    completions_in_window = 0
    for record in records:
        if not record.ok:
            continue
        for offset, tokens in zip(record.chunk_offsets_s, record.chunk_tokens):
            if window_start <= record.scheduled_at + offset < window_end:
                tokens_in_window += tokens
        if record.e2e_s is not None and window_start <= record.scheduled_at + record.e2e_s < window_end:
            completions_in_window += 1
    window = max(window_end - window_start, 1e-9)

    lag = distribution(r.send_lag_s for r in measured)
    # arrivals, not requests: later turns of a conversation are not part of the arrival process
    arrivals_sent = sum(1 for r in measured if r.turn == 0)
    achieved_rate = arrivals_sent / window
    usage_known = [r for r in ok if r.output_tokens_usage is not None and r.output_tokens_tokenizer is not None]
    mismatched = [r for r in usage_known if r.output_tokens_usage != r.output_tokens_tokenizer]
    slot_late = sum(r.slot_late for r in measured)

    problems = []
    late_sends = sum(1 for r in measured if r.send_lag_s > MAX_HEALTHY_LAG_S)
    if late_sends > max(1, MAX_LATE_SEND_FRACTION * len(measured)):
        problems.append(f"{late_sends} of {len(measured)} sends more than {MAX_HEALTHY_LAG_S * 1000:.0f} ms late "
                        f"(schedule lag p99 {lag['p99'] * 1000:.1f} ms)")
    if facts.client_cpu_fraction > MAX_HEALTHY_CLIENT_CPU:
        problems.append(f"load generator CPU {facts.client_cpu_fraction:.0%} of a core")
    if slot_late:
        problems.append(f"{slot_late} requests waited for a free user (open-loop safety cap reached)")
    if facts.scheduled_in_window and arrivals_sent < MIN_SENT_FRACTION * facts.scheduled_in_window:
        problems.append(f"sent {arrivals_sent} of {facts.scheduled_in_window} scheduled arrivals")

    # A closed loop whose requests outlast the window schedules nothing inside it: no latency at all, which
    # must read as "measure longer", not as an empty result.
    window_problem = None
    if records and not measured and not facts.interrupted:
        e2e_all = distribution(r.e2e_s for r in records if r.ok and r.e2e_s is not None)
        window_problem = (f"no request was scheduled inside the {window:.1f}-s window"
                          + (f" (requests took {e2e_all['p50']:.1f} s, median E2E)" if e2e_all else "")
                          + "; lengthen --duration")

    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for record in failed:
        key = (record.error or "").split(":")[0]
        errors[key] = errors.get(key, 0) + 1
        examples.setdefault(key, (record.error or "")[:200])
    errors = dict(sorted(errors.items(), key=lambda item: -item[1]))
    answered = len(measured) - len(cancelled)
    error_rate = len(failed) / answered if answered else 0.0

    return {
        "requests": {"total": len(records), "measured": len(measured), "ok": len(ok), "failed": len(failed),
                     "cancelled": len(cancelled),
                     "excluded_warmup_cooldown": len(records) - len(measured), "errors_by_type": errors,
                     "error_examples": examples, "error_rate": error_rate, "max_error_rate": facts.max_error_rate,
                     "too_many_errors": error_rate > facts.max_error_rate},
        "window": {"start_unix": window_start, "end_unix": window_end, "seconds": window,
                   "warmup_s": facts.warmup_s, "cooldown_s": facts.cooldown_s, "problem": window_problem},
        "latency_s": {
            "ttft": distribution(r.ttft_s for r in ok),
            "tpot": distribution(t for t in map(tpot, ok) if t is not None),
            "itl": distribution(g for r in ok for g in itl_gaps(r)),
            "e2e": distribution(r.e2e_s for r in ok),
        },
        "throughput": {
            "output_tokens_per_s": tokens_in_window / window,
            "requests_per_s": completions_in_window / window,
            "input_tokens_per_s": sum(r.prompt_tokens_usage or r.prompt_tokens_sent for r in ok) / window,
        },
        "tokens": {
            "output_total": sum(r.output_tokens for r in ok),
            "input_total": sum(r.prompt_tokens_usage or r.prompt_tokens_sent for r in ok),
            "usage_vs_tokenizer_mismatches": len(mismatched),
            "requests_short_of_max_tokens": sum(r.output_tokens < r.max_tokens for r in ok),
            "requests_checked_against_usage": len(usage_known),
        },
        "load_generator": {
            "schedule_lag_s": lag,
            "target_rate_rps": facts.target_rate,
            "achieved_send_rate_rps": achieved_rate,
            "scheduled_arrivals": facts.scheduled_in_window,
            "sent_arrivals": arrivals_sent,
            "slot_late_requests": slot_late,
            "client_cpu_fraction": facts.client_cpu_fraction,
            "valid": not problems,
            "problems": problems,
            "remedy": "add load-generator workers (--workers N) or lower the load" if problems else None,
        },
        "interrupted": facts.interrupted,
    }

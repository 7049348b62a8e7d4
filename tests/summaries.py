"""Hand-made RunSummary objects for tests of what reads summaries (the SLO search, sweeps): a step's
figures as the test states them, every other field empty."""

from tokenrig.metrics.run_summary import RunSummary, SloJudgement, SloVerdict

LAG = {"p50": 0.002, "p90": 0.005, "p95": 0.01, "p99": 0.03, "p99.9": 0.04, "mean": 0.003, "min": 0.0, "max": 0.04,
       "count": 313}


def step_summary(window_s: float, sent: int, completed: int, slo_met: bool | None = True, failed: int = 0,
                 valid: bool = True, interrupted: bool = False, late_sends_only: bool = False,
                 slos: dict | None = None) -> RunSummary:
    """`sent` arrivals and `completed` requests over a `window_s`-second window; `slo_met` None: no SLOs.
    `late_sends_only`: the load generator's one fault was late sends (up to 40 ms). `slos`: name ->
    (percentile value, threshold, samples, samples beyond the threshold, design effect), s."""
    verdicts = {name: SloVerdict(threshold_s=threshold, value_s=value, met=value <= threshold, samples=samples,
                                 beyond_threshold=beyond, design_effect=design_effect, confidence="")
                for name, (value, threshold, samples, beyond, design_effect) in (slos or {}).items()}
    if slos:
        slo_met = all(verdict.met for verdict in verdicts.values())
    valid = valid and not late_sends_only
    problems = (["sends more than 10 ms late: 4 of 313"] if late_sends_only
                else [] if valid else ["load generator CPU 97% of a core"])
    return RunSummary.model_validate({
        "requests": {"total": sent, "measured": sent, "ok": completed, "failed": failed,
                     "excluded_warmup_cooldown": 0, "errors_by_type": {"HTTP 500": failed} if failed else {}},
        "window": {"start_unix": 0.0, "end_unix": window_s, "seconds": window_s, "warmup_s": 0.0, "cooldown_s": 0.0},
        "latency_s": {"ttft": None, "tpot": None, "itl": None, "e2e": None},
        "throughput": {"output_tokens_per_s": 0.0, "requests_per_s": completed / window_s, "input_tokens_per_s": 0.0},
        "tokens": {"output_total": 0, "input_total": 0, "usage_vs_tokenizer_mismatches": 0,
                   "requests_short_of_max_tokens": 0},
        "load_generator": {"schedule_lag_s": LAG if late_sends_only else None, "target_rate_rps": None,
                           "achieved_send_rate_rps": sent / window_s, "scheduled_arrivals": None, "sent_arrivals": sent,
                           "slot_late_requests": 0, "client_cpu_fraction": 0.0 if valid or late_sends_only else 0.97,
                           "valid": valid, "problems": problems, "late_sends_only": late_sends_only,
                           "remedy": None if valid else "add load-generator workers (--workers N) or lower the load"},
        "interrupted": interrupted,
        "slo": None if slo_met is None else SloJudgement(slos=verdicts, all_met=slo_met, goodput_rps=0.0,
                                                         good_requests=0, good_fraction=0.0),
    })

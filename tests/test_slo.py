"""SLO parsing, percentile confidence intervals, goodput, and the search's step arithmetic."""

import random

import numpy as np
import pytest

from tests.test_summary import record
from tokenrig.metrics.distribution import percentile_interval
from tokenrig.metrics.slo import Slo, SloError, judge, parse_slos, samples_for
from tokenrig.metrics.verdict import SloWatch, step_duration, violations_that_miss


def test_parse_slos_reads_units_and_rejects_nonsense():
    assert parse_slos("ttft_p99=500ms, tpot_p99=50ms,e2e_p50=2s") == [
        Slo("ttft", 99, 0.5), Slo("tpot", 99, 0.05), Slo("e2e", 50, 2.0)]
    assert parse_slos("itl_p99.9=800us")[0].threshold_s == pytest.approx(0.0008)
    for bad, says in (("ttft=5ms", "cannot read"), ("latency_p99=1s", "cannot read"), ("ttft_p100=1s", "percentile"),
                      ("", "no SLO"), ("ttft_p99=500", "no unit: write ttft_p99=500ms or ttft_p99=500s"),
                      ("ttft_p99=0ms", "above 0"), ("ttft_p99=1s,ttft_p99=2s", "twice")):
        with pytest.raises(SloError, match=says):
            parse_slos(bad)


def test_percentile_interval_covers_the_true_percentile_95_percent_of_the_time():
    rng = random.Random(1)
    true_p99 = -np.log(0.01)  # exponential(1)
    covered = 0
    for _ in range(400):
        values = np.asarray([rng.expovariate(1.0) for _ in range(1000)])
        low, high = percentile_interval(values, 99)
        covered += low <= true_p99 <= high
    assert 0.91 <= covered / 400 <= 0.99
    assert percentile_interval(np.arange(50.0), 99) is None  # too few samples for a p99 interval
    assert samples_for(99, 10) == 1000 and samples_for(90, 5) == 50


def test_goodput_counts_requests_meeting_every_slo():
    records = [record(1, 0, 0.1, [0.1, 0.2, 0.3], [1, 1, 1], 0.3, 3),  # TTFT 100 ms, TPOT 100 ms
               record(2, 1, 0.6, [0.6, 0.65, 0.7], [1, 1, 1], 0.7, 3),  # TTFT 600 ms: misses
               record(3, 2, 0.2, [0.2, 0.25, 0.3], [1, 1, 1], 0.3, 3),  # meets both
               record(4, 3, None, [], [], None, None, error="HTTP 500: x")]  # failed: never good
    verdict = judge(records, parse_slos("ttft_p50=500ms,tpot_p50=120ms"), window_s=10)
    assert verdict.good_requests == 2 and verdict.goodput_rps == pytest.approx(0.2)
    assert verdict.good_fraction == pytest.approx(0.5)
    assert verdict.slos["ttft_p50"].met and verdict.slos["ttft_p50"].value_s == pytest.approx(0.2)
    assert not judge(records, parse_slos("ttft_p90=500ms"), 10).all_met


def test_step_duration_collects_the_tail_samples():
    slos = parse_slos("ttft_p99=1s,tpot_p90=50ms")
    assert step_duration(slos, rate=10, tail_samples=10, warmup_s=5, min_s=10, max_s=1000) == pytest.approx(105)
    assert step_duration(slos, rate=10, tail_samples=10, warmup_s=5, min_s=10, max_s=60) == 60
    assert step_duration(slos, rate=1000, tail_samples=10, warmup_s=0, min_s=10, max_s=60) == 10


@pytest.mark.parametrize("slow", [1, 2])
def test_slo_watch_stops_a_step_only_once_its_percentile_cannot_be_met(slow):
    """39 x 20 ms + 1 x 60 ms has TTFT p99 44.4 ms, under a 50-ms SLO: the watch must not stop the step.
    A second 60-ms request makes p99 60 ms whatever comes after: then it stops. Its verdict agrees with
    judge() over the same 40 requests."""
    slos = parse_slos("ttft_p99=50ms")
    ttfts = [0.060] * slow + [0.020] * (40 - slow)
    records = [record(i, i, ttft, [ttft, ttft + 0.01], [1, 1], ttft + 0.01, 2) for i, ttft in enumerate(ttfts)]
    watch = SloWatch(slos, expected_requests=40)
    for r in records[:slow]:  # the slow requests end first: the watch sees them before the rest
        watch.write(r)
    missed = not judge(records, slos, window_s=10).all_met
    assert watch.decided() == missed == (slow == 2)
    assert judge(records, slos, 10).slos["ttft_p99"].value_s == pytest.approx(0.0444 if slow == 1 else 0.060)


def test_slo_watch_stops_a_step_whose_slo_is_certainly_met_even_if_every_pending_request_missed_it():
    """1000 fast requests recorded: a p99 is met at 99.8 % even if the one pending request misses it (P(Bin(1001,
    1 %) <= 1) = 0.05 %), not if 5 might (6.4 %); and nothing is decided before a quarter of the step is in."""
    slos = parse_slos("ttft_p99=50ms")
    fast = [record(i, i, 0.02, [0.02], [1], 0.02, 1) for i in range(1000)]
    for pending, expected, decided in [(1, 2000, "met"), (5, 2000, None), (0, 5000, None)]:
        watch = SloWatch(slos, expected_requests=expected, pending=lambda: pending)
        for r in fast:
            watch.write(r)
        assert watch.decided() == (decided is not None) and watch.verdict == decided
    watch = SloWatch(slos, expected_requests=2000)  # without a count of pending requests it cannot stop a step met
    for r in fast:
        watch.write(r)
    assert not watch.decided()


def test_slo_watch_stops_a_step_whose_violations_are_too_many_for_chance():
    slos = parse_slos("ttft_p99=50ms")
    watch = SloWatch(slos, expected_requests=3000)
    for i in range(800):  # 20 of 800 beyond a p99: missed at 99.8 %, though 20 of 3000 could still meet it
        watch.write(record(i, i, 0.09 if i % 40 == 0 else 0.02, [0.02], [1], 0.1, 1))
    assert watch.decided() and watch.verdict == "missed"


def test_judge_counts_slow_requests_in_runs_as_fewer_samples_and_says_how_sure():
    """1000 requests, 2 beyond a 50-ms p99: met at 95 % if independent; if they came in runs of 20 alike
    (busy periods), marginal."""
    slos = parse_slos("ttft_p99=50ms")
    rng = np.random.default_rng(2)
    independent = list(rng.uniform(0.01, 0.045, size=1000))
    independent[100:300:100] = [0.09] * 2
    bursts = list(np.repeat(rng.uniform(0.01, 0.045, size=50), 20))
    bursts[300:302] = [0.09] * 2
    for ttfts, verdict in [(independent, "met at 95%"), (bursts, "marginal (")]:
        records = [record(i, i, ttft, [ttft], [1], ttft, 1) for i, ttft in enumerate(ttfts)]
        judged = judge(records, slos, window_s=10).slos["ttft_p99"]
        assert judged.beyond_threshold == 2 and judged.met and judged.confidence.startswith(verdict), judged
        assert (judged.design_effect < 2.5) if verdict.startswith("met") else judged.design_effect > 5


def test_violations_that_miss_match_numpy_percentiles():
    rng = random.Random(3)
    for _ in range(300):
        samples, percentile = rng.randint(1, 400), rng.choice([50, 90, 95, 99, 99.9])
        needed = violations_that_miss(percentile, samples)
        worst_case_met = [0.0] * (samples - needed + 1) + [1.0] * (needed - 1)  # fast values at 0, violations at 1
        assert np.percentile(worst_case_met, percentile) < 1.0
        missed = [0.0] * (samples - needed) + [1.0] * needed
        assert np.percentile(missed, percentile) == 1.0

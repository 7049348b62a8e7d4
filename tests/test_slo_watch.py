"""SloWatch, the early stop of a --find-max step: what counts against an SLO and when the step is decided.

The counts needed are hand-worked from numpy's percentile (linear interpolation between the order
statistics at floor(h) and floor(h) + 1, h = (n - 1) * p / 100): the percentile is certainly above the
threshold once the value at floor(h) is, that is once n - floor(h) of the n values are.
"""

from __future__ import annotations

from tokenrig.metrics.records import RequestRecord
from tokenrig.metrics.slo import parse_slos
from tokenrig.metrics.verdict import SloWatch


def request(ttft: float | None = 0.1, tpot: float = 0.01, tokens: int = 10, failed: bool = False,
            in_window: bool = True) -> RequestRecord:
    """A streamed request of `tokens` one-token chunks: first at `ttft`, then one every `tpot` seconds."""
    offsets = [] if failed else [ttft + i * tpot for i in range(tokens)]
    return RequestRecord(request_id=0, request_class="c", api="chat", scheduled_at=0.0, send_lag_s=0.0,
                         slot_late=False, in_window=in_window, prompt_tokens_sent=10, max_tokens=tokens,
                         status=None if failed else 200, error="HTTP 503: overloaded" if failed else None,
                         ttft_s=None if failed else ttft, e2e_s=None if failed else offsets[-1],
                         chunk_offsets_s=offsets, chunk_tokens=[1] * len(offsets),
                         output_tokens_usage=None if failed else tokens,
                         output_tokens_tokenizer=None if failed else tokens)


def test_failed_requests_count_against_the_slo_and_out_of_window_ones_do_not():
    """TTFT p50 over 4 requests: h = 3 x 0.5 = 1.5, so the order statistic at rank 1 decides: 4 - 1 = 3
    violations miss the SLO whatever the fourth request does. A failed request has no TTFT to meet it."""
    watch = SloWatch(parse_slos("ttft_p50=100ms"), expected_requests=4)
    for _ in range(10):
        watch.write(request(ttft=5.0, in_window=False))  # warm-up and cool-down are never judged
    watch.write(request(failed=True))
    watch.write(request(ttft=0.5))
    assert not watch.decided()
    watch.write(request(failed=True))
    assert watch.decided()


def test_each_slo_is_counted_on_its_own_metric_and_any_one_decides():
    """TPOT p90 over 10 requests: h = 9 x 0.9 = 8.1, rank 8 decides: 10 - 8 = 2 violations. Requests with
    TTFT 100 ms and a token every 60 ms have TPOT (0.1 + 9 x 0.06 - 0.1) / 9 = 60 ms > 50 ms, TTFT well met."""
    watch = SloWatch(parse_slos("ttft_p90=1s,tpot_p90=50ms"), expected_requests=10)
    watch.write(request(ttft=0.1, tpot=0.06))
    assert not watch.decided()
    watch.write(request(ttft=0.1, tpot=0.06, tokens=1))  # one token: no TPOT to judge, no violation
    assert not watch.decided()
    watch.write(request(ttft=0.1, tpot=0.06))
    assert watch.decided()


def test_a_request_exactly_at_the_threshold_meets_it():
    watch = SloWatch(parse_slos("ttft_p50=100ms"), expected_requests=1)  # h = 0: one violation decides
    watch.write(request(ttft=0.1))
    assert not watch.decided()
    watch.write(request(ttft=0.1001))
    assert watch.decided()


def test_an_itl_slo_never_stops_a_step_early():
    """ITL is judged per token over the whole step, so no count of requests can settle it early."""
    watch = SloWatch(parse_slos("itl_p50=5ms"), expected_requests=2)
    for _ in range(5):
        watch.write(request(tpot=0.5))
        watch.write(request(failed=True))
    assert not watch.decided()

"""What a load test's numbers must mean against the sim server's fixed schedule (token i at arrival +
TTFT + i x TPOT), judged so that a shared 2-core VM cannot fail it.

A unit test proves semantics, not exactness: how close tokenrig gets to the truth is
benchmarks/loadgen.py's question, asked of a server that logs its own send times. On these Firecracker
VMs a message between two idle processes waits for a halted vCPU to wake: measured 2026-11-30 with
both ends timestamping on one clock, a request reached even a bare aiohttp handler 7-26 ms after the
client sent it, and its 100-ms timer fired 6-11 ms late; CI read TTFT p50 26-32 ms over the schedule
at 1-4 users. No client can take that out. So:
- TTFT is never earlier than the schedule, and later only by the host's wake-ups and the server's own
  request handling (a bound that still fails a client that counts from the wrong moment, e.g. after a
  late send or from a later token);
- ITL and TPOT are the schedule's per-token time: its deadlines are absolute, so a late wake-up does
  not carry into the next token.
"""

from __future__ import annotations

import pytest

# The most a request's handling and the host's wake-ups (to receive it, to write its first token, to read
# that) add on these VMs
SERVER_HANDLING_S = 0.060


def assert_ttft_follows_schedule(ttft_s: float, schedule_s: float) -> None:
    assert schedule_s - 0.001 <= ttft_s < schedule_s + SERVER_HANDLING_S, (ttft_s, schedule_s)


def assert_latency_follows_schedule(latency: dict, ttft_s: float = 0.100, tpot_s: float = 0.010) -> None:
    """`latency` is a summary's latency_s block."""
    assert_ttft_follows_schedule(latency["ttft"]["p50"], ttft_s)
    assert latency["itl"]["p50"] == pytest.approx(tpot_s, abs=0.002)
    assert latency["tpot"]["p50"] == pytest.approx(tpot_s, abs=0.002)

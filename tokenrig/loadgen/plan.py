"""Load plans: when each request is due.

A plan hands out send slots. Closed loop (`concurrency`, and `throughput`: as many users as the
open loop's in-flight cap, to saturate the server): a user's next request is due the moment its
previous one ends. Open loop (constant, Poisson, gamma, stages, trace replay): the
whole schedule of due times is computed before the run from the seed (or the trace), so it is
the same whatever the server or the client does; latency is measured from the scheduled time
and a late client counts against the result (no coordinated omission).

Distributed runs split one schedule: worker i of n takes arrivals i, i+n, i+2n, ... so the
workers together send exactly the arrivals a single process would (see `LoadPlan.share`).
"""

from __future__ import annotations

import bisect
import csv
import datetime
import json
import math
import random
import time
from dataclasses import dataclass

from tokenrig.loadgen.scenario import CLOSED_LOOP_TYPES, LoadPlanSpec, Stage, TraceReplay, resolve_data_path


@dataclass(frozen=True)
class TraceRow:
    """What a trace says about one request: token lengths and (Mooncake) prefix-block hashes."""

    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()
    block_tokens: int = 0  # tokens per hash block (Mooncake: 512 x length_scale)


@dataclass(frozen=True)
class Slot:
    due: float  # perf_counter seconds the request is due
    index: int  # arrival number in the whole plan (the same on every worker)
    trace_row: TraceRow | None = None


# -- arrival processes (pure functions of seed and parameters) --------------------------------------

def unit_gaps(process: str, burstiness: float, rng: random.Random):
    """Endless inter-arrival gaps of a unit-rate process: constant, Poisson or gamma with CV `burstiness`."""
    if process == "constant":
        while True:
            yield 1.0
    elif process == "poisson":
        while True:
            yield rng.expovariate(1.0)
    elif process == "gamma":
        shape = 1.0 / burstiness**2  # CV of a gamma variate is 1/sqrt(shape)
        while True:
            yield rng.gammavariate(shape, 1.0 / shape)
    else:
        raise ValueError(f"unknown arrival process {process!r}")


class RateCurve:
    """A piecewise rate r(t) (constant or linear ramps) and the inverse of its integral Λ(t).

    Arrivals of a unit-rate process at operational times u map to t = Λ⁻¹(u) (time rescaling),
    which turns any stationary process into one that follows the stages."""

    def __init__(self, stages: list[Stage]):
        self.pieces = []  # (start_t, duration, r0, r1, start_u)
        t = u = previous = 0.0
        for stage in stages:
            r0 = previous if stage.ramp else stage.rate
            self.pieces.append((t, stage.duration_s, r0, stage.rate, u))
            u += (r0 + stage.rate) / 2 * stage.duration_s
            t += stage.duration_s
            previous = stage.rate
        self.total_u, self.duration = u, t

    def time_at(self, u: float) -> float | None:
        """Λ⁻¹(u): wall offset at which cumulative expected arrivals reach u, None past the end."""
        for start_t, duration, r0, r1, start_u in self.pieces:
            area = (r0 + r1) / 2 * duration
            if u - start_u > area:
                continue
            left = u - start_u
            slope = (r1 - r0) / duration
            if abs(slope) < 1e-12:
                return start_t + (left / r0 if r0 else 0.0)
            # r0 x + slope x²/2 = left
            return start_t + (-r0 + math.sqrt(r0 * r0 + 2 * slope * left)) / slope
        return None


def synthetic_offsets(spec: LoadPlanSpec) -> list[float]:
    """Due offsets (seconds from plan start) of an open-loop plan, deterministic for its seed."""
    if spec.stages:
        stages = spec.stages
    else:
        assert spec.rate is not None, "an open-loop plan has a rate or stages (LoadPlanSpec validates it)"
        stages = [Stage(duration_s=spec.duration_s, rate=spec.rate)]
    curve = RateCurve(stages)
    rng = random.Random(spec.seed)
    offsets = []
    # start the stationary process at a random phase so a constant plan does not fire at t=0 and
    # Poisson/gamma plans are not conditioned on an arrival at the origin
    gaps = unit_gaps(spec.type, spec.burstiness, rng)
    u = next(gaps) * rng.random()
    while u < curve.total_u:
        t = curve.time_at(u)
        if t is None or t >= spec.duration_s:
            break
        offsets.append(t)
        u += next(gaps)
    return offsets


# -- trace replay -----------------------------------------------------------------------------------

def read_trace(replay: TraceReplay) -> list[tuple[float, TraceRow]]:
    """(trace seconds from the first request, row) for every request of the trace, in time order."""
    path = resolve_data_path(replay.path)
    scale = replay.length_scale
    rows: list[tuple[float, TraceRow]] = []
    with path.open(newline="") as handle:
        if replay.format == "mooncake":
            block = max(1, round(512 * scale))
            for line in handle:
                if line.strip():
                    item = json.loads(line)
                    rows.append((item["timestamp"] / 1000.0, TraceRow(
                        max(1, round(item["input_length"] * scale)), max(1, round(item["output_length"] * scale)),
                        tuple(item["hash_ids"]), block)))
        else:
            for item in csv.DictReader(handle):
                stamp = datetime.datetime.fromisoformat(item["TIMESTAMP"][:26]).timestamp()
                rows.append((stamp, TraceRow(max(1, round(int(item["ContextTokens"]) * scale)),
                                             max(1, round(int(item["GeneratedTokens"]) * scale)))))
    rows.sort(key=lambda pair: pair[0])
    first = rows[0][0]
    return [(stamp - first, row) for stamp, row in rows]


def spread_buckets(times: list[float], rng: random.Random) -> list[float]:
    """Spread requests that share a quantized timestamp over the bucket up to the next timestamp.

    Given n arrivals of a Poisson process in an interval, their times are n sorted uniform draws
    over it, so that is how each bucket is spread (the last bucket uses the median bucket width)."""
    distinct = sorted(set(times))
    if len(distinct) < 2:
        return list(times)
    widths = [b - a for a, b in zip(distinct, distinct[1:])]
    last_width = sorted(widths)[len(widths) // 2]
    spread, start = [], 0
    while start < len(times):
        end = start
        while end < len(times) and times[end] == times[start]:
            end += 1
        position = bisect.bisect_left(distinct, times[start])
        width = widths[position] if position < len(widths) else last_width
        spread.extend(sorted(times[start] + rng.random() * width for _ in range(end - start)))
        start = end
    return spread


def trace_schedule(spec: LoadPlanSpec) -> list[tuple[float, TraceRow]]:
    """Due offsets and rows of a trace replay: from `start_s`, k times faster, within duration_s."""
    replay = spec.trace
    assert replay is not None, "a trace plan names its trace (LoadPlanSpec validates it)"
    rows = read_trace(replay)
    times = [stamp for stamp, _ in rows]
    if replay.format == "mooncake" and replay.spread_buckets:
        times = spread_buckets(times, random.Random(spec.seed))
    schedule = []
    for stamp, (_, row) in zip(times, rows):
        offset = (stamp - replay.start_s) / replay.speedup
        if 0 <= offset < spec.duration_s:
            schedule.append((offset, row))
    return schedule


# -- the plan a run follows -------------------------------------------------------------------------

class LoadPlan:
    def __init__(self, spec: LoadPlanSpec, start: float | None = None, share: tuple[int, int] = (0, 1)):
        """`share` = (i, n): this process sends arrivals i, i+n, ... of the plan (distributed runs)."""
        self.spec = spec
        self.share = share
        self.start = time.perf_counter() if start is None else start
        self.issued = 0
        self._offsets: list[float] = []
        self._rows: list[TraceRow | None] = []
        if spec.type == "trace":
            for offset, row in trace_schedule(spec):
                self._offsets.append(offset)
                self._rows.append(row)
        elif self.open_loop:
            self._offsets = synthetic_offsets(spec)
            self._rows = [None] * len(self._offsets)
        self._cursor = share[0]

    @property
    def end(self) -> float:
        return self.start + self.spec.duration_s

    @property
    def open_loop(self) -> bool:
        return self.spec.type not in CLOSED_LOOP_TYPES

    @property
    def scheduled_total(self) -> int:
        """Arrivals of the whole plan (all workers); 0 for closed loop."""
        return len(self._offsets)

    @property
    def pool_size(self) -> int:
        """How many Locust users run the plan: the concurrency, or the open-loop safety cap."""
        return self.users if not self.open_loop else self.spec.max_in_flight

    @property
    def users(self) -> int:
        """Closed loop: its users, each sending its next request when its last one ends."""
        assert self.spec.users is not None, "a closed-loop plan has users (LoadPlanSpec validates it)"
        return self.spec.users

    @property
    def target_rate(self) -> float | None:
        """Open loop: the plan's mean arrival rate (all workers), requests/s."""
        if not self.open_loop:
            return None
        if self.spec.type == "trace" or self.spec.stages:
            return len(self._offsets) / self.spec.duration_s
        return self.spec.rate

    def scheduled_in_window(self, until_s: float | None = None) -> int | None:
        """Open loop: arrivals of the plan due inside the steady-state window (and before `until_s`, seconds
        from the start, when the load was stopped then); None for a closed loop."""
        return self.due_in_window(until_s) if self.open_loop else None

    def due_in_window(self, until_s: float | None = None) -> int:
        """Arrivals of the plan due inside the steady-state window (and before `until_s`); 0 for a closed loop,
        which schedules none."""
        low, high = self.spec.warmup_s, self.spec.duration_s - self.spec.cooldown_s
        if until_s is not None:
            high = min(high, until_s)
        return bisect.bisect_left(self._offsets, high) - bisect.bisect_left(self._offsets, low)

    def describe(self) -> str:
        spec = self.spec
        if spec.type == "throughput":
            return f"throughput mode: {spec.users} requests in flight, each replaced as it ends"
        if not self.open_loop:
            return f"{spec.users} concurrent users"
        if spec.type == "trace":
            assert spec.trace is not None, "a trace plan names its trace (LoadPlanSpec validates it)"
            return (f"replay of {spec.trace.path} x{spec.trace.speedup:g} ({self.scheduled_total} arrivals, "
                    f"{self.target_rate:.2f} req/s mean)")
        process = f"gamma (CV {spec.burstiness:g})" if spec.type == "gamma" else spec.type
        if spec.stages:
            steps = " -> ".join(f"{'ramp to ' if s.ramp else ''}{s.rate:g}/s for {s.duration_s:g} s"
                                for s in spec.stages)
            return f"{process} arrivals in stages: {steps}"
        return f"{process} arrivals at {spec.rate:g} req/s"

    def next_slot(self, now: float) -> Slot | None:
        """The next request this process sends, or None when the plan is over."""
        worker, workers = self.share
        if not self.open_loop:
            if now >= self.end:
                return None
            index = self.issued * workers + worker
            self.issued += 1
            users = self.users
            first_due = self.start + self.spec.ramp_s * index / users if index < users else 0.0
            return Slot(max(now, self.start, first_due), index)
        if self._cursor >= len(self._offsets):
            return None
        index = self._cursor
        self._cursor += workers
        self.issued += 1
        return Slot(self.start + self._offsets[index], index, self._rows[index])

    def in_steady_window(self, due: float) -> bool:
        return self.start + self.spec.warmup_s <= due < self.end - self.spec.cooldown_s

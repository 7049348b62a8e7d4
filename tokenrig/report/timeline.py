"""A run second by second: request records and server scrapes -> per-second series on one clock.

Second k covers [t0 + k, t0 + k + 1), t0 = the first scheduled request (or the first scrape). Sent
counts actual sends (scheduled + lag), done, errors and cancelled (in flight when the load was stopped)
count requests by the moment they ended,
in flight is the count at the start of each second, output tokens are the streamed chunks by the
second they arrived. The server's running and waiting requests and KV-cache usage are its scrapes
on the same clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from tokenrig.metrics.records import RequestRecord


@dataclass
class Timeline:
    seconds: list[float] = field(default_factory=list)  # start of each second, from t0
    sent: list[int] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    done: list[int] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)  # in flight when the load was stopped: no error
    output_tokens: list[int] = field(default_factory=list)
    server: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # key -> (times, values)
    t0: float = 0.0


SERVER_SERIES = ("running", "waiting", "kv_cache_usage")


def _ended(record: RequestRecord) -> float:
    return record.scheduled_at + (record.e2e_s if record.e2e_s is not None else record.send_lag_s)


def build(records: list[RequestRecord], scrapes: list[dict]) -> Timeline:
    starts = [r.scheduled_at for r in records] + [row["t"] for row in scrapes]
    if not starts:
        return Timeline()
    t0 = min(starts)
    ends = [_ended(r) for r in records] + [row["t"] for row in scrapes]
    length = max(1, math.ceil(max(ends) - t0 + 1e-9))
    edges = np.arange(length + 1, dtype=float)

    def per_second(times) -> list[int]:
        return np.histogram(np.asarray(list(times), dtype=float) - t0, bins=edges)[0].astype(int).tolist()

    sends = np.sort([r.scheduled_at + r.send_lag_s - t0 for r in records])
    finished = np.sort([_ended(r) - t0 for r in records])
    in_flight = (np.searchsorted(sends, edges[:-1], side="right")
                 - np.searchsorted(finished, edges[:-1], side="right")).tolist()
    tokens = np.histogram([r.scheduled_at + offset - t0 for r in records for offset in r.chunk_offsets_s],
                          bins=edges, weights=[n for r in records for n in r.chunk_tokens])[0]
    server = {}
    for key in SERVER_SERIES:
        points = [(row["t"] - t0, row[key]) for row in scrapes if key in row]
        if points:
            server[key] = ([t for t, _ in points], [v for _, v in points])
    return Timeline(seconds=edges[:-1].tolist(), sent=per_second(r.scheduled_at + r.send_lag_s for r in records),
                    in_flight=in_flight, done=per_second(_ended(r) for r in records if r.ok),
                    errors=per_second(_ended(r) for r in records if not r.ok and not r.cancelled),
                    cancelled=per_second(_ended(r) for r in records if r.cancelled),
                    output_tokens=tokens.astype(int).tolist(), server=server, t0=t0)

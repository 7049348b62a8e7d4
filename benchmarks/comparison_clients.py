"""The clients the load-generator benchmark compares tokenrig with, each run in a process of its own.

- `baseline`: the least a Python client can do per chunk on tokenrig's stack: gevent greenlets on
  geventhttpclient, each a stream; per line a readline, and for a content line one timestamp.
- `locust`: a plain Locust FastHttpUser doing the same per line, through Locust's own request
  machinery (its session, its request event and statistics per request, its user spawning).

Both time TTFT from the send and gaps between content chunks, over the same window as tokenrig,
and print one JSON row. benchmarks/loadgen.py starts them:

    python benchmarks/comparison_clients.py baseline|locust URL --streams N --duration S
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from urllib.parse import urlsplit

import numpy as np

from loadgen import RAMP_S, TOKENS, WARMUP_S

BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": " ".join(["ba"] * 64)}],
                   "max_tokens": TOKENS, "stream": True}).encode()
HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
PATH = "/v1/chat/completions"


class Timings:
    """TTFT of each request sent inside the window, gaps between its content chunks, tokens that arrived in it."""

    def __init__(self, duration: float):
        start = time.perf_counter()
        self.warm, self.end = start + WARMUP_S, start + duration
        self.ttfts: list[float] = []
        self.gaps: list[float] = []
        self.tokens = 0
        self._cpu, self._wall = time.process_time(), start

    def read(self, readline, sent: float) -> None:
        """Read one response to its end: per line a readline, and for a content line one timestamp."""
        clock, warm, end = time.perf_counter, self.warm, self.end
        first = last = None
        while True:
            line = readline(b"\n")
            now = clock()
            if not line or line.startswith(b"data: [DONE]"):
                break
            if b'"content":"' not in line or b'"content":""' in line:
                continue
            if warm <= now < end:
                self.tokens += 1
            if first is None:
                first = now
                if sent >= warm:
                    self.ttfts.append(now - sent)
            elif sent >= warm:
                self.gaps.append(now - last)
            last = now

    def row(self, tool: str, streams: int) -> dict:
        return {"tool": tool, "streams": streams, "tokens_per_s": self.tokens / (self.end - self.warm),
                "ttft_p50_s": float(np.percentile(self.ttfts, 50)), "itl_p99_s": float(np.percentile(self.gaps, 99)),
                "client_cpu": (time.process_time() - self._cpu) / (time.perf_counter() - self._wall), "valid": True}


def baseline(url: str, streams: int, duration: float) -> dict:
    import gevent
    from geventhttpclient import HTTPClient

    parts = urlsplit(url)
    timings = Timings(duration)

    def stream(index: int):
        gevent.sleep(RAMP_S * index / streams)
        client = HTTPClient(parts.hostname, parts.port, concurrency=1, network_timeout=60)
        while time.perf_counter() < timings.end:
            sent = time.perf_counter()
            timings.read(client.post(PATH, body=BODY, headers=HEADERS).readline, sent)
        client.close()

    gevent.joinall([gevent.spawn(stream, index) for index in range(streams)])
    return timings.row("baseline", streams)


def locust(url: str, streams: int, duration: float) -> dict:
    import gevent
    from locust import FastHttpUser, constant, events, task
    from locust.env import Environment

    timings = Timings(duration)

    class PlainUser(FastHttpUser):
        host = url
        wait_time = constant(0)

        @task
        def chat(self) -> None:
            sent = time.perf_counter()
            response = self.client.post(PATH, data=BODY, headers=HEADERS, stream=True)
            timings.read(response.stream.readline, sent)

    runner = Environment(user_classes=[PlainUser], events=events).create_local_runner()
    runner.start(streams, spawn_rate=streams / RAMP_S)  # evenly over one request's length, as the others
    gevent.sleep(max(0.0, timings.end - time.perf_counter()))
    runner.quit()
    return timings.row("locust", streams)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("client", choices=("baseline", "locust"))
    parser.add_argument("url")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    args = parser.parse_args()
    run = baseline if args.client == "baseline" else locust
    print(json.dumps(run(args.url, args.streams, args.duration)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

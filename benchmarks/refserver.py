"""A streaming chat server whose own send log is the ground truth of the load-generator benchmark.

Every request gets the same fixed schedule: a role chunk at once, then one content token at
received + TTFT + k × ITL (absolute deadlines, k = 0…tokens−1), the last one followed by the
usage chunk and [DONE]. The chunks are pre-rendered bytes (HTTP/1.1 chunked SSE in vLLM's
shape) written with one non-blocking send each from a single-threaded epoll loop, so one core
holds the schedule at well over 50k chunks/s. The loop sleeps on a timerfd armed at the next
deadline (epoll's own timeout has millisecond grain) and, where allowed, runs SCHED_FIFO so no
other process on its core delays a due send.

With `--metrics-page` it answers GET /metrics with a real engine's page (vLLM 0.26's, ~50 KB),
so a client that scrapes its server pays what it would against that engine.

On SIGTERM/SIGINT it writes its log (`--log`, .npz): per request the receive time and the
perf_counter time each content chunk was handed to the kernel (NaN if not sent), plus the
schedule it was given. `python benchmarks/refserver.py --port 0` prints `listening on PORT`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import heapq
import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np

SPIN_S = 0.00005  # a deadline closer than this is polled for, not slept to


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(payload: dict | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return _http_chunk(f"data: {text}\n\n".encode())


def render_stream(tokens: int, word: str = " kalo", model: str = "tiny") -> tuple[bytes, list[bytes]]:
    """(headers + role chunk, one byte string per content token; the last also ends the stream)."""
    base = {"id": "chatcmpl-0123456789abcdef0123456789abcdef", "object": "chat.completion.chunk",
            "created": 1764300000, "model": model}

    def chunk(delta: dict, finish: str | None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + _sse(chunk({"role": "assistant", "content": ""}, None)))
    body = [_sse(chunk({"content": word}, None)) for _ in range(tokens)]
    usage = {**base, "choices": [], "usage": {"prompt_tokens": 64, "completion_tokens": tokens,
                                              "total_tokens": 64 + tokens}}
    body[-1] += _sse(chunk({}, "length")) + _sse(usage) + _sse("[DONE]") + b"0\r\n\r\n"
    return head, body


def _plain(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (status.encode(), content_type, len(body), body))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class DeadlineTimer:
    """A timerfd on CLOCK_MONOTONIC (perf_counter's clock) armed at an absolute time: epoll's own timeout
    has millisecond grain, a timerfd wakes the loop within microseconds of a deadline."""

    CLOCK_MONOTONIC, TFD_NONBLOCK, TFD_TIMER_ABSTIME = 1, os.O_NONBLOCK, 1

    def __init__(self):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.timerfd_create(self.CLOCK_MONOTONIC, self.TFD_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self._spec = _Itimerspec()

    def arm(self, at: float) -> None:
        seconds = int(at)
        self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = seconds, int((at - seconds) * 1e9)
        self._libc.timerfd_settime(self.fd, self.TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None)

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass


class Connection:
    __slots__ = ("sock", "inbox", "outbox", "stream")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.inbox = b""
        self.outbox = b""  # bytes the kernel would not take yet (a client that does not read)
        self.stream: int | None = None  # index of the request being streamed


class ReferenceServer:
    def __init__(self, port: int, ttft_s: float, itl_s: float, tokens: int, max_requests: int,
                 metrics_page: bytes | None = None):
        self.ttft_s, self.itl_s, self.tokens = ttft_s, itl_s, tokens
        self.head, self.body = render_stream(tokens)
        self.models = _plain("200 OK", json.dumps({"object": "list", "data": [
            {"id": "tiny", "object": "model", "max_model_len": 4096}]}).encode())
        self.metrics = (_plain("200 OK", metrics_page, b"text/plain; version=0.0.4; charset=utf-8")
                        if metrics_page is not None else _plain("404 Not Found", b""))
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.timer = DeadlineTimer()
        self.epoll.register(self.timer.fd, select.EPOLLIN)
        self.connections: dict[int, Connection] = {}
        self.received: list[float] = []
        self.sent: list[list[float]] = []  # per request, per content token: when it was handed to the kernel
        self.max_requests = max_requests
        self.due: list[tuple[float, int, int, Connection]] = []  # (deadline, request, token index, connection)
        self.stopping = False

    def serve(self) -> None:
        clock, due, epoll, timer = time.perf_counter, self.due, self.epoll, self.timer
        armed = None
        while not self.stopping:
            if due and due[0][0] - clock() > SPIN_S and due[0][0] != armed:
                armed = due[0][0]
                timer.arm(armed)
            # near a deadline poll without sleeping; otherwise the timer (or a request) wakes the loop
            for fd, events in epoll.poll(0 if due and due[0][0] - clock() <= SPIN_S else 0.1):
                if fd == timer.fd:
                    timer.clear()
                elif fd == self.listener.fileno():
                    self._accept()
                elif events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._read(self.connections[fd])
                if events & select.EPOLLOUT and fd in self.connections:
                    self._drain(self.connections[fd])
            now = clock()
            while due and due[0][0] <= now:
                deadline, request, index, connection = heapq.heappop(due)
                self._send(connection, self.body[index])
                now = clock()
                self.sent[request][index] = now
                if index + 1 < self.tokens:
                    heapq.heappush(due, (deadline + self.itl_s, request, index + 1, connection))
                else:
                    connection.stream = None

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections[sock.fileno()] = Connection(sock)
            self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _read(self, connection: Connection) -> None:
        try:
            data = connection.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(connection)
            return
        connection.inbox += data
        while True:  # every complete request in the buffer (clients send one at a time, but be exact)
            end = connection.inbox.find(b"\r\n\r\n")
            if end < 0:
                return
            head = connection.inbox[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(connection.inbox) < end + 4 + length:
                return
            connection.inbox = connection.inbox[end + 4 + length:]
            self._respond(connection, head.split(" ", 2))

    def _respond(self, connection: Connection, request_line: list[str]) -> None:
        method, path = request_line[0], request_line[1]
        if method == "GET":
            self._send(connection, self.models if path.endswith("/models") else
                       self.metrics if path == "/metrics" else _plain("404 Not Found", b""))
            return
        if connection.stream is not None or len(self.received) == self.max_requests:
            self._send(connection, _plain("503 Service Unavailable", b"busy"))
            return
        request = len(self.received)
        now = time.perf_counter()
        self.received.append(now)
        self.sent.append([float("nan")] * self.tokens)
        connection.stream = request
        self._send(connection, self.head)
        heapq.heappush(self.due, (now + self.ttft_s, request, 0, connection))

    def _send(self, connection: Connection, data: bytes) -> None:
        if connection.outbox:
            connection.outbox += data
            return
        try:
            sent = connection.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return  # the client went away; its stream runs out against a closed socket
        if sent < len(data):
            connection.outbox = data[sent:]
            self.epoll.modify(connection.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def _drain(self, connection: Connection) -> None:
        try:
            sent = connection.sock.send(connection.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(connection.outbox)
        connection.outbox = connection.outbox[sent:]
        if not connection.outbox:
            self.epoll.modify(connection.sock.fileno(), select.EPOLLIN)

    def _close(self, connection: Connection) -> None:
        fd = connection.sock.fileno()
        self.epoll.unregister(fd)
        del self.connections[fd]
        connection.sock.close()  # its stream's remaining deadlines still fire, and their sends fail quietly

    def save(self, path: Path) -> None:
        np.savez(path, received=np.array(self.received), sent=np.array(self.sent).reshape(-1, self.tokens),
                 schedule=np.array([self.ttft_s, self.itl_s, self.tokens]))


def load_log(path: Path) -> dict:
    """The server's truth from its log: TTFT per request, chunk-gap ITL, lateness against the deadlines."""
    log = np.load(path)
    received, sent = log["received"], log["sent"]
    ttft_s, itl_s, tokens = log["schedule"]
    deadlines = received[:, None] + ttft_s + itl_s * np.arange(int(tokens))[None, :]
    return {"received": received, "sent": sent, "ttft_s": sent[:, 0] - received,
            "gaps_s": np.diff(sent, axis=1), "lateness_s": sent - deadlines}


def raise_priority() -> str:
    """Run ahead of every ordinary process on this core where allowed (root): SCHED_FIFO, else nice -20.
    Otherwise any task woken on the server's core may run for milliseconds before a due send."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return "SCHED_FIFO"
    except PermissionError:
        try:
            os.nice(-20 - os.nice(0))
            return "nice -20"
        except PermissionError:
            return "normal"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft-ms", type=float, default=100.0)
    parser.add_argument("--itl-ms", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--log", type=Path, help="write the send log here (.npz) when stopped")
    parser.add_argument("--metrics-page", type=Path,
                        help="answer GET /metrics with this Prometheus page (a real engine's), as a server does")
    args = parser.parse_args()
    server = ReferenceServer(args.port, args.ttft_ms / 1000, args.itl_ms / 1000, args.tokens, args.max_requests,
                             args.metrics_page.read_bytes() if args.metrics_page else None)

    def stop(_signum, _frame):
        server.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # a collection walks every logged request: tens of ms at the end of a long run, so no collector (the
    # server makes no reference cycles)
    gc.disable()
    raise_priority()
    print(f"listening on {server.port}", flush=True)
    server.serve()
    if args.log:
        server.save(args.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-request records and the sinks they stream to.

One `RequestRecord` per request, written the moment the request ends (append + flush), so a
crash or Ctrl-C loses no finished request. Times are seconds; offsets are relative to the
request's scheduled send time, the zero of every latency tokenrig reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import orjson

from tokenrig import exit_status
from tokenrig.errors import UserError

# A request in flight when the load test was stopped: the server did nothing wrong, so it is cancelled,
# not failed.
CANCELLED = "aborted: load test stopped before the response ended"
GAVE_UP = "Timeout: response still not finished --request-timeout seconds after the load ended"


@dataclass
class RequestRecord:
    request_id: int
    request_class: str
    api: str
    scheduled_at: float  # unix time the request was due
    send_lag_s: float  # actual send - scheduled send
    slot_late: bool  # no free user at the due time (open-loop safety cap reached)
    in_window: bool  # scheduled inside the steady-state window (not warm-up/cool-down)
    prompt_tokens_sent: int
    max_tokens: int
    status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_offsets_s: list[float] = field(default_factory=list)  # arrival of each content chunk
    chunk_tokens: list[int] = field(default_factory=list)  # tokens each content chunk carried
    output_tokens_usage: int | None = None
    prompt_tokens_usage: int | None = None
    output_tokens_tokenizer: int | None = None
    arrival_index: int = 0  # the plan's arrival this request belongs to (same on every worker)
    turn: int = 0  # turn of a multi-turn conversation (0 = first)
    prefix_id: int | None = None  # shared prefix sent, if any
    prefix_reused: bool = False  # that prefix had been sent before
    truncated: bool = False  # the stream ended with fewer tokens than max_tokens (every request forces its length)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def cancelled(self) -> bool:
        return self.error == CANCELLED

    @property
    def output_tokens(self) -> int:
        """The tokens the stream carried (the client's tokenizer count of the text received), else the server's
        usage: a server's `completion_tokens: 999` for 20 streamed tokens must not make TPOT 0.2 ms."""
        if self.output_tokens_tokenizer is not None:
            return self.output_tokens_tokenizer
        return self.output_tokens_usage or 0

    def tpot(self) -> float | None:
        """Time per output token after the first: (E2E - TTFT) / (tokens - 1); None under two tokens."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def itl_gaps(self) -> list[float]:
        """Each chunk's gap to the previous one divided by its tokens, once per token (a chunk of none counts one)."""
        if len(self.chunk_offsets_s) < 2:
            return []
        counts = np.maximum(np.asarray(self.chunk_tokens[1:]), 1)
        return np.repeat(np.diff(self.chunk_offsets_s) / counts, counts).tolist()


class Sink(Protocol):
    """Where finished records go: requests.jsonl, the Prometheus exporter, an SLO watch, a worker's shipper."""

    def write(self, record: RequestRecord) -> None: ...

    def close(self) -> None: ...


class FanoutSink:
    """Writes each record to several sinks (requests.jsonl first: it is the source of truth)."""

    def __init__(self, *sinks: Sink):
        self.sinks = sinks

    def write(self, record: RequestRecord) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class RecordWriteError(UserError, OSError):
    """Records could not be written (disk full, file-size limit, directory gone): the run must stop, and failed."""

    exit_code = exit_status.FAILED


class JsonlSink:
    """Appends each record as one line. A failed write never raises into the request that ended: the first
    error is kept and the records not written are counted, for the run to stop and say so."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("ab")
        self.error: OSError | None = None
        self.unwritten = 0

    def write(self, record: RequestRecord) -> None:
        # vars(), not dataclasses.asdict(), which deep-copies the per-chunk lists; orjson, not json: a
        # 128-chunk record takes 4 µs against 73, and at hundreds of streams those microseconds delay the
        # other greenlets. Flushed at once, so that a crash loses no finished request.
        try:
            self._file.write(orjson.dumps(vars(record), option=orjson.OPT_APPEND_NEWLINE))
            self._file.flush()
        except OSError as error:
            self.error = self.error or error
            self.unwritten += 1

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as error:  # the last buffered bytes could not be flushed
            self.error = self.error or error

    @property
    def failing(self) -> bool:
        """A write failed, or the file was deleted (writes would go on into an unlinked file, then vanish)."""
        return self.error is not None or not self.path.exists()

    def check(self) -> None:
        if not self.path.exists():
            raise RecordWriteError(f"{self.path} was deleted during the run: the load was stopped; the records "
                                   "it held are gone")
        if self.error is not None:
            raise RecordWriteError(f"cannot write {self.path}: {self.error.strerror or self.error}; the load was "
                                   f"stopped, {self.unwritten} records could not be written (every record before "
                                   "them is in the file)")


def read_records(path: Path) -> list[RequestRecord]:
    """Every complete record; a last line cut short (the process died, or the disk filled, mid-write) is skipped."""
    records = []
    with path.open() as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                records.append(RequestRecord(**orjson.loads(line)))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise
    return records

"""Locust users that send the plan's requests through an API client and record every one.

Each user takes send slots from the shared `LoadPlan`, waits for the slot's due time, and sends
one streaming request through its API's client (loadgen/clients: OpenAI SSE, TGI
/generate_stream), which times every chunk. Once the request has ended its tokens are counted
(loadgen/tokens.py) and the record goes to the run's sink.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import gevent
from gevent.pool import Group
from locust import User, constant, task
from locust.env import Environment
from locust.exception import StopUser
from tokenizers import Tokenizer

from tokenrig.loadgen.clients import StreamResult, openai
from tokenrig.loadgen.plan import LoadPlan
from tokenrig.loadgen.tokens import TokenCounter
from tokenrig.loadgen.workload import PreparedRequest, Workload
from tokenrig.metrics.records import CANCELLED, GAVE_UP, RequestRecord, Sink

SLOT_LATE_TOLERANCE_S = 0.001


@dataclass
class LoadContext:
    """What every user of a run shares; attached to the Locust environment."""

    base_url: str
    plan: LoadPlan
    workload: Workload
    tokenizer: Tokenizer
    sink: Sink
    unix_offset: float  # unix time - perf_counter
    request_timeout_s: float = 600.0
    client: str = "openai"  # "tgi": TGIStreamingUser over /generate_stream
    headers: dict = field(default_factory=dict)  # added to every request (an API key's Authorization)
    gave_up: bool = False  # the run stopped waiting for requests still in flight: they failed, not cancelled
    in_flight: int = 0
    sent: int = 0  # requests sent so far (counted at the send, not when they end)
    completed: int = 0
    failed: int = 0
    output_tokens: int = 0
    finishers: Group = field(default_factory=Group)  # records being finished after their stream ended
    count_tokens: TokenCounter = field(init=False)
    reading: dict = field(default_factory=dict)  # greenlet -> [when its stream last delivered a line]
    _watchdog: gevent.Greenlet | None = None  # the one that fails silent streams, while any is read
    _next_id: int = 0

    def __post_init__(self) -> None:
        self.count_tokens = TokenCounter(self.tokenizer)

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def watch_stream(self) -> list[float]:
        """Register the calling greenlet's request: it fails once its server has been silent for
        request_timeout_s. Returns the cell the reader keeps its last line's time in."""
        activity = [time.perf_counter()]
        self.reading[gevent.getcurrent()] = activity
        if self._watchdog is None:
            self._watchdog = gevent.spawn(self._fail_silent_streams)
        return activity

    def _fail_silent_streams(self) -> None:
        # One scan a few times a timeout instead of a gevent Timeout started and cancelled around every
        # socket wait, which was 12.7 % of geventhttpclient's readline samples at 256 streams
        while True:
            gevent.sleep(min(1.0, self.request_timeout_s / 4))
            now = time.perf_counter()
            if not self.reading and now > self.plan.end:  # the step is over: a later one starts its own
                self._watchdog = None
                return
            for greenlet, activity in list(self.reading.items()):
                if now - activity[0] > self.request_timeout_s:
                    self.reading.pop(greenlet, None)
                    greenlet.kill(StreamTimeout(f"no bytes from the server for {self.request_timeout_s:g} s"),
                                  block=False)


class StreamTimeout(TimeoutError):
    """The server sent nothing for the request timeout."""


class LoadEnvironment(Environment):
    """Locust's environment with the run's LoadContext, which every user reads; set before the users start."""

    tokenrig: LoadContext


class OpenAIStreamingUser(User):
    """Sends OpenAI-compatible streaming requests (chat or completions) from the scenario."""

    wait_time = constant(0)
    host = "http://127.0.0.1"

    def on_start(self) -> None:
        self.ctx: LoadContext = self.environment.tokenrig
        self.client, self.path_prefix = openai.connect(self.ctx.base_url)
        self.headers = {**openai.HEADERS, **self.ctx.headers}

    def on_stop(self) -> None:
        self.client.close()

    @task
    def one_arrival(self) -> None:
        """Take the plan's next arrival and send its requests: one, or each turn of a conversation."""
        ctx = self.ctx
        picked = time.perf_counter()
        slot = ctx.plan.next_slot(picked)
        if slot is None:
            raise StopUser()
        dialogue = ctx.workload.dialogue(slot.index, slot.trace_row)
        prepared = dialogue.next_request()
        due, slot_late = slot.due, ctx.plan.open_loop and picked > slot.due + SLOT_LATE_TOLERANCE_S
        if not ctx.plan.open_loop:  # closed loop: due once the request is built, as a user would send it
            due = max(due, time.perf_counter())
        while prepared is not None:
            wait = due - time.perf_counter()
            if wait > 0:
                gevent.sleep(wait)
            # a later turn sends this reply back, so it is finished now; else after the next request is sent
            reply, record = self._one_request(prepared, due, slot.index, slot_late,
                                              reply_needed=dialogue.turn < dialogue.turns)
            if not record.ok or reply is None:  # failed, or the last turn
                return
            dialogue.add_reply(reply, record.output_tokens)
            # the next turn is due when the user has read the reply and thought; it is not sent after
            # the plan's end, so a run's length does not depend on conversations still going
            due = time.perf_counter() + dialogue.think_time_s
            if due >= ctx.plan.end:
                return
            prepared, slot_late = dialogue.next_request(), False

    def _one_request(self, prepared: PreparedRequest, due: float, index: int, slot_late: bool,
                     reply_needed: bool) -> tuple[str | None, RequestRecord]:
        ctx = self.ctx
        record = RequestRecord(
            request_id=ctx.new_id(), request_class=prepared.request_class, api=prepared.api,
            scheduled_at=due + ctx.unix_offset, send_lag_s=0.0, slot_late=slot_late,
            in_window=ctx.plan.in_steady_window(due),
            prompt_tokens_sent=prepared.prompt_tokens, max_tokens=prepared.max_tokens,
            arrival_index=index, turn=prepared.turn, prefix_id=prepared.prefix_id,
            prefix_reused=prepared.prefix_reused,
        )
        ctx.in_flight += 1
        ctx.sent += 1
        result = StreamResult(due)
        try:
            self._send(prepared, result)
        except BaseException:  # stopped: what was measured is written now
            if result.e2e_s is None:  # stopped mid-stream; an answer already ended stands as it ended
                result.error = GAVE_UP if ctx.gave_up else CANCELLED
            texts = take(record, result)
            self._finish(prepared, record, texts)
            raise
        texts = take(record, result)
        if reply_needed:
            self._finish(prepared, record, texts)
            return "".join(texts), record
        # Counting tokens, writing the record and Locust's statistics, done in a greenlet of their own,
        # run while this user waits for its next first token, not in between
        # the end of one stream and the send of the next (at hundreds of streams ending together, that
        # delayed every send of the wave)
        ctx.finishers.spawn(self._finish, prepared, record, texts, True)
        return None, record

    def _finish(self, prepared: PreparedRequest, record: RequestRecord, texts: list[str],
                deferred: bool = False) -> None:
        """Count the tokens, account and write the record."""
        ctx = self.ctx
        ctx.count_tokens(record, texts)
        if deferred:
            gevent.sleep(0)  # let the chunks that arrived meanwhile be timestamped before the record is written
        ctx.in_flight -= 1
        ctx.output_tokens += record.output_tokens
        if record.ok:
            ctx.completed += 1
        else:
            ctx.failed += 1
        ctx.sink.write(record)
        self.environment.events.request.fire(
            request_type="POST", name=prepared.path, response_time=(record.e2e_s or 0) * 1000,
            response_length=record.output_tokens, exception=record.error, context={})

    def _send(self, prepared: PreparedRequest, result: StreamResult) -> None:
        """Send one request and read its stream into `result`, failing it when the server falls silent."""
        activity = self.ctx.watch_stream()
        try:
            openai.stream(self.client, self.path_prefix + prepared.path, prepared.body, self.headers, result, activity)
        finally:
            self.ctx.reading.pop(gevent.getcurrent(), None)


class TGIStreamingUser(OpenAIStreamingUser):
    """Sends the same requests to TGI's /generate_stream (loadgen/clients/tgi.py)."""

    def on_start(self) -> None:
        # huggingface_hub takes half a second to import: only a run with the TGI client pays it
        from tokenrig.loadgen.clients import tgi

        self.ctx: LoadContext = self.environment.tokenrig
        self.tgi = tgi
        self.inference_client = tgi.connect(self.ctx.base_url, self.ctx.request_timeout_s)

    def on_stop(self) -> None:
        pass  # InferenceClient keeps no connection of its own to close

    def _send(self, prepared: PreparedRequest, result: StreamResult) -> None:
        self.tgi.stream(self.inference_client, prepared.text, prepared.max_tokens, result)


USER_CLASSES = {"openai": OpenAIStreamingUser, "tgi": TGIStreamingUser}


def take(record: RequestRecord, result: StreamResult) -> list[str]:
    """Move what the client measured into the record; return the chunks' texts, for counting tokens."""
    record.send_lag_s, record.status, record.error = result.send_lag_s, result.status, result.error
    record.ttft_s, record.e2e_s, record.chunk_offsets_s = result.ttft_s, result.e2e_s, result.chunk_offsets_s
    record.output_tokens_usage, record.prompt_tokens_usage = result.output_tokens_usage, result.prompt_tokens_usage
    return result.texts

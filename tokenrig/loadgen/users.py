"""Locust users that speak an LLM API and time every streamed chunk.

Each user takes send slots from the shared `LoadPlan`, waits for the slot's due time, sends
one streaming request and reads the response line by line as bytes arrive (Locust's own
`iter_lines` waits for 1 KiB blocks and would delay every chunk). Per chunk: a readline, a
timestamp and, for the common chunk shape, a byte-level cut of the content (JSON parsing only
for the rest). Tokens are counted once the request has ended: one per content chunk when the
reply's token count confirms it, else the tokenizer on each chunk's text.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import gevent
from gevent.pool import Group
from geventhttpclient import HTTPClient
from locust import User, constant, task
from locust.exception import StopUser
from tokenizers import Tokenizer

from tokenrig.loadgen.plan import LoadPlan
from tokenrig.loadgen.records import CANCELLED, GAVE_UP, RequestRecord
from tokenrig.loadgen.workload import PreparedRequest, Workload

HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
SLOT_LATE_TOLERANCE_S = 0.001


@dataclass
class LoadContext:
    """What every user of a run shares; attached to the Locust environment."""

    base_url: str
    plan: LoadPlan
    workload: Workload
    tokenizer: Tokenizer
    sink: object  # anything with write(RequestRecord)
    unix_offset: float  # unix time - perf_counter
    request_timeout_s: float = 600.0
    client: str = "openai"  # "tgi": TGIStreamingUser over /generate_stream
    headers: dict = field(default_factory=dict)  # added to every request (an API key's Authorization)
    gave_up: bool = False  # the run stopped waiting for requests still in flight: they failed, not cancelled
    in_flight: int = 0
    completed: int = 0
    failed: int = 0
    output_tokens: int = 0
    finishers: Group = field(default_factory=Group)  # records being finished after their stream ended
    reading: dict = field(default_factory=dict)  # greenlet -> [when its stream last delivered a line]
    _watchdog: object = None
    _next_id: int = 0

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


def count_tokens(ctx: LoadContext, record: RequestRecord, texts: list[str]) -> str:
    """The client's count of the whole reply and of each content chunk; return the reply."""
    reply = "".join(texts)
    # encode, not the batch methods, which hand the work to tokenizers' thread pool: inside a 64-stream run
    # on one pinned core this took 0.57 ms p50 a request with encode_batch_fast, 0.44 ms with encode
    encode = ctx.tokenizer.encode
    record.output_tokens_tokenizer = len(encode(reply, add_special_tokens=False).ids)
    # Every chunk with text carries at least one token, so a reply of as many tokens as chunks had exactly one
    # in each (the stream verifies itself; a server's usage may not count what it streamed); otherwise each
    # chunk's text is tokenized, as it arrived.
    if record.output_tokens_tokenizer == len(texts):
        record.chunk_tokens = [1] * len(texts)
    else:
        record.chunk_tokens = [len(encode(text, add_special_tokens=False).ids) for text in texts]
    record.truncated = record.output_tokens < record.max_tokens
    return reply


def end_stream(record: RequestRecord, due: float) -> None:
    """Close the record the moment the stream has ended: E2E, and an empty stream as an error."""
    record.e2e_s = time.perf_counter() - due
    if record.ttft_s is None:
        record.error = "stream ended without any content"


CHAT_CONTENT, COMPLETION_TEXT = b'"content":"', b'"text":"'


def content_fast(line: bytes) -> str | None:
    """The content text of an SSE `data:` line of the common shape (one choice, no escapes, no usage object),
    cut from the bytes without parsing; None when the line needs the JSON parser."""
    key = CHAT_CONTENT
    start = line.find(key)
    if start < 0:
        key = COMPLETION_TEXT
        start = line.find(key)
        if start < 0:
            return None
    start += len(key)
    end = line.find(b'"', start)
    # a backslash means escapes to decode; a second key a second choice; a usage object must be read
    if end < 0 or line.find(b"\\", start, end) >= 0 or line.find(key, end) >= 0 or b'"usage":{' in line:
        return None
    return line[start:end].decode()


def parse_openai_chunk(payload: dict | list) -> tuple[str, dict | None]:
    """Content text and usage (if any) of one OpenAI streaming chunk, chat or completions; some servers
    batch several chunks into one event as a JSON array."""
    if isinstance(payload, list):
        parts = [parse_openai_chunk(item) for item in payload]
        return "".join(text for text, _ in parts), next((usage for _, usage in reversed(parts) if usage), None)
    text = ""
    for choice in payload.get("choices") or ():
        delta = choice.get("delta")
        text += (delta.get("content") or "") if delta is not None else (choice.get("text") or "")
    return text, payload.get("usage")


class OpenAIStreamingUser(User):
    """Sends OpenAI-compatible streaming requests (chat or completions) from the scenario."""

    wait_time = constant(0)
    host = "http://127.0.0.1"

    def on_start(self) -> None:
        self.ctx: LoadContext = self.environment.tokenrig
        url = urlsplit(self.ctx.base_url)
        # no network_timeout: silence is the watchdog's (LoadContext.watch_stream), not a timer per read
        https = url.scheme == "https"
        self.client = HTTPClient(url.hostname, url.port or (443 if https else 80), ssl=https, concurrency=1,
                                 connection_timeout=30, network_timeout=None)
        self.path_prefix = url.path.rstrip("/")
        self.headers = {**HEADERS, **self.ctx.headers}

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
        texts: list[str] = []
        try:
            self._send(prepared, due, record, texts)
        except BaseException:  # stopped: what was measured is written now
            self._finish(prepared, record, texts)
            raise
        if reply_needed:
            return self._finish(prepared, record, texts), record
        # Counting tokens, writing the record and Locust's statistics take ~0.2 ms a request: done in a
        # greenlet of their own they run while this user waits for its next first token, not in between
        # the end of one stream and the send of the next (at hundreds of streams ending together, that
        # delayed every send of the wave)
        ctx.finishers.spawn(self._finish, prepared, record, texts, False)
        return None, record

    def _finish(self, prepared: PreparedRequest, record: RequestRecord, texts: list[str],
                reply_needed: bool = True) -> str:
        """Count the tokens, account and write the record; return the reply text."""
        ctx = self.ctx
        reply = count_tokens(ctx, record, texts)
        if not reply_needed:
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
        return reply

    def _send(self, prepared: PreparedRequest, due: float, record: RequestRecord, texts: list[str]) -> None:
        """Send, read the stream, time the record; each content chunk's text goes to `texts`."""
        sent = time.perf_counter()
        record.send_lag_s = sent - due
        activity = self.ctx.watch_stream()
        try:
            response = self.client.post(self.path_prefix + prepared.path, body=prepared.body, headers=self.headers)
            record.status = response.status_code
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {response.read()[:300].decode(errors='replace')}"
                return
            content_type = response.get("content-type") or ""
            if content_type and not content_type.startswith("text/event-stream"):
                record.error = (f"not an event stream: HTTP 200 with Content-Type {content_type}, "
                                f"{response.read()[:200].decode(errors='replace')}")
                return
            done = False
            # the per-chunk loop: bound methods in locals, nothing allocated but the line and the text
            readline, clock, offsets, add_text = response.readline, time.perf_counter, record.chunk_offsets_s, texts.append
            add_offset = offsets.append
            while True:
                line = readline(b"\n")
                now = activity[0] = clock()
                if not line.startswith(b"data:"):
                    if not line:
                        break
                    continue
                text = content_fast(line)
                if text is None:
                    data = line[5:].strip()
                    if not data:  # an empty data field is legal SSE
                        continue
                    if data == b"[DONE]":
                        done = True
                        break
                    text, usage = parse_openai_chunk(json.loads(data))
                    if usage:
                        record.output_tokens_usage = usage.get("completion_tokens")
                        record.prompt_tokens_usage = usage.get("prompt_tokens")
                if text:
                    if not offsets:
                        record.ttft_s = now - due
                    add_offset(now - due)
                    add_text(text)
            end_stream(record, due)
            if not done and record.ok:  # the connection closed mid-reply: an incomplete answer, not a short one
                record.error = (f"incomplete stream: the connection closed before [DONE], after "
                                f"{len(texts)} content chunks")
        except Exception as error:  # noqa: BLE001 - every failure becomes a record, never a crash
            record.error = f"{type(error).__name__}: {error}"
        except BaseException:  # the run was stopped (Ctrl-C), or gave up on this request, while it was in flight
            record.error = GAVE_UP if self.ctx.gave_up else CANCELLED
            raise
        finally:
            self.ctx.reading.pop(gevent.getcurrent(), None)


class TGIStreamingUser(OpenAIStreamingUser):
    """Sends the same requests to TGI's /generate_stream through huggingface_hub's InferenceClient
    (streaming with details), timed by the same code as the OpenAI user. TGI takes raw text, so a
    chat request is sent as its messages' contents; `details.generated_tokens` is the server's count."""

    def on_start(self) -> None:
        from huggingface_hub import InferenceClient

        self.ctx: LoadContext = self.environment.tokenrig
        base = self.ctx.base_url.rstrip("/").removesuffix("/v1")
        self.client = InferenceClient(model=f"{base}/generate_stream", timeout=self.ctx.request_timeout_s)

    def on_stop(self) -> None:
        pass  # InferenceClient keeps no connection of its own to close

    def _send(self, prepared: PreparedRequest, due: float, record: RequestRecord, texts: list[str]) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        body = json.loads(prepared.body)
        prompt = "\n".join(m["content"] for m in body["messages"]) if "messages" in body else body["prompt"]
        record.send_lag_s = time.perf_counter() - due
        try:
            stream = self.client.text_generation(prompt, max_new_tokens=prepared.max_tokens, stream=True, details=True)
            record.status = 200  # the client raises before yielding when the status is not 200
            for output in stream:
                now = time.perf_counter()
                if output.details is not None:
                    record.output_tokens_usage = output.details.generated_tokens
                if output.token.text and not output.token.special:
                    if record.ttft_s is None:
                        record.ttft_s = now - due
                    record.chunk_offsets_s.append(now - due)
                    texts.append(output.token.text)
            end_stream(record, due)
        except HfHubHTTPError as error:
            record.status = error.response.status_code if error.response is not None else None
            record.error = f"HTTP {record.status}: {str(error)[:300]}"
        except Exception as error:  # noqa: BLE001 - every failure becomes a record, never a crash
            record.error = f"{type(error).__name__}: {error}"
        except BaseException:  # the run was stopped (Ctrl-C), or gave up on this request, while it was in flight
            record.error = GAVE_UP if self.ctx.gave_up else CANCELLED
            raise

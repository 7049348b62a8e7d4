"""Locust users that speak an LLM API and time every streamed chunk.

Each user takes send slots from the shared `LoadPlan`, waits for the slot's due time, sends
one streaming request and reads the response line by line as bytes arrive (Locust's own
`iter_lines` waits for 1 KiB blocks and would delay every chunk). Per-chunk work is a
readline, one JSON parse and one tokenizer call, so one client core keeps up with tens of
thousands of tokens/s.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import gevent
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
    _next_id: int = 0

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id


def note_content(ctx: LoadContext, record: RequestRecord, due: float, now: float, text: str) -> None:
    """Timestamp one content chunk that arrived at `now` and count its tokens (every client user does this)."""
    if record.ttft_s is None:
        record.ttft_s = now - due
    record.chunk_offsets_s.append(now - due)
    record.chunk_tokens.append(len(ctx.tokenizer.encode(text, add_special_tokens=False).ids))


def finish_stream(ctx: LoadContext, record: RequestRecord, due: float, reply: str) -> None:
    """Close the record when the stream has ended: E2E, the client's token count, empty streams as errors."""
    record.e2e_s = time.perf_counter() - due
    record.output_tokens_tokenizer = len(ctx.tokenizer.encode(reply, add_special_tokens=False).ids)
    record.truncated = record.output_tokens < record.max_tokens
    if record.ttft_s is None:
        record.error = "stream ended without any content"


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
        https = url.scheme == "https"
        self.client = HTTPClient(url.hostname, url.port or (443 if https else 80), ssl=https, concurrency=1,
                                 connection_timeout=30, network_timeout=self.ctx.request_timeout_s)
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
            reply, record = self._one_request(prepared, due, slot.index, slot_late)
            if not record.ok:
                return
            dialogue.add_reply(reply, record.output_tokens)
            # the next turn is due when the user has read the reply and thought; it is not sent after
            # the plan's end, so a run's length does not depend on conversations still going
            due = time.perf_counter() + dialogue.think_time_s
            if due >= ctx.plan.end:
                return
            prepared, slot_late = dialogue.next_request(), False

    def _one_request(self, prepared: PreparedRequest, due: float, index: int, slot_late: bool):
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
        reply = ""
        try:
            reply = self._send(prepared, due, record)
        finally:
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
        return reply, record

    def _send(self, prepared: PreparedRequest, due: float, record: RequestRecord) -> str:
        """Send, read the stream, fill the record; return the reply text."""
        ctx = self.ctx
        sent = time.perf_counter()
        record.send_lag_s = sent - due
        text_parts: list[str] = []
        try:
            response = self.client.post(self.path_prefix + prepared.path, body=prepared.body, headers=self.headers)
            record.status = response.status_code
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {response.read()[:300].decode(errors='replace')}"
                return ""
            content_type = response.get("content-type") or ""
            if content_type and not content_type.startswith("text/event-stream"):
                record.error = (f"not an event stream: HTTP 200 with Content-Type {content_type}, "
                                f"{response.read()[:200].decode(errors='replace')}")
                return ""
            done = False
            while True:
                line = response.readline(b"\n")
                now = time.perf_counter()
                if not line:
                    break
                if not line.startswith(b"data:"):
                    continue
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
                    note_content(ctx, record, due, now, text)
                    text_parts.append(text)
            reply = "".join(text_parts)
            finish_stream(ctx, record, due, reply)
            if not done and record.ok:  # the connection closed mid-reply: an incomplete answer, not a short one
                record.error = (f"incomplete stream: the connection closed before [DONE], after "
                                f"{record.output_tokens} tokens")
            return reply
        except Exception as error:  # noqa: BLE001 - every failure becomes a record, never a crash
            record.error = f"{type(error).__name__}: {error}"
            return ""
        except BaseException:  # the run was stopped (Ctrl-C), or gave up on this request, while it was in flight
            record.error = GAVE_UP if ctx.gave_up else CANCELLED
            raise


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

    def _send(self, prepared: PreparedRequest, due: float, record: RequestRecord) -> str:
        from huggingface_hub.errors import HfHubHTTPError

        ctx = self.ctx
        body = json.loads(prepared.body)
        prompt = "\n".join(m["content"] for m in body["messages"]) if "messages" in body else body["prompt"]
        record.send_lag_s = time.perf_counter() - due
        text_parts: list[str] = []
        try:
            stream = self.client.text_generation(prompt, max_new_tokens=prepared.max_tokens, stream=True, details=True)
            record.status = 200  # the client raises before yielding when the status is not 200
            for output in stream:
                now = time.perf_counter()
                if output.details is not None:
                    record.output_tokens_usage = output.details.generated_tokens
                if output.token.text and not output.token.special:
                    note_content(ctx, record, due, now, output.token.text)
                    text_parts.append(output.token.text)
            reply = "".join(text_parts)
            finish_stream(ctx, record, due, reply)
            return reply
        except HfHubHTTPError as error:
            record.status = error.response.status_code if error.response is not None else None
            record.error = f"HTTP {record.status}: {str(error)[:300]}"
        except Exception as error:  # noqa: BLE001 - every failure becomes a record, never a crash
            record.error = f"{type(error).__name__}: {error}"
        except BaseException:  # the run was stopped (Ctrl-C), or gave up on this request, while it was in flight
            record.error = GAVE_UP if ctx.gave_up else CANCELLED
            raise
        return ""

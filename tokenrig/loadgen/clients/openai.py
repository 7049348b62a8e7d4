"""OpenAI-compatible streaming (chat and completions) over geventhttpclient, timed per chunk.

The response is read line by line as bytes arrive (Locust's own `iter_lines` waits for 1 KiB blocks
and would delay every chunk). Per chunk: a readline, a timestamp and, for the common chunk shape, a
byte-level cut of the content (`content_fast`); JSON parsing (orjson) only for the rest.
"""

from __future__ import annotations

import ssl
import time
from http.client import HTTPException
from urllib.parse import urlsplit

import gevent
import orjson
from geventhttpclient import HTTPClient

from tokenrig.loadgen.clients import StreamResult

HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
BODY_END_WAIT_S = 0.25  # how long after [DONE] a server may take to end the body before its connection is dropped
CHAT_CONTENT, COMPLETION_TEXT = b'"content":"', b'"text":"'


def connect(base_url: str) -> tuple[HTTPClient, str]:
    """A one-connection client for the server at `base_url`, and the path prefix its API routes take."""
    url = urlsplit(base_url)
    if url.hostname is None:
        raise ValueError(f"{base_url!r} names no host")
    https = url.scheme == "https"
    # no network_timeout: silence is the load context's watchdog's (LoadContext.watch_stream), not a timer per read.
    # geventhttpclient annotates it as a float, but hands it to socket.settimeout, where None means no timeout
    client = HTTPClient(url.hostname, url.port or (443 if https else 80), ssl=https, concurrency=1,
                        connection_timeout=30, network_timeout=None,  # type: ignore[arg-type]
                        ssl_context_factory=trusted_tls_context if https else None)
    return client, url.path.rstrip("/")


def trusted_tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """The certificates the pre-flight request trusts: the system's, or $SSL_CERT_FILE's (which --ca-cert sets).
    geventhttpclient would trust certifi's bundle alone (its `cafile`, ignored here), and fail every request
    to a server whose CA the pre-flight had accepted."""
    return ssl.create_default_context()


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


def stream(client: HTTPClient, path: str, body: bytes, headers: dict, result: StreamResult,
           activity: list[float]) -> StreamResult:
    """POST one streaming request and read its events into `result`; `activity[0]` is kept at the time the
    last line arrived (for a watchdog). Every failure becomes `result.error`, never an exception; a stop
    (GreenletExit, KeyboardInterrupt) propagates with the chunks read so far in `result`."""
    due = result.due
    result.send_lag_s = time.perf_counter() - due
    try:
        response = client.post(path, body=body, headers=headers)
        result.status = response.status_code
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {response.read()[:300].decode(errors='replace')}"
            return result
        content_type = response.get("content-type") or ""
        if isinstance(content_type, list):  # the header sent more than once: its values as one, as HTTP joins them
            content_type = ", ".join(content_type)
        if content_type and not content_type.startswith("text/event-stream"):
            result.error = (f"not an event stream: HTTP 200 with Content-Type {content_type}, "
                            f"{response.read()[:200].decode(errors='replace')}")
            return result
        done = False
        # the per-chunk loop: bound methods in locals, nothing allocated but the line and the text
        readline, clock, add_text = response.readline, time.perf_counter, result.texts.append
        offsets = result.chunk_offsets_s
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
                text, usage = parse_openai_chunk(orjson.loads(data))
                if usage:
                    result.output_tokens_usage = usage.get("completion_tokens")
                    result.prompt_tokens_usage = usage.get("prompt_tokens")
            if text:
                if not offsets:
                    result.ttft_s = now - due
                add_offset(now - due)
                add_text(text)
        result.end()
        if done:
            keep_connection(response)
        if not done and result.error is None:  # the connection closed mid-reply: an incomplete answer, not a short one
            result.error = (f"incomplete stream: the connection closed before [DONE], after "
                            f"{len(result.texts)} content chunks")
    except Exception as error:  # noqa: BLE001 - every failure becomes a result, never a crash
        result.error = f"{type(error).__name__}: {error}"
    return result


def keep_connection(response) -> None:
    """Read the body's end after [DONE] (the last, empty chunk, which servers such as vLLM's uvicorn write on
    its own), so that the connection goes back to the client's pool. Left unread, geventhttpclient closes the
    connection, and the next request opens a new one inside its TTFT: a DNS lookup in gevent's thread pool,
    a TCP handshake, and over https a TLS one. A server that does not end the body within BODY_END_WAIT_S
    loses its connection, as before; the answer it gave stands."""
    if response.message_complete:  # the end came with [DONE]: the connection is back in the pool already
        return
    with gevent.Timeout(BODY_END_WAIT_S, False):
        try:
            response.read()
        except (OSError, HTTPException):
            pass

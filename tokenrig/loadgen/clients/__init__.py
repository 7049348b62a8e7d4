"""The LLM APIs a load test speaks: one streaming request function per API, each filling a StreamResult.

`openai.stream` (chat/completions SSE over geventhttpclient) and `tgi.stream` (TGI /generate_stream
through huggingface_hub's InferenceClient) send one request and time every content chunk as it
arrives; the Locust users (loadgen/users.py) schedule them and turn each result into a record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class StreamResult:
    """One streamed request as the client saw it. Filled in place as the stream arrives, so a request stopped
    mid-stream (Ctrl-C, the load ended) keeps every chunk timed before the stop."""

    due: float  # perf_counter time the request was due: the zero of every offset
    send_lag_s: float = 0.0  # actual send - due
    status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_offsets_s: list[float] = field(default_factory=list)  # arrival of each content chunk
    texts: list[str] = field(default_factory=list)  # each content chunk's text
    output_tokens_usage: int | None = None  # the server's count of the reply, if it gave one
    prompt_tokens_usage: int | None = None

    def end(self) -> None:
        """Close the result the moment the stream has ended: E2E, and an empty stream as an error."""
        self.e2e_s = time.perf_counter() - self.due
        if self.ttft_s is None:
            self.error = "stream ended without any content"

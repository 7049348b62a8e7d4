"""TGI's /generate_stream through huggingface_hub's InferenceClient (streaming with details), timed per token.

TGI takes raw text, so a chat request is sent as its messages' contents; `details.generated_tokens`
is the server's count of the reply.
"""

from __future__ import annotations

import time

from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

from tokenrig.loadgen.clients import StreamResult


def connect(base_url: str, timeout_s: float) -> InferenceClient:
    base = base_url.rstrip("/").removesuffix("/v1")
    return InferenceClient(model=f"{base}/generate_stream", timeout=timeout_s)


def stream(client: InferenceClient, prompt: str, max_new_tokens: int, result: StreamResult) -> StreamResult:
    """Send one request's text (PreparedRequest.text) as TGI's /generate_stream and read its tokens into `result`;
    every failure becomes `result.error`; a stop propagates with the tokens read so far in `result`."""
    due = result.due
    result.send_lag_s = time.perf_counter() - due
    try:
        tokens = client.text_generation(prompt, max_new_tokens=max_new_tokens, stream=True, details=True)
        result.status = 200  # the client raises before yielding when the status is not 200
        for output in tokens:
            now = time.perf_counter()
            if output.details is not None:
                result.output_tokens_usage = output.details.generated_tokens
            if output.token.text and not output.token.special:
                if result.ttft_s is None:
                    result.ttft_s = now - due
                result.chunk_offsets_s.append(now - due)
                result.texts.append(output.token.text)
        result.end()
    except HfHubHTTPError as error:
        result.status = error.response.status_code if error.response is not None else None
        result.error = f"HTTP {result.status}: {str(error)[:300]}"
    except Exception as error:  # noqa: BLE001 - every failure becomes a result, never a crash
        result.error = f"{type(error).__name__}: {error}"
    return result

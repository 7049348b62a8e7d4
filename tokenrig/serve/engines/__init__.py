"""Engines: what turns prompt token ids into a stream of generated token ids.

The HTTP layer (`tokenrig.serve.api`) is shared; an engine only implements `Engine`. Engines never
stop at EOS themselves: the API layer applies max_tokens / min_tokens / ignore_eos so every engine
honours them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncGenerator, Protocol


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    arrival: float  # event-loop time the HTTP request arrived, before parsing and tokenization


@dataclass
class EngineLoad:
    running: int
    waiting: int
    kv_cache_usage: float | None  # fraction 0..1, None when the engine cannot tell
    prefix_cache_queries: int | None = None  # prompt tokens looked up in the prefix cache, cumulative
    prefix_cache_hits: int | None = None  # of those, tokens found cached (not recomputed), cumulative
    preemptions: int | None = None  # running requests preempted (their KV freed, to be recomputed), cumulative


class Engine(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[list[int], None]:
        """Yield newly generated token ids as they are produced; closing the iterator cancels."""

    def load(self) -> EngineLoad: ...

    def failure(self) -> str | None:
        """Why the engine can no longer generate (its worker died), or None while it can."""

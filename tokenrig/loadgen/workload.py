"""Request sampling: turn a scenario's request mix into ready-to-send requests (`PreparedRequest`: the request as
data, which the clients and capacity's replay read, and its OpenAI body serialized once).

Synthetic prompts are drawn from the served model's own tokenizer vocabulary, so their length
in tokens is exact; prompts from files and ShareGPT conversations are counted with it (a ShareGPT
reply's tokens are the request's output length). What arrival k sends depends only on the seed
and k (not on which process or when), so a distributed run sends the same requests as a single
process. A `Dialogue` is
the requests of one arrival: one request, or the turns of a conversation whose history grows
with each reply. Shared prefixes come from a pool with a target hit ratio, or (trace replay)
from Mooncake's prefix-block hashes: equal hash, equal block of text.
"""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from tokenrig.loadgen.plan import TraceRow
from tokenrig.loadgen.scenario import (
    FilePrompt,
    LengthDist,
    RequestClass,
    Scenario,
    SharedPrefix,
    ShareGptPrompt,
)
from tokenrig.serve.tokenizer import content_words

API_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# chat template and special tokens add a few tokens around each message
TEMPLATE_MARGIN = 8


def _sample(lengths: LengthDist | None, rng: random.Random, request_class: RequestClass) -> int:
    """A token length from the class's distribution, which the scenario's validation requires wherever one is drawn."""
    if lengths is None:
        raise ValueError(f"request class {request_class.name!r} has no token length distribution to draw from")
    return lengths.sample(rng)


@dataclass
class PreparedRequest:
    """One request ready to send: what it asks as data (the chat messages or the completions prompt, the
    token counts), what its record says of it, and `body`, the same request in the OpenAI API's JSON."""

    request_class: str
    api: str
    path: str
    model: str
    messages: list[dict] | None  # chat: the conversation so far, this turn's user message last
    prompt: str | None  # completions: the prompt text
    prompt_tokens: int  # content tokens the client put in the prompt (before any chat template)
    max_tokens: int  # exactly this many come back: min_tokens = max_tokens, and the end-of-sequence ignored
    temperature: float
    turn: int = 0
    prefix_id: int | None = None  # shared prefix sent (pool prefixes and Mooncake's first block)
    prefix_reused: bool = False  # that prefix had been sent before (a prefix-cache hit is possible)
    ignore_eos: bool = True
    body: bytes = field(init=False, repr=False)  # serialized once, when prepared

    def __post_init__(self) -> None:
        body = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "min_tokens": self.max_tokens,
            "ignore_eos": self.ignore_eos,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.messages is not None:
            body["messages"] = self.messages
        else:
            body["prompt"] = self.prompt
        self.body = json.dumps(body).encode()

    @property
    def text(self) -> str:
        """The request as one text (what TGI takes): the prompt, or the messages' contents one a line."""
        if self.messages is not None:
            return "\n".join(m["content"] for m in self.messages)
        if self.prompt is None:
            raise ValueError("a prepared request holds chat messages or a completions prompt, and this has neither")
        return self.prompt


class PrefixPool:
    """Assigns shared prefixes to arrivals: arrival k reuses a pooled prefix with probability
    hit_ratio, else takes a new one. Decided in arrival order from its own seeded stream, so the
    choice for arrival k is the same on every worker."""

    def __init__(self, spec: SharedPrefix, seed: str):
        self.spec = spec
        self._rng = random.Random(seed)
        self._pool: deque[int] = deque(maxlen=spec.pool_size)
        self._decided: list[tuple[int, bool]] = []
        self._next_new = 0

    def assign(self, index: int) -> tuple[int, bool]:
        """(prefix id, reused) for arrival `index`."""
        while len(self._decided) <= index:
            if self._pool and self._rng.random() < self.spec.hit_ratio:
                self._decided.append((self._rng.choice(self._pool), True))
            else:
                self._pool.append(self._next_new)
                self._decided.append((self._next_new, False))
                self._next_new += 1
        return self._decided[index]


class Workload:
    def __init__(self, scenario: Scenario, tokenizer: Tokenizer, model_name: str, max_context: int, seed: int = 0):
        self.scenario = scenario
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_context = max_context
        self.seed = seed
        self._words = content_words(tokenizer)
        self._classes = scenario.requests
        self._weights = [c.weight for c in scenario.requests]
        self._pools = {c.name: PrefixPool(c.shared_prefix, f"{seed}:pool:{c.name}")
                       for c in scenario.requests if c.shared_prefix}
        self._blocks: dict[tuple[str, int], list[str]] = {}
        self._reply_tokens: dict[tuple[str, int], int] = {}  # ShareGPT: the reply's tokens by (file, conversation)
        self.clamped = 0  # requests shortened to fit the model's context
        self.conversations_cut = 0  # conversations ended early because the history filled the context

    def words(self, count: int, rng: random.Random) -> list[str]:
        return rng.choices(self._words, k=count)

    def block(self, kind: str, key: int, tokens: int) -> list[str]:
        """A deterministic run of words for a shared prefix or a trace hash block."""
        cache_key = (kind, key)
        words = self._blocks.get(cache_key)
        if words is None or len(words) < tokens:
            words = self.words(tokens, random.Random(f"{self.seed}:{kind}:{key}"))
            self._blocks[cache_key] = words
        return words[:tokens]

    def dialogue(self, index: int, trace_row: TraceRow | None = None) -> Dialogue:
        rng = random.Random(self.seed * 1_000_003 + index)
        request_class = rng.choices(self._classes, self._weights)[0]
        return Dialogue(self, request_class, index, rng, trace_row)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def data_prompt(self, request_class: RequestClass, source: FilePrompt | ShareGptPrompt,
                    rng: random.Random) -> tuple[str, int]:
        """A prompt from the class's prompt file or ShareGPT file `source`, and its output length: the class's
        distribution, else (ShareGPT) the tokens of the reply the conversation had, counted once a run."""
        if isinstance(source, FilePrompt):
            return rng.choice(source.prompts()), _sample(request_class.output_tokens, rng, request_class)
        pairs = source.pairs()
        index = rng.randrange(len(pairs))
        prompt, reply = pairs[index]
        if request_class.output_tokens is not None:
            return prompt, request_class.output_tokens.sample(rng)
        key = (source.path, index)
        if key not in self._reply_tokens:
            self._reply_tokens[key] = max(1, self.count_tokens(reply))
        return prompt, self._reply_tokens[key]

    def fit(self, input_tokens: int, output_tokens: int) -> tuple[int, int]:
        room = self.max_context - TEMPLATE_MARGIN
        if input_tokens + output_tokens <= room:
            return input_tokens, output_tokens
        self.clamped += 1
        output_tokens = min(output_tokens, room // 2)
        return room - output_tokens, output_tokens


class Dialogue:
    """The requests of one arrival. `next_request()` gives the next turn (None when done);
    `add_reply(text)` appends the assistant's reply to the history before the next turn."""

    def __init__(self, workload: Workload, request_class: RequestClass, index: int, rng: random.Random,
                 trace_row: TraceRow | None):
        self.workload = workload
        self.request_class = request_class
        self.index = index
        self._rng = rng
        self._trace_row = trace_row
        conversation = request_class.conversation
        self.turns = conversation.turns.sample(rng) if conversation else 1
        self.think_time_s = conversation.think_time_s if conversation else 0.0
        self.turn = 0
        self._history: list[dict] = []
        self._history_tokens = 0
        self._prefix: tuple[list[str], int | None, bool] = self._shared_prefix()

    def _shared_prefix(self) -> tuple[list[str], int | None, bool]:
        spec = self.request_class.shared_prefix
        if spec is None:
            return [], None, False
        prefix_id, reused = self.workload._pools[self.request_class.name].assign(self.index)
        return self.workload.block(f"prefix-{self.request_class.name}", prefix_id, spec.tokens), prefix_id, reused

    def _trace_prompt(self, row: TraceRow, tokens: int) -> tuple[list[str], int | None, bool]:
        """Mooncake: the prompt is the text of its hash blocks, so equal hash ids share text."""
        if not row.hash_ids:
            return self.workload.words(tokens, self._rng), None, False
        words: list[str] = []
        for hash_id in row.hash_ids:
            if len(words) >= tokens:
                break
            words += self.workload.block("trace", hash_id, row.block_tokens)
        if len(words) < tokens:  # a row longer than its blocks: pad with unshared words
            words += self.workload.words(tokens - len(words), self._rng)
        return words[:tokens], row.hash_ids[0], False

    def next_request(self) -> PreparedRequest | None:
        if self.turn >= self.turns:
            return None
        workload, request_class, rng = self.workload, self.request_class, self._rng
        prefix_words, prefix_id, reused = self._prefix if self.turn == 0 else ([], None, False)
        row = self._trace_row
        if row is not None:
            new_tokens, output_tokens = workload.fit(row.input_tokens, row.output_tokens)
            words, prefix_id, reused = self._trace_prompt(row, new_tokens)
            text = " ".join(words)
        elif isinstance(request_class.prompt, (FilePrompt, ShareGptPrompt)):
            text, output_tokens = workload.data_prompt(request_class, request_class.prompt, rng)
            new_tokens = workload.count_tokens(text)
            if self.turn == 0:
                fitted, output_tokens = workload.fit(new_tokens, output_tokens)
                if fitted < new_tokens:  # cut the prompt by words (exact for word-level tokenizers)
                    text = " ".join(text.split()[:fitted])
                    new_tokens = workload.count_tokens(text)
        else:
            new_tokens = _sample(request_class.input_tokens, rng, request_class)
            output_tokens = _sample(request_class.output_tokens, rng, request_class)
            if self.turn == 0:
                new_tokens, output_tokens = workload.fit(len(prefix_words) + new_tokens, output_tokens)
                new_tokens -= len(prefix_words)
                if new_tokens < 0:  # the prefix alone fills the context
                    prefix_words, new_tokens = prefix_words[:len(prefix_words) + new_tokens], 0
            text = " ".join(prefix_words + workload.words(new_tokens, rng))
        prompt_tokens = self._history_tokens + len(prefix_words) + new_tokens
        if self.turn > 0:
            room = workload.max_context - TEMPLATE_MARGIN * (self.turn + 1)
            if prompt_tokens + output_tokens > room:
                workload.conversations_cut += 1
                self.turns = self.turn
                return None
        self._history.append({"role": "user", "content": text})
        self._history_tokens = prompt_tokens
        chat = request_class.api == "chat"
        prepared = PreparedRequest(request_class.name, request_class.api, API_PATHS[request_class.api],
                                   workload.model_name, messages=list(self._history) if chat else None,
                                   prompt=None if chat else " ".join(m["content"] for m in self._history),
                                   prompt_tokens=prompt_tokens, max_tokens=output_tokens,
                                   temperature=request_class.temperature, turn=self.turn, prefix_id=prefix_id,
                                   prefix_reused=reused)
        self.turn += 1
        return prepared

    def add_reply(self, text: str, tokens: int) -> None:
        self._history.append({"role": "assistant", "content": text})
        self._history_tokens += tokens

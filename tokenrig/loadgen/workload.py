"""Request sampling: turn a scenario's request mix into ready-to-send request bodies.

Synthetic prompts are drawn from the served model's own tokenizer vocabulary, so their length
in tokens is exact. Bodies are serialised before their send time, keeping the hot path small.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from tokenizers import Tokenizer

from tokenrig.loadgen.scenario import RequestClass, Scenario
from tokenrig.serve.tokenizer import content_words

API_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class PreparedRequest:
    request_class: str
    api: str
    path: str
    body: bytes
    prompt_tokens: int  # content tokens the client put in the prompt (before any chat template)
    max_tokens: int


class Workload:
    def __init__(self, scenario: Scenario, tokenizer: Tokenizer, model_name: str, max_context: int, seed: int = 0):
        self.scenario = scenario
        self.model_name = model_name
        self.max_context = max_context
        self._rng = random.Random(seed)
        self._words = content_words(tokenizer)
        self._classes = scenario.requests
        self._weights = [c.weight for c in scenario.requests]
        self.clamped = 0  # requests shortened to fit the model's context

    # chat template and special tokens add a few tokens around the user's text
    TEMPLATE_MARGIN = 8

    def next(self) -> PreparedRequest:
        request_class = self._rng.choices(self._classes, self._weights)[0]
        return self.build(request_class)

    def build(self, request_class: RequestClass) -> PreparedRequest:
        input_tokens = request_class.input_tokens.sample(self._rng)
        output_tokens = request_class.output_tokens.sample(self._rng)
        room = self.max_context - self.TEMPLATE_MARGIN
        if input_tokens + output_tokens > room:
            self.clamped += 1
            output_tokens = min(output_tokens, room // 2)
            input_tokens = room - output_tokens
        prompt = " ".join(self._rng.choices(self._words, k=input_tokens))
        body = {
            "model": self.model_name,
            "max_tokens": output_tokens,
            "min_tokens": output_tokens,
            "ignore_eos": True,
            "temperature": request_class.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request_class.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return PreparedRequest(request_class.name, request_class.api, API_PATHS[request_class.api],
                               json.dumps(body).encode(), input_tokens, output_tokens)

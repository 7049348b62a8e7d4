"""The HTTP layer every tokenrig-run engine shares: OpenAI and TGI APIs plus Prometheus /metrics.

Routes: /v1/completions, /v1/chat/completions (streaming and not, usage incl.
stream_options.include_usage, max_tokens, min_tokens, ignore_eos), /v1/models, /health,
TGI's /generate and /generate_stream, and /metrics under vLLM's metric names, so dashboards
and scrapers written for vLLM work unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from tokenizers import Tokenizer

from tokenrig.serve.engines import Engine, GenerationRequest

if TYPE_CHECKING:
    from tokenrig.serve.engines.step_profiler import StepProfiler

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)


class BadRequest(ValueError):
    pass


class EngineUnavailable(RuntimeError):
    """The engine can no longer generate (its worker died): 503, not a request that waits forever."""


class ServerMetrics:
    """vLLM-named Prometheus metrics for what a tokenrig engine can measure."""

    def __init__(self, model_name: str, cache_config: dict | None = None):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        if cache_config:  # as vLLM tells its KV cache (what `loadtest --url` records of a server)
            info = Gauge("vllm:cache_config_info", "KV-cache configuration", list(cache_config), registry=self.registry)
            info.labels(**{key: str(value) for key, value in cache_config.items()}).set(1)
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch", labels,
                             registry=self.registry)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", labels,
                             registry=self.registry)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = full", labels, registry=self.registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed", labels, registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", labels, registry=self.registry)
        self.success = Counter("vllm:request_success", "Finished requests", labels + ["finished_reason"],
                               registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens", labels,
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token", labels,
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels, registry=self.registry)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", labels,
                                   registry=self.registry)
        self._prefix_seen = (0, 0)
        self.preemptions = Counter("vllm:num_preemptions", "Running requests preempted (KV freed, recomputed later)",
                                   labels, registry=self.registry)
        self._preemptions_seen = 0

    def observe_load(self, engine: Engine) -> None:
        load = engine.load()
        self.running.labels(self.model_name).set(load.running)
        self.waiting.labels(self.model_name).set(load.waiting)
        if load.kv_cache_usage is not None:
            self.kv_usage.labels(self.model_name).set(load.kv_cache_usage)
        # engines report totals; counters take the increase
        if load.prefix_cache_queries is not None and load.prefix_cache_hits is not None:
            queries, hits = self._prefix_seen
            self.prefix_queries.labels(self.model_name).inc(load.prefix_cache_queries - queries)
            self.prefix_hits.labels(self.model_name).inc(load.prefix_cache_hits - hits)
            self._prefix_seen = (load.prefix_cache_queries, load.prefix_cache_hits)
        if load.preemptions is not None:
            self.preemptions.labels(self.model_name).inc(load.preemptions - self._preemptions_seen)
            self._preemptions_seen = load.preemptions


class Detokenizer:
    """Incremental detokenization (the prefix/read-offset scheme vLLM uses), so a streamed text
    delta is exactly what the token adds to the decoded sequence."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=False)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=False)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]


@dataclass
class Sampling:
    max_tokens: int
    min_tokens: int
    ignore_eos: bool


def _sampling(body: dict, default_max: int) -> Sampling:
    given = [body.get(key) for key in ("max_completion_tokens", "max_tokens", "max_new_tokens")]
    max_tokens = next((value for value in given if value is not None), default_max)
    min_tokens = body.get("min_tokens", 0)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if not isinstance(min_tokens, int) or not 0 <= min_tokens <= max_tokens:
        raise BadRequest(f"min_tokens must be an integer between 0 and max_tokens, got {min_tokens!r}")
    return Sampling(max_tokens, min_tokens, bool(body.get("ignore_eos", False)))


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def encode_prompt(tokenizer, prompt) -> list[int]:
    """A completions prompt (text, or token ids) as the engine receives it."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string or a list of token ids (one prompt per request)")
    return tokenizer.backend_tokenizer.encode(prompt, add_special_tokens=True).ids


def encode_chat(tokenizer, messages) -> list[int]:
    """Chat messages through the model's chat template, as the engine receives them."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content}")
    for message in messages:
        if isinstance(message.get("content"), list):  # OpenAI content parts: keep the text parts
            message["content"] = " ".join(p.get("text", "") for p in message["content"] if p.get("type") == "text")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


class OpenAIServer:
    def __init__(self, engine: Engine, tokenizer, model_name: str, max_context: int, cache_config: dict | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        # The Rust tokenizer itself on the request path: transformers 5's encode() wraps it in ~2-4 ms of
        # Python per call, which lands inside every TTFT this server reports and its clients measure.
        self.fast: Tokenizer = tokenizer.backend_tokenizer
        self.model_name = model_name
        self.max_context = max_context
        self.eos_id = tokenizer.eos_token_id
        self.metrics = ServerMetrics(model_name, cache_config)
        self.ready = False
        # the hf engine's step profiler, when profiling is on
        self.profiler: StepProfiler | None = getattr(engine, "profiler", None)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/generate", self.tgi_generate)
        app.router.add_post("/generate_stream", self.tgi_generate_stream)
        if self.profiler is not None:  # vLLM's routes, as vLLM has them: when profiling is on
            app.router.add_post("/start_profile", partial(self.start_profile, self.profiler))
            app.router.add_post("/stop_profile", partial(self.stop_profile, self.profiler))
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app) -> None:
        await self.engine.start()
        # The first batch pays one-off costs (kernel selection, allocator growth): pay them before /health says ready.
        warmup = self.engine.generate(
            GenerationRequest("warmup", [self.tokenizer.bos_token_id or 0] * 8, 4, asyncio.get_running_loop().time()))
        async for _ in warmup:
            pass
        self.ready = True

    async def _stop(self, _app) -> None:
        await self.engine.stop()

    async def health(self, _request: web.Request) -> web.Response:
        problem = self.engine.failure()
        if problem:
            return web.Response(status=503, text=problem)
        return web.Response(status=200 if self.ready else 503)

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "owned_by": "tokenrig", "max_model_len": self.max_context}]})

    async def prometheus(self, _request: web.Request) -> web.Response:
        self.metrics.observe_load(self.engine)
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start_profile(self, profiler: StepProfiler, _request: web.Request) -> web.Response:
        profiler.request_start()
        return web.Response(status=200)

    async def stop_profile(self, profiler: StepProfiler, _request: web.Request) -> web.Response:
        await asyncio.to_thread(profiler.request_stop)  # writing the trace takes a while
        return web.Response(status=200)

    # -- generation core ----------------------------------------------------------------------
    def _admit(self, prompt_ids: list[int], sampling: Sampling) -> None:
        """Refuse, before any byte of a reply is sent, what the engine cannot serve."""
        if len(prompt_ids) + sampling.max_tokens > self.max_context:
            raise BadRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) exceed the model's "
                f"context of {self.max_context} tokens")
        problem = self.engine.failure()
        if problem:
            raise EngineUnavailable(problem)

    async def _tokens(self, prompt_ids: list[int], sampling: Sampling, arrival: float):
        """Yield (token_ids, finish_reason) from the engine, applying the stop rules (after `_admit`)."""
        request = GenerationRequest(uuid.uuid4().hex, prompt_ids, sampling.max_tokens, arrival)
        labels = (self.model_name,)
        self.metrics.prompt_tokens.labels(*labels).inc(len(prompt_ids))
        loop = asyncio.get_running_loop()
        start = last = arrival
        generated, finish = 0, "length"
        stream = self.engine.generate(request)
        try:
            async for token_ids in stream:
                now = loop.time()
                if generated == 0:
                    self.metrics.ttft.labels(*labels).observe(now - start)
                else:
                    for _ in token_ids:
                        self.metrics.itl.labels(*labels).observe((now - last) / len(token_ids))
                last = now
                if not sampling.ignore_eos and self.eos_id in token_ids:
                    cut = token_ids.index(self.eos_id)
                    if generated + cut >= sampling.min_tokens:
                        token_ids, finish = token_ids[:cut], "stop"
                generated += len(token_ids)
                self.metrics.generation_tokens.labels(*labels).inc(len(token_ids))
                yield token_ids, None
                if finish == "stop" or generated >= sampling.max_tokens:
                    break
        finally:
            await stream.aclose()
        self.metrics.e2e.labels(*labels).observe(loop.time() - start)
        self.metrics.success.labels(self.model_name, finish).inc()
        yield [], finish

    async def _read_json(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except json.JSONDecodeError as error:
            raise BadRequest(f"request body is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    # -- OpenAI --------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=True)

    async def _openai(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival = asyncio.get_running_loop().time()
        try:
            body = await self._read_json(request)
            prompt_ids = (encode_chat(self.tokenizer, body.get("messages")) if chat
                          else encode_prompt(self.tokenizer, body.get("prompt")))
            sampling = _sampling(body, default_max=16)
            self._admit(prompt_ids, sampling)
        except BadRequest as error:
            return web.json_response({"error": {"message": str(error), "type": "BadRequestError", "code": 400}},
                                     status=400)
        except EngineUnavailable as error:
            return web.json_response({"error": {"message": str(error), "type": "ServiceUnavailable", "code": 503}},
                                     status=503)
        if body.get("model") not in (None, self.model_name):  # as vLLM answers a model it does not serve
            return web.json_response({"error": {"message": f"The model `{body['model']}` does not exist.",
                                                "type": "NotFoundError", "code": 404}}, status=404)
        # Closed here, not left to the garbage collector: a client gone mid-stream ends the handler with a write
        # error, and its request must leave the engine with it (as vLLM aborts it), or /metrics counts it running
        # until a collection happens to run, and a load test waiting for the server to drain waits that long.
        async with contextlib.aclosing(self._tokens(prompt_ids, sampling, arrival)) as tokens:
            object_name = "chat.completion" if chat else "text_completion"
            response_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            created = int(time.time())
            detokenizer = Detokenizer(self.fast)
            base = {"id": response_id, "created": created, "model": self.model_name}

            def usage(completion_tokens: int) -> dict:
                return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                        "total_tokens": len(prompt_ids) + completion_tokens}

            if not body.get("stream"):
                text, count, finish = "", 0, None
                async for token_ids, finish in tokens:
                    count += len(token_ids)
                    text += detokenizer.add(token_ids) if token_ids else ""
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                          if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
                return web.json_response({**base, "object": object_name, "choices": [choice], "usage": usage(count)})

            # Headers (and the chat role chunk) go out now, not with the first token: at a burst of first tokens
            # their cost would land inside the measured TTFT of every stream but the first.
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            chunk_object = "chat.completion.chunk" if chat else "text_completion"
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def chunk(text: str | None, finish: str | None) -> dict:
                if chat:
                    delta = {} if text is None else {"content": text}
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
                payload = {**base, "object": chunk_object, "choices": [choice]}
                if include_usage:
                    payload["usage"] = None
                return payload

            if chat:
                role_chunk = chunk("", None)
                role_chunk["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                await response.write(_sse(role_chunk))
            count = 0
            async for token_ids, finish in tokens:
                if token_ids:
                    count += len(token_ids)
                    await response.write(_sse(chunk(detokenizer.add(token_ids), None)))
                if finish:
                    await response.write(_sse(chunk(None if chat else "", finish)))
            if include_usage:
                await response.write(_sse({**base, "object": chunk_object, "choices": [], "usage": usage(count)}))
            await response.write(_sse("[DONE]"))
            await response.write_eof()
            return response

    # -- TGI -----------------------------------------------------------------------------------
    async def _tgi_start(self, request: web.Request):
        arrival = asyncio.get_running_loop().time()
        body = await self._read_json(request)
        if not isinstance(body.get("inputs"), str):
            raise BadRequest("inputs must be a string")
        parameters = body.get("parameters") or {}
        sampling = _sampling({"max_new_tokens": parameters.get("max_new_tokens"), "ignore_eos": True}, default_max=20)
        prompt_ids = self.fast.encode(body["inputs"], add_special_tokens=True).ids
        self._admit(prompt_ids, sampling)
        return sampling, parameters, prompt_ids, arrival

    async def tgi_generate(self, request: web.Request) -> web.Response:
        try:
            sampling, parameters, prompt_ids, arrival = await self._tgi_start(request)
        except BadRequest as error:
            return web.json_response({"error": str(error), "error_type": "validation"}, status=422)
        except EngineUnavailable as error:
            return web.json_response({"error": str(error), "error_type": "unavailable"}, status=503)
        detokenizer, text, count, finish = Detokenizer(self.fast), "", 0, None
        async with contextlib.aclosing(self._tokens(prompt_ids, sampling, arrival)) as tokens:
            async for token_ids, finish in tokens:
                count += len(token_ids)
                text += detokenizer.add(token_ids) if token_ids else ""
        result: dict[str, object] = {"generated_text": text}
        if parameters.get("details"):
            result["details"] = {"finish_reason": finish, "generated_tokens": count, "seed": None,
                                 "prefill": [], "tokens": []}
        return web.json_response(result)

    async def tgi_generate_stream(self, request: web.Request) -> web.StreamResponse:
        try:
            sampling, parameters, prompt_ids, arrival = await self._tgi_start(request)
        except BadRequest as error:
            return web.json_response({"error": str(error), "error_type": "validation"}, status=422)
        except EngineUnavailable as error:
            return web.json_response({"error": str(error), "error_type": "unavailable"}, status=503)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        detokenizer, text, index = Detokenizer(self.fast), "", 0
        # Each token goes out as it is generated, like TGI's router; the event of the last token (the
        # max_new_tokens-th: TGI requests never stop early here) also carries generated_text and details.
        async with contextlib.aclosing(self._tokens(prompt_ids, sampling, arrival)) as tokens:
            async for token_ids, _finish in tokens:
                for token_id in token_ids:
                    piece = detokenizer.add([token_id])
                    text += piece
                    index += 1
                    event = {"index": index, "token": {"id": token_id, "text": piece, "logprob": 0.0, "special": False},
                             "generated_text": None, "details": None, "top_tokens": None}
                    if index == sampling.max_tokens:
                        event["generated_text"] = text
                        event["details"] = {"finish_reason": "length", "generated_tokens": index, "seed": None,
                                            "input_length": len(prompt_ids)}
                    await response.write(_sse(event))
        await response.write_eof()
        return response

"""The sim engine: a simulated LLM engine whose timing is known exactly.

Two timing models:

* `FixedSchedule` — token i of every request is due at arrival + ttft + i * tpot, whatever the
  load. Deadlines are absolute, so sleep jitter never accumulates: the ground truth for checking
  that a load generator measures what the server did. With `slots` (--max-num-seqs) it is a
  queue: at most that many requests are served at once, the rest wait in arrival order, and a
  request's schedule starts when a slot frees (on the schedule, not the clock) — an N-server
  FIFO queue with known service times, whose SLO knee a queueing simulation computes.
* `RooflineEngine` — a continuous-batching scheduler (iteration-level, like vLLM; the clock-free
  `RooflineScheduler`) whose step time is the roofline of the work in the step: matmul and
  attention FLOPs over the GPU's BF16 peak, weight and KV-cache bytes over its memory bandwidth,
  each derated by an efficiency (`RooflineParams`, settable per server). The KV cache the fit planner
  leaves that configuration (serve/fit.py: the same budget, and the same "does not fit" with what
  would fit, as a vLLM or TGI launch gets) bounds how many requests run at once; the rest wait. So
  latency grows with load the way a real engine's does. Automatic prefix caching (as vLLM's):
  full 16-token prompt blocks are kept by the hash of their whole prefix, least recently used
  first out, and a request skips the prefill of its leading cached blocks.
"""

from __future__ import annotations

import asyncio
import heapq
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import AsyncIterator

from tokenrig.profiles import GpuProfile, ModelProfile
from tokenrig.serve.engines import EngineLoad, GenerationRequest
from tokenrig.serve.fit import DEFAULT_GPU_MEMORY_UTILIZATION, plan_fit, weight_bytes


class _TokenSource:
    """Random content-word token ids (never special tokens), seeded for reproducibility."""

    def __init__(self, vocab_size: int, first_content_id: int, seed: int = 0):
        self._random = random.Random(seed).random
        self._low, self._span = first_content_id, vocab_size - first_content_id

    def next(self) -> int:
        return self._low + int(self._random() * self._span)  # randint's cost, a fifth of it


class FixedSchedule:
    def __init__(self, ttft_s: float, tpot_s: float, vocab_size: int, first_content_id: int,
                 slots: int | None = None):
        self.ttft_s = ttft_s
        self.tpot_s = tpot_s
        self.slots = slots
        self._tokens = _TokenSource(vocab_size, first_content_id)
        self._active: set[str] = set()
        self._slot_free_at: list[float] = [0.0] * (slots or 0)  # a heap: when each slot's request is done
        # (start, end) of each request given a slot: the queue's load is the schedule's, whether or not a
        # request's stream has been closed (a client that went away leaves its generator to the collector)
        self._reservations: list[tuple[float, float]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def load(self) -> EngineLoad:
        if not self.slots:
            return EngineLoad(running=len(self._active), waiting=0, kv_cache_usage=None)
        now = asyncio.get_running_loop().time()
        self._reservations = [(start, end) for start, end in self._reservations if end > now]
        waiting = sum(start > now for start, _ in self._reservations)
        return EngineLoad(running=len(self._reservations) - waiting, waiting=waiting, kv_cache_usage=None)

    def failure(self) -> str | None:
        return None

    def _schedule_start(self, request: GenerationRequest) -> float:
        """When the request's first-token clock starts: on arrival, or when the earliest slot frees. A slot is
        held until the request's last token is due, whether or not its client still reads."""
        if not self.slots:
            return request.arrival
        start = max(request.arrival, heapq.heappop(self._slot_free_at))
        end = start + self.ttft_s + max(request.max_tokens - 1, 0) * self.tpot_s
        heapq.heappush(self._slot_free_at, end)
        self._reservations.append((start, end))
        return start

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[int]]:
        loop = asyncio.get_running_loop()
        start = self._schedule_start(request)
        self._active.add(request.request_id)
        try:
            for index in range(request.max_tokens):
                delay = start + self.ttft_s + index * self.tpot_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                yield [self._tokens.next()]
        finally:
            self._active.discard(request.request_id)


@dataclass
class RooflineParams:
    """Derating and limits of the roofline engine. Defaults are typical of a tuned engine."""

    compute_efficiency: float = 0.6  # achieved / peak BF16 FLOP/s on large matmuls
    bandwidth_efficiency: float = 0.8  # achieved / peak memory bandwidth on weight streaming
    step_overhead_s: float = 0.002  # scheduler + kernel-launch cost per iteration
    sequence_overhead_s: float = 0.0  # host cost per sequence in the step (batch bookkeeping, sampling)
    max_num_seqs: int = 256
    max_batch_tokens: int = 8192  # prefill token budget per step (chunked prefill)
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # what the fit planner may budget


class PrefixCache:
    """Prompt blocks by the hash of everything up to and including them (so a block hits only
    after the same prefix), evicted least recently used once `capacity_blocks` are held."""

    BLOCK_TOKENS = 16

    def __init__(self, capacity_blocks: int):
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.queries = 0
        self.hits = 0

    def lookup_and_insert(self, prompt_ids: list[int]) -> int:
        """Prompt tokens already cached (leading full blocks); caches the prompt's full blocks."""
        size, chain, cached, missed = self.BLOCK_TOKENS, 0, 0, False
        for start in range(0, len(prompt_ids) - size + 1, size):
            chain = hash((chain, tuple(prompt_ids[start:start + size])))
            if not missed and chain in self._blocks:
                cached += size
            else:
                missed = True
            self._blocks[chain] = None
            self._blocks.move_to_end(chain)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
        cached = min(cached, len(prompt_ids) - 1)  # the last prompt token is always computed
        self.queries += len(prompt_ids)
        self.hits += cached
        return cached


@dataclass
class _Sequence:
    request: GenerationRequest
    out: asyncio.Queue | None = None  # the asyncio engine's token queue; a virtual-time replay reads tokens itself
    prefilled: int = 0
    generated: int = 0
    done: bool = False

    @property
    def context(self) -> int:
        return len(self.request.prompt_ids) + self.generated

    @property
    def reserved_tokens(self) -> int:
        return len(self.request.prompt_ids) + self.request.max_tokens


@dataclass
class StepWork:
    prefill_tokens: int = 0
    decode_tokens: int = 0
    attention_flops: float = 0.0
    kv_bytes_read: float = 0.0
    kv_tokens_written: int = 0
    sequences: list = field(default_factory=list)


class RooflineScheduler:
    """The engine's timing model without a clock: admission, step planning, step time, tokens out.

    The sim server drives it in real time (`RooflineEngine`); capacity projections drive the same
    object in virtual time (`tokenrig.capacity.simulate`), so both follow one model. Weights are the
    fit planner's bytes for the quantization; with tensor parallelism over `tp` GPUs, FLOPs, bytes
    and memory are shared by the GPUs and each step adds two ring all-reduces of the hidden state
    per layer over the GPU's interconnect. The KV cache holds what the fit planner's plan for this
    model, GPU, quantization, TP size, context (`context_tokens`, default the model's) and batch limit
    leaves for it; a configuration the planner refuses raises its FitError, which says what would fit.
    """

    def __init__(self, model: ModelProfile, gpu: GpuProfile, first_content_id: int,
                 params: RooflineParams | None = None, quant: str = "bf16", tp: int = 1,
                 context_tokens: int | None = None):
        self.model = model
        self.gpu = gpu
        self.params = params or RooflineParams()
        self.quant = quant
        self.tp = tp
        self.weight_bytes = weight_bytes(model, quant)
        self.kv_bytes_per_token = model.kv_bytes_per_token()
        self._attention_flops_per_pair = 4 * model.num_layers * model.num_heads * model.head_dim
        self._matmul_params = model.num_matmul_params
        self.kv_capacity_tokens = plan_fit(
            model, gpu, quant, concurrency=self.params.max_num_seqs, context_tokens=context_tokens, tp=tp,
            gpu_memory_utilization=self.params.gpu_memory_utilization).kv_capacity_tokens
        self.prefix_cache = PrefixCache(self.kv_capacity_tokens // PrefixCache.BLOCK_TOKENS)
        self._tokens = _TokenSource(model.vocab_size, first_content_id)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._kv_reserved = 0

    def load(self) -> EngineLoad:
        return EngineLoad(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_cache_usage=self._kv_reserved / self.kv_capacity_tokens,
            prefix_cache_queries=self.prefix_cache.queries,
            prefix_cache_hits=self.prefix_cache.hits,
        )

    @property
    def busy(self) -> bool:
        """Requests are waiting or still generating."""
        return bool(self._waiting) or any(not s.done for s in self._running)

    def check_fits(self, request: GenerationRequest) -> None:
        if len(request.prompt_ids) + request.max_tokens > self.kv_capacity_tokens:
            raise ValueError("prompt + max_tokens exceed the whole KV cache")

    def submit(self, sequence: _Sequence) -> None:
        self._waiting.append(sequence)

    def step_time(self, work: StepWork) -> float:
        """Roofline time of one engine iteration."""
        p, tp = self.params, self.tp
        tokens = work.prefill_tokens + work.decode_tokens
        flops = 2 * self._matmul_params * tokens + work.attention_flops
        bytes_moved = self.weight_bytes + work.kv_bytes_read + work.kv_tokens_written * self.kv_bytes_per_token
        compute_s = flops / (tp * self.gpu.flops_per_s * p.compute_efficiency)
        memory_s = bytes_moved / (tp * self.gpu.bandwidth_bytes_per_s * p.bandwidth_efficiency)
        host_s = p.step_overhead_s + p.sequence_overhead_s * len(work.sequences)
        return max(compute_s, memory_s) + host_s + self.all_reduce_s(tokens)

    def all_reduce_s(self, tokens: int) -> float:
        """Two ring all-reduces of the bf16 hidden state per layer (after attention and after the MLP)."""
        if self.tp == 1:
            return 0.0
        size = tokens * self.model.hidden_size * 2
        sent_per_gpu = 2 * (self.tp - 1) / self.tp * size
        return 2 * self.model.num_layers * sent_per_gpu / (self.gpu.interconnect_gbs * 1e9)

    def _attention_flops(self, query_tokens: int, context_end: int) -> float:
        # QK^T and AV: 2 matmuls x 2 FLOPs per multiply-add, over all heads, causal context
        per_token_context = context_end - (query_tokens - 1) / 2
        return self._attention_flops_per_pair * query_tokens * per_token_context

    def plan_step(self) -> StepWork:
        """Admit what fits, then the step's work: prefill chunks within the token budget, one decode token each."""
        p = self.params
        self._running = [s for s in self._running if not s.done or self._release(s)]
        while self._waiting and self._waiting[0].done:
            self._waiting.popleft()
        while (
            self._waiting
            and len(self._running) < p.max_num_seqs
            and self._kv_reserved + self._waiting[0].reserved_tokens <= self.kv_capacity_tokens
        ):
            sequence = self._waiting.popleft()
            self._kv_reserved += sequence.reserved_tokens
            sequence.prefilled = self.prefix_cache.lookup_and_insert(sequence.request.prompt_ids)
            self._running.append(sequence)

        work, budget = StepWork(), p.max_batch_tokens
        decoded_context = 0  # sum of the decoding sequences' contexts: their KV read and attention
        for sequence in self._running:
            prompt = len(sequence.request.prompt_ids)
            if sequence.prefilled < prompt:
                chunk = min(prompt - sequence.prefilled, budget)
                if chunk == 0:
                    continue
                budget -= chunk
                sequence.prefilled += chunk
                work.prefill_tokens += chunk
                work.attention_flops += self._attention_flops(chunk, sequence.prefilled)
                work.kv_tokens_written += chunk
                if sequence.prefilled == prompt:
                    work.sequences.append(sequence)
            else:
                work.decode_tokens += 1
                decoded_context += prompt + sequence.generated
                work.sequences.append(sequence)
        # each decoded token attends over its context + itself and reads the context's KV cache
        work.attention_flops += self._attention_flops_per_pair * (decoded_context + work.decode_tokens)
        work.kv_bytes_read += decoded_context * self.kv_bytes_per_token
        work.kv_tokens_written += work.decode_tokens
        return work

    def finish_step(self, work: StepWork) -> list[tuple[_Sequence, int]]:
        """The step has ended: one new token for each of its live sequences; the last one marks it done."""
        emitted = []
        for sequence in work.sequences:
            if sequence.done:
                continue
            sequence.generated += 1
            emitted.append((sequence, self._tokens.next()))
            if sequence.generated >= sequence.request.max_tokens:
                sequence.done = True
        return emitted

    def _release(self, sequence: _Sequence) -> bool:
        self._kv_reserved -= sequence.reserved_tokens
        return False


class RooflineEngine(RooflineScheduler):
    """The scheduler on the event loop: each step sleeps until its roofline deadline, then streams tokens."""

    def __init__(self, model: ModelProfile, gpu: GpuProfile, first_content_id: int,
                 params: RooflineParams | None = None, quant: str = "bf16", tp: int = 1,
                 context_tokens: int | None = None):
        super().__init__(model, gpu, first_content_id, params, quant, tp, context_tokens)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()

    def failure(self) -> str | None:
        task = self._loop_task
        if task is None or not task.done() or task.cancelled():
            return None
        return f"scheduler loop ended: {task.exception()!r}"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[int]]:
        self.check_fits(request)
        sequence = _Sequence(request, asyncio.Queue())
        self.submit(sequence)
        self._wake.set()
        try:
            while True:
                token = await sequence.out.get()
                if token is None:
                    return
                yield [token]
        finally:
            sequence.done = True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            work = self.plan_step()
            if not work.sequences and not work.prefill_tokens:
                self._wake.clear()
                await self._wake.wait()
                deadline = loop.time()
                continue
            deadline += self.step_time(work)
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                deadline = loop.time()  # fell behind (host pause): do not try to catch up
            for sequence, token in self.finish_step(work):
                sequence.out.put_nowait(token)
                if sequence.done:
                    sequence.out.put_nowait(None)

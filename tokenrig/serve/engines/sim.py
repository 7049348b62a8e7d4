"""The sim engine: a simulated LLM engine whose timing is known exactly.

Two timing models:

* `FixedSchedule` — token i of every request is due at arrival + ttft + i * tpot, whatever the
  load. Deadlines are absolute, so sleep jitter never accumulates: the ground truth for checking
  that a load generator measures what the server did. With `slots` (--max-num-seqs) it is a
  queue: at most that many requests are served at once, the rest wait in arrival order, and a
  request's schedule starts when a slot frees (on the schedule, not the clock) — an N-server
  FIFO queue with known service times, whose SLO knee a queueing simulation computes.
* `RooflineEngine` — vLLM 0.26's V1 scheduler (the clock-free `RooflineScheduler`) whose step time is
  the roofline of the work in the step: matmul and attention FLOPs over the GPU's BF16 peak, weight and
  KV-cache bytes over its memory bandwidth, each derated by an efficiency (`RooflineParams`, settable
  per server). As vLLM's: one token budget per step (max_num_batched_tokens) shared by the running
  requests first (a decode is 1 token, a prefill a chunk of its prompt) and then the waiting ones, first
  come first served, up to max_num_seqs at once; the KV cache, what the fit planner (serve/fit.py: the
  same budget, and the same "does not fit" with what would fit, as a vLLM or TGI launch gets) leaves,
  is a pool of 16-token blocks allocated as tokens are computed; when a running request needs a block
  and none is free, the last admitted request is preempted and later recomputes. The prefix cache is
  that pool: full blocks are kept by the hash of their whole prefix after their request ends, shared by
  reference, and overwritten least recently freed first when a new block is needed. So latency grows
  with load the way a real engine's does.
"""

from __future__ import annotations

import asyncio
import heapq
import random
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import AsyncGenerator

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

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[list[int], None]:
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
    max_batch_tokens: int = 8192  # tokens per step, decodes and prefill chunks (vLLM's max_num_batched_tokens)
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # what the fit planner may budget


BLOCK_TOKENS = 16  # vLLM's default KV block size


class BlockPool:
    """vLLM's KV block pool with its prefix cache (v1/core/block_pool.py): the cache is the pool itself.

    A block that no request holds any more stays in the pool with its hash (the hash of everything up
    to and including it), so a later request with the same prefix can take it back; it is overwritten
    only when a new block is needed and it is the least recently freed. Free blocks queue in eviction
    order: a request's blocks are freed tail first, blocks with no hash (a partial last block) go to
    the front, hashed ones to the back."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._references = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._holders: dict[int, dict[int, None]] = {}  # block hash -> the blocks holding it
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # next evicted first

    @property
    def free_blocks(self) -> int:
        """Blocks no request holds, cached or not."""
        return len(self._free)

    def cached(self, block_hash: int) -> int | None:
        holders = self._holders.get(block_hash)
        return next(iter(holders)) if holders else None

    def unreferenced(self, blocks: Iterable[int]) -> int:
        """Of these cached blocks, those no request holds: taking them uses up free blocks."""
        return sum(self._references[block] == 0 for block in blocks)

    def take(self, count: int) -> list[int]:
        """`count` new blocks off the front of the free queue, their cached content evicted."""
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._references[block] = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[int]) -> None:
        """Share cached blocks with one more request (off the free queue if no one held them)."""
        for block in blocks:
            if self._references[block] == 0:
                del self._free[block]
            self._references[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block, given in eviction order (first evicted first)."""
        unhashed = []
        for block in blocks:
            self._references[block] -= 1
            if self._references[block] == 0:
                self._free[block] = None
                if self._hash[block] is None:
                    unhashed.append(block)
        for block in reversed(unhashed):  # a block no prefix can hit is reused first, in the given order
            self._free.move_to_end(block, last=False)

    def cache(self, block: int, block_hash: int) -> None:
        self._hash[block] = block_hash
        self._holders.setdefault(block_hash, {})[block] = None

    def _forget(self, block: int) -> None:
        block_hash = self._hash[block]
        if block_hash is None:
            return
        holders = self._holders[block_hash]
        del holders[block]
        if not holders:
            del self._holders[block_hash]
        self._hash[block] = None


@dataclass(slots=True)
class SimSequence:
    """A request in the engine, as vLLM's Request: its tokens (prompt + generated), how many of them have
    KV computed, the KV blocks it holds and the hashes of its full blocks."""

    request: GenerationRequest
    out: asyncio.Queue | None = None  # the asyncio engine's token queue; a virtual-time replay reads tokens itself
    computed: int = 0  # tokens whose KV is computed (or scheduled to be, in the step being planned)
    generated: int = 0
    done: bool = False
    preemptions: int = 0
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    hashed_blocks: int = 0  # leading blocks already entered in the prefix cache
    block_hashes: list[int] = field(default_factory=list)  # of each full block of tokens, chained
    num_tokens: int = field(init=False)  # prompt + generated

    def __post_init__(self):
        self.num_tokens = len(self.request.prompt_ids) + self.generated
        self._hash_full_blocks()

    def add_token(self, token: int) -> None:
        self.output_ids.append(token)
        self.generated += 1
        self.num_tokens += 1
        if self.num_tokens % BLOCK_TOKENS == 0:
            self._hash_full_blocks()

    def _hash_full_blocks(self) -> None:
        prompt, size = self.request.prompt_ids, BLOCK_TOKENS
        while (len(self.block_hashes) + 1) * size <= self.num_tokens:
            start = len(self.block_hashes) * size
            outputs = self.output_ids[max(start - len(prompt), 0):start + size - len(prompt)]
            tokens = prompt[start:start + size] + outputs
            self.block_hashes.append(hash((self.block_hashes[-1] if self.block_hashes else 0, tuple(tokens))))


class PagedKvCache:
    """vLLM's KV cache manager for a full-attention model (v1/core/kv_cache_manager.py): blocks of
    `BLOCK_TOKENS` given to a request as its tokens are scheduled, prefix-cache hits shared by reference,
    full blocks entered in the cache as soon as they are allocated."""

    def __init__(self, num_blocks: int):
        self.pool = BlockPool(num_blocks)

    @property
    def usage(self) -> float:
        return 1 - self.pool.free_blocks / self.pool.num_blocks

    def cached_prefix(self, sequence: SimSequence) -> list[int]:
        """The cached blocks of the sequence's leading full blocks, up to the first miss. The last token is
        always computed (its logits give the next token), so a hit covers at most num_tokens - 1."""
        blocks = []
        for block_hash in sequence.block_hashes[:(sequence.num_tokens - 1) // BLOCK_TOKENS]:
            block = self.pool.cached(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def allocate(self, sequence: SimSequence, new_tokens: int, hit: Sequence[int] = (),
                 whole_sequence: bool = False) -> bool:
        """Blocks for `new_tokens` more tokens after those computed (and the cached `hit` of a request being
        admitted), or False, changing nothing, if the free blocks are too few. `whole_sequence`: admit
        only if all its tokens so far would fit (vLLM 0.26's scheduler_reserve_full_isl, on by default)."""
        pool = self.pool
        end = sequence.computed + len(hit) * BLOCK_TOKENS + new_tokens
        held = len(sequence.blocks) + len(hit)
        needed = max(-(-end // BLOCK_TOKENS) - held, 0)
        taken_from_free = pool.unreferenced(hit) if hit else 0
        if whole_sequence:
            whole = max(-(-sequence.num_tokens // BLOCK_TOKENS) - held, 0)
            if whole + taken_from_free > pool.free_blocks:
                return False
        if needed + taken_from_free > pool.free_blocks:
            return False
        if hit:
            pool.touch(hit)
            sequence.blocks += hit
            sequence.hashed_blocks += len(hit)
        if needed:
            sequence.blocks += pool.take(needed)
        # the blocks this step fills are entered in the cache now, as vLLM does at allocation
        for index in range(sequence.hashed_blocks, min(end, sequence.num_tokens) // BLOCK_TOKENS):
            pool.cache(sequence.blocks[index], sequence.block_hashes[index])
            sequence.hashed_blocks = index + 1
        return True

    def free(self, sequence: SimSequence) -> None:
        self.pool.release(sequence.blocks[::-1])  # tail first: a prefix outlives its continuations
        sequence.blocks, sequence.hashed_blocks = [], 0


@dataclass
class StepWork:
    """One engine step's batch. Tokens: `prefill_tokens` in chunks (`prefill_chunks`: new tokens and the
    context they end at, per sequence), one token for each of `decode_tokens` sequences (a query of one
    token, as vLLM's attention kernels count a decode). What the step reads and computes: KV tokens the
    decodes read (`decode_kv_tokens`), query x key pairs of prefill attention (causal, cached context
    included), and the roofline's FLOPs and bytes derived from them. `sequences`: those the step gives a
    token to."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    attention_flops: float = 0.0
    kv_bytes_read: float = 0.0
    kv_tokens_written: int = 0
    sequences: list = field(default_factory=list)
    prefill_chunks: list[tuple[int, int]] = field(default_factory=list)
    decode_kv_tokens: int = 0
    prefill_attention_pairs: int = 0
    preemptions: int = 0

    @property
    def idle(self) -> bool:
        """Nothing was scheduled: no request waits or runs (one that fits the cache is always admitted)."""
        return not self.prefill_tokens and not self.decode_tokens


class RooflineScheduler:
    """The engine's timing model without a clock: vLLM 0.26's scheduler, the step time, tokens out.

    The sim server drives it in real time (`RooflineEngine`); capacity projections drive the same
    object in virtual time (`tokenrig.capacity.simulate`), so both follow one model. Weights are the
    fit planner's bytes for the quantization; with tensor parallelism over `tp` GPUs, FLOPs, bytes
    and memory are shared by the GPUs and each step adds two ring all-reduces of the hidden state
    per layer over the GPU's interconnect. The KV cache holds what the fit planner's plan for this
    model, GPU, quantization, TP size, context (`context_tokens`, default the model's) and batch limit
    leaves for it, or `kv_cache_tokens` when given (as vLLM's --num-gpu-blocks-override); a configuration
    the planner refuses raises its FitError, which says what would fit.

    Each step (vLLM's Scheduler.schedule) shares one budget of `max_batch_tokens` tokens: first the
    running requests in admission order, each the tokens it lacks (1 for a decode, the rest of its prompt
    in a chunk for a prefill); a request whose blocks cannot be allocated preempts the last admitted one
    (recompute: its blocks are freed, it goes back to the front of the waiting queue, and when admitted
    again it prefills its prompt and the tokens it had generated, from the prefix cache where its blocks
    are still there). Then, only if nothing was preempted, waiting requests first come first served while
    there is budget, fewer than `max_num_seqs` run, and the blocks of their whole sequence are free.
    """

    def __init__(self, model: ModelProfile, gpu: GpuProfile, first_content_id: int,
                 params: RooflineParams | None = None, quant: str = "bf16", tp: int = 1,
                 context_tokens: int | None = None, kv_cache_tokens: int | None = None):
        self.model = model
        self.gpu = gpu
        self.params = params or RooflineParams()
        self.quant = quant
        self.tp = tp
        self.weight_bytes = weight_bytes(model, quant)
        self.kv_bytes_per_token = model.kv_bytes_per_token()
        self._attention_flops_per_pair = 4 * model.num_layers * model.num_heads * model.head_dim
        self._matmul_params = model.num_matmul_params
        planned = plan_fit(
            model, gpu, quant, concurrency=self.params.max_num_seqs, context_tokens=context_tokens, tp=tp,
            gpu_memory_utilization=self.params.gpu_memory_utilization).kv_capacity_tokens
        self.kv_capacity_tokens = kv_cache_tokens or planned
        self.kv_cache = PagedKvCache(self.kv_capacity_tokens // BLOCK_TOKENS)
        self._tokens = _TokenSource(model.vocab_size, first_content_id)
        self._waiting: deque[SimSequence] = deque()
        self._running: list[SimSequence] = []
        self.prefix_cache_queries = 0  # prompt tokens of the requests admitted (resumed ones not counted)
        self.prefix_cache_hits = 0  # of those, tokens found in the prefix cache
        self.preemptions = 0

    def load(self) -> EngineLoad:
        return EngineLoad(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_cache_usage=self.kv_cache.usage,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            preemptions=self.preemptions,
        )

    @property
    def busy(self) -> bool:
        """Requests are waiting or still generating."""
        return bool(self._waiting) or any(not s.done for s in self._running)

    def check_fits(self, request: GenerationRequest) -> None:
        """Refuse a request whose KV (its last token's is never computed) is more than the whole cache."""
        if -(-(len(request.prompt_ids) + request.max_tokens - 1) // BLOCK_TOKENS) > self.kv_cache.pool.num_blocks:
            raise ValueError("prompt + max_tokens exceed the whole KV cache")

    def submit(self, request: GenerationRequest, out: asyncio.Queue | None = None) -> SimSequence:
        """Queue a request (check_fits first); the sequence returned is the request in the engine, whose tokens
        finish_step emits (and, with `out`, the event loop's engine streams)."""
        sequence = SimSequence(request, out)
        self._waiting.append(sequence)
        return sequence

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
        return self._attention_flops_per_pair * _attention_pairs(query_tokens, context_end)

    def plan_step(self) -> StepWork:
        """Schedule one step as vLLM 0.26 does (see the class) and return its work."""
        for sequence in self._running:
            if sequence.done:
                self.kv_cache.free(sequence)
        self._running = [s for s in self._running if not s.done]
        budget = self.params.max_batch_tokens
        scheduled: list[tuple[SimSequence, int]] = []
        preempted = 0
        for sequence in self._running:  # a preemption pops the list's end, which this loop has not reached
            if budget == 0:
                break
            computed = sequence.computed
            new_tokens = sequence.num_tokens - computed
            if new_tokens > budget:
                new_tokens = budget
            end = computed + new_tokens
            # most decodes stay within their last block, which they do not fill: nothing to allocate or cache
            allocated = ((end <= len(sequence.blocks) * BLOCK_TOKENS and end // BLOCK_TOKENS <= sequence.hashed_blocks)
                         or self.kv_cache.allocate(sequence, new_tokens))
            while not allocated:
                victim = self._running.pop()  # the last admitted
                self._preempt(victim)
                preempted += 1
                if victim is sequence:
                    break
                allocated = self.kv_cache.allocate(sequence, new_tokens)
            if not allocated:  # it preempted itself (vLLM's guard; a request check_fits takes always fits alone)
                break
            scheduled.append((sequence, new_tokens))
            budget -= new_tokens
        while not preempted and self._waiting and budget > 0 and len(self._running) < self.params.max_num_seqs:
            sequence = self._waiting[0]
            if sequence.done:  # cancelled while it waited
                self._waiting.popleft()
                continue
            hit = self.kv_cache.cached_prefix(sequence)
            new_tokens = min(sequence.num_tokens - len(hit) * BLOCK_TOKENS, budget)
            if not self.kv_cache.allocate(sequence, new_tokens, hit, whole_sequence=True):
                break
            self._waiting.popleft()
            self._running.append(sequence)
            sequence.computed = len(hit) * BLOCK_TOKENS
            if not sequence.preemptions:
                self.prefix_cache_queries += sequence.num_tokens
                self.prefix_cache_hits += sequence.computed
            scheduled.append((sequence, new_tokens))
            budget -= new_tokens
        return self._work(scheduled, preempted)

    def _preempt(self, sequence: SimSequence) -> None:
        self.kv_cache.free(sequence)
        sequence.computed = 0
        sequence.preemptions += 1
        self.preemptions += 1
        self._waiting.appendleft(sequence)

    def _work(self, scheduled: list[tuple[SimSequence, int]], preempted: int) -> StepWork:
        work = StepWork(preemptions=preempted)
        decodes = decode_kv_tokens = 0  # locals: this loop runs for every sequence of every step
        for sequence, new_tokens in scheduled:
            context_end = sequence.computed + new_tokens
            if new_tokens == 1:
                decodes += 1
                decode_kv_tokens += sequence.computed
            else:
                work.prefill_tokens += new_tokens
                work.prefill_chunks.append((new_tokens, context_end))
                work.prefill_attention_pairs += _attention_pairs(new_tokens, context_end)
            sequence.computed = context_end  # as vLLM advances it when the step is scheduled
            if context_end == sequence.num_tokens:  # caught up: the step samples its next token
                work.sequences.append(sequence)
        work.decode_tokens, work.decode_kv_tokens = decodes, decode_kv_tokens
        # each decoded token attends over its context + itself and reads the context's KV cache
        pairs = work.prefill_attention_pairs + decode_kv_tokens + decodes
        work.attention_flops = self._attention_flops_per_pair * pairs
        work.kv_bytes_read = decode_kv_tokens * self.kv_bytes_per_token
        work.kv_tokens_written = work.prefill_tokens + decodes
        return work

    def finish_step(self, work: StepWork) -> list[tuple[SimSequence, int]]:
        """The step has ended: one new token for each of its live sequences; the last one marks it done."""
        emitted = []
        next_token = self._tokens.next
        for sequence in work.sequences:
            if sequence.done:
                continue
            token = next_token()
            sequence.add_token(token)
            emitted.append((sequence, token))
            if sequence.generated >= sequence.request.max_tokens:
                sequence.done = True
        return emitted


def _attention_pairs(query_tokens: int, context_end: int) -> int:
    """Query x key pairs of causal attention for `query_tokens` new tokens ending at position `context_end`."""
    return query_tokens * context_end - query_tokens * (query_tokens - 1) // 2


class RooflineEngine(RooflineScheduler):
    """The scheduler on the event loop: each step sleeps until its roofline deadline, then streams tokens."""

    def __init__(self, model: ModelProfile, gpu: GpuProfile, first_content_id: int,
                 params: RooflineParams | None = None, quant: str = "bf16", tp: int = 1,
                 context_tokens: int | None = None, kv_cache_tokens: int | None = None):
        super().__init__(model, gpu, first_content_id, params, quant, tp, context_tokens, kv_cache_tokens)
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

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[list[int], None]:
        self.check_fits(request)
        out: asyncio.Queue = asyncio.Queue()
        sequence = self.submit(request, out)
        self._wake.set()
        try:
            while True:
                token = await out.get()
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
            if work.idle:
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
                assert sequence.out is not None  # generate() gives every sequence of this engine its queue
                sequence.out.put_nowait(token)
                if sequence.done:
                    sequence.out.put_nowait(None)

"""The roofline sim engine: its arithmetic, its KV-capacity limit (the fit planner's), and latency growing
with load; the fixed schedule with slots, a FIFO queue."""

import asyncio

import pytest

from tokenrig.profiles import resolve_gpu, resolve_model
from tokenrig.serve.engines import GenerationRequest
from tokenrig.serve.engines.sim import FixedSchedule, RooflineEngine, RooflineParams, StepWork
from tokenrig.serve.fit import FitError


def engine(model="llama2-7b", gpu="a800", quant="bf16", tp=1, context_tokens=None, **params):
    return RooflineEngine(resolve_model(model), resolve_gpu(gpu), first_content_id=7, params=RooflineParams(**params),
                          quant=quant, tp=tp, context_tokens=context_tokens)


def test_decode_step_is_weight_bandwidth_bound():
    sim = engine()
    work = StepWork(decode_tokens=1, attention_flops=0, kv_bytes_read=0, kv_tokens_written=0)
    # 6,738,415,616 bf16 weights x 2 B = 13.477 GB read per step; the A800's 2,039 GB/s at the default 0.8
    # bandwidth efficiency = 1,631.2 GB/s: 13.477 / 1631.2 = 8.262 ms, plus the 2-ms step overhead = 10.262 ms
    assert sim.step_time(work) == pytest.approx(0.010262, rel=1e-4)


def test_large_prefill_is_compute_bound():
    sim = engine()
    work = StepWork(prefill_tokens=8192)
    # 2 x 6,607,077,376 matmul params x 8,192 tokens = 1.0825e14 FLOP; the A800's 312 TFLOP/s at the default
    # 0.6 compute efficiency = 187.2 TFLOP/s: 0.57826 s (the 13.5-GB weight read takes 8 ms), + 2 ms = 0.58026 s
    assert sim.step_time(work) == pytest.approx(0.58026, rel=1e-4)


def test_weights_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="does not fit") as refused:
        engine(model="llama2-70b", gpu="rtx4090")
    assert "--quant gptq --tp 2 --gpu rtx4090" in str(refused.value)  # the planner says what would fit


def test_the_kv_cache_is_what_the_fit_planner_leaves():
    """llama2-7b bf16 on an A800: its 81,920 MiB (85.90 GB) x 0.9 = 77.31 GB usable - 13.477 GB weights
    - 0.438 GB activations (a 4096-token prefill chunk at (4 x 4096 + 3 x 11008) x 2 = 98,816 B a token, and
    256 x 32,000 fp32 logits) - 2 GB runtime = 61.39 GB; at 2 x 32 layers x 4096 x 2 B = 0.5 MiB a token,
    117,101 tokens. (Memory minus weights alone, as the engine once counted, gave more.)"""
    assert engine().kv_capacity_tokens == 117101
    # a batch limit of 4 keeps 4 x 32,000 x 4 B of logits instead of 256 sequences': 32.3 MB, 62 tokens more
    assert engine(max_num_seqs=4).kv_capacity_tokens == 117163


def test_what_a_refusal_suggests_the_engine_accepts():
    """70B bf16 on one A800: 138 GB of weights on a card of 85.9 GB. The engine refuses it with the planner's
    advice, and takes each configuration that advice names."""
    with pytest.raises(FitError, match="does not fit on 1 x a800") as refused:
        engine(model="70b", tp=1)
    advice = str(refused.value)
    assert "--quant bf16 --tp 2 --gpu a800" in advice and "--quant gptq --tp 1 --gpu a800" in advice
    assert engine(model="70b", tp=2).kv_capacity_tokens > 0 and engine(model="70b", quant="gptq").kv_capacity_tokens > 0


async def _run(sim, requests):
    await sim.start()
    loop = asyncio.get_running_loop()

    async def one(request):
        start = loop.time()
        first = None
        async for _ in sim.generate(request):
            first = first or loop.time() - start
        return first, loop.time() - start

    try:
        return await asyncio.gather(*(one(r) for r in requests))
    finally:
        await sim.stop()


def _requests(n, prompt=256, out=16):
    # distinct prompts, so the prefix cache does not shorten any prefill
    return [GenerationRequest(str(i), [7 + i] * prompt, out, 0.0) for i in range(n)]


def test_latency_grows_with_load_and_kv_capacity_queues_requests():
    # a small GPU budget: room for about two requests' KV cache at a time
    sim = engine(model="tiny", gpu="cpu", step_overhead_s=0.001)
    sim.kv_capacity_tokens = 2 * (256 + 16)
    single = asyncio.run(_run(sim, _requests(1)))
    sim = engine(model="tiny", gpu="cpu", step_overhead_s=0.001)
    sim.kv_capacity_tokens = 2 * (256 + 16)
    many = asyncio.run(_run(sim, _requests(6)))
    worst_ttft = max(first for first, _ in many)
    # the 5th and 6th requests wait for two full requests to finish before they are admitted
    assert worst_ttft > 2 * single[0][1]
    assert max(total for _, total in many) > 2.5 * single[0][1]


def test_a_fixed_schedule_with_slots_serves_that_many_at_once_and_queues_the_rest_in_order():
    async def run():
        sim = FixedSchedule(0.02, 0.01, vocab_size=100, first_content_id=7, slots=2)
        loop = asyncio.get_running_loop()
        arrival, first_tokens = loop.time(), {}

        async def one(index: int):
            async for _ in sim.generate(GenerationRequest(str(index), [7], 3, arrival)):
                first_tokens.setdefault(index, loop.time() - arrival)

        tasks = [asyncio.create_task(one(index)) for index in range(3)]
        await asyncio.sleep(0.005)
        load = sim.load()
        await asyncio.gather(*tasks)
        return load, first_tokens, sim.load()

    load, first_tokens, idle = asyncio.run(run())
    # two slots: requests 0 and 1 start at once (first token at 20 ms, the last of 3 at 40 ms); request 2 waits
    # for the first slot to free at 40 ms, on the schedule, so its first token is due at 60 ms
    assert (load.running, load.waiting) == (2, 1) and (idle.running, idle.waiting) == (0, 0)
    assert 0.0195 <= first_tokens[0] < 0.04 and 0.0595 <= first_tokens[2] < 0.09, first_tokens

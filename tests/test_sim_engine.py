"""The roofline sim engine: its arithmetic, its KV-capacity limit, and latency growing with load."""

import asyncio

import pytest

from tokenrig.profiles import resolve_gpu, resolve_model
from tokenrig.serve.engines import GenerationRequest
from tokenrig.serve.engines.sim import RooflineEngine, RooflineParams, StepWork


def engine(model="llama2-7b", gpu="a800", **params):
    return RooflineEngine(resolve_model(model), resolve_gpu(gpu), first_content_id=7, params=RooflineParams(**params))


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
    assert "--quant gptq --tp 4 --gpu rtx4090" in str(refused.value)  # the planner says what would fit


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

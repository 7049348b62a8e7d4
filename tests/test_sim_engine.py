"""The roofline sim engine: its arithmetic, its KV-capacity limit (the fit planner's), latency growing with
load, and its scheduler (vLLM 0.26's) step by step; the fixed schedule with slots, a FIFO queue."""

import asyncio

import pytest

from tokenrig.profiles import resolve_gpu, resolve_model
from tokenrig.serve.engines import GenerationRequest
from tokenrig.serve.engines.sim import (
    FixedSchedule,
    RooflineEngine,
    RooflineParams,
    RooflineScheduler,
    SimSequence,
    StepWork,
)
from tokenrig.serve.fit import FitError


def engine(model="llama2-7b", gpu="a800", quant="bf16", tp=1, context_tokens=None, kv_cache_tokens=None, **params):
    return RooflineEngine(resolve_model(model), resolve_gpu(gpu), first_content_id=7, params=RooflineParams(**params),
                          quant=quant, tp=tp, context_tokens=context_tokens, kv_cache_tokens=kv_cache_tokens)


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
    # a small KV cache: room for two requests' blocks at a time (34 blocks; each ends holding 17)
    single = asyncio.run(_run(engine(model="tiny", gpu="cpu", step_overhead_s=0.001, kv_cache_tokens=2 * (256 + 16)),
                              _requests(1)))
    many = asyncio.run(_run(engine(model="tiny", gpu="cpu", step_overhead_s=0.001, kv_cache_tokens=2 * (256 + 16)),
                            _requests(6)))
    worst_ttft = max(first for first, _ in many)
    # the 5th and 6th requests wait for two full requests to finish before they are admitted
    assert worst_ttft > 2 * single[0][1]
    assert max(total for _, total in many) > 2.5 * single[0][1]


# vLLM 0.26's scheduler, step by step, on the tiny model: small prompts, a KV cache of a few 16-token blocks.

def scheduler(kv_cache_tokens=1024, **params):
    return RooflineScheduler(resolve_model("tiny"), resolve_gpu("cpu"), first_content_id=7,
                             params=RooflineParams(**params), kv_cache_tokens=kv_cache_tokens)


def submit(sim, name, prompt, max_tokens):
    request = GenerationRequest(name, list(prompt), max_tokens, 0.0)
    sim.check_fits(request)
    return sim.submit(request)


def step(sim):
    work = sim.plan_step()
    sim.finish_step(work)
    return work


def names(sequences):
    return [sequence.request.request_id for sequence in sequences]


def test_one_token_budget_per_step_decodes_first_then_waiting_prefills_within_max_num_seqs():
    sim = scheduler(max_batch_tokens=32, max_num_seqs=2)
    submit(sim, "a", [100] * 20, 3)
    first = step(sim)
    assert first.prefill_chunks == [(20, 20)] and names(first.sequences) == ["a"]
    submit(sim, "b", [200] * 40, 2)
    submit(sim, "c", [300] * 10, 1)
    # a's decode takes 1 of the 32 tokens; b prefills the other 31; c waits: 2 requests run (max_num_seqs)
    second = step(sim)
    assert (second.decode_tokens, second.decode_kv_tokens, second.prefill_chunks) == (1, 20, [(31, 31)])
    assert second.prefill_attention_pairs == 31 * 31 - 31 * 30 // 2  # causal: 496 query x key pairs
    assert names(second.sequences) == ["a"]  # b's prompt is not all computed: no token for it yet
    assert second.attention_flops == sim._attention_flops_per_pair * (496 + 20 + 1)
    assert second.kv_tokens_written == 32 and second.kv_bytes_read == 20 * sim.kv_bytes_per_token
    third = step(sim)  # a's last decode, the rest of b's prompt; c still waits for a free slot
    assert (third.decode_kv_tokens, third.prefill_chunks, names(third.sequences)) == (21, [(9, 40)], ["a", "b"])
    fourth = step(sim)  # a has ended: b decodes, c is admitted
    assert (fourth.decode_kv_tokens, fourth.prefill_chunks, names(fourth.sequences)) == (40, [(10, 10)], ["b", "c"])
    assert not sim.busy


def test_a_request_short_of_blocks_preempts_the_last_admitted_which_recomputes():
    """6 blocks (96 tokens), 64 tokens a step, 3 requests of 40 prompt tokens and 20 out. a and b are admitted
    (3 + 2 blocks for their first chunks, which spend the budget); c waits. a's 49th token needs a 4th block:
    b, admitted last, is preempted with 8 tokens generated, and a takes b's last block. When a ends, b
    recomputes its 48 tokens, of which the first 32 are still cached, and c prefills. b's 49th token
    preempts c in turn."""
    sim = scheduler(kv_cache_tokens=96, max_batch_tokens=64, max_num_seqs=4)
    a, b, c = (submit(sim, name, [base] * 40, 20) for name, base in (("a", 100), ("b", 200), ("c", 300)))
    steps = []
    while sim.busy:
        steps.append((step(sim), names(sim._running), names(sim._waiting)))
    assert steps[0][0].prefill_chunks == [(40, 40), (24, 24)] and steps[0][1:] == (["a", "b"], ["c"])
    assert sum(work.preemptions for work, _, _ in steps[:9]) == 0
    work, running, waiting = steps[9]
    assert (work.preemptions, work.decode_kv_tokens, running, waiting) == (1, 48, ["a"], ["b", "c"])
    work, running, _ = steps[20]  # a ended after its 20th token (step 19)
    # b: 40 prompt + 8 generated tokens, the first 32 from the cache; its 9th token comes out of this step
    assert work.prefill_chunks == [(16, 48), (40, 40)] and running == ["b", "c"] and names(work.sequences) == ["b", "c"]
    assert steps[21][0].preemptions == 1 and steps[21][2] == ["c"]
    assert steps[32][0].prefill_chunks == [(9, 41)]  # c: 40 + 1 tokens; its 2 full prompt blocks were still cached
    assert len(steps) == 51 and all(s.generated == 20 for s in (a, b, c))
    load = sim.load()
    assert load.preemptions == 2
    # a resumed request's lookup is not counted as a query (vLLM counts it apart): 3 prompts, no hits
    assert (load.prefix_cache_queries, load.prefix_cache_hits) == (120, 0)


def test_admission_needs_the_whole_sequence_and_the_last_admitted_may_preempt_itself():
    """7 blocks, 96 tokens a step. a and b prefill 40 tokens each (3 blocks each); the 16 tokens and 1 block
    left would hold a first chunk of c, but c is admitted only once all 40 of its tokens fit. At their 49th
    token a takes the free block and b, the last admitted, finds none: it preempts itself. When a ends, b's
    48 tokens are all in the prefix cache (its own blocks, freed but not overwritten): it resumes with a
    1-token query, as a decode."""
    sim = scheduler(kv_cache_tokens=112, max_batch_tokens=96, max_num_seqs=4)
    a, b, c = (submit(sim, name, [base] * 40, 20) for name, base in (("a", 100), ("b", 200), ("c", 300)))
    steps = []
    while sim.busy:
        steps.append((step(sim), names(sim._running), names(sim._waiting)))
    first, running, waiting = steps[0]
    assert first.prefill_chunks == [(40, 40), (40, 40)] and (running, waiting) == (["a", "b"], ["c"])
    work, running, waiting = steps[9]
    assert (work.preemptions, names(work.sequences), running, waiting) == (1, ["a"], ["a"], ["b", "c"])
    work, running, _ = steps[20]
    assert (work.decode_tokens, work.decode_kv_tokens, work.prefill_chunks) == (1, 48, [(40, 40)])
    assert running == ["b", "c"] and names(work.sequences) == ["b", "c"]
    assert steps[29][0].preemptions == 1 and steps[29][2] == ["c"]  # c, last admitted, preempts itself too
    assert sim.preemptions == 2 and all(s.generated == 20 for s in (a, b, c))


def run_alone(sim, prompt, max_tokens=1):
    """Run one request to its end; the prompt tokens it found in the prefix cache."""
    hits = sim.prefix_cache_hits
    submit(sim, str(prompt[:3]), prompt, max_tokens)
    while sim.busy:
        step(sim)
    sim.plan_step()  # frees the ended request's blocks, as the next step does
    return sim.prefix_cache_hits - hits


def test_prefix_cache_blocks_hit_only_after_the_same_prefix():
    sim = scheduler()
    a = list(range(1000, 1040))
    assert run_alone(sim, a) == 0
    assert run_alone(sim, a[:32] + [999] * 8) == 32
    assert run_alone(sim, [999] * 16 + a[16:]) == 0  # same block after a different prefix
    assert run_alone(sim, a) == 32  # two full blocks; the partial third is never cached
    assert run_alone(sim, a[:32]) == 16  # the last prompt token is always computed: its block is recomputed


def test_the_prefix_cache_is_the_kv_pool_shared_by_reference_and_evicted_least_recently_freed():
    """8 blocks. a's and b's prompts (2 full blocks + 8 tokens each) run and end: their full blocks stay
    cached; their partial last blocks, which no prefix can hit, go to the front of the free queue, and each
    request's blocks are freed tail first. d's 80-token prompt takes 5 blocks: b's partial one, the 3 never
    used, and a's second (a's were freed before b's, a's tail before its head). So a's prompt still finds
    its first block cached, and b's both."""
    sim = scheduler(kv_cache_tokens=128, max_batch_tokens=256)
    a, b = list(range(1000, 1040)), list(range(2000, 2040))
    run_alone(sim, a)
    run_alone(sim, b)
    assert sim.kv_cache.usage == 0  # cached blocks are free blocks
    run_alone(sim, list(range(3000, 3080)))

    def cached(prompt):
        return len(sim.kv_cache.cached_prefix(SimSequence(GenerationRequest("?", prompt, 1, 0.0)))) * 16

    assert (cached(a), cached(b)) == (16, 32)
    # two requests with one prompt at once: the second shares the first's 2 full blocks (cached when allocated)
    sim = scheduler(kv_cache_tokens=128, max_batch_tokens=256)
    first, second = submit(sim, "1", a, 2), submit(sim, "2", a, 2)
    sim.plan_step()
    assert first.blocks[:2] == second.blocks[:2] and sim.kv_cache.pool.free_blocks == 8 - 4
    assert sim.prefix_cache_hits == 32


def test_a_request_larger_than_the_whole_cache_is_refused():
    sim = scheduler(kv_cache_tokens=64)  # 4 blocks
    with pytest.raises(ValueError, match="exceed the whole KV cache"):
        submit(sim, "too long", [100] * 60, 6)  # 65 tokens of KV
    whole = submit(sim, "whole cache", [100] * 60, 5)  # the last token's KV is never computed: 64 tokens
    while sim.busy:
        step(sim)
    assert whole.generated == 5 and sim.preemptions == 0


def test_the_sim_servers_metrics_count_preemptions(tmp_path):
    """Four requests at once on a 12-block cache: decodes outgrow it, and /metrics says how often the engine
    preempted, as vLLM's vllm:num_preemptions does."""
    from aiohttp.test_utils import TestClient, TestServer
    from prometheus_client.parser import text_string_to_metric_families
    from transformers import PreTrainedTokenizerFast

    from tokenrig.serve.api import OpenAIServer
    from tokenrig.serve.checkpoint import tokenizer_dir

    model = resolve_model("tiny")
    sim = engine(model="tiny", gpu="cpu", step_overhead_s=0.0005, kv_cache_tokens=12 * 16)
    server = OpenAIServer(sim, PreTrainedTokenizerFast.from_pretrained(tokenizer_dir(model)), "tiny", 2048)

    async def scenario():
        async with TestClient(TestServer(server.app())) as client:
            bodies = [{"prompt": [100 + i] * 30, "max_tokens": 40, "ignore_eos": True} for i in range(4)]
            replies = await asyncio.gather(*(client.post("/v1/completions", json=body) for body in bodies))
            assert [(await reply.json())["usage"]["completion_tokens"] for reply in replies] == [40] * 4
            return await (await client.get("/metrics")).text()

    page = asyncio.run(scenario())
    counted = [sample.value for family in text_string_to_metric_families(page) for sample in family.samples
               if sample.name == "vllm:num_preemptions_total"]
    assert counted == [sim.preemptions] and sim.preemptions > 0


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

"""The fit planner on known cases, with the arithmetic written out."""

import pytest

from tokenrig.profiles import resolve_gpu, resolve_model
from tokenrig.serve.fit import (
    FitError,
    UnknownQuantError,
    evaluate,
    kv_bytes_per_token_per_gpu,
    linear_bytes,
    load_in_flight,
    plan_fit,
    tp_is_valid,
    weight_bytes,
)


def test_weight_bytes_per_quantization_of_llama2_7b():
    model = resolve_model("7b")
    assert weight_bytes(model, "bf16") == 13_476_831_232  # 6,738,415,616 parameters x 2 bytes
    # one 4096 x 4096 linear at 4 bits, group 128 (32 groups): codes 4096 x 4096 / 2 = 8,388,608 B (int32-packed);
    # zeros 32 x 4096 / 8 x 4 = 65,536 B (int32-packed); fp16 scales 32 x 4096 x 2 = 262,144 B; GPTQ's int32
    # g_idx 4096 x 4 = 16,384 B: 8,732,672 B, and AWQ without g_idx 8,716,288 B
    assert linear_bytes("gptq", 4096, 4096) == 8_732_672
    assert linear_bytes("awq", 4096, 4096) == 8_716_288
    assert linear_bytes("int8", 4096, 4096) == 16_785_408  # 4096 x 4096 one-byte codes + 4096 fp16 scales
    # 4-bit is ~0.52 bytes per quantized weight; embeddings and lm_head stay 16-bit (0.26 GB)
    assert weight_bytes(model, "gptq") / 1e9 == pytest.approx(3.89, abs=0.01)
    assert weight_bytes(model, "int8") / 1e9 == pytest.approx(7.00, abs=0.01)


def test_7b_bf16_fits_one_80gb_card():
    plan = plan_fit(resolve_model("7b"), resolve_gpu("h100-sxm"), "bf16", concurrency=16, context_tokens=4096)
    assert plan.tp == 1
    # 13.5 GB of weights; KV is 2 (K,V) x 32 layers x 32 heads x 128 x 2 bytes = 0.5 MiB per token
    assert plan.kv_bytes_per_token == 524_288
    assert plan.kv_needed_bytes == 2_147_483_648  # one full-context sequence: 4096 x 524,288 B = 2.15 GB
    # the card's 81,559 MiB (85.5 GB) x 0.9 = 77.0 GB usable - 13.5 weights - 2 runtime - ~0.4 activations
    # = ~61 GB of KV: ~117k tokens
    assert plan.kv_budget_bytes / 1e9 == pytest.approx(61.1, abs=0.1)
    assert plan.full_context_sequences() == 28


def test_a_paged_kv_cache_never_shards_a_model_that_fits_one_card():
    """256 users at the full 4096-token context would need 550 GB of KV: the engine pages and queues them,
    so the planner keeps TP 1 and says so instead of refusing or sharding a 13.5-GB model over 8 GPUs."""
    plan = plan_fit(resolve_model("7b"), resolve_gpu("h100-sxm"), "bf16", concurrency=256, context_tokens=4096)
    assert plan.tp == 1 and plan.fits
    line = plan.describe_load(256, 4096, "256 users")
    assert "256 requests in flight (256 users) x ~4096 tokens each = 1048576 tokens" in line
    assert "the engine will queue or preempt" in line


def test_70b_bf16_needs_two_80gb_cards_and_keeps_little_kv_there():
    model, gpu = resolve_model("70b"), resolve_gpu("a800")
    assert weight_bytes(model, "bf16") / 1e9 == pytest.approx(137.95, abs=0.01)  # > 80 GB: TP 1 is impossible
    assert not evaluate(model, gpu, "bf16", 1, 16, 4096).fits
    # at TP 2 each GPU holds 69 GB of weights + 2 GB runtime + 1.2 activations of the 77.3 GB usable of its
    # 81,920 MiB: 5.1 GB of KV, 31k tokens at 160 KiB (4 KV heads per GPU), 7 full-context sequences
    two = evaluate(model, gpu, "bf16", 2, 16, 4096)
    assert two.weight_bytes / 1e9 == pytest.approx(69.0, abs=0.1) and two.fits
    assert two.kv_budget_bytes / 1e9 == pytest.approx(5.09, abs=0.01) and two.full_context_sequences() == 7
    plan = plan_fit(model, gpu, "bf16", concurrency=16, context_tokens=4096)
    assert plan.tp == 2


def test_70b_on_24gb_cards_takes_tp8_in_bf16_and_tp2_in_4bit():
    model, gpu = resolve_model("70b"), resolve_gpu("rtx4090")
    # bf16: at TP 8 each card holds 138/8 = 17.2 GB of weights; 23.2 usable (0.9 of 24,564 MiB) - 17.2 - 2 runtime
    # - 0.7 activations leaves 3.2 GB: 79k tokens at 40 KiB each (GQA: 1 KV head per GPU), 19 full-context sequences
    plan = plan_fit(model, gpu, "bf16", concurrency=16, context_tokens=4096)
    assert plan.tp == 8 and plan.full_context_sequences() == 19
    assert plan.kv_bytes_per_token == 40_960  # 2 (K,V) x 80 layers x 1 KV head x 128 x 2 bytes
    with pytest.raises(FitError) as refused:
        plan_fit(model, gpu, "bf16", concurrency=16, context_tokens=4096, tp=4)
    message = str(refused.value)
    assert "does not fit on 4 x rtx4090" in message and "one sequence of 4096 tokens" in message
    assert "--quant gptq --tp 2 --gpu rtx4090" in message and "--quant awq --tp 2 --gpu rtx4090" in message
    assert "--quant bf16 --tp 2 --gpu h200" in message
    assert "--max-model-len (loadtest, serve) or --context (fit)" in message
    # 4-bit: 36.6 GB of weights; TP 2 puts 18.3 GB on each card and leaves 1.6 GB of KV, ~9.9k tokens at
    # 160 KiB (2 x 80 x 4 heads x 128 x 2): two full-context sequences, which a paged engine can serve 16 users from
    two = evaluate(model, gpu, "gptq", 2, 16, 4096)
    assert two.fits and two.full_context_sequences() == 2
    plan = plan_fit(model, gpu, "gptq", concurrency=16, context_tokens=4096)
    assert plan.tp == 2
    assert plan.kv_bytes_per_token == kv_bytes_per_token_per_gpu(model, 2) == 163_840


def test_tp_must_split_heads_and_whole_quantization_groups():
    assert tp_is_valid(resolve_model("7b"), "bf16", 3) is not None
    assert tp_is_valid(resolve_model("70b"), "gptq", 8) is None  # 28672 / 8 = 3584 = 28 groups
    with pytest.raises(FitError, match="TP 3 is not possible"):
        plan_fit(resolve_model("7b"), resolve_gpu("h100-sxm"), tp=3)
    with pytest.raises(UnknownQuantError, match="unknown quantization"):  # bad input, not "does not fit"
        plan_fit(resolve_model("7b"), resolve_gpu("h100-sxm"), quant="nf5")


def test_cli_fit_prints_the_plan_and_what_would_fit():
    from tests.conftest import run_cli

    ok = run_cli("fit", "--gpu", "h100-sxm", "--model", "13b", "--concurrency", "8")
    assert ok.returncode == 0 and "--tensor-parallel-size 1" in ok.stdout, ok.stderr
    refused = run_cli("fit", "--gpu", "rtx3090", "--model", "70b", "--tp", "4")
    # a valid question whose answer is no: exit 3, not argparse's usage-error 2
    assert refused.returncode == 3 and "what would fit" in refused.stderr
    # what it suggests, it accepts
    shorter = run_cli("fit", "--gpu", "rtx3090", "--model", "70b", "--quant", "gptq", "--tp", "4", "--context", "2048")
    assert shorter.returncode == 0 and "--max-model-len 2048" in shorter.stdout, shorter.stderr


@pytest.mark.parametrize("load, tp, expected", [
    # the refusals: 7B on an H100 at 5 req/s, and 64 users picking TP 4
    (("--rate", "5"), 1, "at least: Little's law at 5 req/s x E2E >= 0.71 s on the bandwidth roofline"),
    (("--users", "64"), 1, "64 requests in flight (64 users) x ~1155 tokens each = 73905 tokens, the KV cache holds"),
])
def test_loadtest_plans_a_vllm_server_for_the_load_it_will_carry(load, tp, expected):
    from tests.conftest import run_cli

    result = run_cli("loadtest", "--backend", "vllm", "--gpu", "h100-sxm", "--model", "7b", *load, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"--tensor-parallel-size {tp} " in result.stdout
    assert expected in result.stdout, result.stdout


def test_the_load_line_uses_the_scenarios_weighted_mean_lengths():
    from tokenrig.loadgen.scenario import parse_scenario

    scenario = parse_scenario("""name: two
requests:
  - {name: short, weight: 3, input_tokens: {dist: fixed, value: 100}, output_tokens: {dist: fixed, value: 50}}
  - {name: long, weight: 1, input_tokens: {dist: fixed, value: 500}, output_tokens: {dist: fixed, value: 10}}
load: {type: poisson, rate: 2, duration_s: 10}
""")
    # (3 x 100 + 500) / 4 = 200 input and (3 x 50 + 10) / 4 = 40 output tokens
    assert (scenario.mean_tokens("input_tokens"), scenario.mean_tokens("output_tokens")) == pytest.approx((200, 40))
    # 7B bf16 on an H100: 13,476,831,232 B read per decode step at 3,350 GB/s is 4.023 ms; 40 output tokens take
    # >= 0.1609 s, so 2 req/s keep >= 2 x 0.1609 = 0.3218 requests in flight (Little's law)
    plan = plan_fit(resolve_model("7b"), resolve_gpu("h100-sxm"), context_tokens=4096)
    in_flight, basis = load_in_flight(plan, resolve_gpu("h100-sxm"), None, 2.0, 40.0)
    assert in_flight == pytest.approx(0.3218, rel=1e-3)
    assert basis == "at least: Little's law at 2 req/s x E2E >= 0.16 s on the bandwidth roofline"
    assert load_in_flight(plan, resolve_gpu("h100-sxm"), 64, None, None) == (64, "64 users")

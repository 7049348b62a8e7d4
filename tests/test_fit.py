"""The fit planner on known cases, with the arithmetic written out."""

import pytest

from tokenrig.profiles import resolve_gpu, resolve_model
from tokenrig.serve.fit import (FitError, evaluate, kv_bytes_per_token_per_gpu, linear_bytes, plan_fit, tp_is_valid,
                                weight_bytes)


def test_weight_bytes_per_quantization_of_llama2_7b():
    model = resolve_model("7b")
    assert weight_bytes(model, "bf16") == 2 * model.num_params
    # one 4096 x 4096 linear at 4 bits, group 128: int32-packed codes, int32-packed zeros, fp16 scales, GPTQ g_idx
    groups = 4096 // 128
    assert linear_bytes("gptq", 4096, 4096) == 4096 * 4096 // 2 + groups * 4096 // 8 * 4 + groups * 4096 * 2 + 4 * 4096
    assert linear_bytes("awq", 4096, 4096) == linear_bytes("gptq", 4096, 4096) - 4 * 4096
    assert linear_bytes("int8", 4096, 4096) == 4096 * 4096 + 2 * 4096
    # 4-bit is ~0.52 bytes per quantized weight; embeddings and lm_head stay 16-bit (0.26 GB)
    assert weight_bytes(model, "gptq") / 1e9 == pytest.approx(3.89, abs=0.01)
    assert weight_bytes(model, "int8") / 1e9 == pytest.approx(7.00, abs=0.01)


def test_7b_bf16_fits_one_80gb_card():
    plan = plan_fit(resolve_model("7b"), resolve_gpu("h100-sxm"), "bf16", concurrency=16, context_tokens=4096)
    assert plan.tp == 1
    # 13.5 GB of weights; KV is 2 (K,V) x 32 layers x 32 heads x 128 x 2 bytes = 0.5 MiB per token
    assert plan.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 == 524288
    assert plan.kv_needed_bytes == 16 * 4096 * 524288  # 34.4 GB
    assert plan.kv_budget_bytes > plan.kv_needed_bytes


def test_70b_bf16_needs_more_than_one_80gb_card():
    model, gpu = resolve_model("70b"), resolve_gpu("a800")
    assert weight_bytes(model, "bf16") / 1e9 == pytest.approx(137.95, abs=0.01)  # > 80 GB: TP 1 is impossible
    assert not evaluate(model, gpu, "bf16", 1, 16, 4096).fits
    # at TP 2 each GPU holds 69 GB of weights + 2 GB runtime of its 72 GB usable: no room for the KV cache
    two = evaluate(model, gpu, "bf16", 2, 16, 4096)
    assert two.weight_bytes / 1e9 == pytest.approx(69.0, abs=0.1) and not two.fits
    plan = plan_fit(model, gpu, "bf16", concurrency=16, context_tokens=4096)
    assert plan.tp >= 2 and plan.tp == 4


def test_70b_on_24gb_cards_needs_4bit_and_tp4():
    model, gpu = resolve_model("70b"), resolve_gpu("rtx4090")
    # bf16: even at TP 8 each card holds 138/8 = 17.2 GB of weights; 21.6 usable - 17.2 - 2 runtime - 0.7 activations
    # leaves 1.6 GB, but 16 x 4096 tokens x 40 KiB per token (GQA: 1 KV head per GPU) need 2.7 GB
    with pytest.raises(FitError) as refused:
        plan_fit(model, gpu, "bf16", concurrency=16, context_tokens=4096)
    message = str(refused.value)
    assert "does not fit on up to 8 x rtx4090" in message
    assert "--quant gptq --tp 4 --gpu rtx4090" in message and "--quant awq --tp 4 --gpu rtx4090" in message
    assert "--quant bf16 --tp 2 --gpu h200" in message
    # 4-bit: 36.6 GB of weights; TP 2 leaves ~0 for KV (18.3 GB weights per card), TP 4 leaves 9.5 GB
    assert not evaluate(model, gpu, "gptq", 2, 16, 4096).fits
    plan = plan_fit(model, gpu, "gptq", concurrency=16, context_tokens=4096)
    assert plan.tp == 4
    assert plan.kv_bytes_per_token == kv_bytes_per_token_per_gpu(model, 4) == 2 * 80 * 2 * 128 * 2


def test_tp_must_split_heads_and_whole_quantization_groups():
    assert tp_is_valid(resolve_model("7b"), "bf16", 3) is not None
    assert tp_is_valid(resolve_model("70b"), "gptq", 8) is None  # 28672 / 8 = 3584 = 28 groups
    with pytest.raises(FitError, match="TP 3 is not possible"):
        plan_fit(resolve_model("7b"), resolve_gpu("h100-sxm"), tp=3)
    with pytest.raises(FitError, match="unknown quantization"):
        plan_fit(resolve_model("7b"), resolve_gpu("h100-sxm"), quant="nf5")


def test_cli_fit_prints_the_plan_and_what_would_fit():
    from tests.conftest import run_cli

    ok = run_cli("fit", "--gpu", "h100-sxm", "--model", "13b", "--concurrency", "8")
    assert ok.returncode == 0 and "--tensor-parallel-size 1" in ok.stdout, ok.stderr
    refused = run_cli("fit", "--gpu", "rtx3090", "--model", "70b")
    assert refused.returncode == 2 and "what would fit" in refused.stderr

"""FLOPs, MFU and settings checks against hand computations (no training run)."""

from __future__ import annotations

import pytest

from tokenrig.profiles import resolve_model
from tokenrig.train.dsconfig import deepspeed_config
from tokenrig.train.flops import lora_params, training_flops, utilisation
from tokenrig.train.spec import TrainSpecError, make_spec

# Llama-2 7B by hand: h=4096, i=11008, L=32, v=32000, 32 heads of 128
H, FFN, L, V = 4096, 11008, 32, 32000
N_7B = L * (4 * H * H + 3 * H * FFN) + V * H  # every matmul weight, LM head included: 6,607,077,376


def test_matmul_parameters_of_llama2_7b():
    assert resolve_model("7b").num_matmul_params == N_7B == 6_607_077_376


def test_pretrain_flops_per_token_is_6n_plus_causal_attention():
    s = 2048
    flops = training_flops(resolve_model("7b"), s, "pretrain", recompute=False)
    assert flops.model_per_token == 6 * N_7B + 6 * L * s * H == 41_253_076_992
    assert flops.hardware_per_token == flops.model_per_token


def test_recompute_adds_one_decoder_forward_to_hardware_flops_only():
    s = 2048
    flops = training_flops(resolve_model("7b"), s, "pretrain", recompute=True)
    assert flops.model_per_token == 41_253_076_992
    assert flops.hardware_per_token - flops.model_per_token == 2 * (N_7B - V * H) + 2 * L * s * H


def test_lora_counts_forward_activation_gradients_and_adapters():
    s, r = 1024, 16
    adapters = L * 4 * r * (H + H)  # A and B on q, k, v, o (all 4096 -> 4096)
    assert lora_params(resolve_model("7b"), r) == adapters == 16_777_216
    flops = training_flops(resolve_model("7b"), s, "lora", recompute=False, lora_rank=r)
    assert flops.model_per_token == 4 * N_7B + 6 * L * s * H + 6 * adapters == 27_334_279_168
    assert training_flops(resolve_model("7b"), s, "qlora", recompute=False).model_per_token == flops.model_per_token


def test_mfu_against_a_hand_computation():
    # 5,000 tokens/s per GPU of 7B pre-training at s=2048 on an H100 SXM (989 dense BF16 TFLOP/s)
    achieved, mfu = utilisation(41_253_076_992, 5000, 989)
    assert achieved == pytest.approx(206.265, abs=1e-3)
    assert mfu == pytest.approx(206.265384960 / 989, rel=1e-9)
    assert mfu == pytest.approx(0.20856, abs=1e-5)


def test_reference_lora_run_reads_37_percent_by_6n():
    # the reference: 9,100 tok/s of 7B LoRA on one H200 = 37% MFU by 6N (N = all 6.74B parameters)
    flops = training_flops(resolve_model("7b"), 1024, "lora", recompute=True)
    _, mfu_6n = utilisation(flops.nominal_6n_per_token, 9100, 989)
    assert mfu_6n == pytest.approx(0.372, abs=0.001)


@pytest.mark.parametrize("fields, message", [
    ({"zero": 2, "offload": "params"}, "needs ZeRO stage 3"),
    ({"zero": 0, "offload": "optimizer"}, "needs ZeRO stage 1, 2 or 3"),
    ({"mode": "qlora"}, "needs a CUDA GPU"),
    ({"gpu": "h100-sxm", "mode": "qlora", "zero": 3}, "4-bit weights cannot be partitioned"),
    ({"gpu": "h200-typo"}, "unknown GPU"),
    ({"seq_len": 100_000}, "exceeds tiny's context"),
    ({"micro_batch": 0}, "micro_batch"),
    ({"nodes": 2}, "hostfile"),
])
def test_bad_settings_name_the_field_and_the_fix(fields, message):
    with pytest.raises(TrainSpecError, match=message):
        make_spec(**fields)


def test_deepspeed_config_follows_the_spec():
    spec = make_spec(gpu="h200", model="7b", zero=3, offload="params", micro_batch=4, seq_len=2048, grad_accum=8,
                     gpus=2)
    config = deepspeed_config(spec)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 8
    assert config["bf16"] == {"enabled": True}
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    assert config["optimizer"]["type"] == "AdamW"  # ZeRO-Offload's CPU Adam
    assert "optimizer" not in deepspeed_config(make_spec(zero=2))  # client torch AdamW otherwise
    assert spec.tokens_per_step == 4 * 2048 * 8 * 2

"""FLOPs per trained token, and the utilisation figures built on them (MFU, HFU).

One formula per training mode, from the model profile's exact shapes (docs/metrics.md states
them): model FLOPs count the arithmetic the training step needs, hardware FLOPs add what
activation recomputation repeats. Utilisation is achieved FLOP/s over the GPU profile's dense
BF16 peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenrig.profiles import ModelProfile

LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def projection_shapes(model: ModelProfile) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one Llama decoder layer."""
    h, i = model.hidden_size, model.config["intermediate_size"]
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def lora_params(model: ModelProfile, rank: int, targets: tuple[str, ...] = LORA_DEFAULT_TARGETS) -> int:
    """Trainable adapter parameters: A (r x in) and B (out x r) on each targeted projection of every layer."""
    shapes = projection_shapes(model)
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {', '.join(shapes)}")
    return model.num_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per trained token: what the mode needs (model) and what the hardware runs (hardware)."""

    model_per_token: float
    hardware_per_token: float
    nominal_6n_per_token: float  # 6 x all parameters: the figure most public MFU numbers quote


def training_flops(model: ModelProfile, seq_len: int, mode: str, recompute: bool, lora_rank: int = 16,
                   lora_targets: tuple[str, ...] = LORA_DEFAULT_TARGETS) -> StepFlops:
    """FLOPs per token of one training step at sequence length `seq_len`.

    N = matmul parameters (every weight used in a matmul, LM head included, input embedding and
    norm gains excluded); attention core (QK^T and PV) under a causal mask costs 2*L*s*h per
    token forward, where h = query heads x head dim. Backward costs twice the forward.
      pretrain:   6N + 6Lsh
      lora/qlora: 2N forward + 2N activation gradients (frozen weights get no weight gradient)
                  + 6Lsh attention + 6 x adapter parameters  = 4N + 6Lsh + 6A
    Recomputation (hardware FLOPs only) reruns each decoder layer's forward: + 2N_layers + 2Lsh
    (+ 2A with adapters), N_layers = N minus the LM head.
    """
    n = model.num_matmul_params
    attention_forward = 2 * model.num_layers * seq_len * model.num_heads * model.head_dim
    adapters = lora_params(model, lora_rank, lora_targets) if mode in ("lora", "qlora") else 0
    if mode == "pretrain":
        model_flops = 6 * n + 3 * attention_forward
    elif mode in ("lora", "qlora"):
        model_flops = 4 * n + 3 * attention_forward + 6 * adapters
    else:
        raise ValueError(f"unknown training mode {mode!r}; use pretrain, lora or qlora")
    recomputed = 0.0
    if recompute:
        decoder_matmul_params = n - model.vocab_size * model.hidden_size
        recomputed = 2 * decoder_matmul_params + attention_forward + 2 * adapters
    return StepFlops(model_per_token=float(model_flops), hardware_per_token=float(model_flops + recomputed),
                     nominal_6n_per_token=6.0 * model.num_params)


def utilisation(flops_per_token: float, tokens_per_s_per_gpu: float, peak_tflops: float) -> tuple[float, float]:
    """(achieved TFLOP/s per GPU, fraction of peak)."""
    achieved = flops_per_token * tokens_per_s_per_gpu / 1e12
    return achieved, achieved / peak_tflops

"""Operator classes of a step's kernels: what each piece of device time was for.

Kernel names say what a kernel does (an attention kernel, an RMSNorm, an all-reduce, a copy) but not which
weight a GEMM multiplies: cuBLAS, CUTLASS and Marlin kernels are named by tile shape. A decoder layer runs
its GEMMs in a fixed order around its attention, so a GEMM's role is its place in that order:

    QKV  ->  attention  ->  O  ->  gate/up  ->  down   (the next layer's QKV ...)  ... LM head

The GEMMs before the first attention are QKV: one where vLLM fuses Q, K and V, three where transformers
runs them apart; between two attentions come O, gate/up (fused: one, apart: two), down and the next
layer's QKV; GEMMs after the last layer's down are the LM head. A GEMM the order cannot place (more GEMMs
than a layer holds, or a step without attention) is 'role unknown'. Attention time is filed by the step's
kind: prefill, decode, or mixed (one kernel serves both in vLLM's FlashAttention path, so a mixed step's
attention is not split).

Names from torch.compile (`triton_poi_fused_...`, `triton_red_fused_...`) list the fused operations:
rsqrt marks a norm, silu/sigmoid/gelu an activation, cos/sin a rotary embedding.
"""

from __future__ import annotations

import re

from tokenrig.breakdown.trace import Kernel, ProfiledStep

GEMM_ROLES = ("gemm_qkv", "gemm_o", "gemm_gate_up", "gemm_down", "gemm_lm_head")
CLASSES = (*GEMM_ROLES, "gemm_other", "attention_prefill", "attention_decode", "attention_mixed", "kv_cache_write",
           "norm", "activation", "rotary", "embedding", "quantize", "sampling", "communication", "prepare", "copy",
           "other", "gpu_idle")
LABELS = {"gemm_qkv": "GEMM QKV", "gemm_o": "GEMM O", "gemm_gate_up": "GEMM MLP gate/up", "gemm_down": "GEMM MLP down",
          "gemm_lm_head": "GEMM LM head", "gemm_other": "GEMM (role unknown)",
          "attention_prefill": "attention (prefill)", "attention_decode": "attention (decode)",
          "attention_mixed": "attention (mixed step)",
          "kv_cache_write": "KV cache write", "norm": "norms", "activation": "activation", "rotary": "rotary",
          "embedding": "embedding", "quantize": "activation quantization", "sampling": "sampling and logits",
          "prepare": "input preparation", "communication": "communication", "copy": "copies", "other": "other kernels",
          "gpu_idle": "GPU idle (host, scheduler)"}

# first match wins: attention before GEMM (FlashAttention 3's names contain 'cutlass' and 'gemm'), GEMM before
# quantization (FP8 GEMMs are named fp8), rotary before embedding (a compiled rotary gathers its cos/sin rows)
_BY_NAME = (
    ("communication", r"nccl|all_?reduce|cross_device_reduce|reduce_scatter|all_?gather|custom_ar"),
    ("kv_cache_write", r"reshape_and_cache|concat_and_cache|cache_kernel|index_copy|paged_kv_write"),
    ("attention", r"flash|fmha|attention|attn|sdpa|paged_|BatchDecode|BatchPrefill|_fwd_kernel|mha_"),
    ("gemm_reduce", r"splitKreduce|split_k_reduce"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|marlin|Marlin|cublas|matmul|scaled_mm|sm90_|wgmma|"
             r"aten::(?:linear|mm|addmm|matmul|bmm)$"),
    ("quantize", r"quant(?!ization)|fp8|per_token_group"),
    ("sampling", r"argmax|softmax|topk|top_k|top_p|sort|sampl|exponential|gumbel|multinomial|penalt|logit|"
                 r"_bias_kernel|_post_update|cumsum|max_kernel|reduce_kernel<.*(?:Max|ArgMax)"),
    ("norm", r"rms_?norm|layer_?norm|rsqrt|aten::(?:rms_norm|layer_norm)"),
    ("activation", r"silu|gelu|swiglu|act_and_mul|sigmoid|aten::(?:silu|gelu)"),
    ("rotary", r"rotary|rope|\bcos\b|_cos_|_sin_|cos_sin|^triton_\w*(?=\w*index_select)(?=\w*mul)(?=\w*cat)"),
    ("embedding", r"embedding|indexSelect|index_select"),
    ("prepare", r"prepare|gather_block_tables|slot_mapping|_apply_write|arange|pos_seq_lens|index_elementwise"),
    ("copy", r"memcpy|memset|Memcpy|Memset|copy|fill|cat_|CatArray|aten::(?:copy_|to|cat|clone|contiguous)$"),
)
_PATTERNS = tuple((name, re.compile(pattern, re.IGNORECASE)) for name, pattern in _BY_NAME)


def kind_of(kernel: Kernel) -> str:
    """The operator a kernel's name shows, before GEMM roles and attention phases are assigned."""
    if kernel.category in ("gpu_memcpy", "gpu_memset"):
        return "copy"
    for name, pattern in _PATTERNS:
        if pattern.search(kernel.name):
            return name
    return "other"


def classify_step(step: ProfiledStep) -> list[str]:
    """The operator class of each of the step's kernels, in order. A split-K reduction belongs to the GEMM it
    finishes: it takes that GEMM's role and is not a GEMM of the layer order."""
    kinds = [kind_of(kernel) for kernel in step.kernels]
    classes = [f"attention_{step.composition.kind}" if kind == "attention" else kind for kind in kinds]
    for indices, roles in zip(_gemm_segments(kinds), _segment_roles(kinds)):
        for index, role in zip(indices, roles):
            classes[index] = role
    last_gemm = "gemm_other"
    for index, name in enumerate(classes):
        if name.startswith("gemm_") and name != "gemm_reduce":
            last_gemm = name
        elif name == "gemm_reduce":
            classes[index] = last_gemm
    return ["gemm_other" if name == "gemm" else name for name in classes]


def _gemm_segments(kinds: list[str]) -> list[list[int]]:
    """The step's GEMMs, cut at each layer's attention (attention kernels with no GEMM between them, such as
    a split-KV combine, are one layer's)."""
    segments: list[list[int]] = [[]]
    for index, kind in enumerate(kinds):
        if kind == "gemm":
            segments[-1].append(index)
        elif kind == "attention" and segments[-1]:
            segments.append([])
    return segments if len(segments) > 1 else []


def _segment_roles(kinds: list[str]) -> list[list[str]]:
    """Roles of the GEMMs of each segment. The first segment is layer 0's QKV (1 GEMM fused, 3 apart); a
    segment between two attentions is O, gate/up (1 or 2), down, then the next layer's QKV; the last is O,
    gate/up, down, then the LM head."""
    lengths = [len(segment) for segment in _gemm_segments(kinds)]
    if not lengths:
        return []
    qkv = lengths[0]
    middle = lengths[1:-1]
    gate_up = (middle[0] - 2 - qkv) if middle else max(lengths[-1] - 3, 1)
    gate_up = max(gate_up, 1)
    roles = [["gemm_qkv"] * qkv]
    layer = ["gemm_o", *["gemm_gate_up"] * gate_up, "gemm_down"]
    for length in middle:
        roles.append((layer + ["gemm_qkv"] * qkv)[:length] + ["gemm_other"] * max(length - len(layer) - qkv, 0))
    roles.append((layer + ["gemm_lm_head"] * max(lengths[-1] - len(layer), 0))[:lengths[-1]])
    return roles

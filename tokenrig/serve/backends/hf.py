"""The hf backend: tokenrig's server over transformers' continuous batching, on CPU or one GPU.

Attention is transformers' `attn_implementation` (eager, sdpa = PyTorch's fused kernels incl. its
FlashAttention, flash_attention_2 when flash-attn is installed). GPTQ/AWQ checkpoints load through
transformers' quantizers (gptqmodel). Its own options (`HfOptions`: torch.compile, CUDA graphs over
the engine's statically allocated paged cache, KV padding, the GPTQ/AWQ kernel) go to the server as given.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenrig.serve.backends import vllm
from tokenrig.serve.backends.base import (
    Backend,
    BatchLimits,
    LaunchPlan,
    plan_for,
    resolve_attention,
    tokenrig_server_command,
)
from tokenrig.serve.checkpoint import checkpoint_dir, is_complete, make_checkpoint
from tokenrig.serve.fit import FitPlan
from tokenrig.serve.spec import HfOptions, LaunchError, ServerSpec

ATTENTION = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "flash_attention_2",
             "flash": "flash_attention_2", "noflash": "eager"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "gptq": "float16", "awq": "float16"}
CPU_MAX_NUM_SEQS = 64  # on CPU there is no fit plan: room for this many full-context requests
# eager materialises a step's attention scores over the whole packed batch: heads x step tokens x every
# request's KV, as bf16 scores, bf16 after the mask, fp32 softmax and bf16 again (10 bytes a score).
# They must fit in part of the memory the plan leaves unallocated. Seen on an H200 (7B, 32 streams):
# 8192-token steps hung the engine at 137.0k MiB; 2048-token steps peaked at 139.9k MiB and the 298-token
# steps this sizing gives at 142.1k MiB (1-s nvidia-smi samples of 143.8k), both completing; the rest was
# the caching allocator (122.1k MiB with expandable segments, see allocator_env).
EAGER_SCORE_BYTES = 2 + 2 + 4 + 2
EAGER_HEADROOM_SHARE = 0.5
EAGER_MIN_STEP_TOKENS = 128
# transformers' paged cache (5.17-5.25) checks, before its first step, that the cache plus what scales with
# it fits its share of free memory: per cache token one layer's K and V read back at the attention peak, and
# attention masks of step tokens x (cache + step tokens), double-buffered (2 bytes an entry in bf16/fp16).
# Planned as plain KV they overflowed it on an H100 (7B: "Memory footprint 65.4 GB is more than available
# memory 63.9 GB"), so the cache is shrunk until both fit in the plan's KV budget.
PAGED_MASK_BUFFERS = 2
PAGED_MASK_ENTRY_BYTES = 2


def _check(spec: ServerSpec) -> None:
    if spec.quant not in DTYPES:
        raise LaunchError(f"the hf backend serves {', '.join(DTYPES)}; for 8-bit use --backend tgi --quant int8 (EETQ)")
    if spec.tp not in (None, 1):
        raise LaunchError("the hf backend runs on one GPU (--tp 1); use --backend vllm or tgi for tensor parallelism")


def model_dir(spec: ServerSpec, progress=print, write: bool = True) -> Path:
    _check(spec)
    quant = spec.quant if spec.quant in ("gptq", "awq") else None
    path = checkpoint_dir(spec.model, quant=quant)
    if not write:
        return path
    if not is_complete(path):
        progress(f"writing synthetic {spec.model.key} {spec.quant} checkpoint to {path} (random weights)")
    return make_checkpoint(spec.model, dtype=DTYPES[spec.quant], quant=quant, progress=progress)


def allocator_env(device: str) -> dict[str, str]:
    """The engine process's PyTorch allocator setting: expandable segments on a GPU, unless the user set one.

    Continuous batching changes the step's shapes every step; PyTorch's default caching allocator kept
    blocks of each: eager at 32 streams on an H200 peaked at 142.1k MiB with it, 122.1k with expandable
    segments (same load, 0 failures either way; docs/results/serve-h200-hf.md).
    """
    if device == "cpu" or {"PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"} & os.environ.keys():
        return {}
    return {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}


def engine_limits(spec: ServerSpec, fit: FitPlan | None = None) -> tuple[FitPlan | None, int | None, int, int]:
    """(fit plan or None, max_num_seqs, KV-cache tokens, per-step tokens) that the hf engine runs with (`fit`:
    the spec's, planned already).

    One GPU: what one card holds, never a larger TP's share. On CPU, bounded: left to itself
    transformers sizes the cache and step from free memory, which on CPU is host RAM (14 GB for tiny).
    """
    fit = fit or (plan_for(spec, tp=1) if spec.device != "cpu" else None)
    max_num_seqs = spec.max_num_seqs or (fit.max_num_seqs if fit else None)
    kv_tokens = fit.kv_capacity_tokens if fit else (max_num_seqs or CPU_MAX_NUM_SEQS) * spec.model.max_context
    batch_tokens = fit.prefill_chunk_tokens if fit else spec.model.max_context
    if fit:
        kv_tokens = paged_cache_tokens(fit, batch_tokens, spec.model.num_layers)
    if fit and resolve_attention(spec, ATTENTION, "sdpa") == "eager":
        seqs = spec.max_num_seqs or fit.max_num_seqs
        kv_span = min(kv_tokens, seqs * fit.max_model_len)  # the most KV one step can read
        budget = EAGER_HEADROOM_SHARE * (1 - spec.gpu_memory_utilization) * spec.gpu.memory_bytes
        fits = int(budget / (spec.model.num_heads * (kv_span + batch_tokens) * EAGER_SCORE_BYTES))
        batch_tokens = max(EAGER_MIN_STEP_TOKENS, min(batch_tokens, fits))
    return fit, max_num_seqs, kv_tokens, batch_tokens


def paged_cache_tokens(fit: FitPlan, batch_tokens: int, num_layers: int) -> int:
    """The most cache tokens whose KV, per-token read-back and attention masks fit the plan's KV budget."""
    mask_per_cache_token = PAGED_MASK_BUFFERS * PAGED_MASK_ENTRY_BYTES * batch_tokens
    per_token = fit.kv_bytes_per_token * (1 + 1 / num_layers) + mask_per_cache_token
    return max(0, int((fit.kv_budget_bytes - mask_per_cache_token * batch_tokens) // per_token))


def launch_plan(spec: ServerSpec, model_dir: Path, port: int, fit: FitPlan | None = None) -> LaunchPlan:
    _check(spec)
    attention = resolve_attention(spec, ATTENTION, "sdpa")
    fit, max_num_seqs, kv_tokens, batch_tokens = engine_limits(spec, fit)
    command = tokenrig_server_command("hf", spec, model_dir, port) + [
        "--device", spec.device, "--dtype", DTYPES[spec.quant], "--attn-implementation", attention]
    if max_num_seqs:
        command += ["--max-num-seqs", str(max_num_seqs)]
    command += ["--kv-cache-tokens", str(kv_tokens), "--max-batch-tokens", str(batch_tokens)]
    context = fit.max_model_len if fit else spec.max_model_len
    if context:
        command += ["--max-model-len", str(context)]
    limits = BatchLimits.known(max_num_seqs=max_num_seqs, max_batch_tokens=batch_tokens, kv_cache_tokens=kv_tokens)
    return LaunchPlan(command + spec.options_as(HfOptions).to_args() + spec.extra_args,
                      env=allocator_env(spec.device), fit=fit, batch_limits=limits)


def profile_args(trace_dir: Path, steps: int) -> list[str]:
    """tokenrig's server runs torch.profiler on the hf engine's thread (serve/engines/step_profiler.py)."""
    return ["--profile-dir", str(trace_dir.resolve()), "--profile-steps", str(steps)]


BACKEND = Backend(
    name="hf", summary="transformers", options=HfOptions, model_dir=model_dir, launch_plan=launch_plan,
    metrics=vllm.METRICS,  # tokenrig's server exports vLLM's names
    max_seqs_flags=("--max-num-seqs",), max_batch_tokens_flags=("--max-batch-tokens",), package="transformers",
    profile_args=profile_args,
    setup="Installed with tokenrig; flash_attention_2 needs `pip install flash-attn`, GPTQ/AWQ need "
          "`pip install optimum gptqmodel`")

"""Fit planner: does a model fit on N GPUs of a type, with a KV cache for the load it must carry?

From the model and GPU profiles alone it counts weight bytes per GPU for each quantization
(the exact tensors tokenrig's checkpoints hold: packed int32 4-bit weights, fp16 scales, zeros
and GPTQ's g_idx at group size 128), KV-cache bytes per token, activation and runtime headroom,
and picks the smallest tensor-parallel size whose KV cache holds one full-context sequence: every
engine tokenrig launches (vLLM, TGI, transformers' continuous batching) pages its KV cache and queues
or preempts what does not fit, so a load's concurrency is reported against the cache, never a reason
to refuse a model or to shard one that fits a card. Every backend takes its TP size, max model length
and batch limits from here; when nothing fits, the error names the configurations that would.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenrig import exit_status
from tokenrig.errors import UserError
from tokenrig.profiles import GpuProfile, ModelProfile, gpu_profiles

GROUP_SIZE = 128  # quantization group along the input dimension (GPTQ/AWQ default)
QUANTS = ("bf16", "fp16", "int8", "fp8", "gptq", "awq")
QUANT_ALIASES = {"none": "bf16", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                 "gptq-4bit": "gptq", "awq-4bit": "awq", "int8": "int8", "w8": "int8", "float8": "fp8"}
TP_SIZES = (1, 2, 4, 8)
MAX_GPUS = 8
# CUDA context, cuBLAS/NCCL workspaces and CUDA-graph pools: what an engine holds besides weights,
# KV cache and activations. ~1.5-2.5 GiB on vLLM/TGI on 80 GB cards; 2 GB per GPU is the planner's figure.
RUNTIME_RESERVE_BYTES = 2.0e9
DEFAULT_GPU_MEMORY_UTILIZATION = 0.90  # vLLM's default; the rest is left to the driver and fragmentation
DEFAULT_PREFILL_CHUNK_TOKENS = 8192  # tokens one engine step prefills (vLLM max_num_batched_tokens)
ACTIVATION_BYTES = 2  # bf16/fp16 activations
LOGIT_BYTES = 4  # samplers upcast logits to fp32


class FitError(UserError, ValueError):
    """The model does not fit; the message says what would. A valid question whose answer is no."""

    exit_code = exit_status.DOES_NOT_FIT
    label = "does not fit"


class UnknownQuantError(UserError, ValueError):
    """A weight format tokenrig does not know: bad input, not a model that does not fit."""


def normalise_quant(quant: str) -> str:
    key = quant.strip().lower()
    key = QUANT_ALIASES.get(key, key)
    if key not in QUANTS:
        raise UnknownQuantError(f"unknown quantization {quant!r}; known: {', '.join(QUANTS)} "
                       "(gptq and awq are 4-bit, group size 128)")
    return key


def linear_shapes(model: ModelProfile) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every decoder-layer linear, Llama architecture."""
    h, i = model.hidden_size, model.config["intermediate_size"]
    q_dim, kv_dim = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    layer = [("self_attn.q_proj", h, q_dim), ("self_attn.k_proj", h, kv_dim), ("self_attn.v_proj", h, kv_dim),
             ("self_attn.o_proj", q_dim, h), ("mlp.gate_proj", h, i), ("mlp.up_proj", h, i),
             ("mlp.down_proj", i, h)]
    return [(f"model.layers.{n}.{name}", fan_in, fan_out) for n in range(model.num_layers)
            for name, fan_in, fan_out in layer]


def linear_bytes(quant: str, fan_in: int, fan_out: int) -> int:
    """Bytes of one linear layer's stored tensors under `quant` (the layouts checkpoint.py writes)."""
    if quant in ("bf16", "fp16"):
        return 2 * fan_in * fan_out
    if quant == "int8":
        return fan_in * fan_out + 2 * fan_out  # int8 weight + one fp16 scale per output channel
    if quant == "fp8":
        return fan_in * fan_out + 4  # fp8 e4m3 weight + one fp32 scale per tensor (vLLM's online FP8)
    groups = fan_in // GROUP_SIZE  # tp_is_valid refuses dimensions that are not whole groups
    qweight = fan_in * fan_out // 2  # 8 4-bit values per int32
    qzeros = groups * (fan_out // 8) * 4
    scales = groups * fan_out * 2
    g_idx = 4 * fan_in if quant == "gptq" else 0  # GPTQ maps each input row to its group (int32)
    return qweight + qzeros + scales + g_idx


def weight_bytes(model: ModelProfile, quant: str = "bf16") -> int:
    """All weight bytes of the checkpoint: quantized linears plus 16-bit embeddings, lm_head, norms and biases."""
    quant = normalise_quant(quant)
    linears = sum(linear_bytes(quant, fan_in, fan_out) for _, fan_in, fan_out in linear_shapes(model))
    h, v = model.hidden_size, model.vocab_size
    embeddings = v * h * (1 if model.tied_embeddings else 2)
    norms = (2 * model.num_layers + 1) * h
    return linears + 2 * (embeddings + norms + model.bias_params)


def kv_heads_per_gpu(model: ModelProfile, tp: int) -> int:
    # Engines replicate KV heads when TP exceeds their number (GQA models such as llama2-70b at TP 16).
    return max(1, model.num_kv_heads // tp)


def kv_bytes_per_token_per_gpu(model: ModelProfile, tp: int, kv_bytes: float = 2.0) -> float:
    return 2 * model.num_layers * kv_heads_per_gpu(model, tp) * model.head_dim * kv_bytes


def activation_bytes_per_gpu(model: ModelProfile, tp: int, prefill_tokens: int, max_num_seqs: int) -> float:
    """Peak activations of one prefill chunk (residual, qkv, MLP up/gate) plus fp32 logits of a decode batch."""
    h, i = model.hidden_size, model.config["intermediate_size"]
    per_token = (4 * h + 3 * i / tp) * ACTIVATION_BYTES
    return prefill_tokens * per_token + max_num_seqs * model.vocab_size / tp * LOGIT_BYTES


def tp_is_valid(model: ModelProfile, quant: str, tp: int) -> str | None:
    """Why this TP size cannot shard the model, or None."""
    if model.num_heads % tp:
        return f"{model.num_heads} attention heads do not split over {tp} GPUs"
    if model.num_kv_heads % tp and tp % model.num_kv_heads:
        return f"{model.num_kv_heads} KV heads do not split over {tp} GPUs"
    if quant in ("gptq", "awq"):
        # every quantized input dimension, as one GPU holds it (row-parallel layers split theirs), must be whole groups
        fan_ins = (model.hidden_size, model.num_heads * model.head_dim // tp, model.config["intermediate_size"] // tp)
        if any(size % GROUP_SIZE for size in fan_ins):
            return f"input dimensions {fan_ins} are not all multiples of the quantization group ({GROUP_SIZE})"
    return None


@dataclass(frozen=True)
class FitPlan:
    """What one configuration needs per GPU, and the engine limits that follow from it."""

    model: str
    gpu: str
    quant: str
    tp: int
    concurrency: int  # the engine's batch limit: the load's requests in flight, at most
    context_tokens: int
    gpu_memory_utilization: float
    usable_bytes: float  # per GPU: memory x utilization
    weight_bytes: float  # per GPU
    activation_bytes: float  # per GPU
    reserve_bytes: float  # per GPU
    kv_bytes_per_token: float  # per GPU
    kv_budget_bytes: float  # per GPU, what is left for the KV cache
    prefill_chunk_tokens: int
    kv_sequences: int = 1  # full-context sequences the KV cache must hold at once: the engines' minimum is one

    @property
    def kv_needed_bytes(self) -> float:
        return self.kv_sequences * self.context_tokens * self.kv_bytes_per_token

    @property
    def kv_capacity_tokens(self) -> int:
        return max(0, int(self.kv_budget_bytes // self.kv_bytes_per_token))

    @property
    def fits(self) -> bool:
        return self.kv_budget_bytes > 0 and self.kv_budget_bytes >= self.kv_needed_bytes

    @property
    def max_model_len(self) -> int:
        return self.context_tokens

    @property
    def max_num_seqs(self) -> int:
        return self.concurrency

    @property
    def max_batch_total_tokens(self) -> int:
        """TGI's KV-cache budget in tokens: the whole cache the planner leaves room for."""
        return self.kv_capacity_tokens

    def full_context_sequences(self) -> int:
        return self.kv_capacity_tokens // self.context_tokens

    def describe(self) -> str:
        gb = 1e9
        return (f"{self.model} {self.quant} on {self.tp} x {self.gpu}: "
                f"per GPU {self.usable_bytes / gb:.1f} GB usable = weights {self.weight_bytes / gb:.1f} "
                f"+ activations {self.activation_bytes / gb:.1f} + runtime "
                f"{self.reserve_bytes / gb:.1f} + KV {self.kv_budget_bytes / gb:.1f} GB "
                f"({self.kv_capacity_tokens} tokens, {self.full_context_sequences()} sequences of "
                f"{self.context_tokens}); the engine pages its KV cache and needs room for "
                f"{self._sequences_needed()} ({self.kv_needed_bytes / gb:.2f} GB) -> "
                f"{'fits' if self.fits else 'does not fit'}")

    def _sequences_needed(self) -> str:
        return "one sequence" if self.kv_sequences == 1 else f"{self.kv_sequences} sequences"

    def describe_load(self, in_flight: float, mean_tokens: float | None, basis: str) -> str:
        """What the load puts in the cache, against what it holds: beyond it the engine queues or preempts."""
        tokens = in_flight * (mean_tokens or self.context_tokens)
        per_request = f"~{mean_tokens:.0f} tokens each" if mean_tokens else f"{self.context_tokens} tokens each at most"
        verdict = ("the KV cache holds them" if tokens <= self.kv_capacity_tokens else
                   f"more than the KV cache's {self.kv_capacity_tokens} tokens: the engine will queue or preempt "
                   f"(a larger --tp or --gpu-memory-utilization, or a smaller --max-model-len, gives it more room)")
        return f"load: {in_flight:.0f} requests in flight ({basis}) x {per_request} = {tokens:.0f} tokens, {verdict}"

    def as_dict(self) -> dict:
        return {"model": self.model, "gpu": self.gpu, "quant": self.quant, "tp": self.tp,
                "concurrency": self.concurrency, "context_tokens": self.context_tokens,
                "gpu_memory_utilization": self.gpu_memory_utilization, "usable_gb": self.usable_bytes / 1e9,
                "weights_gb_per_gpu": self.weight_bytes / 1e9, "activations_gb_per_gpu": self.activation_bytes / 1e9,
                "runtime_gb_per_gpu": self.reserve_bytes / 1e9, "kv_budget_gb_per_gpu": self.kv_budget_bytes / 1e9,
                "kv_capacity_tokens": self.kv_capacity_tokens, "kv_needed_gb_per_gpu": self.kv_needed_bytes / 1e9,
                "fits": self.fits}


def evaluate(model: ModelProfile, gpu: GpuProfile, quant: str, tp: int, concurrency: int, context_tokens: int,
             gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
             prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS, kv_sequences: int = 1) -> FitPlan:
    """The memory budget of one configuration (whether or not it fits)."""
    quant = normalise_quant(quant)
    h, norms = model.hidden_size, (2 * model.num_layers + 1) * model.hidden_size * 2
    # Linears and embeddings shard over TP (column/row/vocab parallel); norms are replicated.
    per_gpu_weights = (weight_bytes(model, quant) - norms) / tp + norms
    usable = gpu.memory_bytes * gpu_memory_utilization
    activations = activation_bytes_per_gpu(model, tp, min(prefill_chunk_tokens, max(context_tokens, h)), concurrency)
    budget = usable - per_gpu_weights - activations - RUNTIME_RESERVE_BYTES
    return FitPlan(model.key, gpu.key, quant, tp, concurrency, context_tokens, gpu_memory_utilization, usable,
                   per_gpu_weights, activations, RUNTIME_RESERVE_BYTES, kv_bytes_per_token_per_gpu(model, tp),
                   budget, prefill_chunk_tokens, kv_sequences)


def _candidates(model: ModelProfile, gpu: GpuProfile, quant: str, concurrency: int, context_tokens: int,
                utilization: float, max_gpus: int, kv_sequences: int) -> list[FitPlan]:
    plans = []
    for tp in TP_SIZES:
        if tp <= max_gpus and tp_is_valid(model, quant, tp) is None:
            plans.append(evaluate(model, gpu, quant, tp, concurrency, context_tokens, utilization,
                                  kv_sequences=kv_sequences))
    return plans


def alternatives(model: ModelProfile, gpu: GpuProfile, quant: str, concurrency: int, context_tokens: int,
                 utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION, max_gpus: int = MAX_GPUS,
                 kv_sequences: int = 1) -> list[FitPlan]:
    """Smallest fitting TP per (quantization on this GPU) and per (other GPU with this quantization)."""
    found = []
    for other_quant in QUANTS:
        plans = [p for p in _candidates(model, gpu, other_quant, concurrency, context_tokens, utilization, max_gpus,
                                        kv_sequences) if p.fits]
        if plans:
            found.append(plans[0])
    for other in gpu_profiles().values():
        if other.key in (gpu.key, "cpu"):
            continue
        plans = [p for p in _candidates(model, other, quant, concurrency, context_tokens, utilization, max_gpus,
                                        kv_sequences) if p.fits]
        if plans:
            found.append(plans[0])
    return found


def load_in_flight(plan: FitPlan, gpu: GpuProfile, users: int | None, rate: float | None,
                   mean_output_tokens: float | None) -> tuple[float, str]:
    """(requests in flight, how that was found) for a closed loop of `users` or an open loop at `rate`."""
    if users or not rate or not mean_output_tokens:
        return (users or plan.concurrency), (f"{users} users" if users else "the open loop's in-flight cap")
    # Little's law with the bandwidth roofline's decode step (every weight byte read once per step): E2E is at
    # least that many steps, so this is the fewest requests the load can keep in flight
    e2e_s = mean_output_tokens * plan.weight_bytes / (gpu.bandwidth_gbs * 1e9)
    in_flight = min(rate * e2e_s, plan.concurrency)
    return in_flight, f"at least: Little's law at {rate:g} req/s x E2E >= {e2e_s:.2f} s on the bandwidth roofline"


def plan_fit(model: ModelProfile, gpu: GpuProfile, quant: str = "bf16", concurrency: int = 16,
             context_tokens: int | None = None, tp: int | None = None,
             gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION, max_gpus: int = MAX_GPUS,
             kv_sequences: int = 1) -> FitPlan:
    """The smallest TP (or the given one) that holds the weights plus KV for `kv_sequences` (by default one:
    the engines' minimum) `context_tokens` sequences; `concurrency` is the engine's batch limit (it sizes
    the decode batch's logits, not the KV cache)."""
    quant = normalise_quant(quant)
    context = context_tokens or model.max_context
    if context > model.max_context:
        raise FitError(f"context {context} exceeds {model.key}'s maximum of {model.max_context} tokens")
    if tp is not None:
        problem = tp_is_valid(model, quant, tp)
        if problem:
            raise FitError(f"TP {tp} is not possible for {model.key} {quant}: {problem}")
        plans = [evaluate(model, gpu, quant, tp, concurrency, context, gpu_memory_utilization,
                          kv_sequences=kv_sequences)]
    else:
        plans = _candidates(model, gpu, quant, concurrency, context, gpu_memory_utilization, max_gpus, kv_sequences)
    for plan in plans:
        if plan.fits:
            return plan
    largest = plans[-1]
    options = alternatives(model, gpu, quant, concurrency, context, gpu_memory_utilization, max_gpus, kv_sequences)
    lines = [f"{model.key} {quant} does not fit on {'' if tp else 'up to '}{largest.tp} x {gpu.key} "
             f"({gpu.memory_gb:g} GB) with a KV cache for {largest._sequences_needed()} of {context} tokens:",
             f"  {largest.describe()}"]
    if options:
        lines.append("what would fit:")
        lines += [f"  --quant {p.quant} --tp {p.tp} --gpu {p.gpu}  ({p.weight_bytes / 1e9:.1f} GB weights per GPU, "
                  f"KV room for {p.kv_capacity_tokens} tokens)" for p in options]
    else:
        lines.append(f"nothing up to {max_gpus} GPUs fits at this context")
    lines.append("or ask for a shorter context: --max-model-len (loadtest, serve) or --context (fit)")
    raise FitError("\n".join(lines))

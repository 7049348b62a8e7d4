"""Will a training run fit its GPU: the memory one rank holds, from the model's shapes and DeepSpeed's layout.

N = all parameters, G = ranks, L layers, h hidden size, a heads, s tokens per sequence, b sequences per
micro-batch, V vocabulary. Bytes per parameter under DeepSpeed's BF16 ZeRO with AdamW, as the H200 runs
measured them (7B ZeRO-2 on 1, 2 and 4 GPUs peaked at 22N, 2N + 10N and 2N + 5N bytes; ZeRO-3 at 18N):
  weights, BF16                        2N   (ZeRO-3: 2N/G)
  gradients, BF16                      2N   (ZeRO-2/3: 2N/G), and under ZeRO-0/1/2 a second BF16 copy
  FP32 master weights                  4N/G (ZeRO-0: 4N)
  AdamW moments                        8N/G (FP32; 2N/G as 8-bit states, e.g. bitsandbytes' AdamW8bit)
  FP32 gradient partition at the step  4N/G (not ZeRO-3)
ZeRO-Offload of the optimizer moves the master weights, moments and FP32 gradients to the host, and the
BF16 gradients leave the GPU bucket by bucket (two buckets stay); offloading the parameters (ZeRO-3) moves
the weights too. LoRA/QLoRA: frozen BF16 (QLoRA: 4-bit) weights, the rest for the adapters only.
Activations (what backward keeps), per micro-batch: 34·s·b·h·L bytes with SDPA/FlashAttention
(Korthikanti et al. 2022; eager attention adds the scores, 5·a·s²·b·L), with recomputation only each layer's
input (2·s·b·h·L) plus one layer's; and the logits, 6·s·b·V (BF16 and their FP32 upcast for the loss).
The peak is the larger of backward's (resident state + activations) and the optimizer step's (resident
state + the step's FP32 gradients). Each rank also holds the CUDA runtime (the serving planner's reserve).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenrig.serve.fit import RUNTIME_RESERVE_BYTES, weight_bytes
from tokenrig.train.dsconfig import ZERO12_BUCKET_SIZE
from tokenrig.train.flops import lora_params
from tokenrig.train.spec import TrainSpec

GIB = 2**30


@dataclass(frozen=True)
class TrainFit:
    """One rank's memory for a run, against its GPU's."""

    label: str
    gpu_state_bytes: float  # weights, gradients and optimizer state held on the GPU through the step
    step_bytes: float  # what the optimizer step adds (FP32 gradient partition)
    activation_bytes: float
    host_bytes: float  # offloaded optimizer state and weights
    gpu_total_bytes: float

    @property
    def peak_bytes(self) -> float:
        return RUNTIME_RESERVE_BYTES + self.gpu_state_bytes + max(self.step_bytes, self.activation_bytes)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_total_bytes

    def describe(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        host = f", host {self.host_bytes / GIB:.1f} GiB" if self.host_bytes else ""
        return (f"{self.label}: {self.peak_bytes / GIB:.1f} GiB of {self.gpu_total_bytes / GIB:.1f} GiB: {verdict} "
                f"(state {self.gpu_state_bytes / GIB:.1f}, step {self.step_bytes / GIB:.1f}, "
                f"activations {self.activation_bytes / GIB:.1f}, runtime {RUNTIME_RESERVE_BYTES / GIB:.1f}{host})")


def activation_bytes(spec: TrainSpec) -> float:
    """What backward keeps of one micro-batch on one rank (the docstring's formulas)."""
    model = spec.model_profile
    s, b, h, layers = spec.seq_len, spec.micro_batch, model.hidden_size, model.num_layers
    per_layer = 34 * s * b * h + (5 * model.num_heads * s * s * b if spec.attention == "eager" else 0)
    kept = (2 * s * b * h * layers + per_layer) if spec.recompute else per_layer * layers
    return kept + 6 * s * b * model.vocab_size


def plan_training_fit(spec: TrainSpec, moment_bytes: int = 8) -> TrainFit:
    """The memory `spec` needs per rank; `moment_bytes` per parameter for AdamW's two moments (8: FP32, as
    tokenrig trains; 2: 8-bit states, a what-if)."""
    model, ranks = spec.model_profile, spec.world_size
    n = model.num_params
    if spec.mode == "pretrain":
        frozen, trained = 0, n
        weights = weight_bytes(model, "bf16")
    else:
        trained = lora_params(model, spec.lora_rank, spec.lora_targets)
        # QLoRA's NF4 weights take ~0.5 byte each with their scales, as 4-bit group-128 checkpoints do
        frozen = weight_bytes(model, "gptq" if spec.mode == "qlora" else "bf16")
        weights = 2 * trained
    optimizer_shards = ranks if spec.zero >= 1 else 1
    gradient_shards = ranks if spec.zero >= 2 else 1
    optimizer = (4 + moment_bytes) * trained / optimizer_shards  # FP32 master weights + moments
    gradients = 2 * trained / gradient_shards + (0 if spec.zero == 3 else 2 * trained / optimizer_shards)
    step = 0 if spec.zero == 3 else 4 * trained / optimizer_shards
    if spec.zero == 3:
        weights /= ranks
    host = 0.0
    if spec.offload in ("optimizer", "params"):
        bucket = spec.bucket_size or (ZERO12_BUCKET_SIZE if spec.zero < 3 else model.hidden_size ** 2)
        host, optimizer, step = optimizer + 4 * trained / optimizer_shards, 0.0, 0.0
        gradients = 2 * 2 * min(bucket, trained)
    if spec.offload == "params":
        host, weights = host + weights, 0.0
    return TrainFit(label=spec.label(), gpu_state_bytes=frozen + weights + gradients + optimizer, step_bytes=step,
                    activation_bytes=activation_bytes(spec), host_bytes=host,
                    gpu_total_bytes=spec.gpu_profile.memory_mib * 2**20)


def fit_report(spec: TrainSpec) -> list[str]:
    """The run's fit and, where it does not fit, what would: optimizer offload, ZeRO-3, recomputation, 8-bit
    AdamW states (a planner what-if: tokenrig train keeps FP32 moments)."""
    plan = plan_training_fit(spec)
    lines = [plan.describe()]
    if plan.fits:
        return lines
    alternatives = []
    if spec.offload == "none":
        alternatives.append(("--offload optimizer", spec.model_copy(update={"offload": "optimizer",
                                                                           "zero": max(spec.zero, 1)}), 8))
    if spec.zero != 3:
        alternatives.append(("--zero 3", spec.model_copy(update={"zero": 3}), 8))
    if not spec.recompute:
        alternatives.append(("--zero 3 --recompute", spec.model_copy(update={"zero": 3, "recompute": True}), 8))
    alternatives.append(("8-bit AdamW states (bitsandbytes; not a tokenrig train option)", spec, 2))
    alternatives.append(("8-bit AdamW states and ZeRO-3", spec.model_copy(update={"zero": 3}), 2))
    for what, changed, moment_bytes in alternatives:
        other = plan_training_fit(changed, moment_bytes)
        lines.append(f"  with {what}: {other.peak_bytes / GIB:.1f} GiB: {'fits' if other.fits else 'does not fit'}"
                     + (f" (host {other.host_bytes / GIB:.1f} GiB)" if other.host_bytes else ""))
    return lines

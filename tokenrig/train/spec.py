"""TrainSpec: one training run's settings, validated, with errors that name the field and the fix.

The CLI, the matrix scenarios and the per-rank worker all speak this one object; the worker
reads it back from the run directory's spec.json.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenrig.profiles import GpuProfile, ModelProfile, resolve_gpu, resolve_model
from tokenrig.train.flops import LORA_DEFAULT_TARGETS, projection_shapes


class TrainSpecError(ValueError):
    """Training settings that cannot run; the message says which field and what to do."""


class TrainSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu: str = "cpu"
    model: str = "tiny"
    mode: Literal["pretrain", "lora", "qlora"] = "pretrain"
    zero: Literal[0, 1, 2, 3] = 2
    offload: Literal["none", "optimizer", "params"] = "none"
    recompute: bool = False
    attention: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    micro_batch: int = Field(1, ge=1)
    seq_len: int = Field(512, ge=8)
    grad_accum: int = Field(1, ge=1)
    gpus: int = Field(1, ge=1, description="processes (GPUs) per node")
    nodes: int = Field(1, ge=1)
    hostfile: str | None = None
    steps: int = Field(10, ge=1, description="measured steps, after warm-up")
    warmup_steps: int = Field(3, ge=0)
    profile_steps: int = Field(2, ge=0, description="extra steps under torch.profiler for the breakdown; 0 = none")
    lora_rank: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_targets: tuple[str, ...] = LORA_DEFAULT_TARGETS
    learning_rate: float = Field(1e-4, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        gpu, model = self.gpu_profile, self.model_profile  # raise UnknownProfileError with the known names
        if self.offload == "params" and self.zero != 3:
            raise TrainSpecError("offload=params needs ZeRO stage 3 (--zero 3); ZeRO-1/2 can only offload the optimizer")
        if self.offload == "optimizer" and self.zero == 0:
            raise TrainSpecError("offload=optimizer needs ZeRO stage 1, 2 or 3 (--zero 1|2|3)")
        if self.mode == "qlora" and gpu.key == "cpu":
            raise TrainSpecError("mode=qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); use --mode lora on CPU")
        if self.mode == "qlora" and self.zero == 3:
            raise TrainSpecError("mode=qlora with ZeRO-3 is not supported: 4-bit weights cannot be partitioned; "
                                 "use --zero 0, 1 or 2")
        if self.attention == "flash_attention_2" and gpu.key == "cpu":
            raise TrainSpecError("attention=flash_attention_2 needs a CUDA GPU; use --attention sdpa or eager on CPU")
        if self.seq_len > model.max_context:
            raise TrainSpecError(f"seq_len={self.seq_len} exceeds {model.key}'s context of {model.max_context}")
        unknown = set(self.lora_targets) - set(projection_shapes(model))
        if unknown:
            raise TrainSpecError(f"lora_targets {sorted(unknown)} unknown; choose from {', '.join(projection_shapes(model))}")
        if self.hostfile is None and self.nodes > 1:
            raise TrainSpecError("nodes > 1 needs a DeepSpeed hostfile (--hostfile), one line per node: 'host slots=N'")
        return self

    @property
    def gpu_profile(self) -> GpuProfile:
        return resolve_gpu(self.gpu)

    @property
    def model_profile(self) -> ModelProfile:
        return resolve_model(self.model)

    @property
    def device(self) -> str:
        return "cpu" if self.gpu_profile.key == "cpu" else "cuda"

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def tokens_per_step(self) -> int:
        """Tokens trained per optimizer step, over all ranks."""
        return self.micro_batch * self.seq_len * self.grad_accum * self.world_size

    def label(self) -> str:
        """Short name of the configuration, used in run ids and comparison tables."""
        parts = [self.model_profile.key, self.mode, f"z{self.zero}", f"{self.world_size}x{self.gpu_profile.key}",
                 f"b{self.micro_batch}x{self.seq_len}", self.attention]
        if self.grad_accum > 1:
            parts.append(f"ga{self.grad_accum}")
        if self.offload != "none":
            parts.append(f"off-{self.offload}")
        if self.recompute:
            parts.append("recompute")
        return "-".join(parts)


def make_spec(**fields) -> TrainSpec:
    """A TrainSpec from loose fields (CLI, YAML); invalid settings raise TrainSpecError naming each field."""
    from pydantic import ValidationError

    try:
        return TrainSpec(**fields)
    except ValidationError as error:
        problems = []
        for e in error.errors():
            where = ".".join(map(str, e["loc"]))
            message = e["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise TrainSpecError("; ".join(problems)) from None

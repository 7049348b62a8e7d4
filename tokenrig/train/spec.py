"""TrainSpec: one training run's settings, validated, with errors that name the field and the fix.

The CLI, the matrix scenarios and the per-rank worker all speak this one object; the worker
reads it back from the run directory's spec.json. A field declared with `option` is also a
`tokenrig train` flag (micro_batch: --micro-batch), its type and choices read from the field.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenrig.errors import UserError
from tokenrig.profiles import GpuProfile, ModelProfile, resolve_gpu, resolve_model
from tokenrig.train.flops import LORA_DEFAULT_TARGETS, projection_shapes


class TrainSpecError(UserError, ValueError):
    """Training settings that cannot run; the message says which field and what to do."""


CLI_HELP = "cli_help"


def option(default: Any, help: str | None = None, **constraints: Any) -> Any:
    """A TrainSpec field that `tokenrig train` also takes as a flag, with this help."""
    return Field(default, json_schema_extra={CLI_HELP: help}, **constraints)


class TrainSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu: str = option("cpu", "GPU profile whose peak BF16 TFLOP/s MFU is measured against (cpu: no GPU)")
    model: str = option("tiny", "model profile: tiny (default), llama2-7b|7b, llama2-13b|13b, llama2-70b|70b, "
                                "llama3-8b|8b")
    mode: Literal["pretrain", "lora", "qlora"] = option("pretrain")
    zero: Literal[0, 1, 2, 3] = option(2, "DeepSpeed ZeRO stage (default 2)")
    offload: Literal["none", "optimizer", "params"] = option("none", "ZeRO-Offload to host memory")
    recompute: bool = option(False, "activation recomputation (gradient checkpointing) of every decoder layer")
    attention: Literal["eager", "sdpa", "flash_attention_2"] = option("sdpa")
    sdpa_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = option(
        "auto", "with --attention sdpa: run only this SDPA kernel (default auto: PyTorch picks per call)")
    compile: bool = option(False, "torch.compile each decoder block (composes with --recompute and ZeRO)")
    liger: bool = option(False, "Liger-Kernel's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy "
                                "(triton, CUDA only: pip install 'tokenrig[liger]')")
    optimizer: Literal["adamw-fused", "adamw", "deepspeed-fused"] = option(
        "adamw-fused", "AdamW as torch's fused kernel (default), torch's multi-tensor (foreach) one, or "
                       "DeepSpeed's FusedAdam (CUDA op built on first use)")
    sync_every: int = option(1, "wait for the GPU and write step records every N steps (default 1); N > 1 "
                                "times each step with CUDA events and lets the host queue the next one", ge=1)
    bucket_size: int | None = option(None, "elements per ZeRO reduce and all-gather bucket, e.g. 5e8 "
                                           "(default 5e8 for ZeRO-1/2, hidden size squared for ZeRO-3)", gt=0)
    overlap_comm: bool | None = option(None, "ZeRO: overlap gradient reduction with backward "
                                             "(default: on with 2+ GPUs, off on one, where it only costs memory)")
    contiguous_gradients: bool = option(True, "ZeRO: copy gradients into one contiguous buffer as they are "
                                              "reduced (default on)")
    micro_batch: int = option(1, "sequences per GPU per micro-step", ge=1)
    seq_len: int = option(512, "tokens per sequence", ge=8)
    grad_accum: int = option(1, "micro-steps per optimizer step", ge=1)
    gpus: int = option(1, "GPUs (processes) per node", ge=1)
    nodes: int = option(1, "nodes, listed in --hostfile", ge=1)
    hostfile: str | None = option(None, "DeepSpeed hostfile for several nodes ('host slots=N' lines)")
    steps: int = option(10, "measured steps (default 10)", ge=1)  # after warm-up
    warmup_steps: int = option(3, "steps excluded from the figures (default 3)", ge=0)
    # extra steps run under torch.profiler for the module breakdown
    profile_steps: int = option(2, "steps profiled for the breakdown (default 2; 0 = none)", ge=0)
    lora_rank: int = option(16, "LoRA rank (default 16)", ge=1)
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
        if self.sdpa_backend != "auto" and self.attention != "sdpa":
            raise TrainSpecError(f"sdpa_backend={self.sdpa_backend} needs --attention sdpa "
                                 f"(not {self.attention}); or leave out --sdpa-backend")
        if self.liger and gpu.key == "cpu":
            raise TrainSpecError("liger=true needs a CUDA GPU: Liger-Kernel's fused kernels are triton kernels; "
                                 "leave out --liger on CPU")
        if self.liger and model.config.get("model_type") != "llama":
            raise TrainSpecError(f"liger=true is wired for Llama models; {model.key} is "
                                 f"{model.config.get('model_type')}: leave out --liger")
        if self.optimizer == "deepspeed-fused" and gpu.key == "cpu":
            raise TrainSpecError("optimizer=deepspeed-fused needs a CUDA GPU (DeepSpeed's FusedAdam is a CUDA op); "
                                 "use --optimizer adamw-fused on CPU")
        if self.offload != "none" and self.optimizer != "adamw-fused":
            raise TrainSpecError(f"optimizer={self.optimizer} does not apply with offload={self.offload}: "
                                 "ZeRO-Offload runs DeepSpeed's CPU Adam; leave out --optimizer")
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
        attention = self.attention if self.sdpa_backend == "auto" else f"sdpa-{self.sdpa_backend}"
        parts = [self.model_profile.key, self.mode, f"z{self.zero}", f"{self.world_size}x{self.gpu_profile.key}",
                 f"b{self.micro_batch}x{self.seq_len}", attention]
        if self.grad_accum > 1:
            parts.append(f"ga{self.grad_accum}")
        if self.offload != "none":
            parts.append(f"off-{self.offload}")
        if self.recompute:
            parts.append("recompute")
        parts += [name for name, on in (("compiled", self.compile), ("liger", self.liger)) if on]
        if self.optimizer != "adamw-fused":
            parts.append(self.optimizer)
        if self.sync_every > 1:
            parts.append(f"sync{self.sync_every}")
        if self.bucket_size is not None:
            parts.append(f"bucket{self.bucket_size:.0e}".replace("+0", "").replace("+", ""))
        if self.overlap_comm is not None:
            parts.append("overlap" if self.overlap_comm else "no-overlap")
        if not self.contiguous_gradients:
            parts.append("no-contiguous")
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


def _cli_fields() -> dict[str, Any]:
    """TrainSpec's fields that are `tokenrig train` flags: name -> pydantic FieldInfo, in declaration order."""
    return {name: info for name, info in TrainSpec.model_fields.items()
            if CLI_HELP in (info.json_schema_extra or {})}


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One flag per option field; left out, a flag is None, so the spec's default (or a matrix's value) holds."""
    for name, info in _cli_fields().items():
        kinds: dict[str, Any] = {}
        if typing.get_origin(info.annotation) is Literal:
            choices = typing.get_args(info.annotation)
            kinds = {"choices": list(choices), **({"type": int} if isinstance(choices[0], int) else {})}
        elif info.annotation is bool:
            kinds = {"action": argparse.BooleanOptionalAction}
        elif info.annotation in (bool | None,):
            kinds = {"action": argparse.BooleanOptionalAction}
        elif info.annotation in (int, int | None):
            kinds = {"type": _count}
        parser.add_argument("--" + name.replace("_", "-"), default=None, help=info.json_schema_extra[CLI_HELP],
                            **kinds)


def _count(text: str) -> int:
    """A whole number, also written as 5e8 or 500_000_000 (bucket sizes are counts of elements)."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def train_options_given(args: argparse.Namespace) -> dict[str, Any]:
    """The option fields given on the command line."""
    return {name: getattr(args, name) for name in _cli_fields() if getattr(args, name) is not None}

"""GPU and model profiles: typed views over the YAML files next to this module.

Every hardware number and model shape in tokenrig comes from here; `resolve_gpu` and
`resolve_model` turn a user-typed name (or alias) into a profile, or raise an error that
lists the known names.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict


class UnknownProfileError(ValueError):
    """A GPU or model name that no profile matches."""


class GpuProfile(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    name: str
    memory_gb: float  # the marketed size, for display
    memory_mib: int  # what the driver reports as total (nvidia-smi memory.total): what engines plan from
    bandwidth_gbs: float
    tflops_bf16: float
    interconnect: str
    interconnect_gbs: float
    tdp_w: float
    price_usd_per_hour: float
    price_date: str  # ISO date the price source gives its figure for
    sources: dict[str, str]

    @property
    def memory_bytes(self) -> float:
        return self.memory_mib * 2**20

    @property
    def flops_per_s(self) -> float:
        return self.tflops_bf16 * 1e12

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.bandwidth_gbs * 1e9


class ModelProfile(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    aliases: list[str]
    source: str
    config: dict[str, Any]

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def num_layers(self) -> int:
        return self.config["num_hidden_layers"]

    @property
    def num_heads(self) -> int:
        return self.config["num_attention_heads"]

    @property
    def num_kv_heads(self) -> int:
        return self.config.get("num_key_value_heads", self.num_heads)

    @property
    def head_dim(self) -> int:
        return self.config.get("head_dim") or self.hidden_size // self.num_heads

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def max_context(self) -> int:
        return self.config["max_position_embeddings"]

    @property
    def num_params(self) -> int:
        """Exact parameter count of a Llama-architecture model with this config."""
        h, i, v, layers = self.hidden_size, self.config["intermediate_size"], self.vocab_size, self.num_layers
        kv = self.num_kv_heads * self.head_dim
        attention = h * (self.num_heads * self.head_dim) * 2 + h * kv * 2
        mlp = 3 * h * i
        norms = 2 * h
        embeddings = v * h * (1 if self.config.get("tie_word_embeddings") else 2)
        return layers * (attention + mlp + norms) + embeddings + h

    @property
    def num_matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (all but the input embedding and norms)."""
        h, v, layers = self.hidden_size, self.vocab_size, self.num_layers
        return self.num_params - v * h - (2 * layers + 1) * h

    def kv_bytes_per_token(self, bytes_per_value: float = 2.0) -> float:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value


@cache
def _load(filename: str) -> dict[str, dict[str, Any]]:
    text = resources.files(__package__).joinpath(filename).read_text()
    return yaml.safe_load(text)


def gpu_profiles() -> dict[str, GpuProfile]:
    return {key: GpuProfile(key=key, **fields) for key, fields in _load("gpus.yaml").items()}


def model_profiles() -> dict[str, ModelProfile]:
    return {key: ModelProfile(key=key, **fields) for key, fields in _load("models.yaml").items()}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def resolve_gpu(name: str) -> GpuProfile:
    profiles = gpu_profiles()
    key = _normalise(name)
    if key not in profiles:
        raise UnknownProfileError(f"unknown GPU {name!r}; known GPUs: {', '.join(profiles)}")
    return profiles[key]


def resolve_model(name: str) -> ModelProfile:
    profiles = model_profiles()
    key = _normalise(name)
    for profile in profiles.values():
        if key == profile.key or key in profile.aliases:
            return profile
    known = ", ".join(f"{p.key} ({', '.join(p.aliases)})" if p.aliases else p.key for p in profiles.values())
    raise UnknownProfileError(f"unknown model {name!r}; known models: {known}")

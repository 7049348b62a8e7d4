"""GPU and model profiles: typed views over the YAML files next to this module.

Every hardware number and model shape in tokenrig comes from here; `resolve_gpu` and
`resolve_model` turn a user-typed name (or alias) into a profile, or raise an error that
lists the known names. `resolve_model` also takes a Hugging Face config.json (or the directory
holding it) of a dense Llama-family decoder (llama, mistral, qwen2), so any such model is a profile
without editing the package.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from tokenrig.errors import UserError


class UnknownProfileError(UserError, ValueError):
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
    path: str | None = None  # the config.json this profile was read from (absolute); None: a shipped profile

    @property
    def reference(self) -> str:
        """What `resolve_model` turns back into this profile, in any process: the key, or the config's path."""
        return self.path or self.key

    @property
    def cache_name(self) -> str:
        """The name of its checkpoint directories: a config file's profile carries its config's digest, so
        two configs in directories of the same name never share a checkpoint."""
        if self.path is None:
            return self.key
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.key}-{digest}"

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
    def tied_embeddings(self) -> bool:
        """The output projection is the input embedding (one v x h matrix stored)."""
        return bool(self.config.get("tie_word_embeddings"))

    @property
    def bias_params(self) -> int:
        """Bias parameters, as transformers builds each type: qwen2's q/k/v biases; llama's attention_bias
        (q, k, v, o) and mlp_bias when its config asks for them; none in mistral."""
        model_type, h, i = self.config.get("model_type"), self.hidden_size, self.config["intermediate_size"]
        qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        per_layer = 0
        if model_type == "qwen2":
            per_layer = qkv
        elif model_type == "llama":
            attention, mlp = bool(self.config.get("attention_bias")), bool(self.config.get("mlp_bias"))
            per_layer = (qkv + h) * attention + (2 * i + h) * mlp
        return self.num_layers * per_layer

    @property
    def num_params(self) -> int:
        """Exact parameter count of a Llama-family model (llama, mistral, qwen2) with this config."""
        h, i, v, layers = self.hidden_size, self.config["intermediate_size"], self.vocab_size, self.num_layers
        kv = self.num_kv_heads * self.head_dim
        attention = h * (self.num_heads * self.head_dim) * 2 + h * kv * 2
        mlp = 3 * h * i
        norms = 2 * h
        embeddings = v * h * (1 if self.tied_embeddings else 2)
        return layers * (attention + mlp + norms) + embeddings + h + self.bias_params

    @property
    def num_matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: the layers' linears and the output projection
        (all but the input embedding, norms and biases; a tied embedding is the output projection)."""
        h, v, layers = self.hidden_size, self.vocab_size, self.num_layers
        input_embedding = 0 if self.tied_embeddings else v * h
        return self.num_params - input_embedding - (2 * layers + 1) * h - self.bias_params

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


# Dense decoders whose weights are exactly the Llama layout counted above (qwen2 adds q/k/v biases).
CONFIG_MODEL_TYPES = ("llama", "mistral", "qwen2")
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                 "max_position_embeddings")


def _is_config_path(name: str) -> bool:
    return name.endswith(".json") or "/" in name or Path(name).expanduser().is_dir()


def profile_from_config(name: str) -> ModelProfile:
    """The profile of a Hugging Face config.json (or a directory holding one), keyed by its directory's name."""
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UnknownProfileError(f"--model {name}: no such config.json; give a model profile name "
                                  "(tokenrig model list) or a Hugging Face config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnknownProfileError(f"--model {name}: not a readable JSON file ({error})") from None
    if not isinstance(config, dict):
        raise UnknownProfileError(f"--model {name}: a config.json holds one JSON object")
    model_type = config.get("model_type")
    if model_type not in CONFIG_MODEL_TYPES:
        raise UnknownProfileError(f"--model {name}: model_type {model_type!r} is not supported; tokenrig models "
                                  f"dense decoders of type {', '.join(CONFIG_MODEL_TYPES)}")
    missing = [field for field in CONFIG_FIELDS if not isinstance(config.get(field), int) or config[field] <= 0]
    if missing:
        raise UnknownProfileError(f"--model {name}: config.json needs positive whole numbers for {', '.join(missing)}")
    stem = path.parent.name if path.name == "config.json" else path.stem
    key = re.sub(r"[^a-z0-9.]+", "-", stem.lower()).strip("-.") or model_type
    return ModelProfile(key=key, aliases=[], source=f"config.json at {path.resolve()}", config=config,
                        path=str(path.resolve()))


def resolve_model(name: str) -> ModelProfile:
    """A shipped profile by name or alias, or the profile of a config.json path."""
    if _is_config_path(name):
        return profile_from_config(name)
    profiles = model_profiles()
    key = _normalise(name)
    for profile in profiles.values():
        if key == profile.key or key in profile.aliases:
            return profile
    known = ", ".join(f"{p.key} ({', '.join(p.aliases)})" if p.aliases else p.key for p in profiles.values())
    raise UnknownProfileError(f"unknown model {name!r}; known models: {known} (or a Hugging Face config.json path)")

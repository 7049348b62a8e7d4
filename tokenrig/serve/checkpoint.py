"""Synthetic Hugging Face checkpoints: config.json, a locally built tokenizer and random weights.

No model hub is reachable, and serving or training speed does not depend on weight values, so
tokenrig writes checkpoints with the exact architecture of a model profile and random weights.
Tensors are generated and written one shard at a time, so even llama2-70b needs no more host
memory than one shard. A finished directory carries `tokenrig-checkpoint.json` and is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from tokenrig.profiles import ModelProfile
from tokenrig.serve.tokenizer import CHAT_TEMPLATE, build_tokenizer

MARKER = "tokenrig-checkpoint.json"
SHARD_BYTES = 4 * 1024**3
INIT_STD = 0.02


def default_models_dir() -> Path:
    return Path(os.environ.get("TOKENRIG_MODELS", Path.home() / ".cache" / "tokenrig" / "models"))


def checkpoint_dir(model: ModelProfile, root: Path | None = None) -> Path:
    return (root or default_models_dir()) / model.key


def is_complete(path: Path) -> bool:
    return (path / MARKER).exists()


def parameter_shapes(model: ModelProfile) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the model's weights, from transformers' own module tree on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**model.config)
    with torch.device("meta"):
        module = AutoModelForCausalLM.from_config(config)
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * INIT_STD).to(dtype)


def write_tokenizer(model: ModelProfile, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(model.vocab_size),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=model.max_context,
    )
    tokenizer.save_pretrained(out)


def make_checkpoint(
    model: ModelProfile, root: Path | None = None, dtype: str = "bfloat16", seed: int = 0, force: bool = False, progress=print
) -> Path:
    """Write (or reuse) the synthetic checkpoint for `model`; returns its directory."""
    from safetensors.torch import save_file

    out = checkpoint_dir(model, root)
    if is_complete(out) and not force:
        return out
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    config = dict(model.config, torch_dtype=dtype, dtype=dtype)
    config["bos_token_id"], config["eos_token_id"], config["pad_token_id"] = 1, 2, 3
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    (staging / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}))
    write_tokenizer(model, staging)

    torch_dtype = getattr(torch, dtype)
    element_bytes = torch.empty((), dtype=torch_dtype).element_size()
    shapes = parameter_shapes(model)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, shape in shapes.items():
        size = element_bytes * int(torch.Size(shape).numel())
        if shards[-1] and shard_bytes + size > SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size

    generator = torch.Generator().manual_seed(seed)
    weight_map, total_bytes, started = {}, 0, time.monotonic()
    for index, names in enumerate(shards, start=1):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random_tensor(name, shapes[name], generator, torch_dtype) for name in names}
        save_file(tensors, staging / filename, metadata={"format": "pt"})
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: filename for name in names})
        progress(f"  wrote shard {index}/{len(shards)} ({total_bytes / 1e9:.1f} GB, {time.monotonic() - started:.0f} s)")
    if len(shards) > 1:
        index_doc = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))

    marker = {"model": model.key, "dtype": dtype, "seed": seed, "bytes": total_bytes, "random_weights": True}
    (staging / MARKER).write_text(json.dumps(marker, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def tokenizer_dir(model: ModelProfile, root: Path | None = None) -> Path:
    """A directory with only the model's tokenizer (what the sim engine and clients need)."""
    out = (root or default_models_dir()) / f"{model.key}-tokenizer"
    if not (out / "tokenizer.json").exists():
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        write_tokenizer(model, staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out

"""Synthetic Hugging Face checkpoints: config.json, a locally built tokenizer and random weights.

No model hub is reachable, and serving or training speed does not depend on weight values, so
tokenrig writes checkpoints with the exact architecture of a model profile and random weights.
Tensors are generated and written one shard at a time, so even llama2-70b needs no more host
memory than one shard. A finished directory carries `tokenrig-checkpoint.json` and is reused.

`quant="gptq"|"awq"` writes the 4-bit layouts GPTQ and AWQ loaders expect (group size 128,
fp16 scales, packed int32 weights and zeros; GPTQ also g_idx) with a quantization_config in
config.json; `config_dir` writes config + tokenizer only, for engines that make their own
random weights (vLLM's `--load-format dummy`). Only the functions that build tensors import torch:
a sim, vLLM or `--url` run needs the directories alone, and torch's import was 4.5 s of each such start.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tokenrig.profiles import ModelProfile
from tokenrig.serve.fit import GROUP_SIZE, linear_shapes, tp_is_valid
from tokenrig.serve.tokenizer import CHAT_TEMPLATE, build_tokenizer

if TYPE_CHECKING:  # for annotations only: the functions that build tensors import torch themselves
    import torch

MARKER = "tokenrig-checkpoint.json"
SHARD_BYTES = 4 * 1024**3
INIT_STD = 0.02
BITS = 4
PACK = 32 // BITS  # 4-bit values per int32


def default_models_dir() -> Path:
    return Path(os.environ.get("TOKENRIG_MODELS", Path.home() / ".cache" / "tokenrig" / "models"))


def checkpoint_dir(model: ModelProfile, root: Path | None = None, quant: str | None = None) -> Path:
    return (root or default_models_dir()) / (model.cache_name if quant is None else f"{model.cache_name}-{quant}")


def is_complete(path: Path) -> bool:
    return (path / MARKER).exists()


def parameter_shapes(model: ModelProfile) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the model's weights, from transformers' own module tree on the meta device; a tied
    output projection is the embedding, stored once (written twice, transformers would untie them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**model.config)
    with torch.device("meta"):
        module = AutoModelForCausalLM.from_config(config)
    return {name: tuple(tensor.shape) for name, tensor in module.named_parameters()}


def quantization_config(quant: str) -> dict:
    """config.json's quantization_config of tokenrig's GPTQ / AWQ checkpoints."""
    if quant == "gptq":
        return {"quant_method": "gptq", "bits": BITS, "group_size": GROUP_SIZE, "desc_act": False, "sym": True,
                "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "lm_head": False,
                "checkpoint_format": "gptq",
                # named, as GPTQModel writes it: without it vLLM 0.26 infers the quantized layers from the
                # safetensors' dtypes, finds none under --load-format dummy and serves every linear in bf16
                "modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                 ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                                                 ["mlp.down_proj"]]}
    if quant == "awq":
        return {"quant_method": "awq", "bits": BITS, "group_size": GROUP_SIZE, "zero_point": True,
                "version": "gemm"}
    raise ValueError(f"unknown checkpoint quantization {quant!r}; known: gptq, awq")


def tensor_layout(model: ModelProfile, dtype: torch.dtype,
                  quant: str | None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every stored tensor; quantized linears expand to their packed tensors."""
    import torch

    layout = {name: (shape, dtype) for name, shape in parameter_shapes(model).items()}
    if quant is None:
        return layout
    for name, fan_in, fan_out in linear_shapes(model):
        del layout[f"{name}.weight"]
        groups = fan_in // GROUP_SIZE
        if quant == "gptq":  # packed along the input dimension
            layout[f"{name}.qweight"] = ((fan_in // PACK, fan_out), torch.int32)
            layout[f"{name}.g_idx"] = ((fan_in,), torch.int32)
        else:  # AWQ GEMM packs along the output dimension
            layout[f"{name}.qweight"] = ((fan_in, fan_out // PACK), torch.int32)
        layout[f"{name}.qzeros"] = ((groups, fan_out // PACK), torch.int32)
        layout[f"{name}.scales"] = ((groups, fan_out), torch.float16)
    return layout


def _packed_zero(quant: str | None) -> int:
    """Every nibble the zero point of symmetric 4-bit: 8, which GPTQ's v1 format stores as 7."""
    nibble = 7 if quant == "gptq" else 8
    word = sum(nibble << (4 * i) for i in range(PACK))
    return word - (1 << 32) if word >= 1 << 31 else word


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator,
                   quant: str | None) -> torch.Tensor:
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".qweight"):  # uniformly random 4-bit codes
        return torch.empty(shape, dtype=torch.int32).random_(generator=generator)
    if name.endswith(".qzeros"):
        return torch.full(shape, _packed_zero(quant), dtype=torch.int32)
    if name.endswith(".g_idx"):
        return torch.arange(shape[0], dtype=torch.int32) // GROUP_SIZE
    if name.endswith(".scales"):
        # codes - zero span [-8, 7] (std ~4.6): this scale gives weights of about INIT_STD
        return (torch.rand(shape, generator=generator) * 0.5 + 0.75).mul_(INIT_STD / 4.6).to(dtype)
    return (torch.randn(shape, generator=generator) * INIT_STD).to(dtype)


def _config_json(model: ModelProfile, dtype: str, quant: str | None) -> str:
    config = dict(model.config, torch_dtype=dtype, dtype=dtype)
    config["bos_token_id"], config["eos_token_id"], config["pad_token_id"] = 1, 2, 3
    if quant is not None:
        config["quantization_config"] = quantization_config(quant)
    return json.dumps(config, indent=2)


def _write_config(model: ModelProfile, out: Path, dtype: str, quant: str | None) -> None:
    (out / "config.json").write_text(_config_json(model, dtype, quant))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}))
    write_tokenizer(model, out)


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
    model: ModelProfile, root: Path | None = None, dtype: str = "bfloat16", seed: int = 0, force: bool = False,
    progress=print, quant: str | None = None,
) -> Path:
    """Write (or reuse) the synthetic checkpoint for `model` (4-bit GPTQ/AWQ with `quant`); returns its directory."""
    import torch
    from safetensors.torch import save_file

    if quant is not None:
        quantization_config(quant)  # refuse unknown methods before writing anything
        problem = tp_is_valid(model, quant, 1)
        if problem:
            raise ValueError(f"cannot write a {quant} checkpoint of {model.key}: {problem}")
        dtype = "float16"  # GPTQ/AWQ kernels compute in fp16; their non-quantized tensors are stored so
    out = checkpoint_dir(model, root, quant)
    if is_complete(out) and not force:
        return out
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _write_config(model, staging, dtype, quant)

    layout = tensor_layout(model, getattr(torch, dtype), quant)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, (shape, tensor_dtype) in layout.items():
        size = torch.empty((), dtype=tensor_dtype).element_size() * int(torch.Size(shape).numel())
        if shards[-1] and shard_bytes + size > SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size

    generator = torch.Generator().manual_seed(seed)
    weight_map, total_bytes, started = {}, 0, time.monotonic()
    for index, names in enumerate(shards, start=1):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _random_tensor(name, *layout[name], generator, quant) for name in names}
        save_file(tensors, staging / filename, metadata={"format": "pt"})
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: filename for name in names})
        del tensors
        progress(f"  wrote shard {index}/{len(shards)} "
                 f"({total_bytes / 1e9:.1f} GB, {time.monotonic() - started:.0f} s)")
    if len(shards) > 1:
        index_doc = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))

    marker = {"model": model.key, "dtype": dtype, "quant": quant, "seed": seed, "bytes": total_bytes,
              "random_weights": True}
    (staging / MARKER).write_text(json.dumps(marker, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def config_dir(model: ModelProfile, root: Path | None = None, quant: str | None = None, write: bool = True) -> Path:
    """config.json (with quantization_config for gptq/awq) and tokenizer, no weights: for engines that
    initialise random weights themselves. A directory an older tokenrig wrote with another config.json
    (GPTQ without modules_in_block_to_quantize: vLLM 0.26 served it in bf16) is rewritten."""
    name = f"{model.cache_name}-config" if quant is None else f"{model.cache_name}-{quant}-config"
    out = (root or default_models_dir()) / name
    dtype = "float16" if quant else "bfloat16"
    current = out / "config.json"
    if write and not (current.exists() and current.read_text() == _config_json(model, dtype, quant)):
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        _write_config(model, staging, dtype, quant)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out


def tokenizer_dir(model: ModelProfile, root: Path | None = None, write: bool = True) -> Path:
    """A directory with only the model's tokenizer (what the sim engine and clients need)."""
    out = (root or default_models_dir()) / f"{model.cache_name}-tokenizer"
    if write and not (out / "tokenizer.json").exists():
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        write_tokenizer(model, staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out

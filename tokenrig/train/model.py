"""The trained model: a model profile's exact architecture with random weights, as the mode needs it.

pretrain: every weight trainable, BF16. lora: frozen BF16 base + peft adapters. qlora: the base's
decoder linears quantised to 4-bit NF4 by bitsandbytes (optional extra), then peft adapters. The
kernel choices (Liger's fused kernels, torch.compile of the blocks) are applied last (kernels.py).
Training speed does not depend on weight values, so weights are initialised on the device
directly (no checkpoint to read), which takes seconds even for 70B-class shapes.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
from torch import nn

from tokenrig.train.kernels import apply_liger, compile_blocks
from tokenrig.train.spec import TrainSpec

FLASH_ATTN_MISSING = ("attention=flash_attention_2 needs the flash-attn package (GPU only): pip install 'tokenrig[flash]'; "
                      "--attention sdpa runs PyTorch's own FlashAttention-2 kernels for causal BF16 on Ampere and newer")
BITSANDBYTES_MISSING = ("mode=qlora needs bitsandbytes (a GPU-only optional extra): "
                        "pip install 'tokenrig[qlora]' or pip install bitsandbytes")


def build_model(spec: TrainSpec, device: torch.device, ds_config: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise RuntimeError(FLASH_ATTN_MISSING)
    profile = spec.model_profile
    config = AutoConfig.for_model(**profile.config)
    config.use_cache = False  # training: no KV cache
    if spec.zero == 3:
        import deepspeed

        importlib.import_module("torch._dynamo")  # imported lazily it would meet zero.Init's patched tensor constructors
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # import the modeling module now, for the same reason

        # ZeRO-3 partitions each layer as it is built, so no rank ever holds the whole model
        # (a 70B model in BF16 is larger than one GPU); weights keep torch's default init
        construction = deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=torch.bfloat16)
    else:
        construction = torch.device(device)
    with construction:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=spec.attention, dtype=torch.bfloat16)
    if spec.liger:
        apply_liger(model, spec)
    if spec.recompute:
        # non-reentrant checkpointing: works with frozen inputs (LoRA) and with ZeRO-3's parameter hooks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.mode == "qlora":
        quantize_decoder_linears_4bit(model, device)
    if spec.mode != "pretrain":
        model = add_lora(model, spec)
    if spec.compile:
        compile_blocks(model)
    return model


def add_lora(model: nn.Module, spec: TrainSpec) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                        target_modules=list(spec.lora_targets), task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.bfloat16)  # adapters in BF16, as DeepSpeed's bf16 mode expects
    return model


def quantize_decoder_linears_4bit(model: nn.Module, device: torch.device) -> None:
    """Replace every linear layer inside the decoder with a bitsandbytes NF4 Linear4bit (LM head stays BF16).

    This is what loading a checkpoint with BitsAndBytesConfig(load_in_4bit, nf4, double quant,
    bf16 compute) produces, done in place on the random weights.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise RuntimeError(BITSANDBYTES_MISSING) from error

    decoder = model.get_decoder()
    for module in list(decoder.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                          device="meta")
            weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                       quant_type="nf4")
            quantized.weight = weight.to(device)  # moving to the GPU is what quantises it
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, quantized)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.is_loaded_in_4bit = True  # what transformers' 4-bit loader sets; peft then wraps with its bnb LoRA layer
    torch.cuda.empty_cache()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]

"""The vllm backend: `vllm serve` with flags checked against vLLM's own argument parser.

Pinned: vLLM 0.11.0. Flags were read from vllm/engine/arg_utils.py (EngineArgs.add_cli_args, the
v0.11 series whose deprecations say "will be removed in v0.12.0") and the OpenAI frontend's
--host/--port/--served-model-name; the attention backend is the environment variable
VLLM_ATTENTION_BACKEND with a name of vllm/attention/backends/registry.py's `_Backend`.
Synthetic checkpoints use `--load-format dummy`: vLLM fills the weights (quantized ones too,
from config.json's quantization_config) with random values, so only config + tokenizer are read.
vLLM is a GPU-only optional dependency: `pip install vllm==0.11.0` on the GPU box.
"""

from __future__ import annotations

from pathlib import Path

from tokenrig.serve.backends import LaunchPlan, plan_for, resolve_attention

VLLM_VERSION = "0.11.0"
ATTENTION = {"FLASH_ATTN": "FLASH_ATTN", "FLASHINFER": "FLASHINFER", "TRITON_ATTN": "TRITON_ATTN",
             "FLEX_ATTENTION": "FLEX_ATTENTION", "flash": "FLASH_ATTN", "noflash": "TRITON_ATTN"}
# Marlin kernels serve GPTQ/AWQ on Ampere and newer (every GPU profile tokenrig ships).
QUANTIZATION = {"gptq": "gptq_marlin", "awq": "awq_marlin"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "gptq": "float16", "awq": "float16"}


def _check(spec) -> None:
    from tokenrig.serve.launcher import LaunchError

    if spec.quant not in DTYPES:
        raise LaunchError("vLLM has no int8 weight-only path for Llama checkpoints; use --quant gptq or awq, "
                          "or --backend tgi --quant int8 (EETQ)")
    if spec.device == "cpu":
        raise LaunchError("the vllm backend serves on a GPU: pick a GPU profile with --gpu")


def model_dir(spec, progress=print, write: bool = True) -> Path:
    from tokenrig.serve.checkpoint import config_dir

    _check(spec)
    return config_dir(spec.model, quant=spec.quant if spec.quant in QUANTIZATION else None, write=write)


def launch_plan(spec, model_dir: Path, port: int) -> LaunchPlan:
    _check(spec)
    fit = plan_for(spec)
    attention = resolve_attention(spec, ATTENTION, None)
    command = ["vllm", "serve", str(model_dir), "--served-model-name", spec.model.key,
               "--host", spec.host, "--port", str(port),
               "--tensor-parallel-size", str(fit.tp), "--dtype", DTYPES[spec.quant],
               "--load-format", "dummy", "--max-model-len", str(fit.max_model_len),
               "--max-num-seqs", str(spec.max_num_seqs or fit.max_num_seqs),
               "--max-num-batched-tokens", str(fit.prefill_chunk_tokens),
               "--gpu-memory-utilization", str(fit.gpu_memory_utilization)]
    if spec.quant in QUANTIZATION:
        command += ["--quantization", QUANTIZATION[spec.quant]]
    if spec.prefix_caching is not None:
        command += ["--enable-prefix-caching" if spec.prefix_caching else "--no-enable-prefix-caching"]
    env = {"VLLM_ATTENTION_BACKEND": attention} if attention else {}
    return LaunchPlan(command + spec.extra_args, env=env, fit=fit,
                      install_hint=f"Install it on the GPU machine: pip install vllm=={VLLM_VERSION}",
                      notes=[f"flags checked against vLLM {VLLM_VERSION}"])

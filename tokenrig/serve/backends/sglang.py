"""The sglang backend: `python -m sglang.launch_server` (SGLang 0.5.17) with flags checked against SGLang's source.

Pinned: SGLang 0.5.17, the last release that pins torch 2.11 (0.5.18 and later pin torch 2.13+). Every
flag and SGLANG_* variable used here is in the list `scripts/gen_sglang_cli.py` generates from that
wheel (tests/data/sglang-0.5.17-cli.json), which the CPU tests parse the generated commands against.

Synthetic checkpoints use `--load-format dummy`, as for vLLM: SGLang fills the weights (quantized ones too,
from config.json's quantization_config) with random values. FP8 is SGLang's online quantization of a
bf16 model (`--quantization fp8`); GPTQ/AWQ checkpoints run on Marlin kernels (`gptq_marlin`,
`awq_marlin`, which SGLang would also pick itself). Prefix caching is SGLang's radix cache, on unless
`--no-prefix-caching` (`--disable-radix-cache`). Memory: SGLang sizes its KV pool from its own
`--mem-fraction-static` (weights + KV pool; activations and CUDA graphs outside it) unless
--gpu-memory-utilization is given; batch limits and context are the fit plan's.

Tensor parallelism on NVSwitch hosts: unless `--nvls` asks for it, tokenrig keeps NVLink multicast off
at TP > 1: no FlashInfer all-reduce fusion, the custom all-reduce's first version (the second can use
multimem), NCCL without NVLS, torch symmetric memory without multicast; SGLang's own --enable-nccl-nvls,
--enable-symm-mem and --enable-torch-symm-mem are never passed.

The server log proves what was served: SGLang logs its resolved arguments (`server_args=ServerArgs(...)`,
entrypoints/engine.py) and the weight memory it loaded ("Load weight end. ... mem usage=X GB.",
model_executor/model_runner.py, GB = 2**30 bytes); `check_served` refuses a run whose weights are far
from the requested quantization's or whose resolved arguments turned multicast on.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tokenrig.serve.backends.base import Backend, BatchLimits, LaunchPlan, plan_for, resolve_attention
from tokenrig.serve.backends.vllm import DTYPES, check_servable, model_dir, weights_problem
from tokenrig.serve.fit import DEFAULT_GPU_MEMORY_UTILIZATION, FitPlan
from tokenrig.serve.spec import ServerSpec, SglangOptions

SGLANG_VERSION = "0.5.17"
ATTENTION = {"fa3": "fa3", "flashinfer": "flashinfer", "triton": "triton", "flash": "fa3", "noflash": "triton"}
QUANTIZATION = {"gptq": "gptq_marlin", "awq": "awq_marlin", "fp8": "fp8"}
NO_MULTICAST_ENV = {"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0",
                    "SGLANG_OPT_USE_CUSTOM_ALL_REDUCE_V2": "0"}
NO_MULTICAST_FLAGS = ["--enforce-disable-flashinfer-allreduce-fusion"]
# SGLang's metric names (sglang/srt/observability/metrics_collector.py) for tokenrig's figures. SGLang has no
# prefix-cache lookup counter: every prompt token is looked up in the radix cache, so the queries are its
# prompt tokens and the hits its cached tokens (both counted as each request finishes). Preemptions are
# SGLang's retractions.
METRICS: dict[str, tuple[str, ...]] = {
    "running": ("sglang:num_running_reqs",),
    "waiting": ("sglang:num_queue_reqs",),
    "kv_cache_usage": ("sglang:token_usage",),
    "prefix_cache_queries": ("sglang:prompt_tokens_total",),
    "prefix_cache_hits": ("sglang:cached_tokens_total",),
    "prompt_tokens": ("sglang:prompt_tokens_total",),
    "generation_tokens": ("sglang:generation_tokens_total",),
    "preemptions": ("sglang:num_retracted_requests_total",),
    "finished_requests": ("sglang:num_requests_total",),
    "ttft_seconds": ("sglang:time_to_first_token_seconds",),
    "itl_seconds": ("sglang:inter_token_latency_seconds",),
    "e2e_seconds": ("sglang:e2e_request_latency_seconds",),
}


def launch_plan(spec: ServerSpec, model_dir: Path, port: int, fit: FitPlan | None = None) -> LaunchPlan:
    check_servable(spec)
    fit = fit or plan_for(spec)
    attention = resolve_attention(spec, ATTENTION, None)
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir),
               "--served-model-name", spec.model.key, "--host", spec.host, "--port", str(port), "--enable-metrics",
               "--tp-size", str(fit.tp), "--dtype", DTYPES[spec.quant], "--load-format", "dummy",
               "--context-length", str(fit.max_model_len),
               "--max-running-requests", str(spec.max_num_seqs or fit.max_num_seqs),
               "--chunked-prefill-size", str(fit.prefill_chunk_tokens)]
    notes = [f"flags checked against SGLang {SGLANG_VERSION}"]
    if spec.gpu_memory_utilization != DEFAULT_GPU_MEMORY_UTILIZATION:
        command += ["--mem-fraction-static", str(spec.gpu_memory_utilization)]
    else:
        notes.append("KV pool: SGLang's own --mem-fraction-static (weights + KV pool); "
                     "--gpu-memory-utilization sets it")
    if spec.quant in QUANTIZATION:
        command += ["--quantization", QUANTIZATION[spec.quant]]
    if attention:
        command += ["--attention-backend", attention]
    command += spec.options_as(SglangOptions).to_args()
    env: dict[str, str] = {}
    if fit.tp > 1 and not spec.options_as(SglangOptions).nvls:
        command += NO_MULTICAST_FLAGS
        env.update(NO_MULTICAST_ENV)
        notes.append("TP > 1: NVLink multicast off (no FlashInfer all-reduce fusion, custom all-reduce v1, "
                     "NCCL_NVLS_ENABLE=0, no multicast in torch symmetric memory); --nvls allows it")
    limits = BatchLimits.known(max_num_seqs=spec.max_num_seqs or fit.max_num_seqs,
                               max_batch_tokens=fit.prefill_chunk_tokens,
                               gpu_memory_utilization=spec.gpu_memory_utilization
                               if spec.gpu_memory_utilization != DEFAULT_GPU_MEMORY_UTILIZATION else None)
    return LaunchPlan(command + spec.extra_args, env=env, fit=fit, notes=notes, batch_limits=limits)


# Log lines of SGLang 0.5.17: model_executor/model_runner.py ("Load weight end. elapsed=%.2f s, type=%s,
# [quant=%s, bits=%s, ]avail mem=%.2f GB, mem usage=%.2f GB.") and entrypoints/engine.py
# (f"{server_args=}": the dataclass repr after SGLang resolved its defaults).
_LOADED = re.compile(r"Load weight end\..*?mem usage=([\d.]+) GB")
_LOADED_QUANT = re.compile(r"Load weight end\..*?\bquant=(\w+)")
_RESOLVED = re.compile(r"server_args=ServerArgs\((.*)\)")
MULTICAST_ARGS = ("enable_nccl_nvls", "enable_symm_mem", "enable_torch_symm_mem")


def _resolved_arg(resolved: str, name: str) -> str | None:
    match = re.search(rf"\b{name}=('[^']*'|\w+)", resolved)
    return match.group(1).strip("'") if match else None


def served_facts(log_text: str) -> dict:
    """What the SGLang log says it served: weight GiB per GPU, the checkpoint's quantization, the attention
    backend it resolved, and the multicast paths its resolved arguments turn on."""
    facts: dict = {}
    loaded = _LOADED.findall(log_text)
    if loaded:
        facts["weights_gib_per_gpu"] = max(float(value) for value in loaded)
    quant = _LOADED_QUANT.findall(log_text)
    if quant:
        facts["checkpoint_quant"] = quant[-1]
    resolved = _RESOLVED.findall(log_text)
    if resolved:
        args = resolved[-1]
        facts["attention_backend"] = _resolved_arg(args, "attention_backend")
        multicast = [name for name in MULTICAST_ARGS if _resolved_arg(args, name) == "True"]
        fusion = _resolved_arg(args, "flashinfer_allreduce_fusion_backend")
        fusion_off = _resolved_arg(args, "enforce_disable_flashinfer_allreduce_fusion") == "True"
        if fusion not in (None, "None") and not fusion_off:
            multicast.append(f"flashinfer_allreduce_fusion_backend={fusion}")
        facts["multicast"] = multicast
    return facts


def check_served(spec: ServerSpec, plan: LaunchPlan, facts: dict) -> str | None:
    """Why the served engine is not what was asked for (weights of another size than the requested quantization
    takes, or multicast that was not allowed at TP > 1), else None."""
    problem = weights_problem("SGLang", spec, plan, facts)
    if problem:
        return problem
    multicast = facts.get("multicast")
    if multicast and plan.fit is not None and plan.fit.tp > 1 and not spec.options_as(SglangOptions).nvls:
        return (f"SGLang resolved {', '.join(multicast)}, which can use NVLink multicast, though tokenrig turned it "
                "off; stopped (--nvls allows multicast)")
    return None


BACKEND = Backend(
    name="sglang", summary="python -m sglang.launch_server", options=SglangOptions, model_dir=model_dir,
    launch_plan=launch_plan, metrics=METRICS, max_seqs_flags=("--max-running-requests",),
    max_batch_tokens_flags=("--chunked-prefill-size",), read_served=served_facts, check_served=check_served,
    package="sglang",
    setup=f"Install it on the GPU machine: pip install sglang=={SGLANG_VERSION} (make setup-sglang: a separate venv, "
          "SGLang pins torch 2.11), or unpack the wheels scripts/stage_sglang.sh stages into a folder of their own, "
          "first on PYTHONPATH (its pins differ from vLLM's; its wheel is manylinux_2_34: glibc 2.34 or newer)")

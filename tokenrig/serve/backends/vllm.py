"""The vllm backend: `vllm serve` (vLLM 0.26.0) with flags checked against vLLM's own source.

Pinned: vLLM 0.26.0, the release that pins torch 2.11. Every flag and VLLM_* variable used here is in
the list `scripts/gen_vllm_cli.py` generates from that wheel (tests/data/vllm-0.26.0-cli.json), which
the CPU tests parse the generated commands against. Since 0.11 the attention backend is the flag
`--attention-backend` (the variable VLLM_ATTENTION_BACKEND is gone).

Synthetic checkpoints use `--load-format dummy`: vLLM fills the weights (quantized ones too, from
config.json's quantization_config) with random values, so only config + tokenizer are read. FP8 is
vLLM's online quantization of a bf16 model (`--quantization fp8`, native on Hopper and Ada).

Tensor parallelism on NVSwitch hosts: vLLM 0.26 fuses all-reduce with RMSNorm through FlashInfer,
whose 'mnnvl' backend and torch symmetric memory use NVLink multicast. Unless `--nvls` asks for it,
tokenrig turns all of that off at TP > 1 (docs/serving.md says why and what else could reach it).

The server log proves what was served: `served_facts` reads the weight memory vLLM loaded, the
linear kernels and the attention backend it chose, and `check_served` refuses a run whose weight
memory is far from what the requested quantization would take.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

from tokenrig.serve.backends.base import Backend, BatchLimits, LaunchPlan, plan_for, resolve_attention
from tokenrig.serve.checkpoint import config_dir
from tokenrig.serve.fit import FitPlan
from tokenrig.serve.spec import LaunchError, ServerSpec, VllmOptions

VLLM_VERSION = "0.26.0"
ATTENTION = {"FLASH_ATTN": "FLASH_ATTN", "FLASHINFER": "FLASHINFER", "TRITON_ATTN": "TRITON_ATTN",
             "FLEX_ATTENTION": "FLEX_ATTENTION", "flash": "FLASH_ATTN", "noflash": "TRITON_ATTN"}
# Marlin kernels serve GPTQ/AWQ on Ampere and newer (every GPU profile tokenrig ships); fp8 is online.
QUANTIZATION = {"gptq": "gptq_marlin", "awq": "awq_marlin", "fp8": "fp8"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "gptq": "float16", "awq": "float16", "fp8": "bfloat16"}
CHECKPOINT_QUANT = ("gptq", "awq")  # quantized in config.json; fp8 quantizes a bf16 model at load
# At TP > 1: no FlashInfer all-reduce fusion (its 'mnnvl' backend is multicast), its one-shot/two-shot
# kernels through TensorRT-LLM's backend where anything still asks for it, no symmetric-memory
# all-reduce (multimem on NVSwitch) and torch's multicast in symmetric memory, NCCL without NVLink SHARP (NVLS).
NO_MULTICAST_ENV = {"VLLM_FLASHINFER_ALLREDUCE_BACKEND": "trtllm", "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
                    "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
NO_MULTICAST_COMPILATION = {"pass_config": {"fuse_allreduce_rms": False}}
# How a weight memory this far from the planned bytes reads: not the quantization that was asked for.
WEIGHT_TOLERANCE = 0.35
# vLLM's metric names for tokenrig's figures, newest first: 0.11-0.26 (tests/data/vllm-*-cli.json lists 0.26's),
# then <= 0.10's gpu_* names (hidden in 0.11, gone since). tokenrig's own server exports the same names.
METRICS = {
    "running": ("vllm:num_requests_running",),
    "waiting": ("vllm:num_requests_waiting",),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "prefix_cache_queries": ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
    "prompt_tokens": ("vllm:prompt_tokens_total",),
    "generation_tokens": ("vllm:generation_tokens_total",),
    "preemptions": ("vllm:num_preemptions_total",),
    "finished_requests": ("vllm:request_success_total",),
    "ttft_seconds": ("vllm:time_to_first_token_seconds",),
    "itl_seconds": ("vllm:inter_token_latency_seconds",),
    "e2e_seconds": ("vllm:e2e_request_latency_seconds",),
}


def check_servable(spec: ServerSpec) -> None:
    """What vLLM and SGLang both cannot serve: int8 weight-only Llama, or anything without a GPU."""
    if spec.quant not in DTYPES:
        raise LaunchError(f"the {spec.backend} backend has no int8 weight-only path for Llama checkpoints; use --quant "
                          "gptq, awq or fp8, or --backend tgi --quant int8 (EETQ)")
    if spec.device == "cpu":
        raise LaunchError(f"the {spec.backend} backend serves on a GPU: pick a GPU profile with --gpu")


def model_dir(spec: ServerSpec, progress=print, write: bool = True) -> Path:
    """Config + tokenizer only (quantized for gptq/awq): vLLM and SGLang make their own random weights
    (`--load-format dummy`)."""
    check_servable(spec)
    return config_dir(spec.model, quant=spec.quant if spec.quant in CHECKPOINT_QUANT else None, write=write)


def vllm_entrypoint() -> list[str]:
    """`vllm` where its script is on PATH; else this Python's `-m vllm.entrypoints.cli.main` where vLLM
    imports from here (an offline host with vLLM's wheels unpacked on PYTHONPATH has no script)."""
    if shutil.which("vllm") is None and importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    return ["vllm"]


def launch_plan(spec: ServerSpec, model_dir: Path, port: int, fit: FitPlan | None = None) -> LaunchPlan:
    check_servable(spec)
    fit = fit or plan_for(spec)
    attention = resolve_attention(spec, ATTENTION, None)
    command = [*vllm_entrypoint(), "serve", str(model_dir), "--served-model-name", spec.model.key,
               "--host", spec.host, "--port", str(port),
               "--tensor-parallel-size", str(fit.tp), "--dtype", DTYPES[spec.quant],
               "--load-format", "dummy", "--max-model-len", str(fit.max_model_len),
               "--max-num-seqs", str(spec.max_num_seqs or fit.max_num_seqs),
               "--max-num-batched-tokens", str(fit.prefill_chunk_tokens),
               "--gpu-memory-utilization", str(fit.gpu_memory_utilization)]
    if spec.quant in QUANTIZATION:
        command += ["--quantization", QUANTIZATION[spec.quant]]
    if attention:
        command += ["--attention-backend", attention]
    command += spec.options_as(VllmOptions).to_args()
    env: dict[str, str] = {}
    notes = [f"flags checked against vLLM {VLLM_VERSION}"]
    if fit.tp > 1 and not spec.options_as(VllmOptions).nvls:
        command += ["--compilation-config", json.dumps(NO_MULTICAST_COMPILATION, separators=(",", ":"))]
        env.update(NO_MULTICAST_ENV)
        notes.append("TP > 1: NVLink multicast off (no FlashInfer all-reduce fusion, no symmetric-memory "
                     "all-reduce, NCCL_NVLS_ENABLE=0); --nvls allows it")
    limits = BatchLimits.known(max_num_seqs=spec.max_num_seqs or fit.max_num_seqs,
                               max_batch_tokens=fit.prefill_chunk_tokens,
                               gpu_memory_utilization=fit.gpu_memory_utilization)
    return LaunchPlan(command + spec.extra_args, env=env, fit=fit, notes=notes, batch_limits=limits)


# Log lines of vLLM 0.26.0: v1/worker/gpu/model_runner.py ("Model loading took %s GiB and ..."),
# quantization/auto_gptq.py and auto_awq.py ("Using %s for %s"), kernels/linear/__init__.py (FP8/INT8:
# "Selected %s for %s"), platforms/cuda.py ("Using %s attention backend out of ..." when vLLM chooses,
# "Using AttentionBackendEnum.%s backend." when --attention-backend names it), and
# distributed/device_communicators/cuda_communicator.py ("Using [...] all-reduce backends").
_LOADED = re.compile(r"Model loading took ([\d.]+) GiB")
_KERNEL = re.compile(r"(?:Using|Selected) (\w+) for (\w+LinearMethod)\b")
_ATTENTION = re.compile(r"Using (\w+) attention backend out of|Using (?:AttentionBackendEnum\.)?(\w+) backend\.")
_ALLREDUCE = re.compile(r"Using \[([^\]]*)\] all-reduce backends")
MULTICAST_ALLREDUCE = ("SYMM_MEM", "NCCL_SYMM_MEM", "FLASHINFER")  # all-reduce backends that can use multicast


def served_facts(log_text: str) -> dict:
    """What the vLLM log says it served: weight GiB per GPU, linear kernel per method, attention backend,
    and at TP > 1 the all-reduce backends in use."""
    facts: dict = {}
    loaded = _LOADED.findall(log_text)
    if loaded:
        facts["weights_gib_per_gpu"] = max(float(value) for value in loaded)
    kernels = {method: kernel for kernel, method in _KERNEL.findall(log_text)}
    if kernels:
        facts["linear_kernels"] = kernels
    for first, second in _ATTENTION.findall(log_text):
        facts["attention_backend"] = first or second
    allreduce = _ALLREDUCE.findall(log_text)
    if allreduce:
        facts["allreduce_backends"] = re.findall(r"'(\w+)'", allreduce[-1])
    return facts


def check_served(spec: ServerSpec, plan: LaunchPlan, facts: dict) -> str | None:
    """Why the served engine is not what was asked for (weights of another size than the requested
    quantization takes, or a multicast all-reduce that was not allowed), else None."""
    problem = weights_problem("vLLM", spec, plan, facts)
    if problem:
        return problem
    multicast = sorted(set(facts.get("allreduce_backends", ())) & set(MULTICAST_ALLREDUCE))
    if multicast and not spec.options_as(VllmOptions).nvls:
        return (f"vLLM uses the all-reduce backends {', '.join(multicast)}, which can use NVLink multicast, "
                "though tokenrig turned them off; stopped (--nvls allows multicast)")
    return None


def weights_problem(engine: str, spec: ServerSpec, plan: LaunchPlan, facts: dict) -> str | None:
    """Why the weight memory an engine loaded per GPU is not the requested quantization's, else None."""
    loaded = facts.get("weights_gib_per_gpu")
    if loaded is None or plan.fit is None:
        return None
    planned = plan.fit.weight_bytes / 2**30
    if abs(loaded - planned) <= WEIGHT_TOLERANCE * planned:
        return None
    return (f"{engine} loaded {loaded:.2f} GiB of weights per GPU; {spec.quant} {spec.model.key} at TP "
            f"{plan.fit.tp} takes {planned:.2f} GiB: the served weights are not {spec.quant}")


def profile_args(trace_dir: Path, steps: int) -> list[str]:
    """vLLM's own torch profiler: each engine step annotated with its batch (`detailed_trace_annotation`),
    stopping by itself after `steps` (`max_iterations`), the API front end left out, no Python stacks."""
    config = {"profiler": "torch", "torch_profiler_dir": str(trace_dir.resolve()), "detailed_trace_annotation": True,
              "ignore_frontend": True, "max_iterations": steps, "torch_profiler_with_stack": False,
              "torch_profiler_dump_cuda_time_total": False}
    return ["--profiler-config", json.dumps(config, separators=(",", ":"))]


BACKEND = Backend(
    name="vllm", summary="vllm serve", options=VllmOptions, model_dir=model_dir, launch_plan=launch_plan,
    metrics=METRICS, max_seqs_flags=("--max-num-seqs",), max_batch_tokens_flags=("--max-num-batched-tokens",),
    read_served=served_facts, check_served=check_served, profile_args=profile_args, package="vllm",
    setup=f"Install it on the GPU machine: pip install vllm=={VLLM_VERSION} (make setup-vllm: a separate venv, vLLM "
          "pins torch 2.11), or unpack its wheels onto PYTHONPATH (tokenrig then runs python -m "
          "vllm.entrypoints.cli.main)")

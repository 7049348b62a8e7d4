"""The tgi backend: Hugging Face text-generation-launcher, and the same server as a `docker run` line.

Pinned: TGI 3.0.1. Flags were read from TGI's launcher reference (docs/source/reference/launcher.md:
--model-id, --num-shard, --quantize {awq, eetq, gptq, ...}, --dtype, --max-input-tokens,
--max-total-tokens, --max-batch-prefill-tokens, --max-batch-total-tokens, --max-concurrent-requests,
--cuda-memory-fraction, --hostname, --port). Its attention kernel is the server's ATTENTION
environment variable (paged | flashdecoding | flashinfer) and prefix caching PREFIX_CACHING.
TGI's flash models always use FlashAttention for prefill; ATTENTION picks the decode kernel, so
`noflash` here means vLLM's paged-attention kernel for decode, not a model without FlashAttention.
TGI has no dummy-weight loader, so it reads a full synthetic checkpoint (quantized for gptq/awq).
Upstream put TGI into maintenance in December 2025 and archived it in March 2026; its server ships only as
a Docker image. tokenrig keeps the launch plan (as --dry-run prints it) and the TGI client.
"""

from __future__ import annotations

from pathlib import Path

from tokenrig.serve.backends.base import Backend, BatchLimits, LaunchPlan, plan_for, resolve_attention
from tokenrig.serve.checkpoint import checkpoint_dir, make_checkpoint
from tokenrig.serve.fit import FitPlan
from tokenrig.serve.spec import LaunchError, ServerSpec, TgiOptions

TGI_VERSION = "3.0.1"
TGI_IMAGE = f"ghcr.io/huggingface/text-generation-inference:{TGI_VERSION}"
ATTENTION = {"flashinfer": "flashinfer", "flashdecoding": "flashdecoding", "paged": "paged",
             "flash": "flashdecoding", "noflash": "paged"}
QUANTIZE = {"gptq": "gptq", "awq": "awq", "int8": "eetq", "fp8": "fp8"}  # eetq, fp8: quantized at load
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
MIN_CONCURRENT_REQUESTS = 128  # TGI's default; more would only queue in the router
METRICS: dict[str, tuple[str, ...]] = {"running": ("tgi_batch_current_size",), "waiting": ("tgi_queue_size",),
           "batch_tokens": ("tgi_batch_current_max_tokens",)}


def _check(spec: ServerSpec) -> None:
    if spec.device == "cpu":
        raise LaunchError("the tgi backend serves on a GPU: pick a GPU profile with --gpu")


def model_dir(spec: ServerSpec, progress=print, write: bool = True) -> Path:
    _check(spec)
    quant = spec.quant if spec.quant in ("gptq", "awq") else None
    dtype = "float16" if spec.quant in ("fp16", "gptq", "awq") else "bfloat16"
    if not write:
        return checkpoint_dir(spec.model, quant=quant)
    return make_checkpoint(spec.model, dtype=dtype, quant=quant, progress=progress)


def server_args(spec: ServerSpec, fit: FitPlan, model_id: str) -> list[str]:
    """The launcher arguments shared by the native and the docker form."""
    context = fit.max_model_len
    prefill = max(fit.prefill_chunk_tokens, context)
    args = ["--model-id", model_id, "--num-shard", str(fit.tp),
            "--max-input-tokens", str(context - 1), "--max-total-tokens", str(context),
            "--max-batch-prefill-tokens", str(prefill),
            "--max-batch-total-tokens", str(max(fit.max_batch_total_tokens, prefill)),
            "--max-concurrent-requests", str(max(spec.max_num_seqs or fit.max_num_seqs, MIN_CONCURRENT_REQUESTS)),
            "--cuda-memory-fraction", str(fit.gpu_memory_utilization)]
    if spec.quant in QUANTIZE:
        args += ["--quantize", QUANTIZE[spec.quant]]
    else:
        args += ["--dtype", DTYPES[spec.quant]]
    return args


def launch_plan(spec: ServerSpec, model_dir: Path, port: int, fit: FitPlan | None = None) -> LaunchPlan:
    _check(spec)
    fit = fit or plan_for(spec)
    env = {}
    attention = resolve_attention(spec, ATTENTION, None)
    if attention:
        env["ATTENTION"] = attention
    env.update(spec.options_as(TgiOptions).env())
    command = ["text-generation-launcher", *server_args(spec, fit, str(model_dir)),
               "--hostname", spec.host, "--port", str(port)] + spec.extra_args
    docker = ["docker", "run", "--gpus", "all", "--shm-size", "1g", "-p", f"{port}:80",
              "-v", f"{model_dir}:/data/model"]
    for key, value in env.items():
        docker += ["-e", f"{key}={value}"]
    docker += [TGI_IMAGE, *server_args(spec, fit, "/data/model")] + spec.extra_args
    limits = BatchLimits.known(max_batch_tokens=max(fit.prefill_chunk_tokens, fit.max_model_len),
                               gpu_memory_utilization=fit.gpu_memory_utilization)
    return LaunchPlan(command, env=env, fit=fit, docker=docker, batch_limits=limits,
                      notes=[f"flags checked against TGI {TGI_VERSION}'s launcher reference"])


BACKEND = Backend(
    name="tgi", summary="text-generation-launcher; its server is archived upstream", options=TgiOptions,
    model_dir=model_dir, launch_plan=launch_plan, metrics=METRICS,
    max_seqs_flags=("--max-batch-size",), max_batch_tokens_flags=("--max-batch-prefill-tokens",),
    default_client="tgi",
    setup=f"Run it as a container instead (see --dry-run's docker line), or build TGI {TGI_VERSION} from source on "
          "the GPU machine; upstream put TGI into maintenance in December 2025 and archived it in March 2026, and "
          "its server ships only as a Docker image")

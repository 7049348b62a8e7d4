"""Reference parsers for the engines tokenrig launches but cannot install here (no GPU): vLLM and TGI.

Built by hand from the engines' own sources, independently of tokenrig's backends, so a wrong or
renamed flag in a generated command fails to parse:

* vLLM 0.11.0 — vllm/engine/arg_utils.py (EngineArgs.add_cli_args; types from the config
  dataclasses: Literal -> choices, bool -> BooleanOptionalAction, max_model_len -> human-readable
  int), vllm/entrypoints/openai/cli_args.py (--host, --port), vllm/entrypoints/cli/serve.py
  (`vllm serve [model_tag]`), quantization names from vllm/model_executor/layers/quantization,
  attention backends from vllm/attention/backends/registry.py (`_Backend`).
* TGI 3.0.1 — docs/source/reference/launcher.md (the launcher's clap arguments and possible
  values) and the launcher's checks between them; ATTENTION values from the server's globals.
"""

from __future__ import annotations

import argparse
import re

VLLM_QUANTIZATION = ["aqlm", "awq", "deepspeedfp", "tpu_int8", "fp8", "ptpc_fp8", "fbgemm_fp8", "modelopt",
                     "modelopt_fp4", "marlin", "bitblas", "gguf", "gptq_marlin_24", "gptq_marlin", "gptq_bitblas",
                     "awq_marlin", "gptq", "compressed-tensors", "bitsandbytes", "qqq", "hqq", "experts_int8",
                     "ipex", "quark", "moe_wna16", "torchao", "auto-round"]
VLLM_LOAD_FORMATS = ["auto", "pt", "safetensors", "npcache", "dummy", "tensorizer", "runai_streamer",
                     "bitsandbytes", "sharded_state", "gguf", "mistral"]
VLLM_ATTENTION_BACKENDS = {"FLASH_ATTN", "TRITON_ATTN", "XFORMERS", "ROCM_FLASH", "TORCH_SDPA", "FLASHINFER",
                           "FLASHINFER_MLA", "TRITON_MLA", "CUTLASS_MLA", "FLASHMLA", "FLASH_ATTN_MLA", "PALLAS",
                           "IPEX", "FLEX_ATTENTION", "TREE_ATTN", "ROCM_ATTN"}
TGI_QUANTIZE = ["awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin", "bitsandbytes", "bitsandbytes-nf4",
                "bitsandbytes-fp4", "fp8"]
TGI_ATTENTION = {"paged", "flashdecoding", "flashinfer"}


class _Strict(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def _human_readable_int(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    if not match:
        raise argparse.ArgumentTypeError(value)
    return int(match.group(1)) * {"": 1, "k": 1000, "m": 10**6, "g": 10**9}[match.group(2).lower()]


def vllm_serve_parser() -> argparse.ArgumentParser:
    parser = _Strict(prog="vllm serve", allow_abbrev=False)
    parser.add_argument("model_tag", nargs="?")
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int)
    parser.add_argument("--dtype", choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    parser.add_argument("--load-format", choices=VLLM_LOAD_FORMATS)
    parser.add_argument("--max-model-len", type=_human_readable_int)
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--max-num-batched-tokens", type=_human_readable_int)
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--quantization", "-q", choices=VLLM_QUANTIZATION)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction)
    return parser


def parse_vllm(command: list[str], env: dict[str, str]) -> argparse.Namespace:
    if command[:2] != ["vllm", "serve"]:
        raise ValueError(f"not a `vllm serve` command: {command[:2]}")
    args = vllm_serve_parser().parse_args(command[2:])
    backend = env.get("VLLM_ATTENTION_BACKEND")
    if backend is not None and backend not in VLLM_ATTENTION_BACKENDS:
        raise ValueError(f"VLLM_ATTENTION_BACKEND={backend} is not a vLLM attention backend")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ValueError("--gpu-memory-utilization must be in (0, 1]")
    return args


def tgi_launcher_parser() -> argparse.ArgumentParser:
    parser = _Strict(prog="text-generation-launcher", allow_abbrev=False)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--num-shard", type=int)
    parser.add_argument("--quantize", choices=TGI_QUANTIZE)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"])
    parser.add_argument("--max-input-tokens", type=int)
    parser.add_argument("--max-total-tokens", type=int)
    parser.add_argument("--max-batch-prefill-tokens", type=int)
    parser.add_argument("--max-batch-total-tokens", type=int)
    parser.add_argument("--max-concurrent-requests", type=int)
    parser.add_argument("--cuda-memory-fraction", type=float)
    parser.add_argument("--hostname")
    parser.add_argument("--port", "-p", type=int)
    return parser


def parse_tgi(arguments: list[str], env: dict[str, str]) -> argparse.Namespace:
    """TGI's launcher arguments (without the program name) plus the checks its launcher makes between them."""
    args = tgi_launcher_parser().parse_args(arguments)
    if args.dtype and args.quantize:
        raise ValueError("--dtype cannot be used with --quantize")
    if not args.max_input_tokens < args.max_total_tokens:
        raise ValueError("max_input_tokens must be < max_total_tokens")
    if args.max_batch_prefill_tokens < args.max_input_tokens:
        raise ValueError("max_batch_prefill_tokens must be >= max_input_tokens")
    if args.max_batch_total_tokens < max(args.max_total_tokens, args.max_batch_prefill_tokens):
        raise ValueError("max_batch_total_tokens must be >= max_total_tokens and max_batch_prefill_tokens")
    if env.get("ATTENTION", "paged") not in TGI_ATTENTION:
        raise ValueError(f"ATTENTION={env['ATTENTION']} is not one of {TGI_ATTENTION}")
    return args

"""Server process entry point: `python -m tokenrig.serve.server --engine hf|sim ...`.

The launcher runs this in its own process; it can also be run by hand. Prints one line when
it listens and shuts down cleanly on SIGINT/SIGTERM. The engines' own options are the hf and sim
backends' (`HfOptions`, `SimOptions`), under the flags `tokenrig serve` takes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from aiohttp import web

from tokenrig.profiles import resolve_gpu, resolve_model
from tokenrig.serve.api import OpenAIServer
from tokenrig.serve.engines.hf import HFEngine
from tokenrig.serve.engines.sim import BLOCK_TOKENS, FixedSchedule, RooflineEngine, RooflineParams
from tokenrig.serve.engines.step_profiler import StepProfiler
from tokenrig.serve.fit import DEFAULT_GPU_MEMORY_UTILIZATION, FitError, UnknownQuantError
from tokenrig.serve.spec import HfOptions, LaunchError, SimOptions
from tokenrig.serve.tokenizer import SPECIAL_TOKENS, TEMPLATE_WORDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tokenrig.serve.server", description=__doc__)
    parser.add_argument("--engine", choices=["hf", "sim"], required=True)
    parser.add_argument("--model", required=True, help="model profile name (tiny, llama2-7b, ...)")
    parser.add_argument("--model-dir", required=True, help="checkpoint (hf) or tokenizer (sim) directory")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gpu", default="cpu", help="GPU profile whose roofline the sim engine follows")
    parser.add_argument("--device", default="cpu", help="torch device for the hf engine")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attn-implementation", default="sdpa", help="hf engine: eager, sdpa or flash_attention_2")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context served: prompt + max_tokens beyond it get HTTP 400 (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="hf and sim engines: KV cache size in tokens (default: transformers sizes it from free "
                             "memory; the sim engine takes the fit planner's)")
    parser.add_argument("--quant", default="bf16", help="sim engine: weight format whose bytes each step streams")
    parser.add_argument("--tp", type=int, default=1, help="sim engine: tensor-parallel GPUs")
    parser.add_argument("--gpu-memory-utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION,
                        help="sim engine: fraction of GPU memory its KV plan may use")
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="hf engine: serve /start_profile and /stop_profile, writing torch-profiler traces here")
    parser.add_argument("--profile-steps", type=int, default=64, help="engine steps a profile records")
    HfOptions.add_arguments(parser)
    SimOptions.add_arguments(parser)
    return parser


def build_engine(args):
    """The engine the parsed arguments ask for, and its model profile."""
    model = resolve_model(args.model)
    if args.engine == "hf":
        profiler = StepProfiler(args.profile_dir, args.profile_steps) if args.profile_dir else None
        return HFEngine(args.model_dir, device=args.device, dtype=args.dtype,
                        attn_implementation=args.attn_implementation,
                        max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
                        kv_cache_tokens=args.kv_cache_tokens, options=HfOptions.from_args(args),
                        profiler=profiler), model
    options = SimOptions.from_args(args)
    options.validate()
    first_content_id = len(SPECIAL_TOKENS) + len(TEMPLATE_WORDS)
    if options.fixed_schedule:
        assert options.sim_ttft_ms is not None and options.sim_tpot_ms is not None, "validate() refuses one alone"
        return FixedSchedule(options.sim_ttft_ms / 1000, options.sim_tpot_ms / 1000, model.vocab_size,
                             first_content_id, slots=args.max_num_seqs), model
    params = RooflineParams(gpu_memory_utilization=args.gpu_memory_utilization)
    if args.max_num_seqs:
        params.max_num_seqs = args.max_num_seqs
    if args.max_batch_tokens:
        params.max_batch_tokens = args.max_batch_tokens
    return RooflineEngine(model, resolve_gpu(args.gpu), first_content_id, options.roofline(params), args.quant,
                          args.tp, context_tokens=args.max_model_len, kv_cache_tokens=args.kv_cache_tokens), model


def cache_config(engine, args) -> dict | None:
    """The KV cache in the words of vLLM's cache_config_info, for the engine that sizes it from a memory plan
    (the sim's roofline); transformers' cache is sized by the library, and tells no block count."""
    if not isinstance(engine, RooflineEngine):
        return None
    block = BLOCK_TOKENS
    return {"block_size": block, "num_gpu_blocks": engine.kv_capacity_tokens // block,
            "kv_cache_size_tokens": engine.kv_capacity_tokens, "gpu_memory_utilization": args.gpu_memory_utilization}


def main(argv: list[str] | None = None) -> None:
    # heavy: after the arguments are checked. The class tokenrig writes its tokenizers with (serve/checkpoint.py),
    # not AutoTokenizer, whose import pulls in torch: 4.6 s of a sim server's start against 2.0 s
    from transformers import PreTrainedTokenizerFast

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine, model = build_engine(args)
    except (FitError, UnknownQuantError, LaunchError) as error:
        raise SystemExit(f"tokenrig server: {error}") from None
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model_dir)
    server = OpenAIServer(engine, tokenizer, args.served_model_name or model.key,
                          args.max_model_len or model.max_context, cache_config(engine, args))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(f"tokenrig {args.engine} server for {model.key} on http://{args.host}:{args.port}", flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None, shutdown_timeout=5)


if __name__ == "__main__":
    main()

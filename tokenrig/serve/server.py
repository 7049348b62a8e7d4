"""Server process entry point: `python -m tokenrig.serve.server --engine hf|sim ...`.

The launcher runs this in its own process; it can also be run by hand. Prints one line when
it listens and shuts down cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging

from aiohttp import web

from tokenrig.serve.engines.sim import add_roofline_flags


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
    parser.add_argument("--compile-level", type=int, default=0,
                        help="hf engine: torch.compile level of transformers' continuous batching (0 = off, 1-3)")
    parser.add_argument("--kv-cache-tokens", type=int, default=None,
                        help="hf engine: paged KV cache size in tokens (default: transformers sizes it from free memory)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="hf engine: CUDA graphs over the paged cache (default: transformers decides)")
    parser.add_argument("--kv-padding-tokens", type=int, default=None,
                        help="hf engine with CUDA graphs: pad each step's KV read to a multiple of this (default 16384)")
    parser.add_argument("--quant-kernel", default=None,
                        help="hf engine: gptqmodel kernel for a GPTQ/AWQ checkpoint (default: gptqmodel's choice)")
    parser.add_argument("--sim-ttft-ms", type=float, default=None,
                        help="sim engine fixed schedule: time to first token (with --sim-tpot-ms)")
    parser.add_argument("--sim-tpot-ms", type=float, default=None, help="sim engine fixed schedule: ms per token")
    parser.add_argument("--quant", default="bf16", help="sim engine: weight format whose bytes each step streams")
    parser.add_argument("--tp", type=int, default=1, help="sim engine: tensor-parallel GPUs")
    add_roofline_flags(parser)
    return parser


def build_engine(args):
    from tokenrig.profiles import resolve_gpu, resolve_model
    from tokenrig.serve.tokenizer import SPECIAL_TOKENS, TEMPLATE_WORDS

    model = resolve_model(args.model)
    if args.engine == "hf":
        from tokenrig.serve.engines.hf import HFEngine

        return HFEngine(args.model_dir, device=args.device, dtype=args.dtype,
                        attn_implementation=args.attn_implementation,
                        max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
                        compile_level=args.compile_level, cuda_graphs=args.cuda_graphs,
                        kv_cache_tokens=args.kv_cache_tokens, quant_kernel=args.quant_kernel,
                        kv_padding_tokens=args.kv_padding_tokens), model
    from tokenrig.serve.engines.sim import FixedSchedule, RooflineEngine, RooflineParams, roofline_params

    first_content_id = len(SPECIAL_TOKENS) + len(TEMPLATE_WORDS)
    if args.sim_ttft_ms is not None or args.sim_tpot_ms is not None:
        if args.sim_ttft_ms is None or args.sim_tpot_ms is None:
            raise SystemExit("--sim-ttft-ms and --sim-tpot-ms go together")
        return FixedSchedule(args.sim_ttft_ms / 1000, args.sim_tpot_ms / 1000, model.vocab_size, first_content_id), model
    params = RooflineParams()
    if args.max_num_seqs:
        params.max_num_seqs = args.max_num_seqs
    if args.max_batch_tokens:
        params.max_batch_tokens = args.max_batch_tokens
    params = roofline_params(vars(args), params)
    return RooflineEngine(model, resolve_gpu(args.gpu), first_content_id, params, args.quant, args.tp), model


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from tokenrig.serve.api import OpenAIServer

    from tokenrig.serve.fit import FitError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine, model = build_engine(args)
    except FitError as error:
        raise SystemExit(f"tokenrig server: {error}") from None
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    server = OpenAIServer(engine, tokenizer, args.served_model_name or model.key,
                          args.max_model_len or model.max_context)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(f"tokenrig {args.engine} server for {model.key} on http://{args.host}:{args.port}", flush=True)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None, shutdown_timeout=5)


if __name__ == "__main__":
    main()

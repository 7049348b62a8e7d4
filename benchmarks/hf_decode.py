"""Batch-1 decode speed of tokenrig's hf engine against the card's memory-bandwidth roofline.

Each configuration runs in its own process: it loads the synthetic checkpoint into the same
HFEngine that `tokenrig serve --backend hf` runs (built from the hf backend's launch plan by the
server's own argument parser, so with the same KV-cache and step limits and options), and times
single requests (--prompt-tokens in, --output-tokens out) with no HTTP in between, so what the
server adds and what the engine costs can be told apart. A configuration is an attention
implementation with optional `+graphs` (CUDA graphs), `+compile=N` (torch.compile level), `+kv=N`
(KV-cache tokens instead of the planner's) and `+kvpad=N` (KV read padded to a multiple of N under
CUDA graphs). Ratios are against the first configuration, measured in the same run, and against the
roofline: every weight byte but the input embedding table is read once per token, so a token takes
at least streamed bytes / memory bandwidth.

    python benchmarks/hf_decode.py --gpu h200 --model llama2-7b --configs eager sdpa sdpa+graphs

Ctrl-C abandons the configuration in progress and prints the ones already measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_config(text: str) -> dict:
    attention, *options = text.split("+")
    config = {"label": text, "attention": attention, "cuda_graphs": None, "compile_level": 0, "kv_tokens": None,
              "kv_padding_tokens": None}
    for option in options:
        name, _, value = option.partition("=")
        if name == "graphs":
            config["cuda_graphs"] = True
        elif name == "compile" and value.isdigit():
            config["compile_level"] = int(value)
        elif name == "kv" and value.isdigit():
            config["kv_tokens"] = int(value)
        elif name == "kvpad" and value.isdigit():
            config["kv_padding_tokens"] = int(value)
        else:
            raise SystemExit(f"unknown option {option!r} in {text!r}: use +graphs, +compile=N, +kv=N, +kvpad=N")
    return config


def server_spec(args, config: dict):
    from tokenrig.profiles import resolve_gpu, resolve_model
    from tokenrig.serve.spec import HfOptions, ServerSpec

    gpu = resolve_gpu(args.gpu)
    options = HfOptions(compile_level=config["compile_level"], cuda_graphs=config["cuda_graphs"],
                        kv_padding_tokens=config["kv_padding_tokens"], quant_kernel=args.quant_kernel)
    # +kv=N: the server's --kv-cache-tokens after the planner's, and the last one given counts
    kv_override = ["--kv-cache-tokens", str(config["kv_tokens"])] if config["kv_tokens"] else []
    return ServerSpec(backend="hf", model=resolve_model(args.model), gpu=gpu,
                      device="cpu" if gpu.key == "cpu" else "cuda", quant=args.quant, attention=config["attention"],
                      concurrency=args.concurrency, max_model_len=args.max_model_len, options=options,
                      extra_args=kv_override)


def served_engine(spec):
    """The HFEngine `tokenrig serve` would run for `spec`: its launch plan's arguments, parsed by the server."""
    from tokenrig.serve.backends import launch_plan, model_dir
    from tokenrig.serve.server import build_engine, build_parser

    directory = model_dir(spec, progress=lambda line: print(line, file=sys.stderr))
    command = launch_plan(spec, directory, port=0).command
    engine, _ = build_engine(build_parser().parse_args(command[command.index("tokenrig.serve.server") + 1:]))
    return engine


def roofline_ms_per_token(args) -> float:
    from tokenrig.serve.fit import weight_bytes

    spec = server_spec(args, parse_config("sdpa"))
    model = spec.model
    streamed = weight_bytes(model, args.quant) - 2 * model.vocab_size * model.hidden_size  # one embedding row is read
    return streamed / spec.gpu.bandwidth_bytes_per_s * 1e3


async def time_requests(engine, args, vocab_size: int) -> list[dict]:
    import random

    from tokenrig.serve.engines import GenerationRequest

    rng = random.Random(0)

    async def one(request_id: str, prompt_tokens: int, output_tokens: int) -> dict:
        prompt = [rng.randrange(3, vocab_size) for _ in range(prompt_tokens)]
        started = time.perf_counter()
        token_times, tokens = [], 0
        async for new in engine.generate(GenerationRequest(request_id, prompt, output_tokens, started)):
            token_times.append(time.perf_counter())
            tokens += len(new)
        decode_s = token_times[-1] - token_times[0]
        return {"ttft_ms": (token_times[0] - started) * 1e3, "tokens": tokens, "chunks": len(token_times),
                "tpot_ms": decode_s / (tokens - 1) * 1e3 if tokens > 1 else None}

    await one("warmup", 32, 8)  # first forward: allocator, kernels, graph capture or compilation
    return [await one(f"r{i}", args.prompt_tokens, args.output_tokens) for i in range(args.repeats)]


def measure_one(args, config: dict) -> dict:
    """In the child process: load the engine for one configuration and time it."""
    import torch

    spec = server_spec(args, config)
    engine = served_engine(spec)

    async def run() -> tuple[float, list[dict]]:
        started = time.perf_counter()
        await engine.start()
        load_s = time.perf_counter() - started
        try:
            return load_s, await time_requests(engine, args, spec.model.vocab_size)
        finally:
            await engine.stop()

    load_s, requests = asyncio.run(run())
    peak = torch.cuda.max_memory_reserved() / 1e9 if spec.device == "cuda" else None
    return {**config, "kv_tokens": engine.kv_cache_tokens, "load_s": load_s, "requests": requests,
            "ttft_ms": statistics.median(r["ttft_ms"] for r in requests),
            "tpot_ms": statistics.median(r["tpot_ms"] for r in requests),
            "tokens_per_chunk": statistics.median(r["tokens"] / r["chunks"] for r in requests), "peak_gb": peak}


def run_child(args, config_text: str) -> dict:
    from tokenrig.serve.backends import dry_run_plan

    command = [sys.executable, __file__, "--child", config_text] + args.passthrough
    env = dict(os.environ, **dry_run_plan(server_spec(args, parse_config(config_text)), 0).env)  # as the server's
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        return {**parse_config(config_text), "error": last_line}
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(results: list[dict], roofline_ms: float, args) -> str:
    lines = [f"batch-1 decode, {args.model} {args.quant} on {args.gpu}: {args.prompt_tokens} prompt tokens, "
             f"{args.output_tokens} generated, median of {args.repeats} requests; roofline {roofline_ms:.2f} ms/token",
             "", "| configuration | KV tokens | load s | TTFT ms | TPOT ms | tok/s | of roofline | TPOT vs first |",
             "|---|---|---|---|---|---|---|---|"]
    baseline = next((r["tpot_ms"] for r in results if "error" not in r), None)
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | | | | | | | failed: {r['error'][:120]} |")
            continue
        lines.append(f"| {r['label']} | {r['kv_tokens']} | {r['load_s']:.1f} | {r['ttft_ms']:.1f} | "
                     f"{r['tpot_ms']:.2f} | {1e3 / r['tpot_ms']:.1f} | {roofline_ms / r['tpot_ms']:.1%} | "
                     f"{r['tpot_ms'] / baseline:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="cpu")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--quant", default="bf16", help="bf16, gptq or awq (checkpoint written on first use)")
    parser.add_argument("--quant-kernel", default=None, help="gptqmodel kernel for gptq/awq, as tokenrig serve takes")
    parser.add_argument("--configs", nargs="+", default=["eager", "sdpa"])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64, help="what the KV cache is planned for, as in serve")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=None, help="also write the table and raw results here (.md, .json)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.passthrough = [arg for name in ("gpu", "model", "quant", "prompt_tokens", "output_tokens", "repeats",
                                         "concurrency", "max_model_len", "quant_kernel")
                        if getattr(args, name) is not None
                        for arg in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    if args.child:
        print(json.dumps(measure_one(args, parse_config(args.child))))
        return
    for text in args.configs:
        parse_config(text)  # refuse a bad list before loading anything
    roofline_ms = roofline_ms_per_token(args)
    results = []
    try:
        for text in args.configs:
            print(f"... {text}", file=sys.stderr, flush=True)
            results.append(run_child(args, text))
    except KeyboardInterrupt:
        print("stopped: reporting the configurations measured so far", file=sys.stderr)
    report = table(results, roofline_ms, args)
    print(report)
    if args.out:
        args.out.with_suffix(".md").write_text(report + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"roofline_ms": roofline_ms, "results": results}, indent=1))


if __name__ == "__main__":
    main()

"""The `tokenrig` command line: every subcommand's options, their types and checks, and the examples."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from tokenrig.serve.spec import add_server_arguments, backend_flag
from tokenrig.train.spec import add_train_options

EXAMPLES = """examples:
  tokenrig loadtest                                  tiny model, hf server on CPU, chat scenario
  tokenrig loadtest --backend sim --gpu a800 --model 13b --users 32
  tokenrig loadtest --backend sim --gpu h100-sxm --model 7b --rate 5 --duration 120
  tokenrig loadtest --backend sim --gpu a800 --model 13b --find-max --slo ttft_p99=500ms,tpot_p99=50ms
  tokenrig loadtest --backend sim --scenario rag --sweep 1,2,4,8 --slo ttft_p90=1s
  tokenrig serve --backend hf --model tiny --port 8000
  tokenrig serve --backend vllm --gpu a800 --model 13b --quant gptq --dry-run
  tokenrig serve --backend tgi --gpu rtx4090 --model 70b --quant awq --dry-run
  tokenrig fit --gpu rtx4090 --model 70b --concurrency 16
  tokenrig model make llama2-7b --quant gptq
  tokenrig train                                     tiny model, ZeRO-2, one CPU process
  tokenrig train --gpu h100-sxm --model 7b --mode lora --zero 2 --recompute --micro-batch 8 --seq-len 1024
  tokenrig train --matrix study-7b                   the study's grid, one comparison table
  tokenrig capacity --from docs/results --gpu h100-sxm,a800,rtx4090 --model 13b --quant bf16,awq \\
      --scenario chat --slo ttft_p99=500ms,tpot_p99=50ms --target-rps 50
  tokenrig report results/RUN_ID results/OTHER_RUN -o report.html --csv exports/
"""


def add_server_args(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print what would run and exit")


def _fraction(text: str) -> float:
    """'5%' or '0.05' -> 0.05, within [0, 1]."""
    try:
        value = float(text.removesuffix("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fraction: {text!r} (write 0.05 or 5%)") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1 (0% and 100%)")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def _positive(text: str) -> float:
    """A finite number > 0 (a rate of 0 or inf, a negative timeout are refused, not ignored or hung on)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text!r}")
    return value


def _rate(text: str) -> float:
    """--rate: requests/s above 0, or inf (the throughput mode)."""
    return math.inf if text.strip().lower() in ("inf", "infinity") else _positive(text)


def _not_negative(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text!r}")
    return value


def _count_or(keyword: str | None, unit: str, hint: str | None = None):
    """An argparse type: a whole number of `unit`s (1 or more), or the word `keyword` (None: no word)."""
    def parse(text: str) -> int | str:
        if keyword is not None and text == keyword:
            return text
        try:
            value = int(text)
        except ValueError:
            alternative = f" (or {hint})" if hint else ""
            raise argparse.ArgumentTypeError(f"a whole number of {unit}s{alternative}, not {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"at least 1 {unit}, not {value}")
        return value
    return parse


def given_options(argv: list[str] | None) -> set[str]:
    """The options the command line gives, by their dest, whatever their defaults: a --url run records as
    declared only what its user said (argparse alone cannot tell `--backend hf` from the default)."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                for option in command._actions:
                    option.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenrig", description="Measure LLM serving and training speed and cost on your own hardware.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    loadtest = commands.add_parser(
        "loadtest", help="run a load test against a server tokenrig starts (or --url)",
        description="Start a server, drive a serving scenario with Locust, write results/<run-id>/ and print "
                    "latency percentiles and throughput.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(loadtest)
    loadtest.add_argument("--scenario", default="chat",
                          help="name in tokenrig/scenarios/serving/ or a path to a .yaml file")
    loadtest.add_argument("--data", help="the requests, in place of the scenario's (its load stays): a ShareGPT-format "
                                         ".json file (first human turn = prompt, its gpt reply's tokens = output "
                                         "length), or synthetic lengths prompt_tokens=512,output_tokens=128 (each "
                                         "with optional _stdev, _min, _max)")
    loadtest.add_argument("--users", type=_count_or("sweep", "user", "'sweep' with --sweep"),
                          help="closed loop: this many concurrent streams ('sweep' with --sweep)")
    loadtest.add_argument("--rate", type=_rate,
                          help="open loop: requests per second (Poisson unless --arrival); inf: the throughput mode, "
                               "--max-in-flight requests kept in flight to saturate the server (throughput figures, "
                               "not latency)")
    loadtest.add_argument("--max-in-flight", type=_count_or(None, "request"),
                          help="open loop: cap on requests in flight; --rate inf: the requests kept in flight "
                               "(default: the scenario's, 512)")
    loadtest.add_argument("--arrival", choices=["poisson", "constant", "gamma"], default="poisson")
    loadtest.add_argument("--burstiness", type=_positive, help="gamma arrivals: coefficient of variation of the gaps")
    loadtest.add_argument("--seed", type=int, help="seed of arrivals and prompts: the same seed sends the same "
                                                   "prompts (default: a fresh one per run, recorded in metadata.json)")
    loadtest.add_argument("--duration", type=_positive, help="seconds of load (overrides the scenario)")
    loadtest.add_argument("--warmup", type=_not_negative, help="seconds excluded at the start")
    loadtest.add_argument("--request-timeout", type=_positive, default=600.0,
                          help="seconds without a byte from the server before a request counts as failed; after "
                               "the load ends, in-flight requests get this long to finish (default 600)")
    loadtest.add_argument("--max-error-rate", type=_fraction, default=0.05,
                          help="fraction (or percent: 5%%) of measured requests that may fail before the run is "
                               "FAILED, with exit status 1 (default 5%%)")
    loadtest.add_argument("--slo", help="service-level objectives, e.g. ttft_p99=500ms,tpot_p99=50ms: judged with a "
                                        "confidence statement, goodput reported")
    loadtest.add_argument("--find-max", action="store_true",
                          help="with --slo: find the highest open-loop rate meeting every SLO (short probe steps "
                               "up from --rate, then full steps where the percentile, interpolated between the "
                               "bracketing steps, crosses its threshold); writes search.json and the curve walked")
    loadtest.add_argument("--quick", action="store_true",
                          help="--find-max for a first look: 3 samples beyond the judged percentile per step (300 "
                               "requests for a p99) instead of 10; the knee's stated 95%% interval is wider")
    loadtest.add_argument("--sweep", help="comma-separated rates (req/s), or user counts with --users sweep, "
                                          "one step each, e.g. --sweep 1,2,4,8")
    loadtest.add_argument("--tail-samples", type=int,
                          help="--find-max: samples beyond the judged percentile each step must collect (default 10: "
                               "1000 requests for a p99; 3 with --quick)")
    loadtest.add_argument("--precision", type=_positive, default=0.05,
                          help="--find-max: stop when the bracket is this tight")
    loadtest.add_argument("--max-step", type=_positive, default=300, help="--find-max: longest step, seconds")
    loadtest.add_argument("--profile-steps", type=int, metavar="N",
                          help="after each step's warm-up, trace N engine steps with the engine's profiler (vllm, hf) "
                               "and report the time by operator (GEMMs by layer role, attention, norms, sampling, "
                               "idle); a profiled step's latencies carry the profiler's cost, so not with --find-max")
    loadtest.add_argument("--profile-dir", type=Path, metavar="DIR",
                          help="--url with --profile-steps: where that server writes its traces (its --profiler-config "
                               "torch_profiler_dir, readable from here)")
    loadtest.add_argument("--workers", type=_count_or("auto", "worker", "'auto'"),
                          help="distributed load: a Locust master here and N worker processes splitting the schedule "
                               "(spawned here unless --local-workers); 'auto': as many as the plan's expected chunk "
                               "rate needs at the measured per-core ceiling, up to one per free core")
    loadtest.add_argument("--local-workers", type=int, help="how many of --workers to spawn on this machine "
                                                            "(default all); the rest connect from elsewhere")
    loadtest.add_argument("--master-host", default="127.0.0.1",
                          help="address the master binds for workers (0.0.0.0 for workers on other machines)")
    loadtest.add_argument("--master-port", type=int, help="master port (default: a free one, 5557 with remote workers)")
    loadtest.add_argument("--url", help="load-test a server that is already running at this base URL "
                                        "(http:// unless https:// is given); a test request checks it before the load")
    loadtest.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                          help="--url: bearer token sent with every request (default: $OPENAI_API_KEY); never written "
                               "to the run directory")
    loadtest.add_argument("--served-model", help="--url: the model name the server serves (default: the one "
                                                 "/v1/models lists, or the --model profile's name among several)")
    loadtest.add_argument("--ca-cert", type=Path, metavar="FILE",
                          help="--url over https: trust the CA certificate(s) in this PEM file, for the test request "
                               "and the load (sets SSL_CERT_FILE; default: the system's certificates)")
    loadtest.add_argument("--tokenizer", help="--url: the served model's tokenizer.json, its directory, or its "
                                              "Hugging Face model name (ORG/NAME: from the Hub's cache or the Hub), "
                                              "to count prompt and reply tokens with")
    loadtest.add_argument("--results", type=Path, default=Path("results"), help="where run directories go")
    loadtest.add_argument("--compare", nargs="+", type=Path, metavar="DIR",
                          help="no run: one markdown table of every load-test run under these directories")
    loadtest.add_argument("--client", choices=["openai", "tgi"], default=None,
                          help="request API: OpenAI streaming, or TGI's /generate_stream through huggingface_hub's "
                               "InferenceClient (default: the backend's, tgi for --backend tgi, else openai)")
    loadtest.add_argument("--scrape-interval", type=_positive, default=1.0,
                          help="seconds between scrapes of the server's /metrics into server_metrics.jsonl")
    loadtest.add_argument("--no-scrape", action="store_true",
                          help="do not scrape the server's /metrics (a --url server without one is found out "
                               "before the load and not scraped anyway)")
    loadtest.add_argument("--metrics-port", type=int, default=None,
                          help="expose live Prometheus metrics on this port (0 = any free port)")
    loadtest.add_argument("--prometheus-targets", type=Path, default=None,
                          help="file_sd directory where the run announces its scrape targets "
                               "(default grafana/targets, which `make monitor` watches; implies --metrics-port 0)")

    serve = commands.add_parser("serve", help="start a server and keep it up until Ctrl-C",
                                description="Start a server with the launcher (health-checked, logged).")
    add_server_args(serve)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1")

    _add_train_parser(commands)

    model = commands.add_parser("model", help="synthetic checkpoints and model profiles")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    make = model_commands.add_parser("make", help="write a local HF checkpoint with random weights",
                                     description="Write config.json, a locally built tokenizer and random-weight "
                                                 "safetensors for a model profile (no hub needed).")
    make.add_argument("name", help="model profile name")
    make.add_argument("--out", type=Path, default=None, help="parent directory (default ~/.cache/tokenrig/models)")
    make.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    make.add_argument("--quant", choices=["gptq", "awq"], default=None,
                      help="write a 4-bit checkpoint in the GPTQ or AWQ layout (group size 128, fp16 scales)")
    make.add_argument("--force", action="store_true", help="rewrite an existing checkpoint")
    model_commands.add_parser("list", help="list model profiles")
    commands.add_parser("gpus", help="list GPU profiles")
    fit = commands.add_parser("fit", help="memory plan: smallest TP that fits weights + KV cache",
                              description="Weights, activations, runtime and KV cache per GPU for a model on a GPU "
                                          "type; says what would fit when it does not.")
    fit.add_argument("--gpu", required=True)
    fit.add_argument("--model", required=True, help="model profile, or a Hugging Face config.json")
    fit.add_argument("--quant", default="bf16")
    fit.add_argument("--tp", type=int, default=None)
    fit.add_argument("--concurrency", type=int, default=16)
    fit.add_argument("--context", "--max-model-len", dest="context", type=int, default=None,
                     help="tokens per request (default: the model's context); --max-model-len, as its advice says")
    fit.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    _add_capacity_parser(commands)
    _add_report_parser(commands)
    return parser


def _add_capacity_parser(commands) -> None:
    capacity = commands.add_parser(
        "capacity", help="replicas, GPUs and cost per GPU type for a target load within SLOs (measured or projected)",
        description="For each GPU type x weight format x engine: the highest goodput one replica sustains within "
                    "the SLOs — measured by a --find-max run where one exists (--from, or run here with --backend), "
                    "projected elsewhere by the roofline calibrated on the measured steps, with its held-out error "
                    "band — then replicas and GPUs for --target-rps, $/hour, $/month, $ per million tokens and energy "
                    "at TDP. One table, cheapest first (docs/capacity.md).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    capacity.add_argument("--gpu", help="comma-separated GPU profiles, e.g. h100-sxm,a800,rtx4090 (default: the GPU "
                                        "every run under --from ran on)")
    capacity.add_argument("--model", help="model profile, e.g. 13b, or a Hugging Face config.json (default: the model "
                                          "every run under --from served)")
    capacity.add_argument("--quant", help="comma-separated weight formats, e.g. bf16,awq (default: the runs' one "
                                          "format, else bf16)")
    capacity.add_argument("--scenario", help="name in tokenrig/scenarios/serving/ or a path (default: the runs' one "
                                             "scenario, else chat)")
    capacity.add_argument("--slo", required=True, help="service-level objectives, e.g. ttft_p99=500ms,tpot_p99=50ms")
    capacity.add_argument("--target-rps", type=_positive, help="requests/s to serve (default: size one replica)")
    capacity.add_argument("--headroom", type=float, default=0.2,
                          help="spare capacity: replicas = ceil(target x (1 + headroom) / goodput) (default 0.2)")
    capacity.add_argument("--from", dest="inputs", nargs="+", type=Path, default=[], metavar="DIR",
                          help="results directories of load tests: --find-max runs answer their configuration; "
                               "every measured step calibrates its engine (e.g. docs/results)")
    capacity.add_argument("--backend", choices=backend_flag().choices,
                          help="run the --find-max searches here first, one per GPU type and weight format")
    capacity.add_argument("--engine", action="append", metavar="LABEL",
                          help="only this engine (repeatable): its label as the table prints it, e.g. vllm, or part "
                               "of labels, e.g. 'CUDA graphs' (default: every engine measured)")
    capacity.add_argument("--price", action="append", default=[], metavar="GPU=USD",
                          help="replace a GPU's price per hour, e.g. --price h100-sxm=2.49 (repeatable)")
    capacity.add_argument("--tail-samples", type=int, default=10,
                          help="SLO searches: samples beyond the judged percentile per step (default 10)")
    capacity.add_argument("--precision", type=float, default=0.05, help="SLO searches: bracket width (default 0.05)")
    capacity.add_argument("--max-step", type=float, default=300, help="SLO searches: longest step, seconds")
    capacity.add_argument("--results", type=Path, default=Path("results"),
                          help="where --backend searches write their run directories")
    capacity.add_argument("-o", "--out", type=Path,
                          help="capacity.json (default results/capacity-TIME.json), for `tokenrig report --capacity`")
    capacity.add_argument("--csv", type=Path, help="also write the table as CSV to this file")


def _add_report_parser(commands) -> None:
    report = commands.add_parser(
        "report", help="one self-contained HTML report of finished runs (and CSV exports)",
        description="Write one offline HTML file (plotly, inlined) over run directories: latency CDFs, a per-second "
                    "timeline with the server's scraped metrics, load-generator health, sweep and SLO-search "
                    "curves, a comparison of several runs, training runs, and a capacity table (docs/report.md).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories, or directories holding them")
    report.add_argument("-o", "--out", type=Path, default=Path("report.html"), help="HTML file (default report.html)")
    report.add_argument("--capacity", type=Path, help="a capacity.json written by `tokenrig capacity`")
    report.add_argument("--csv", type=Path, metavar="DIR",
                        help="also write requests.csv (one row per request) and summary.csv (one row per run or step)")
    report.add_argument("--title", default="tokenrig report")


def _add_train_parser(commands) -> None:
    train = commands.add_parser(
        "train", help="measure training throughput with DeepSpeed (tokens/s, MFU, memory, module breakdown)",
        description="Train a model profile with random weights on random tokens under DeepSpeed, started by "
                    "DeepSpeed's launcher; write results/<run-id>/ (steps.jsonl, summary.json, breakdown.md/.png). "
                    "Options left out take TrainSpec's defaults (or the matrix's values with --matrix).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_options(train)
    train.add_argument("--matrix", help="run a training matrix: a name in tokenrig/scenarios/train/ or matrix/, "
                                        "or a .yaml path; the options above override every run")
    train.add_argument("--runs", help="with --matrix: only these runs, by 1-based number (e.g. 1,3,5)")
    train.add_argument("--max-gpus", type=int, help="with --matrix: skip runs needing more GPUs "
                                                   "(default: the CUDA GPUs this host has)")
    train.add_argument("--compare", nargs="+", type=Path, metavar="DIR",
                       help="no run: one comparison table of every training run under these directories "
                            "(written to --results/comparison.md)")
    train.add_argument("--results", type=Path, default=Path("results"), help="where run directories go")
    train.add_argument("--price", action="append", default=[], metavar="GPU=USD",
                       help="replace a GPU's price per hour in the $ per billion tokens trained, e.g. --price "
                            "h100-sxm=2.49 (repeatable; default: tokenrig/profiles/gpus.yaml)")
    train.add_argument("--fit", action="store_true",
                       help="no run: the memory each run needs (weights, gradients, optimizer state, activations) "
                            "against the GPU's, and whether it fits")
    train.add_argument("--metrics-port", type=int, default=None,
                       help="expose live Prometheus gauges on this port (0 = any free port)")
    train.add_argument("--prometheus-targets", type=Path, default=None,
                       help="file_sd directory where the run announces its scrape target (implies --metrics-port 0)")
    train.add_argument("--dry-run", action="store_true",
                       help="print the DeepSpeed config and launcher command, and exit")


def parse_prices(items: list[str]) -> dict[str, float]:
    """--price GPU=USD (repeatable) -> {GPU profile key: $ per GPU-hour}, for capacity and train."""
    from tokenrig.errors import UsageError
    from tokenrig.profiles import resolve_gpu

    prices = {}
    for item in items:
        gpu, _, usd = item.partition("=")
        try:
            prices[resolve_gpu(gpu).key] = float(usd)
        except ValueError:
            raise UsageError(f"--price takes GPU=USD, e.g. h100-sxm=2.49, not {item!r}") from None
    return prices


def monitor_options(args):
    """Live Prometheus metrics when --metrics-port or --prometheus-targets is given."""
    if args.metrics_port is None and args.prometheus_targets is None:
        return None
    from tokenrig.monitor.discovery import DEFAULT_TARGETS_DIR, MonitorOptions

    return MonitorOptions(port=args.metrics_port or 0, targets_dir=args.prometheus_targets or DEFAULT_TARGETS_DIR)

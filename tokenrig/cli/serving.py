"""`tokenrig loadtest`, `serve`, `model`, `fit` and `gpus`: options -> ServerSpec, scenario and load profile
-> the run (loadtest.py) or the server; the launch, fit and load lines printed before a run."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from tokenrig.cli.parser import monitor_options
from tokenrig.errors import UsageError
from tokenrig.serve.backends import BACKENDS, dry_run_plan
from tokenrig.serve.spec import ServerSpec


def print_launch(spec: ServerSpec, port: int, fit=None) -> None:
    """--dry-run: the command, environment and memory plan (`fit`, when planned already), nothing started or
    written."""
    plan = dry_run_plan(spec, port, fit)
    if plan.fit is not None:
        print("fit:", plan.fit.describe())
    for key, value in plan.env.items():
        print(f"env: {key}={value}")
    print("command:", shlex.join(plan.command))
    if plan.docker:
        print("docker:", shlex.join(plan.docker))
    for note in plan.notes:
        print("note:", note)


def load_fit(spec):
    """A GPU server's memory plan, planned once before anything starts (raising FitError); None for a CPU or
    simulated server, whose launch plans what it needs."""
    if spec.device == "cpu" or spec.backend == "sim":
        return None
    return dry_run_plan(spec, 0).fit


def print_load_fit(fit, spec, scenario, with_plan: bool) -> None:
    """A GPU server's memory plan and what the load puts in its KV cache."""
    from tokenrig.loadgen.scenario import CLOSED_LOOP_TYPES
    from tokenrig.serve.fit import load_in_flight

    load = scenario.load
    prompt, output = scenario.mean_tokens("input_tokens"), scenario.mean_tokens("output_tokens")
    in_flight, basis = load_in_flight(fit, spec.gpu, load.users if load.type in CLOSED_LOOP_TYPES else None,
                                      load.rate, output)
    if with_plan:
        print("fit:", fit.describe())
    print(fit.describe_load(in_flight, prompt + output if prompt and output else None, basis))


def _check_hardware(spec, dry_run: bool) -> None:
    """A GPU profile with the hf backend needs that GPU here; say what would run if it is absent."""
    if spec.backend != "hf" or spec.device == "cpu" or dry_run:
        return
    import torch

    if torch.cuda.is_available():
        return
    command = dry_run_plan(spec, spec.port or 8000).command
    raise SystemExit(
        f"no CUDA GPU on this machine, so the hf backend cannot serve {spec.model.key} on {spec.gpu.key}.\n"
        f"On a {spec.gpu.name} it would run:\n  {shlex.join(command)}\n"
        f"To see how it would behave without the GPU, use the simulated engine: "
        f"BACKEND=sim (make) or --backend sim (CLI).")


def _planned_chunk_rate(scenario, profile, spec) -> float:
    """The plan's expected chunk rate at its heaviest step (a sweep's last value; a search starts low)."""
    from tokenrig.loadgen.ceiling import ASSUMED_TPOT_S, expected_chunk_rate
    from tokenrig.loadgen.load_profiles import Sweep

    load = scenario.load
    if isinstance(profile, Sweep):
        heaviest = max(profile.loads)
        load = load.model_copy(update={"users": int(heaviest)} if profile.users else {"rate": heaviest})
    tpot_ms = spec.options.sim_tpot_ms if spec.backend == "sim" else None
    tpot_s = tpot_ms / 1000 if tpot_ms else ASSUMED_TPOT_S
    return expected_chunk_rate(scenario.model_copy(update={"load": load}), tpot_s)


def _choose_workers(args, scenario, profile, spec) -> int | None:
    """--workers as given, or for 'auto' what the plan needs; say so before the run when it needs more than
    the load generator has."""
    from tokenrig.loadgen.ceiling import capacity_advice, free_cores, per_core_ceiling, refusal, workers_needed
    chunk_rate, ceiling = _planned_chunk_rate(scenario, profile, spec), per_core_ceiling()
    too_much = refusal(chunk_rate, free_cores() if args.workers == "auto" else args.workers or 1, ceiling)
    if too_much:
        flag = ("--sweep" if args.sweep else "--users" if scenario.load.type == "concurrency" else "--rate")
        raise UsageError(f"{flag}: {too_much}; lower {flag}")
    if args.workers == "auto":
        workers = min(workers_needed(chunk_rate, ceiling), free_cores())
        print(f"load generator: {workers} process{'es' if workers > 1 else ''} for about {chunk_rate:,.0f} "
              f"chunks/s (--workers auto; {ceiling.chunks_per_s:,} chunks/s a process, {ceiling.source})")
        advice = capacity_advice(chunk_rate, workers, ceiling, auto=True)
        if advice:
            print(f"warning: {advice}")
        return workers if workers > 1 else None
    advice = capacity_advice(chunk_rate, args.workers, ceiling)
    if advice:
        print(f"warning: {advice}")
    return args.workers


def cmd_loadtest(args) -> int:
    if args.compare:
        from tokenrig.report.compare import compare_runs, markdown

        print(markdown(compare_runs(args.compare)), end="")
        return 0
    import locust  # noqa: F401  - gevent must patch the standard library before anything else imports it

    from tokenrig.loadtest import run_session

    plan = loadtest_plan(args)
    if args.dry_run:
        print_launch(plan.spec, 0, plan.fit)
    if plan.fit is not None:
        print_load_fit(plan.fit, plan.spec, plan.scenario, with_plan=not args.dry_run)
    if args.dry_run:
        print("scenario:", plan.scenario.model_dump_json(indent=2))
        return 0
    return run_session(plan)


def loadtest_plan(args):
    """The LoadTestPlan a parsed `loadtest` command line asks for, every option checked and the server's fit
    planned (FitError) before anything starts."""
    from tokenrig.loadgen.load_profiles import Sweep
    from tokenrig.loadgen.overrides import LoadOverrides, plan_run
    from tokenrig.loadgen.scenario import CLOSED_LOOP_TYPES, load_scenario
    from tokenrig.loadtest_plan import LoadTestPlan, WorkerOptions
    from tokenrig.metrics.slo import SloError, parse_slos
    from tokenrig.serve.remote import DECLARABLE, RemoteOptions, tokenizer_dir

    if args.ca_cert:
        if not args.ca_cert.is_file():
            raise UsageError(f"--ca-cert {args.ca_cert}: no such file; give the PEM file of the CA that signed "
                             "the server's certificate")
        # OpenSSL reads it for every TLS context made with the default paths here and in spawned workers
        os.environ["SSL_CERT_FILE"] = str(args.ca_cert.resolve())
    scenario = load_scenario(args.scenario)
    if args.data:
        from tokenrig.loadgen.data import with_data

        scenario = with_data(scenario, args.data)
    try:
        slos = parse_slos(args.slo) if args.slo else None
    except SloError as error:
        raise UsageError(str(error)) from None
    if args.tokenizer and not args.url:
        raise UsageError("--tokenizer goes with --url: a server tokenrig starts counts with its model's own")
    tokenizer = tokenizer_dir(args.tokenizer) if args.tokenizer else None  # a Hub name is fetched before any load
    overrides = LoadOverrides(users=args.users, rate=args.rate, max_in_flight=args.max_in_flight,
                              arrival=args.arrival, burstiness=args.burstiness,
                              duration_s=args.duration, warmup_s=args.warmup, seed=args.seed, sweep=args.sweep,
                              find_max=args.find_max, precision=args.precision, tail_samples=args.tail_samples,
                              max_step_s=args.max_step, quick=args.quick)
    run = plan_run(scenario, overrides, slos)
    scenario, load = run.scenario, run.scenario.load
    profiling = _profiling(args)
    # the KV cache must hold the closed loop's users, or the open loop's in-flight cap (up to a typical batch limit)
    if isinstance(run.profile, Sweep) and run.profile.users:  # closed-loop steps: the server must hold the largest
        concurrency = int(max(run.profile.loads))
    elif load.type in CLOSED_LOOP_TYPES and load.users is not None:  # a closed loop's plan always has users
        concurrency = load.users
    else:
        concurrency = min(load.max_in_flight, 256)
    spec = ServerSpec.from_args(args, concurrency=concurrency)
    if not args.url:  # a server at --url runs wherever it runs, with its own memory plan
        _check_hardware(spec, args.dry_run)
    count = _choose_workers(args, scenario, run.profile, spec)
    fit = None if args.url else load_fit(spec)
    workers = None
    if count and not args.dry_run:  # a dry run starts no worker
        local = count if args.local_workers is None else args.local_workers
        if not 0 <= local <= count:
            raise UsageError("--local-workers must be between 0 and --workers")
        workers = WorkerOptions(count, local, args.master_host, args.master_port)
    remote = None
    if args.url:  # what the user declares about the server is the run's, the flags' defaults are not
        described = spec.describe()
        declared = {name: described[name] for name in DECLARABLE if name in getattr(args, "given", ())}
        remote = RemoteOptions(args.url, args.api_key, args.served_model, tokenizer, declared)
    return LoadTestPlan(spec, scenario, args.results, fit=fit, remote=remote, profile=run.profile,
                        seed_source=run.seed_source, slos=slos, workers=workers,
                        client=args.client or BACKENDS[spec.backend].default_client, monitor=monitor_options(args),
                        profiling=profiling, scrape=not args.no_scrape, scrape_interval_s=args.scrape_interval,
                        request_timeout_s=args.request_timeout, max_error_rate=args.max_error_rate)


def _profiling(args):
    """The operator-profile request of a load test, refused at once where it cannot be taken."""
    if args.profile_steps is None:
        if args.profile_dir:
            raise UsageError("--profile-dir is for --profile-steps; add --profile-steps N")
        return None
    from tokenrig.breakdown.capture import profiled_backends
    from tokenrig.loadtest_plan import ProfileOptions

    if args.profile_steps < 1:
        raise UsageError("--profile-steps must be at least 1")
    if args.find_max:
        raise UsageError("--profile-steps: a profiled step's latencies carry the profiler's cost, so an SLO search "
                         "would judge the profiler; profile a run of its own (--users N or --rate R)")
    if args.backend not in profiled_backends():
        raise UsageError(f"--profile-steps: the {args.backend} backend has no kernels to trace; profiling works "
                         f"with {' and '.join(profiled_backends())}")
    if args.url and not args.profile_dir:
        raise UsageError("--profile-steps with --url: name where that server writes its traces (--profile-dir DIR; "
                         "vLLM: its --profiler-config torch_profiler_dir)")
    return ProfileOptions(args.profile_steps, args.profile_dir)


def cmd_serve(args) -> int:
    from tokenrig.interrupts import stop_signals_interrupt
    from tokenrig.serve.launcher import LaunchedServer

    spec = ServerSpec.from_args(args)
    _check_hardware(spec, args.dry_run)
    if args.dry_run:
        print_launch(spec, spec.port or 0)  # 0: a free port, chosen at launch
        return 0
    log = Path("results") / "serve" / f"{spec.backend}-{spec.model.key}-{spec.quant}-{spec.gpu.key}.log"
    # the server runs in its own session: any stop signal must go through the launcher to reach it
    with stop_signals_interrupt(), LaunchedServer(spec, log) as server:
        endpoint = server.endpoint
        assert endpoint is not None  # a LaunchedServer's context is entered only once its server is healthy
        try:  # from the announcement on: whoever read it may stop the server the next instant
            print(f"serving {spec.model.key} at {endpoint.base_url}/v1 "
                  f"(metrics: {endpoint.metrics_url}); log: {log}; Ctrl-C or SIGTERM stops it", flush=True)
            return server.wait()
        except KeyboardInterrupt:
            print("stopping server")
            return 0


def cmd_model(args) -> int:
    from tokenrig.profiles import model_profiles, resolve_model

    if args.model_command == "list":
        for profile in model_profiles().values():
            aliases = f" (aliases: {', '.join(profile.aliases)})" if profile.aliases else ""
            print(f"{profile.key:<12} {profile.num_params / 1e9:7.2f}B params{aliases}  — {profile.source}")
        return 0
    from tokenrig.serve.checkpoint import make_checkpoint

    model = resolve_model(args.name)
    path = make_checkpoint(model, root=args.out, dtype=args.dtype, force=args.force, quant=args.quant)
    kind = f"{args.quant} 4-bit, group size 128" if args.quant else args.dtype
    print(f"{model.key}: {path} ({kind}, random weights, locally built tokenizer)")
    return 0


def cmd_fit(args) -> int:
    from tokenrig.profiles import resolve_gpu, resolve_model
    from tokenrig.serve.fit import plan_fit

    plan = plan_fit(resolve_model(args.model), resolve_gpu(args.gpu), args.quant, concurrency=args.concurrency,
                    context_tokens=args.context, tp=args.tp, gpu_memory_utilization=args.gpu_memory_utilization)
    print(plan.describe())
    print(f"engine limits: --tensor-parallel-size {plan.tp} --max-model-len {plan.max_model_len} "
          f"--max-num-seqs {plan.max_num_seqs} (TGI --max-batch-total-tokens {plan.max_batch_total_tokens})")
    return 0


def cmd_gpus(_args) -> int:
    from tokenrig.profiles import gpu_profiles

    print(f"{'gpu':<10}{'memory':>8}{'GB/s':>7}{'BF16 TF':>9}{'TDP W':>7}{'$/h':>7}{'priced':>12}  interconnect")
    for g in gpu_profiles().values():
        print(f"{g.key:<10}{g.memory_gb:>6g}GB{g.bandwidth_gbs:>7g}{g.tflops_bf16:>9g}{g.tdp_w:>7g}"
              f"{g.price_usd_per_hour:>7.2f}{g.price_date:>12}  {g.interconnect}")
    print("prices: tokenrig/profiles/gpus.yaml names each source; tokenrig capacity --price GPU=USD replaces one")
    return 0

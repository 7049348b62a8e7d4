"""`tokenrig capacity` (GPUs and cost for a target load) and `tokenrig report` (the offline HTML report)."""

from __future__ import annotations

import argparse

from tokenrig.cli.parser import add_server_args
from tokenrig.serve.spec import ServerSpec


def cmd_capacity(args) -> int:
    import time

    from tokenrig.capacity.inputs import read_results
    from tokenrig.capacity.planner import CapacityPlanner, CapacityQuestion
    from tokenrig.capacity.table import render, write_csv
    from tokenrig.loadgen.load_profiles import FindMax
    from tokenrig.loadgen.scenario import ScenarioError, load_scenario
    from tokenrig.profiles import resolve_gpu, resolve_model
    from tokenrig.report.rundir import write_json
    from tokenrig.report.slo import SloError, parse_slos
    from tokenrig.serve.fit import normalise_quant

    if not args.inputs and not args.backend:
        raise ScenarioError("give --from DIR (results of load tests, e.g. docs/results) or --backend to run the "
                            "SLO searches here")
    try:
        slos = parse_slos(args.slo)
    except SloError as error:
        raise ScenarioError(str(error)) from None
    prices = {}
    for item in args.price:
        gpu, _, usd = item.partition("=")
        try:
            prices[resolve_gpu(gpu).key] = float(usd)
        except ValueError:
            raise ScenarioError(f"--price takes GPU=USD, e.g. h100-sxm=2.49, not {item!r}") from None
    gpus = [resolve_gpu(name) for name in args.gpu.split(",") if name.strip()]
    quants = [normalise_quant(name) for name in args.quant.split(",") if name.strip()]
    options = FindMax(tail_samples=args.tail_samples, precision=args.precision, max_step_s=args.max_step)
    question = CapacityQuestion(gpus, resolve_model(args.model), quants, load_scenario(args.scenario), slos,
                                target_rps=args.target_rps, headroom=args.headroom, prices=prices,
                                engines=args.engine,
                                search=options)
    inputs = list(args.inputs)
    if args.backend:
        import locust  # noqa: F401  - gevent must patch the standard library before the load test's imports

        from tokenrig.capacity.searches import run_searches

        defaults = vars(_capacity_server_defaults())
        specs = [ServerSpec.from_args(argparse.Namespace(**{**defaults, "backend": args.backend, "gpu": gpu.key,
                                                            "model": args.model, "quant": quant}))
                 for gpu in gpus for quant in quants]
        inputs += run_searches(specs, question.scenario, slos, options, args.results)
    steps, searches = read_results(inputs)
    if not steps:
        raise ScenarioError(f"no load-test runs under {', '.join(map(str, inputs))}")
    print(f"capacity inputs: {len(steps)} measured steps, {len(searches)} --find-max runs")
    answer = CapacityPlanner(question, steps, searches).answer()
    document = answer.document()
    out = args.out or args.results / f"capacity-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, document)
    print("")
    print(render(document))
    if args.csv:
        write_csv(document, args.csv)
        print(f"csv: {args.csv}")
    print(f"capacity.json: {out} (tokenrig report RUN_DIR... --capacity {out})")
    return 0


def _capacity_server_defaults() -> argparse.Namespace:
    """The serve options a `tokenrig capacity --backend` search starts its servers with: every default."""
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    return parser.parse_args([])


def cmd_report(args) -> int:
    from tokenrig.report.html import write_report

    write_report(args.runs, args.out, capacity=args.capacity, csv_dir=args.csv, title=args.title)
    return 0

"""`tokenrig capacity` (GPUs and cost for a target load) and `tokenrig report` (the offline HTML report)."""

from __future__ import annotations

import argparse

from tokenrig.cli.parser import add_server_args, parse_prices
from tokenrig.errors import UsageError
from tokenrig.serve.spec import ServerSpec


def cmd_capacity(args) -> int:
    import time

    from tokenrig.capacity.inputs import read_results
    from tokenrig.capacity.planner import CapacityPlanner, CapacityQuestion
    from tokenrig.capacity.table import render, write_csv
    from tokenrig.jsonfile import write_json
    from tokenrig.loadgen.load_profiles import FindMax
    from tokenrig.loadgen.scenario import load_scenario
    from tokenrig.metrics.slo import SloError, parse_slos
    from tokenrig.profiles import resolve_gpu, resolve_model
    from tokenrig.serve.fit import normalise_quant

    if not args.inputs and not args.backend:
        raise UsageError("give --from DIR (results of load tests, e.g. docs/results) or --backend to run the "
                         "SLO searches here")
    if args.backend and not (args.gpu and args.model):
        raise UsageError("--backend runs a search for each --gpu and --model: give both")
    try:
        slos = parse_slos(args.slo)
    except SloError as error:
        raise UsageError(str(error)) from None
    prices = parse_prices(args.price)
    # what the command line names is checked before any run is read
    gpus = [resolve_gpu(name) for name in _names(args.gpu)] if args.gpu else None
    model = resolve_model(args.model) if args.model else None
    quants = [normalise_quant(name) for name in _names(args.quant)] if args.quant else None
    scenario = load_scenario(args.scenario) if args.scenario else None
    options = FindMax(tail_samples=args.tail_samples, precision=args.precision, max_step_s=args.max_step)
    inputs = list(args.inputs)
    if args.backend:
        import locust  # noqa: F401  - gevent must patch the standard library before the load test's imports

        from tokenrig.capacity.searches import run_searches

        assert gpus is not None and model is not None  # --backend without --gpu and --model was refused above
        defaults = vars(_capacity_server_defaults())
        specs = [ServerSpec.from_args(argparse.Namespace(**{**defaults, "backend": args.backend, "gpu": gpu.key,
                                                            "model": model.key, "quant": quant}))
                 for gpu in gpus for quant in quants or ["bf16"]]
        inputs += run_searches(specs, scenario or load_scenario("chat"), slos, options, args.results)
    notes: list[str] = []
    steps, searches = read_results(inputs, notes)
    if not steps:
        skipped = f" ({len(notes)} skipped: {notes[0]}{', ...' if len(notes) > 1 else ''})" if notes else ""
        raise UsageError(f"no load-test runs capacity can use under {', '.join(map(str, inputs))}{skipped}")
    print(f"capacity inputs: {len(steps)} measured steps, {len(searches)} --find-max runs"
          + (f"; {len(notes)} runs skipped (see the notes)" if notes else ""))
    # what the command line leaves out, the runs answer when they all agree: `--from RUN` sizes RUN's own setup
    runs = f"the runs under {', '.join(map(str, inputs))}"
    gpus = gpus or [resolve_gpu(_agreed(steps, "gpu", "--gpu GPU[,GPU...]", runs))]
    model = model or resolve_model(_agreed(steps, "model", "--model", runs))
    quants = quants or [_shared(steps, "quant") or "bf16"]
    if scenario is None:  # the runs' own scenario as they recorded it, which may be a file only their machine has
        name = _shared(steps, "scenario.name")
        scenario = next((step.scenario for step in steps if step.scenario.name == name), None) or load_scenario("chat")
    question = CapacityQuestion(gpus, model, quants, scenario, slos, target_rps=args.target_rps,
                                headroom=args.headroom, prices=prices, engines=args.engine, search=options)
    answer = CapacityPlanner(question, steps, searches, notes=notes).answer()
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


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _values(steps, attribute: str) -> set:
    """The values of `attribute` (dotted) over the steps."""
    values = set()
    for step in steps:
        value = step
        for name in attribute.split("."):
            value = getattr(value, name)
        values.add(value)
    return values


def _shared(steps, attribute: str) -> str | None:
    """The value of `attribute` (dotted) every step shares; None when they differ."""
    values = _values(steps, attribute)
    return values.pop() if len(values) == 1 else None


def _agreed(steps, attribute: str, flag: str, runs: str) -> str:
    """The value of `attribute` (dotted) every step shares; when they differ, an error asking for it with `flag`."""
    values = _values(steps, attribute)
    if len(values) != 1:
        raise UsageError(f"{runs} differ in {attribute} ({', '.join(sorted(map(str, values)))}): say which "
                         f"with {flag}")
    return values.pop()


def _capacity_server_defaults() -> argparse.Namespace:
    """The serve options a `tokenrig capacity --backend` search starts its servers with: every default."""
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    return parser.parse_args([])


def cmd_report(args) -> int:
    from tokenrig.report.html import write_report

    write_report(args.runs, args.out, capacity=args.capacity, csv_dir=args.csv, title=args.title)
    return 0

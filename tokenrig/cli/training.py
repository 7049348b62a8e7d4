"""`tokenrig train`: a TrainSpec from the options (or a matrix of them) -> DeepSpeed runs -> summaries."""

from __future__ import annotations

import shlex

from tokenrig.cli.parser import monitor_options, parse_prices
from tokenrig.train.spec import train_options_given


def cmd_train(args) -> int:
    given = train_options_given(args)
    prices = parse_prices(args.price)
    if args.compare:
        from tokenrig.train.matrix import compare_dirs

        print(compare_dirs(args.compare, args.results, prices))
        return 0
    if args.matrix:
        from tokenrig.train.matrix import expand, load_matrix, run_matrix

        matrix = load_matrix(args.matrix)
        only = [int(n) for n in args.runs.split(",")] if args.runs else None
        if args.fit:  # each run's fit, and why a run cannot run at all
            from tokenrig.train.fit import fit_report
            from tokenrig.train.matrix import expand_each

            for number, spec in enumerate(expand_each(matrix, given), start=1):
                if not only or number in only:
                    lines = [f"cannot run: {spec}"] if isinstance(spec, Exception) else fit_report(spec)
                    print(f"{number}: " + "\n    ".join(lines))
            return 0
        if args.dry_run:
            for spec in expand(matrix, given):
                print(spec.label())
            return 0
        from tokenrig.train.matrix import available_gpus

        run_matrix(matrix, args.results, given, only=only,
                   max_gpus=args.max_gpus if args.max_gpus is not None else available_gpus(), prices=prices)
        return 0
    from tokenrig.train.dsconfig import deepspeed_config
    from tokenrig.train.session import launcher_command, run_training
    from tokenrig.train.spec import make_spec

    spec = make_spec(**given)
    if args.fit:
        from tokenrig.train.fit import fit_report

        print(*fit_report(spec), sep="\n")
        return 0
    if args.dry_run:
        import json

        print("spec:", spec.model_dump_json(indent=2))
        print("ds_config:", json.dumps(deepspeed_config(spec), indent=2))
        print("launcher:", shlex.join(launcher_command(spec, args.results / "<run-id>", 29500)))
        return 0
    summary = run_training(spec, args.results, monitor=monitor_options(args), prices=prices)
    return {"ok": 0, "interrupted": 130, "oom": 3}.get(summary["status"], 1)

"""How far `tokenrig capacity` can be trusted where it has not measured: leave one configuration out, project it.

Every `--find-max` run under --from is a case: its configuration (engine, weight format, GPU type, model,
scenario) and the goodput its search measured for its own SLOs (where several searches measured the same
configuration, the one with the most requests per step). For each case the capacity planner is given all
the other data, less every run and every operator profile of that engine, weight format, GPU type and model
(so the projection must travel from another GPU type, format or model, as for a card the user has not
measured); it projects the case's SLO search in virtual time, and the table sets the projection against
the measurement: goodput, and TTFT p99 / TPOT p99 replayed at the measured best rate, the error and the
band the projection carried. The ground truth is the measured search; its own uncertainty (the step
between its best passing rate and its first failing one) is printed beside it.

    python benchmarks/capacity_holdout.py --from docs/results --json docs/results/capacity-holdout.json

`--jobs N` projects N cases at once, each in its own process. Ctrl-C stops at once and prints the cases finished.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Case:
    name: str
    engine: str
    quant: str
    gpu: str
    model: str
    scenario: str
    run: str
    measured_goodput: float
    measured_next_failed: float | None  # the lowest rate above the best that failed: the search's resolution
    measured_ttft_p99_s: float | None
    measured_tpot_p99_s: float | None
    projected_goodput: float | None = None
    projected_ttft_p99_s: float | None = None
    projected_tpot_p99_s: float | None = None
    band: float | None = None
    band_derivation: dict | None = None  # calibrate.Band: the load steps and checks the band was made of
    check: list | None = None  # each held-out load step of the calibration: what it scaled, its figures, its error
    seed_matched_goodput: float | None = None  # the measured search's own steps replayed: its best that met
    seed_matched: list | None = None  # [rate, measured met, replay met] per step of the measured search
    basis: str = ""
    note: str = ""
    seconds: float = 0.0

    @property
    def error(self) -> float | None:
        if self.projected_goodput is None or not self.measured_goodput:
            return None
        return self.projected_goodput / self.measured_goodput - 1

    @property
    def seed_matched_error(self) -> float | None:
        if self.seed_matched_goodput is None or not self.measured_goodput:
            return None
        return self.seed_matched_goodput / self.measured_goodput - 1

    @property
    def within_band(self) -> bool | None:
        if self.error is None or self.band is None:
            return None
        return abs(self.error) <= self.band


def configuration(step) -> tuple[str, str, str, str]:
    return step.engine, step.quant, step.gpu, step.model


def cases_of(searches) -> list[tuple[object, object]]:
    """One search per configuration and scenario: the one with the most requests per step; its best step."""
    chosen: dict[tuple, object] = {}
    for search in searches:
        first = search.steps[0]
        key = (*configuration(first), first.scenario.name)
        per_step = sum(s.summary.requests.total for s in search.steps) / len(search.steps)
        best = chosen.get(key)
        if best is None or per_step > best[1]:
            chosen[key] = (search, per_step)
    return [(search, key) for key, (search, _) in sorted(chosen.items())]


def measure_case(search, key) -> Case | None:
    best = search.best_for(search.slos)
    if isinstance(best, str):
        return None
    step, verdict = best
    rows = search.document["steps"]
    best_rate = rows[search.steps.index(step)]["load"]
    failed_above = [row["load"] for measured, row in zip(search.steps, rows)  # a step cut short has no verdict
                    if row["load"] > best_rate and not row.get("slo_met", False) and not measured.summary.interrupted]
    slos = {s.name: s for s in search.slos}
    value = lambda name: (verdict.slos[name].value_s if name in verdict.slos else None)  # noqa: E731
    engine, quant, gpu, model, scenario = key
    return Case(name=f"{engine} {quant} {model} {scenario} on {gpu}", engine=engine, quant=quant, gpu=gpu, model=model,
                scenario=scenario, run=str(search.path), measured_goodput=verdict.goodput_rps,
                measured_next_failed=min(failed_above) if failed_above else None,
                measured_ttft_p99_s=value("ttft_p99") if "ttft_p99" in slos else None,
                measured_tpot_p99_s=value("tpot_p99") if "tpot_p99" in slos else None)


def project(case: Case, search, steps, searches, profiles, calibrator, progress, options=None) -> None:
    from tokenrig.capacity.planner import CapacityPlanner, CapacityQuestion
    from tokenrig.capacity.simulate import replay
    from tokenrig.metrics.verdict import StepResult
    from tokenrig.profiles import resolve_gpu, resolve_model

    held = (case.engine, case.quant, case.gpu, case.model)
    kept_steps = [s for s in steps if configuration(s) != held]
    kept_searches = [s for s in searches if configuration(s.steps[0]) != held]
    question = CapacityQuestion(gpus=[resolve_gpu(case.gpu)], model=resolve_model(case.model), quants=[case.quant],
                                scenario=search.steps[0].scenario, slos=search.slos, engines=[case.engine])
    if options is not None:
        question.search = options
    planner = CapacityPlanner(question, kept_steps, kept_searches, progress=progress,
                              profiles=profiles.without(*held), calibrator=calibrator)
    answer = planner.answer()
    rows = [r for r in answer.rows if r.engine == case.engine and r.quant == case.quant]
    if not rows:
        case.note = "; ".join(answer.notes) or "no projection"
        return
    row = rows[0]
    case.projected_goodput, case.band, case.basis = row.goodput_rps, row.band, row.basis
    calibration = next((c for c in answer.calibrations if c.engine == case.engine and c.quant == case.quant), None)
    if calibration is None:
        return
    chosen = planner.profiles.nearest(case.engine, case.quant, question.gpus[0], question.model.key)
    band = calibration.band_for(chosen.kinds if chosen and calibration.profile else frozenset())
    case.band_derivation = band.document() if band else None
    case.check = [{"step": str(held.step.path), "scalings": sorted(held.scalings), "measured": held.measured,
                   "predicted": held.predicted, "elasticity": held.elasticity, "error": held.error}
                  for held in calibration.held_out]
    best = search.best_for(search.slos)
    step = best[0]
    setup = calibration.model.setup(question.model, question.gpus[0], case.quant, row.tp)
    at_measured = replay(setup, planner.book(), step.load, search.slos).summary
    ttft, tpot = at_measured.latency_s.get("ttft"), at_measured.latency_s.get("tpot")
    case.projected_ttft_p99_s = ttft.p99 if ttft else None
    case.projected_tpot_p99_s = tpot.p99 if tpot else None
    # the measured search's own steps (same arrivals, seeds and early stops): the projection's error without the
    # difference between two searches' random arrivals
    case.seed_matched, met = [], []
    for measured, document in zip(search.steps, search.document["steps"]):
        if document.get("probe") or measured.summary.interrupted:
            continue
        replayed = replay(setup, planner.book(), measured.load, search.slos, stop_early=True)
        result = StepResult(document["load"], replayed.summary, stopped_early=replayed.stopped_early)
        case.seed_matched.append([document["load"], bool(document.get("slo_met")), result.slo_met])
        if result.slo_met:
            met.append((document["load"], result.summary.slo.goodput_rps))
    case.seed_matched_goodput = max(met)[1] if met else 0.0


# what every case reads, set before a pool of workers forks (they inherit it): the cases, the inputs, the operator
# profiles, the search's options, the progress printer, the case in progress and this process's calibrator
_SHARED: dict = {}


def run_case(index: int) -> Case:
    """Project the case at `index` of _SHARED["cases"], in this process or a forked worker."""
    from tokenrig.capacity.calibrate import Calibrator
    from tokenrig.profiles import UnknownProfileError

    shared = _SHARED
    case, search = shared["cases"][index]
    shared["case"] = index
    if "calibrator" not in shared:  # one a process: the scenarios' requests are built once for all its cases
        shared["calibrator"] = Calibrator(shared["progress"])
    print(f"case {index + 1}: {case.name} (measured {case.measured_goodput:.2f} req/s)", flush=True)
    started = time.perf_counter()
    try:
        project(case, search, shared["steps"], shared["searches"], shared["profiles"], shared["calibrator"],
                shared["progress"], shared["options"])
    except UnknownProfileError as error:  # a run capacity cannot place: no GPU type or model recorded
        case.note = f"not projected: {error}"
    case.seconds = time.perf_counter() - started
    return case


def table(cases: list[Case]) -> str:
    ms = lambda v: f"{v * 1000:.0f}" if v is not None else "-"  # noqa: E731
    pct = lambda v: f"{v:+.0%}" if v is not None else "-"  # noqa: E731
    lines = ["| case | measured req/s (next failed) | projected req/s | error | band | in band | its steps replayed: "
             "req/s (error) | TTFT p99 ms meas/proj | TPOT p99 ms meas/proj | basis |",
             "|---|---:|---:|---:|---:|---|---:|---|---|---|"]
    for c in cases:
        measured = f"{c.measured_goodput:.2f}" + (f" ({c.measured_next_failed:g})" if c.measured_next_failed else "")
        projected = f"{c.projected_goodput:.2f}" if c.projected_goodput is not None else "-"
        band = f"±{c.band:.0%}" if c.band is not None and math.isfinite(c.band) else "-"
        inside = {True: "yes", False: "no", None: "-"}[c.within_band]
        matched = (f"{c.seed_matched_goodput:.2f} ({pct(c.seed_matched_error)})" if c.seed_matched_goodput is not None
                   else "-")
        lines.append(f"| {c.name} | {measured} | {projected} | {pct(c.error)} | {band} | {inside} | {matched} | "
                     f"{ms(c.measured_ttft_p99_s)}/{ms(c.projected_ttft_p99_s)} | "
                     f"{ms(c.measured_tpot_p99_s)}/{ms(c.projected_tpot_p99_s)} | {c.basis or c.note} |")
    done = [c for c in cases if c.error is not None]
    if done:
        within_15 = sum(abs(c.error) <= 0.15 for c in done)
        banded = [c for c in done if c.band is not None and math.isfinite(c.band)]
        lines.append("")
        lines.append(f"{len(done)} of {len(cases)} cases projected; goodput within 15 %: {within_15} of {len(done)}; "
                     f"band at most ±20 %: {sum(c.band <= 0.2 for c in banded)} of {len(done)}; band containing the "
                     f"error: {sum(bool(c.within_band) for c in done)} of {len(done)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="inputs", nargs="+", type=Path, default=[REPO / "docs" / "results"])
    parser.add_argument("--json", type=Path, help="write {'cases': [...]} here")
    parser.add_argument("--only", help="only cases whose name contains this")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--max-step", type=float, help="the projected searches' longest step, seconds (default: "
                                                         "the search's own, as `tokenrig loadtest --find-max`)")
    parser.add_argument("--precision", type=float, help="the projected searches' bracket width")
    parser.add_argument("--jobs", type=int, default=1, help="cases projected at once, each in its own process "
                                                            "(default 1)")
    args = parser.parse_args(argv)

    from dataclasses import replace

    from tokenrig.capacity.inputs import read_results
    from tokenrig.capacity.operators import OperatorProfiles
    from tokenrig.errors import UserError
    from tokenrig.loadgen.load_profiles import FindMax

    quiet, parallel = args.quiet, args.jobs > 1

    def progress(line: str) -> None:
        if not quiet:
            print(f"  [{_SHARED['case'] + 1}] {line}" if parallel and "case" in _SHARED else f"  {line}", flush=True)

    steps, searches = read_results(args.inputs)
    profiles = OperatorProfiles(steps, progress)
    print(f"{len(searches)} SLO searches, {len(steps)} measured steps, {len(profiles.models)} operator profiles "
          f"under {', '.join(map(str, args.inputs))}", flush=True)
    options = FindMax()
    if args.max_step:
        options = replace(options, max_step_s=args.max_step)
    if args.precision:
        options = replace(options, precision=args.precision)
    pending = [(case, search) for search, key in cases_of(searches)
               if (case := measure_case(search, key)) is not None and (not args.only or args.only in case.name)]
    _SHARED.update(cases=pending, steps=steps, searches=searches, profiles=profiles, options=options, progress=progress)
    cases = []
    try:
        if not parallel:
            cases += map(run_case, range(len(pending)))
        else:  # forked workers inherit _SHARED; Ctrl-C reaches this process alone, which ends them
            with multiprocessing.get_context("fork").Pool(args.jobs, initializer=signal.signal,
                                                          initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
                for case in pool.imap(run_case, range(len(pending))):
                    cases.append(case)
    except KeyboardInterrupt:
        print("interrupted: the cases finished so far", flush=True)
    except UserError as error:
        print(f"capacity_holdout: {error}", file=sys.stderr)
        return error.exit_code
    print(table(cases))
    if args.json:
        document = {"cases": [{**asdict(c), "error": c.error, "within_band": c.within_band,
                               "seed_matched_error": c.seed_matched_error} for c in cases]}
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

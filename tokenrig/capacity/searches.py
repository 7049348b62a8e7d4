"""Capacity inputs measured on the spot: one --find-max load test per GPU type and weight format.

`tokenrig capacity --backend B` runs, for each configuration asked about, the SLO search that
`tokenrig loadtest --find-max` runs (same session, same run directory layout), so its results are
read back exactly like results given with --from. Each search draws a fresh seed unless the scenario
file sets one, as `loadtest` does. The caller must have imported locust first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tokenrig.loadgen.load_profiles import FindMax
from tokenrig.loadgen.scenario import Scenario, with_run_seed
from tokenrig.metrics.slo import Slo


def run_searches(specs: list, scenario: Scenario, slos: list[Slo], search: FindMax, results: Path,
                 progress: Callable[[str], None] = print) -> list[Path]:
    """Run the search for each ServerSpec; returns the new run directories. Stops at Ctrl-C."""
    from tokenrig.loadtest import run_session
    from tokenrig.loadtest_plan import LoadTestPlan

    made = []
    for number, spec in enumerate(specs, start=1):
        progress(f"search {number}/{len(specs)}: {spec.backend} {spec.model.key} {spec.quant} on {spec.gpu.key}")
        before = set(results.iterdir()) if results.exists() else set()
        # a fresh seed per search, as `loadtest` draws one per run: the default seed 0 would send every
        # capacity run the same prompts, one sample of the scenario's lengths repeated
        load, seed_source = with_run_seed(scenario.load, None)
        plan = LoadTestPlan(spec, scenario.model_copy(update={"load": load}), results, profile=search,
                            seed_source=seed_source, slos=slos)
        code = run_session(plan, progress=progress)
        made += sorted(set(results.iterdir()) - before)
        if code == 130:
            raise KeyboardInterrupt
    return made

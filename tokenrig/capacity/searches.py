"""Capacity inputs measured on the spot: one --find-max load test per GPU type and weight format.

`tokenrig capacity --backend B` runs, for each configuration asked about, the SLO search that
`tokenrig loadtest --find-max` runs (same session, same run directory layout), so its results are
read back exactly like results given with --from. The caller must have imported locust first.
"""

from __future__ import annotations

from pathlib import Path

from tokenrig.loadgen.scenario import Scenario
from tokenrig.loadgen.load_profiles import FindMax
from tokenrig.report.slo import Slo


def run_searches(specs: list, scenario: Scenario, slos: list[Slo], search: FindMax, results: Path,
                 progress=print) -> list[Path]:
    """Run the search for each ServerSpec; returns the new run directories. Stops at Ctrl-C."""
    from tokenrig.loadtest import run_session

    made = []
    for number, spec in enumerate(specs, start=1):
        progress(f"search {number}/{len(specs)}: {spec.backend} {spec.model.key} {spec.quant} on {spec.gpu.key}")
        before = set(results.iterdir()) if results.exists() else set()
        code = run_session(spec, scenario, results, slos=slos, profile=search, progress=progress)
        made += sorted(set(results.iterdir()) - before)
        if code == 130:
            raise KeyboardInterrupt
    return made

"""The backend registry: every engine tokenrig drives, one plug-in object (`Backend`, backends/base.py) each.

`hf` and `sim` (tokenrig's own server with the transformers or the simulated engine), `vllm` (`vllm serve`),
`sglang` (`python -m sglang.launch_server`) and `tgi` (`text-generation-launcher`, plus the equivalent
`docker run` line). `--backend`'s choices, the server-metrics scraper, the Grafana server dashboard and
capacity's reading of old runs' batch limits read them from `BACKENDS`; adding an engine is one module listed here.
"""

from __future__ import annotations

from pathlib import Path

from tokenrig.serve.backends import hf, sglang, sim, tgi, vllm
from tokenrig.serve.backends.base import Backend, LaunchPlan
from tokenrig.serve.fit import FitPlan
from tokenrig.serve.spec import ServerSpec

BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (
    hf.BACKEND, sim.BACKEND, vllm.BACKEND, sglang.BACKEND, tgi.BACKEND)}


def launch_plan(spec: ServerSpec, model_dir: Path, port: int, fit: FitPlan | None = None) -> LaunchPlan:
    """What runs the server `spec` asks for; `fit`: its fit plan when planned already (else planned here)."""
    return BACKENDS[spec.backend].launch_plan(spec, model_dir, port, fit)


def model_dir(spec: ServerSpec, progress=print, write: bool = True) -> Path:
    """The directory the server reads (written on first use unless `write` is False, as for --dry-run)."""
    return BACKENDS[spec.backend].model_dir(spec, progress, write)


def dry_run_plan(spec: ServerSpec, port: int, fit: FitPlan | None = None) -> LaunchPlan:
    """The plan, with nothing written: what --dry-run prints and what is checked before a load starts."""
    return launch_plan(spec, model_dir(spec, write=False), port, fit)


def metric_names(figure: str) -> tuple[str, ...]:
    """Every engine's /metrics sample names for one of tokenrig's server figures, in registry order, each
    engine's preferred name first."""
    names: list[str] = []
    for backend in BACKENDS.values():
        names += [name for name in backend.metrics.get(figure, ()) if name not in names]
    return tuple(names)


def preferred_metric_names(figure: str) -> tuple[str, ...]:
    """Each engine's preferred sample name for one figure, once each: what a dashboard query sums over."""
    names: list[str] = []
    for backend in BACKENDS.values():
        preferred = backend.metrics.get(figure, ())[:1]
        names += [name for name in preferred if name not in names]
    return tuple(names)

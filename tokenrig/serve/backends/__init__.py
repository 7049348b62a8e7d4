"""Backends: turn one ServerSpec into a launch — the checkpoint it reads, its command line and environment.

`hf` and `sim` (tokenrig's own server with the transformers or the simulated engine), `vllm`
(`vllm serve`) and `tgi` (`text-generation-launcher`, plus the equivalent `docker run` line) each
give a `LaunchPlan` (backends/base.py) and the directory their server reads.
"""

from __future__ import annotations

from pathlib import Path

from tokenrig.serve.backends import hf, sim, tgi, vllm
from tokenrig.serve.backends.base import LaunchPlan
from tokenrig.serve.spec import ServerSpec

BACKENDS = {"hf": hf, "sim": sim, "vllm": vllm, "tgi": tgi}


def launch_plan(spec: ServerSpec, model_dir: Path, port: int) -> LaunchPlan:
    return BACKENDS[spec.backend].launch_plan(spec, model_dir, port)


def model_dir(spec: ServerSpec, progress=print, write: bool = True) -> Path:
    """The directory the server reads (written on first use unless `write` is False, as for --dry-run)."""
    return BACKENDS[spec.backend].model_dir(spec, progress, write)


def dry_run_plan(spec: ServerSpec, port: int) -> LaunchPlan:
    """The plan, with nothing written: what --dry-run prints and what is checked before a load starts."""
    return launch_plan(spec, model_dir(spec, write=False), port)

"""Backends: turn one ServerSpec into a launch — the checkpoint it reads, its command line and environment.

`tokenrig` (hf and sim engines behind tokenrig's own server), `vllm` (`vllm serve`) and `tgi`
(`text-generation-launcher`, plus the equivalent `docker run` line) share one shape: a
`LaunchPlan` that the launcher runs, `--dry-run` prints and the run's metadata records.
TP size, max model length and batch limits come from the fit planner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType


@dataclass
class LaunchPlan:
    command: list[str]
    env: dict[str, str]  # only what tokenrig sets on top of the inherited environment
    fit: object | None = None  # FitPlan, when the server runs on a GPU
    docker: list[str] | None = None  # the same server as a container, for users who run it that way
    install_hint: str | None = None  # what to install when command[0] is missing
    health_path: str = "/health"
    metrics_path: str = "/metrics"
    notes: list[str] = field(default_factory=list)
    # server log -> what the engine says it served (weights loaded, kernels, attention backend)
    read_served: Callable[[str], dict] | None = None
    # (spec, plan, served facts) -> why the served engine is not what was asked for, or None
    check_served: Callable[[object, LaunchPlan, dict], str | None] | None = None

    def describe(self) -> dict:
        return {"command": self.command, "env": self.env, "docker": self.docker,
                "fit": self.fit.as_dict() if self.fit is not None else None, "notes": self.notes}


def backend_module(name: str) -> ModuleType:
    from tokenrig.serve.backends import hf, sim, tgi, vllm

    modules = {"hf": hf, "sim": sim, "vllm": vllm, "tgi": tgi}
    if name not in modules:
        from tokenrig.serve.launcher import LaunchError

        raise LaunchError(f"unknown backend {name!r}; known backends: {', '.join(modules)}")
    return modules[name]


def launch_plan(spec, model_dir: Path, port: int) -> LaunchPlan:
    return backend_module(spec.backend).launch_plan(spec, model_dir, port)


def prepare_model_dir(spec, progress=print, write: bool = True) -> Path:
    """The directory the server reads (written on first use unless `write` is False, as for --dry-run)."""
    return backend_module(spec.backend).model_dir(spec, progress, write)


def resolve_attention(spec, choices: dict[str, str], default: str | None) -> str | None:
    """The backend's own name for the requested attention ('flash'/'noflash' are portable aliases)."""
    if spec.attention is None:
        return default
    if spec.attention not in choices:
        from tokenrig.serve.launcher import LaunchError

        raise LaunchError(f"--attention {spec.attention!r} is not available on the {spec.backend} backend; "
                          f"choose one of: {', '.join(choices)}")
    return choices[spec.attention]


def plan_for(spec):
    """The fit plan for a GPU spec: TP size, context and batch limits; raises FitError with alternatives."""
    from tokenrig.serve.fit import plan_fit

    return plan_fit(spec.model, spec.gpu, spec.quant, concurrency=spec.concurrency,
                    context_tokens=spec.max_model_len, tp=spec.tp,
                    gpu_memory_utilization=spec.gpu_memory_utilization)

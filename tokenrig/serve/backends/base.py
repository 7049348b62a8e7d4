"""What every backend's launch is made of: the `LaunchPlan`, and the steps backends share.

A plan is what the launcher runs, `--dry-run` prints and the run's metadata records. TP size, max
model length and batch limits come from the fit planner (`plan_for`); attention names are the
backend's own or the portable 'flash' / 'noflash' (`resolve_attention`); hf and sim run tokenrig's
own server process (`tokenrig_server_command`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tokenrig.serve.fit import FitPlan, plan_fit
from tokenrig.serve.spec import LaunchError, ServerSpec


@dataclass
class LaunchPlan:
    command: list[str]
    env: dict[str, str]  # only what tokenrig sets on top of the inherited environment
    fit: FitPlan | None = None  # when the server runs on a GPU
    docker: list[str] | None = None  # the same server as a container, for users who run it that way
    install_hint: str | None = None  # what to install when command[0] is missing
    health_path: str = "/health"
    metrics_path: str = "/metrics"
    notes: list[str] = field(default_factory=list)
    # server log -> what the engine says it served (weights loaded, kernels, attention backend)
    read_served: Callable[[str], dict] | None = None
    # (spec, plan, served facts) -> why the served engine is not what was asked for, or None
    check_served: Callable[[ServerSpec, LaunchPlan, dict], str | None] | None = None

    def describe(self) -> dict:
        return {"command": self.command, "env": self.env, "docker": self.docker,
                "fit": self.fit.as_dict() if self.fit is not None else None, "notes": self.notes}


def resolve_attention(spec: ServerSpec, choices: dict[str, str], default: str | None) -> str | None:
    """The backend's own name for the requested attention ('flash'/'noflash' are portable aliases)."""
    if spec.attention is None:
        return default
    if spec.attention not in choices:
        raise LaunchError(f"--attention {spec.attention!r} is not available on the {spec.backend} backend; "
                          f"choose one of: {', '.join(choices)}")
    return choices[spec.attention]


def plan_for(spec: ServerSpec, tp: int | None = None) -> FitPlan:
    """The fit plan for a GPU spec (at `tp` GPUs if given, else the spec's): TP size, context and batch
    limits; raises FitError with alternatives."""
    return plan_fit(spec.model, spec.gpu, spec.quant, concurrency=spec.concurrency,
                    context_tokens=spec.max_model_len, tp=tp or spec.tp,
                    gpu_memory_utilization=spec.gpu_memory_utilization)


def tokenrig_server_command(engine: str, spec: ServerSpec, model_dir: Path, port: int) -> list[str]:
    """The start of `python -m tokenrig.serve.server` for one of its engines (hf, sim)."""
    return [sys.executable, "-m", "tokenrig.serve.server", "--engine", engine, "--model", spec.model.reference,
            "--model-dir", str(model_dir), "--host", spec.host, "--port", str(port), "--gpu", spec.gpu.key]

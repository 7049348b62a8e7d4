"""What a backend is: its plug-in object (`Backend`), the `LaunchPlan` it makes, and the steps backends share.

A `Backend` holds everything tokenrig knows of one engine: its options, how it is launched, what its
log proves it served, its /metrics names for tokenrig's server figures, where its server command sets
its batch limits, its default client and how it is installed. The registry (backends/__init__.py)
lists them; `--backend`, the scraper, the dashboards and capacity read them from there.

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
from typing import overload

from pydantic import BaseModel, ConfigDict

from tokenrig.serve.fit import FitPlan, plan_fit
from tokenrig.serve.spec import BackendOptions, LaunchError, ServerSpec


class BatchLimits(BaseModel):
    """The limits an engine step runs with, as the launch sets them or a server's user declares or it tells;
    None where nothing says (the engine keeps its own default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_num_seqs: int | None = None  # requests in one engine step
    max_batch_tokens: int | None = None  # tokens in one engine step, the prefill chunk (vLLM max_num_batched_tokens)
    kv_cache_tokens: int | None = None  # the KV cache's size in tokens
    kv_cache_blocks: int | None = None  # ... in blocks of kv_block_tokens tokens
    kv_block_tokens: int | None = None
    gpu_memory_utilization: float | None = None  # the fraction of GPU memory the engine may take

    @classmethod
    def known(cls, **limits) -> BatchLimits:
        """The limits given a value, the others unset (a recorded document names only what is known)."""
        return cls(**{name: value for name, value in limits.items() if value is not None})


@dataclass
class LaunchPlan:
    command: list[str]
    env: dict[str, str]  # only what tokenrig sets on top of the inherited environment
    fit: FitPlan | None = None  # when the server runs on a GPU
    batch_limits: BatchLimits = field(default_factory=BatchLimits)  # what the command sets
    docker: list[str] | None = None  # the same server as a container, for users who run it that way
    health_path: str = "/health"
    metrics_path: str = "/metrics"
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"command": self.command, "env": self.env, "docker": self.docker,
                "fit": self.fit.as_dict() if self.fit is not None else None, "notes": self.notes,
                "batch_limits": self.batch_limits.model_dump(exclude_unset=True)}


@dataclass(frozen=True)
class Backend:
    """One engine as tokenrig drives it: the plug-in the registry lists."""

    name: str
    summary: str  # what --backend's help says of it
    options: type[BackendOptions]
    model_dir: Callable[[ServerSpec, Callable, bool], Path]  # (spec, progress, write) -> the directory it reads
    # (spec, model dir, port, the spec's fit plan or None to plan it) -> command, env, fit
    launch_plan: Callable[[ServerSpec, Path, int, FitPlan | None], LaunchPlan]
    # tokenrig's server figure (serve/scrape.py, the server dashboard) -> the sample names this engine's
    # /metrics page exports it under, preferred first
    metrics: dict[str, tuple[str, ...]]
    # the server command's flags that set its batch limits: how runs recorded before the structured limits are read
    max_seqs_flags: tuple[str, ...] = ()
    max_batch_tokens_flags: tuple[str, ...] = ()
    # server log -> what the engine says it served (weights loaded, kernels, attention backend)
    read_served: Callable[[str], dict] | None = None
    # (spec, plan, served facts) -> why the served engine is not what was asked for, or None
    check_served: Callable[[ServerSpec, LaunchPlan, dict], str | None] | None = None
    # (trace folder, engine steps) -> the server flags that make it trace that many engine steps into the folder
    # after POST /start_profile (loadtest --profile-steps, tokenrig/breakdown); None: it cannot be profiled
    profile_args: Callable[[Path, int], list[str]] | None = None
    default_client: str = "openai"  # the request API `loadtest` uses unless --client says otherwise
    package: str | None = None  # its Python distribution, whose version a run directory records
    setup: str = ""  # how to install or stage it: what the launcher says when its program is missing

    def batch_limits(self, command: list[str]) -> BatchLimits:
        """The batch limits a server command of this engine sets (a run recorded before the structured limits)."""
        return BatchLimits.known(max_num_seqs=_flag_value(command, self.max_seqs_flags),
                                 max_batch_tokens=_flag_value(command, self.max_batch_tokens_flags))


def _flag_value(command: list[str], names: tuple[str, ...]) -> int | None:
    for index, word in enumerate(command[:-1]):
        if word in names:
            return int(command[index + 1])
    return None


@overload
def resolve_attention(spec: ServerSpec, choices: dict[str, str], default: str) -> str: ...
@overload
def resolve_attention(spec: ServerSpec, choices: dict[str, str], default: None) -> str | None: ...
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

"""LoadTestPlan: a load test as decided before anything starts, once (the command line builds it, loadtest.py runs it).

It holds the server to start (its ServerSpec and, for a GPU backend, the fit plan printed before the run and
launched with, so the memory plan is computed once) or the server at --url, the scenario carrying the run's
load, the load profile and its SLOs, the load generator's workers, and what the run records where.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenrig.loadgen.load_profiles import LoadProfile, SingleRun
from tokenrig.loadgen.scenario import Scenario
from tokenrig.metrics.slo import Slo
from tokenrig.metrics.summary import DEFAULT_MAX_ERROR_RATE
from tokenrig.monitor.discovery import MonitorOptions
from tokenrig.serve.fit import FitPlan
from tokenrig.serve.remote import RemoteOptions
from tokenrig.serve.spec import ServerSpec


@dataclass
class WorkerOptions:
    """Distributed load: `workers` in all, `local` of them spawned here, the master's bind address."""

    workers: int
    local: int
    bind_host: str = "127.0.0.1"
    port: int | None = None


@dataclass
class ProfileOptions:
    """Trace `steps` engine steps in every load step; a launched server writes into the run's traces/, a --url
    server into `trace_dir`."""

    steps: int
    trace_dir: Path | None = None


@dataclass
class LoadTestPlan:
    """A load test as decided before anything starts, once: the server (its spec and fit plan, or the server at
    --url), the scenario carrying the run's load, the load profile and SLOs, the load generator, and what the
    run records where."""

    spec: ServerSpec
    scenario: Scenario
    results_root: Path
    # the launched server's memory plan when planned already (the GPU backends' load fit); None: planned at launch
    fit: FitPlan | None = None
    remote: RemoteOptions | None = None  # the server at --url, instead of one tokenrig starts
    profile: LoadProfile = field(default_factory=SingleRun)
    seed_source: str = "scenario"  # "--seed", "scenario" or "random"
    slos: list[Slo] | None = None
    workers: WorkerOptions | None = None
    client: str = "openai"
    monitor: MonitorOptions | None = None
    profiling: ProfileOptions | None = None
    scrape: bool = True  # the server's /metrics is scraped (not with --no-scrape)
    scrape_interval_s: float = 1.0
    request_timeout_s: float = 600.0
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE

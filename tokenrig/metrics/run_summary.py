"""RunSummary: the typed summary.json of one load step (docs/metrics.md defines each figure).

Every reader (the console, the SLO search, --compare, the HTML report, capacity planning) reads
these models instead of string keys. The JSON shape is the one tokenrig has always written, plus
`schema_version`: `to_json()` writes exactly the fields a summary was built or loaded with, so a
summary.json written before a field existed loads (the field takes its default) and is written
back unchanged. Files without a version are version 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tokenrig.breakdown.table import OperatorBreakdown
from tokenrig.jsonfile import write_json

SCHEMA_VERSION = 1


class SummaryVersionError(ValueError):
    """A summary.json written by a newer tokenrig than this one."""


class _Part(BaseModel):
    model_config = ConfigDict(populate_by_name=True, validate_assignment=True)


class Distribution(_Part):
    """Exact percentiles of a set of values, and p99's distribution-free 95 % interval (None: too few)."""

    p50: float
    p90: float
    p95: float
    p99: float
    p99_9: float = Field(alias="p99.9")
    mean: float
    min: float
    max: float
    count: int
    p99_ci95: tuple[float, float] | None = None

    @property
    def p99_uncertain(self) -> bool:
        """p99 from too few samples for an interval (summaries written before intervals existed say nothing)."""
        return "p99_ci95" in self.model_fields_set and self.p99_ci95 is None


class Requests(_Part):
    total: int
    measured: int
    ok: int
    failed: int
    cancelled: int = 0
    excluded_warmup_cooldown: int
    errors_by_type: dict[str, int]
    error_examples: dict[str, str] = {}
    error_rate: float = 0.0
    max_error_rate: float | None = None
    too_many_errors: bool = False


class Window(_Part):
    start_unix: float
    end_unix: float
    seconds: float
    warmup_s: float
    cooldown_s: float
    problem: str | None = None  # why nothing was measured


class Latency(_Part):
    """One distribution per registered metric (metrics/registry.py), by its name: ttft, tpot, itl, e2e, ..."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Distribution | None] = Field(init=False)

    def get(self, metric: str) -> Distribution | None:
        """The metric's distribution; None without samples, or in a summary written before the metric existed."""
        return (self.__pydantic_extra__ or {}).get(metric)


class Throughput(_Part):
    output_tokens_per_s: float
    requests_per_s: float
    input_tokens_per_s: float


class Tokens(_Part):
    output_total: int
    input_total: int
    usage_vs_tokenizer_mismatches: int
    requests_short_of_max_tokens: int
    requests_checked_against_usage: int | None = None


class WorkerCpu(_Part):
    index: int
    cpu_fraction: float
    cpu_s: float


class LoadGenerator(_Part):
    schedule_lag_s: Distribution | None
    target_rate_rps: float | None
    achieved_send_rate_rps: float
    scheduled_arrivals: int | None
    sent_arrivals: int
    slot_late_requests: int
    client_cpu_fraction: float
    chunks_per_s_per_process: float | None = None
    chunks_per_s_ceiling: int | None = None
    valid: bool
    problems: list[str]
    # its one problem was sends past the late rule: the load it offered was later and lighter, never heavier
    late_sends_only: bool = False
    remedy: str | None = None
    # the open loop's in-flight cap was reached by a slow server, not a busy client: what happened, in words
    server_saturated: str | None = None
    workers: list[WorkerCpu] | None = None  # a distributed run's worker processes


class SloVerdict(_Part):
    threshold_s: float
    value_s: float | None
    met: bool
    samples: int
    beyond_percentile: int | None = None
    ci95_s: tuple[float, float] | None = None
    beyond_threshold: int | None = None  # samples over the threshold (summaries before it was recorded lack it)
    design_effect: float | None = None  # samples per independent one in the tail (metrics/slo.tail_design_effect)
    confidence: str


class SloJudgement(_Part):
    slos: dict[str, SloVerdict]
    all_met: bool
    goodput_rps: float
    good_requests: int
    good_fraction: float


class WorkloadFacts(_Part):
    requests_clamped_to_context: int
    conversations_cut_at_context: int


THROUGHPUT_MODE_NOTE = ("THROUGHPUT MODE (--rate inf): the server was saturated on purpose; read output tok/s and "
                        "req/s. TTFT, TPOT and E2E include the wait in its queue: they are no latency figures")


class LoadFacts(_Part):
    plan: str
    stopped_early_slo_missed: bool
    spec: dict[str, Any] | None = None  # the step's LoadPlanSpec (summaries before it was recorded lack it)
    throughput_mode: bool = False  # a saturating run (--rate inf): THROUGHPUT_MODE_NOTE applies to its figures


class RunSummary(_Part):
    schema_version: int = 0
    requests: Requests
    window: Window
    latency_s: Latency
    throughput: Throughput
    tokens: Tokens
    load_generator: LoadGenerator
    interrupted: bool
    slo: SloJudgement | None = None
    workload: WorkloadFacts | None = None
    load: LoadFacts | None = None
    server: dict[str, Any] | None = None  # the server's scraped /metrics over the window (serve/scrape.py)
    breakdown: OperatorBreakdown | None = None  # the engine's time by operator, when the step was profiled

    @property
    def plan(self) -> str:
        return self.load.plan if self.load else ""

    @property
    def stopped_early(self) -> bool:
        return bool(self.load and self.load.stopped_early_slo_missed)

    @property
    def no_measurement(self) -> str | None:
        """Why the window measured nothing (summaries before `window.problem` existed say it by the count)."""
        return self.window.problem or (None if self.requests.measured
                                       else "no request was scheduled inside the window")

    def to_json(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def write(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> RunSummary:
        return cls.from_json(json.loads(path.read_text()))

    @classmethod
    def from_json(cls, document: dict) -> RunSummary:
        version = document.get("schema_version", 0)
        if version > SCHEMA_VERSION:
            raise SummaryVersionError(f"summary schema version {version} is newer than this tokenrig reads "
                                      f"({SCHEMA_VERSION}): upgrade tokenrig")
        return cls.model_validate(document)

"""StepRecord (one training step) and its JSONL sink; Outcome (how a rank's run ended).

steps.jsonl gets one line per finished step, flushed at once, so a crash, an out-of-memory or
Ctrl-C keeps every measured step. outcome-rank<N>.json says how each rank ended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel


class StepRecord(BaseModel):
    step: int
    phase: Literal["warmup", "measured", "profiled"]
    step_time_s: float
    loss: float
    tokens: int  # tokens trained in this step, all ranks together
    time: float  # wall clock at the step's end (Unix seconds)
    host_rss_bytes: int
    gpu_allocated_peak_bytes: int | None = None  # rank 0's peak since the run started
    gpu_reserved_peak_bytes: int | None = None


class StepSink:
    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def write(self, record: StepRecord) -> None:
        self.file.write(record.model_dump_json() + "\n")
        self.file.flush()


def read_steps(path: Path) -> list[StepRecord]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            records.append(StepRecord.model_validate_json(line))
    return records


class Outcome(BaseModel):
    status: Literal["running", "ok", "oom", "interrupted", "error"]
    rank: int
    message: str | None = None
    trainable_params: int | None = None


def write_outcome(run_dir: Path, outcome: Outcome) -> None:
    path = run_dir / f"outcome-rank{outcome.rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(outcome.model_dump_json(indent=2))
    tmp.replace(path)


def read_outcomes(run_dir: Path) -> list[Outcome]:
    return [Outcome.model_validate(json.loads(p.read_text())) for p in sorted(run_dir.glob("outcome-rank*.json"))]

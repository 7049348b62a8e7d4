"""Run directories as the report reads them: whatever a run left behind, finished or not.

A load test (metadata.json + summary.json, requests.jsonl, server_metrics.jsonl), a sweep or SLO
search (search.json + steps/NN-*/), or a training run (metadata.json of kind train, summary.json,
steps.jsonl, breakdown.json). A run stopped by Ctrl-C, killed before its summary, with no
successful request, or copied without its per-request records is read as far as it goes; what is
missing becomes a notice the report prints, never an exception.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from tokenrig.errors import UserError
from tokenrig.metrics.records import RequestRecord, read_records
from tokenrig.metrics.run_summary import THROUGHPUT_MODE_NOTE, RunSummary, SummaryVersionError
from tokenrig.report.console import failed_line


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _summary(path: Path) -> RunSummary | None:
    """A load step's summary; one unreadable (cut short, or not a summary this tokenrig reads) counts as none."""
    document = _json(path)
    try:
        return RunSummary.from_json(document) if document is not None else None
    except (ValidationError, SummaryVersionError):
        return None


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return rows


class NoRunsError(UserError, ValueError):
    """A path given to the report is no directory, or nothing under the paths is a run."""


@dataclass
class LoadStep:
    """One load step: a plain run's directory, or one step of a sweep or search."""

    path: Path
    label: str
    summary: RunSummary | None
    records: list[RequestRecord] | None  # None: requests.jsonl was not kept
    scrapes: list[dict]

    def notices(self) -> list[str]:
        """What a reader must know before trusting the figures of this step."""
        notes, summary = [], self.summary
        ok = sum(r.ok for r in self.records) if self.records is not None else None
        if summary is None:
            count = f"the {len(self.records)} request records" if self.records is not None else "no request record"
            notes.append(f"no summary.json: the run stopped before it was summarised (killed, or stopped while "
                         f"starting); shown: {count} and the server scrapes it left")
        elif summary.interrupted:
            notes.append("stopped early (Ctrl-C or a stop signal): the figures cover the requests finished before "
                         "the stop")
        if summary is not None and summary.window.problem:
            notes.append(f"no measurement: {summary.window.problem}")
        total_ok = summary.requests.ok if summary is not None else ok
        if total_ok == 0:
            failed = summary.requests.failed if summary else sum(not r.ok for r in self.records or [])
            errors = (summary.requests.errors_by_type if summary else None) or _error_types(self.records or [])
            notes.append(f"no request succeeded ({failed} failed: "
                         + (", ".join(f"{kind} x{n}" for kind, n in errors.items()) or "none sent") + ")")
        if summary is not None and summary.load and summary.load.throughput_mode:
            notes.append(THROUGHPUT_MODE_NOTE)
        if summary is not None and summary.requests.too_many_errors and total_ok:
            notes.append(failed_line(summary.requests))
        if summary is not None and summary.load_generator.server_saturated:
            notes.append(f"server saturated: {summary.load_generator.server_saturated}")
        if summary is not None and not summary.load_generator.valid:
            notes.append("INVALID: the load generator was the bottleneck (" +
                         "; ".join(summary.load_generator.problems) + ")")
        if self.records is None:
            notes.append("requests.jsonl was not kept with this run: latency distributions and the client "
                         "timeline need per-request records; the summary and the server scrapes are shown")
        return notes


def _error_types(records: list[RequestRecord]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for record in records:
        if not record.ok:
            key = (record.error or "").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    return errors


@dataclass
class LoadRun:
    path: Path
    metadata: dict
    steps: list[LoadStep]
    search: dict | None  # search.json of a sweep or SLO search

    @property
    def run_id(self) -> str:
        return self.metadata.get("run_id", self.path.name)


@dataclass
class TrainRun:
    path: Path
    metadata: dict
    summary: dict | None  # the training summary.json as written (train/summary.py), not a load step's RunSummary
    steps: list[dict]
    breakdown: dict | None

    @property
    def run_id(self) -> str:
        return self.metadata.get("run_id", self.path.name)


@dataclass
class Runs:
    load: list[LoadRun] = field(default_factory=list)
    train: list[TrainRun] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _load_step(path: Path, label: str, progress) -> LoadStep:
    records_path = path / "requests.jsonl"
    records = read_records(records_path) if records_path.exists() else None
    if records is not None and len(records) >= 10_000:
        progress(f"  {path.name}: {len(records)} request records")
    return LoadStep(path, label, _summary(path / "summary.json"), records, _jsonl(path / "server_metrics.jsonl"))


def read_run(path: Path, metadata: dict, progress=print) -> LoadRun | TrainRun:
    if metadata.get("kind") == "train":
        return TrainRun(path, metadata, _json(path / "summary.json"), _jsonl(path / "steps.jsonl"),
                        _json(path / "breakdown.json"))
    steps_dir = path / "steps"
    if steps_dir.is_dir():
        steps = [_load_step(step, step.name, progress) for step in sorted(steps_dir.iterdir()) if step.is_dir()]
    else:
        steps = [_load_step(path, metadata.get("run_id", path.name), progress)]
    return LoadRun(path, metadata, steps, _json(path / "search.json"))


def find_runs(paths: list[Path], progress=print) -> Runs:
    """Each path is a run directory, or a directory whose run directories (metadata.json) are read.

    Directories whose metadata is neither a load test's (scenario) nor a training run's (a training
    matrix's own, for instance) hold runs rather than being one."""
    runs = Runs()
    for path in paths:
        if not path.is_dir():
            raise NoRunsError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}; give run "
                              "directories (results/RUN_ID) or directories holding them (results/)")
        found = 0
        for metadata_path in sorted(path.rglob("metadata.json")):
            metadata = _json(metadata_path)
            if metadata is None or not ("scenario" in metadata or metadata.get("kind") == "train"):
                continue
            progress(f"reading {metadata_path.parent}")
            run = read_run(metadata_path.parent, metadata, progress)
            if isinstance(run, TrainRun):
                runs.train.append(run)
            else:
                runs.load.append(run)
            found += 1
        if not found:
            runs.skipped.append(f"{path}: no load-test or training run (metadata.json) under it")
    return runs

"""CSV exports of run directories: requests.csv (one row per request) and summary.csv (one row per run or step).

requests.csv has every RequestRecord field except the per-chunk lists, plus the figures derived
from them (TPOT, chunks, output tokens as docs/metrics.md counts them), tagged with run and step.
summary.csv flattens each summary.json (load tests and training runs) into dotted columns,
`latency_s.ttft.p99` and the like; columns are the union over the rows.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tokenrig.metrics.registry import METRICS
from tokenrig.report.runs import Runs

REQUEST_SKIPPED = ("chunk_offsets_s", "chunk_tokens")
PROGRESS_EVERY = 50_000


def flatten(document: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def write_csv(runs: Runs, directory: Path, progress=print) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    requests_path, summary_path = directory / "requests.csv", directory / "summary.csv"
    written = 0
    with requests_path.open("w", newline="") as handle:
        writer = None
        for run in runs.load:
            for step in run.steps:
                for record in step.records or []:
                    row = {"run_id": run.run_id, "step": step.label,
                           **{k: v for k, v in vars(record).items() if k not in REQUEST_SKIPPED},
                           "ok": record.ok, "output_tokens": record.output_tokens,
                           **{metric.csv_column: metric.request_value(record, percentile=50)
                              for metric in METRICS.values() if metric.csv_column},
                           "chunks": len(record.chunk_offsets_s)}
                    if writer is None:
                        writer = csv.DictWriter(handle, list(row))
                        writer.writeheader()
                    writer.writerow(row)
                    written += 1
                    if written % PROGRESS_EVERY == 0:
                        progress(f"  requests.csv: {written} rows")
        if writer is None:
            handle.write("run_id,step\n")  # no request record in any run: the header says what would be here
    rows = [{"run_id": run.run_id, "step": step.label, **flatten(step.summary.to_json())}
            for run in runs.load for step in run.steps if step.summary is not None]
    rows += [{"run_id": run.run_id, "step": "", **flatten(run.summary)} for run in runs.train if run.summary]
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["run_id", "step"]
    with summary_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    progress(f"csv: {requests_path} ({written} requests), {summary_path} ({len(rows)} runs and steps)")
    return requests_path, summary_path

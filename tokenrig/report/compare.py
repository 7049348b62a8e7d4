"""One markdown table over finished load-test runs: `tokenrig loadtest --compare DIR...`.

Reads each run directory's metadata.json (server configuration, load plan) and summary.json
(docs/metrics.md definitions), so a results page is regenerated from the data, not typed.
Runs that failed, measured nothing, or whose load generator was the bottleneck, are kept and marked;
directories that are not load tests (a training run) are skipped with a note.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import ValidationError

from tokenrig.errors import UserError
from tokenrig.metrics.registry import compared_metrics
from tokenrig.metrics.run_summary import Distribution, RunSummary, SummaryVersionError
from tokenrig.report.console import failed_line


class CompareError(UserError, ValueError):
    pass


def quant_label(server: dict) -> str:
    quant = server.get("quant") or "bf16"
    return quant + (f" ({server['quant_kernel']})" if server.get("quant_kernel") else "")


def engine_details(server: dict) -> list[str]:
    """The engine settings besides backend, model, GPU and weights, in the words of the serve flags."""
    parts = []
    if server.get("attention"):
        parts.append(server["attention"])
    if server.get("cuda_graphs"):
        padding = server.get("kv_padding_tokens")
        parts.append("CUDA graphs" + (f", KV padding {padding}" if padding else ""))
    if server.get("sim_ttft_ms") is not None:
        parts.append(f"sim TTFT {server['sim_ttft_ms']:g} ms, TPOT {server['sim_tpot_ms']:g} ms")
    roofline = [f"{name} {server[key]:g}{unit}" for key, name, unit in (
        ("sim_compute_efficiency", "compute", ""), ("sim_bandwidth_efficiency", "bandwidth", ""),
        ("sim_step_overhead_ms", "overhead", " ms"), ("sim_sequence_overhead_us", "per sequence", " us"))
        if server.get(key) is not None]
    if roofline:
        parts.append("roofline " + " ".join(roofline))
    if server.get("compile_level"):
        parts.append(f"compile {server['compile_level']}")
    if server.get("prefix_caching") is False:
        parts.append("no prefix caching")
    return parts


def engine_label(server: dict) -> str:
    """The serving engine as configured, whatever the model, GPU and weight format: e.g. 'hf, sdpa, CUDA graphs'."""
    return ", ".join([server.get("backend", "?")] + engine_details(server))


def server_label(server: dict) -> str:
    """What distinguishes one serving configuration from another, in the words of the serve flags."""
    return (f"{server.get('backend', '?')} {server.get('model', '?')} {server.get('gpu', '?')}, "
            + ", ".join([quant_label(server)] + engine_details(server)))


def _ms(distribution: Distribution | None, key: str) -> float | None:
    return getattr(distribution, key) * 1000 if distribution else None


def _metadata_path(result_dir: Path) -> Path | None:
    """A run's metadata.json, also for one step of a sweep or search (RUN/steps/NN-.../summary.json)."""
    for candidate in (result_dir / "metadata.json", result_dir.parent.parent / "metadata.json"):
        if candidate.exists() and (candidate.parent == result_dir or result_dir.parent.name == "steps"):
            return candidate
    return None


def _read_metadata(result_dir: Path) -> dict:
    path = _metadata_path(result_dir)
    if path is None:
        raise FileNotFoundError(f"{result_dir}: no metadata.json, neither its own nor its run's")
    return json.loads(path.read_text())


def run_row(run_dir: Path) -> dict:
    metadata = _read_metadata(run_dir)
    summary = RunSummary.read(run_dir / "summary.json")
    latency, server_metrics = summary.latency_s, summary.server or {}
    running = server_metrics.get("running") or {}
    notes = []
    if summary.requests.too_many_errors:
        notes.append(failed_line(summary.requests))
    if summary.no_measurement:
        notes.append(f"no measurement: {summary.no_measurement}")
    if not summary.load_generator.valid:
        notes.append("INVALID: the load generator was the bottleneck: " + "; ".join(summary.load_generator.problems))
    if summary.load_generator.server_saturated:
        notes.append(f"server saturated: {summary.load_generator.server_saturated}")
    if summary.interrupted:
        notes.append("interrupted")
    return {
        "run_id": metadata.get("run_id", run_dir.name) + (f"/{run_dir.name}" if run_dir.parent.name == "steps" else ""),
        "config": server_label(metadata.get("server") or {}),
        "load": summary.plan,
        "window_s": summary.window.seconds,
        "ok": summary.requests.ok, "failed": summary.requests.failed,
        **{f"{metric.name}_{key}_ms": _ms(latency.get(metric.name), key)
           for metric in compared_metrics() for key in ("p50", "p99")},
        "output_tokens_per_s": summary.throughput.output_tokens_per_s,
        "requests_per_s": summary.throughput.requests_per_s,
        "server_running_mean": running.get("mean"), "server_running_max": running.get("max"),
        "notes": notes,
    }


def _not_a_load_test(run_dir: Path) -> str | None:
    """Why a directory with metadata.json and summary.json is no load test to table (None: it is one)."""
    try:
        metadata = _read_metadata(run_dir)
        if metadata.get("kind") == "train":
            return "a training run (tokenrig train --compare tables those)"
        RunSummary.read(run_dir / "summary.json")
    except (OSError, ValueError, ValidationError, SummaryVersionError) as error:
        return f"its summary.json is not a load test's this tokenrig reads ({str(error).splitlines()[0]})"
    return None


def compare_runs(directories: list[Path], note=lambda text: print(text, file=sys.stderr)) -> list[dict]:
    """A row per run directory (metadata.json + summary.json) under `directories`, in creation order per directory;
    `note` says which directories were skipped and why."""
    rows = []
    for directory in directories:
        run_dirs = sorted({path.parent for path in Path(directory).rglob("summary.json")
                           if _metadata_path(path.parent) is not None},
                          key=lambda p: (p.parent.parent.name, p.name) if p.parent.name == "steps" else (p.name, ""))
        for run_dir in run_dirs:
            reason = _not_a_load_test(run_dir)
            if reason:
                note(f"skipped {run_dir}: {reason}")
            else:
                rows.append(run_row(run_dir))
    if not rows:
        raise CompareError(f"no load-test runs (summary.json + metadata.json) under {', '.join(map(str, directories))}")
    return rows


def markdown(rows: list[dict]) -> str:
    def number(value, fmt=".1f"):
        return "–" if value is None else format(value, fmt)

    def pair(row, metric):
        return f"{number(row[f'{metric}_p50_ms'])} / {number(row[f'{metric}_p99_ms'])}"

    compared = compared_metrics()
    lines = ["| config | load | window s | ok | " + "".join(f"{metric.label} p50 / p99 ms | " for metric in compared)
             + "output tok/s | req/s | server running mean / max |",
             "|---|---|---:|---:|" + "---|" * len(compared) + "---:|---:|---|"]
    for row in rows:
        running = (f"{number(row['server_running_mean'])} / {number(row['server_running_max'], '.0f')}"
                   if row["server_running_mean"] is not None else "–")
        ok = f"{row['ok']}" + (f" (+{row['failed']} failed)" if row["failed"] else "")
        lines.append(f"| {row['config']} | {row['load']} | {number(row['window_s'], '.0f')} | {ok} "
                     + "".join(f"| {pair(row, metric.name)} " for metric in compared)
                     + f"| {number(row['output_tokens_per_s'])} | {number(row['requests_per_s'], '.2f')} | {running} |")
    marked = [row for row in rows if row["notes"]]
    if marked:
        lines += [""] + [f"- {row['run_id']} ({row['config']}, {row['load']}): {'; '.join(row['notes'])}"
                         for row in marked]
    return "\n".join(lines) + "\n"

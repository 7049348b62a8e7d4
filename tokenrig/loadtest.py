"""One load-test run, end to end: server → load plan → request records → summary.

Opens the run directory first and writes metadata, starts (or reuses, with --url) a server,
runs the plan with Locust, then summarises requests.jsonl into summary.json and the console
table. Ctrl-C at any point stops the server and still summarises what finished.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from tokenrig.loadgen.plan import LoadPlan
from tokenrig.loadgen.records import JsonlSink, read_records
from tokenrig.loadgen.runner import run_load
from tokenrig.loadgen.scenario import Scenario
from tokenrig.loadgen.users import LoadContext
from tokenrig.loadgen.workload import Workload
from tokenrig.report.console import render
from tokenrig.report.rundir import environment_facts, new_run_dir, write_json
from tokenrig.report.summary import RunFacts, summarize
from tokenrig.serve.launcher import Endpoint, LaunchedServer, ServerSpec


def _existing_endpoint(url: str, spec: ServerSpec) -> Endpoint:
    from tokenrig.serve.checkpoint import tokenizer_dir

    base = url.rstrip("/").removesuffix("/v1")
    return Endpoint(base, f"{base}/metrics", spec.model.key, tokenizer_dir(spec.model), spec.model.max_context)


@dataclass
class MonitorOptions:
    """Live Prometheus metrics for the run: exporter port (0 = any free one) and discovery directory."""

    port: int
    targets_dir: Path
    linger_s: float = 5.0


def run_session(spec: ServerSpec, scenario: Scenario, results_root: Path, url: str | None = None,
                monitor: MonitorOptions | None = None, progress=print) -> int:
    run_dir = new_run_dir(results_root, scenario.name, spec.backend, spec.model.key, spec.gpu.key)
    metadata = {"run_id": run_dir.name, "created_unix": time.time(), "scenario": scenario.model_dump(),
                "server": spec.describe(), **environment_facts()}
    write_json(run_dir / "metadata.json", metadata)
    progress(f"run {run_dir.name}: scenario {scenario.name}, {spec.backend} backend, {spec.model.key} on {spec.gpu.key}")

    sink = JsonlSink(run_dir / "requests.jsonl")
    with contextlib.ExitStack() as stack:
        stack.callback(sink.close)
        if url:
            endpoint = _existing_endpoint(url, spec)
            metadata["server"]["url"] = url
        else:
            server = stack.enter_context(LaunchedServer(spec, run_dir / "server.log", progress=progress))
            endpoint = server.endpoint
            metadata["server"].update(server.plan.describe())  # the exact command, environment and memory plan
        metadata["endpoint"] = {"base_url": endpoint.base_url, "metrics_url": endpoint.metrics_url}
        write_json(run_dir / "metadata.json", metadata)

        tokenizer = Tokenizer.from_file(str(Path(endpoint.tokenizer_dir) / "tokenizer.json"))
        workload = Workload(scenario, tokenizer, endpoint.model_name, endpoint.max_context, seed=scenario.load.seed)
        plan = LoadPlan(scenario.load)
        ctx = LoadContext(endpoint.base_url, plan, workload, tokenizer, sink, unix_offset=0.0)
        if monitor:
            from tokenrig.monitor.exporter import live_loadgen_metrics

            labels = {"run_id": run_dir.name, "scenario": scenario.name, "backend": spec.backend,
                      "model": spec.model.key, "gpu": spec.gpu.key}
            stack.enter_context(live_loadgen_metrics(ctx, labels, endpoint.metrics_url, monitor.port,
                                                     monitor.targets_dir, monitor.linger_s, progress))
        mode = plan.describe()
        progress(f"load: {mode} for {scenario.load.duration_s:g} s (warm-up {scenario.load.warmup_s:g} s)")
        outcome = run_load(ctx, progress=progress)

    sink.close()
    records = read_records(run_dir / "requests.jsonl")
    facts = RunFacts(duration_s=scenario.load.duration_s, warmup_s=scenario.load.warmup_s,
                     cooldown_s=scenario.load.cooldown_s, plan_start_unix=plan.start + ctx.unix_offset,
                     target_rate=plan.target_rate, client_cpu_fraction=outcome.client_cpu_fraction,
                     interrupted=outcome.interrupted)
    summary = summarize(records, facts)
    summary["workload"] = {"requests_clamped_to_context": workload.clamped}
    write_json(run_dir / "summary.json", summary)
    title = f"{scenario.name} | {spec.backend} | {spec.model.key} | {spec.gpu.key} | {mode}"
    progress("")
    progress(render(summary, title))
    progress(f"\nresults: {run_dir}")
    return 130 if outcome.interrupted else 0

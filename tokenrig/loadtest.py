"""Load tests end to end: server → load plan(s) → request records → summaries.

Opens the run directory first and writes metadata, starts (or reuses, with --url) a server,
then runs one load step (a plain run), a sweep of steps, or an SLO search (`--find-max`), each
step with its own requests.jsonl, server_metrics.jsonl (the server's /metrics scraped at a fixed
interval) and summary.json; with profiling, each step also traces the engine's kernels for a number of
engine steps and reports the time by operator (tokenrig/breakdown). Ctrl-C at any point stops the server
and still summarises what finished.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

from tokenrig import exit_status
from tokenrig.breakdown.capture import ProfileError, TraceCapture, server_profile_args
from tokenrig.breakdown.table import OperatorBreakdown
from tokenrig.interrupts import stop_signals_interrupt
from tokenrig.jsonfile import write_json
from tokenrig.loadgen.ceiling import per_core_ceiling
from tokenrig.loadgen.driver import LoadOutcome, WorkerLostError
from tokenrig.loadgen.load_profiles import Search, SearchStepPlan, walk
from tokenrig.loadgen.plan import LoadPlan
from tokenrig.loadgen.runner import run_load
from tokenrig.loadgen.scenario import LoadPlanSpec, Scenario
from tokenrig.loadgen.users import LoadContext
from tokenrig.loadgen.workload import API_PATHS, Workload
from tokenrig.loadtest_plan import LoadTestPlan
from tokenrig.metrics.records import FanoutSink, JsonlSink, Sink, read_records
from tokenrig.metrics.run_summary import LoadFacts, RunSummary, WorkerCpu, WorkloadFacts
from tokenrig.metrics.slo import Slo
from tokenrig.metrics.summary import DEFAULT_MAX_ERROR_RATE, RunFacts, SummaryParts, summarize
from tokenrig.metrics.verdict import SloWatch, StepResult
from tokenrig.monitor.discovery import MonitorOptions
from tokenrig.report.console import failed_line, render, render_steps
from tokenrig.report.run_metadata import RunMetadata, ServerFacts
from tokenrig.report.rundir import environment_facts, new_run_dir
from tokenrig.serve.checkpoint import tokenizer_dir as profile_tokenizer_dir
from tokenrig.serve.launcher import LaunchedServer
from tokenrig.serve.remote import RemoteOptions, RemoteServer, auth_headers, server_facts, whole_url
from tokenrig.serve.scrape import MetricsScraper, summarize_server_metrics, wait_server_idle
from tokenrig.serve.spec import Endpoint, ServerSpec

if TYPE_CHECKING:  # the distributed load's master is imported where --workers asks for one (run_session)
    from tokenrig.loadgen.distributed import Master


def _existing_endpoint(remote: RemoteOptions, spec: ServerSpec, scenario: Scenario, client: str,
                       progress: Callable[[str], None] = print) -> tuple[Endpoint, dict, str | None]:
    """The server at --url, checked by one streaming request before any load (RemoteError names the fix), the
    `server` facts its run records, and why its /metrics is no page to scrape (None: it is one)."""
    server = RemoteServer(whole_url(remote.url), remote.api_key)
    model, entry = server.served_model(remote.served_model, spec.model.key)
    report = server.report(entry)
    if report.max_model_len is None:
        context = spec.max_model_len or spec.model.max_context
        progress(f"the server at {server.base_url} does not say its context length: prompts are sized for "
                 f"{context} tokens (--max-model-len sets it)")
    else:
        context = min(report.max_model_len, spec.max_model_len or report.max_model_len)
    declared = remote.declared.get("backend")
    if declared and report.engine and report.engine != declared:
        progress(f"note: --backend {declared} declared, but the server at {server.base_url} reports the "
                 f"{report.engine} engine; the run is recorded as {declared}, with what the server reported")
    if remote.tokenizer:
        tokenizer = remote.tokenizer
    else:
        tokenizer = profile_tokenizer_dir(spec.model)
        progress(f"prompt lengths are counted with tokenrig's word-level tokenizer of the {spec.model.key} profile; "
                 "the server's own tokenizer may count them differently: --tokenizer gives its tokenizer.json "
                 "or Hub name")
    if client == "openai":
        first = scenario.requests[0]
        note = server.preflight(API_PATHS[first.api], model, chat=first.api == "chat")
        if note:
            progress(note)
    endpoint = Endpoint(server.base_url, f"{server.base_url}/metrics", model, tokenizer, context)
    return endpoint, server_facts(remote.declared, server.base_url, model, report), report.metrics_problem


@dataclass
class Session:
    """What every step of a run shares: the run directory, server endpoint, tokenizer, scenario."""

    run_dir: Path
    endpoint: Endpoint
    tokenizer: Tokenizer
    scenario: Scenario
    labels: dict
    slos: list[Slo] | None
    monitor: MonitorOptions | None
    progress: Callable[[str], None]
    master: Master | None = None  # when the load runs on worker processes
    client: str = "openai"  # "tgi": requests go to /generate_stream through InferenceClient
    scrape_interval_s: float = 1.0  # the server's /metrics -> server_metrics.jsonl, every this many seconds
    request_timeout_s: float = 600.0  # silence that fails a request; also how long in-flight ones may drain
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE  # past this fraction of failed requests a step FAILED
    headers: dict = field(default_factory=dict)  # sent with every request (the API key's Authorization)
    trace_dir: Path | None = None  # where the server writes profiler traces: each step is profiled
    trace_source: str = ""
    scrape: bool = True  # the server's /metrics is scraped (not with --no-scrape, nor when it has none)

    def run_step(self, load: LoadPlanSpec, step_dir: Path, stop_early: bool = False
                 ) -> tuple[RunSummary, LoadOutcome]:
        """Run one load plan; write step_dir/requests.jsonl and summary.json; return (summary, outcome)."""
        step_dir.mkdir(parents=True, exist_ok=True)
        scenario = self.scenario.model_copy(update={"load": load})
        workload = Workload(scenario, self.tokenizer, self.endpoint.model_name, self.endpoint.max_context,
                            seed=load.seed)
        plan = LoadPlan(load)
        watch = _slo_watch(self.slos, plan) if stop_early and self.slos and plan.open_loop else None
        with contextlib.ExitStack() as stack:
            # the record stream's sinks, all assembled before the load's context: requests.jsonl first (the source
            # of truth), the early stop's SLO watch, the Prometheus exporter
            exporter = None
            if self.monitor:
                from tokenrig.monitor.exporter import PrometheusSink, live_loadgen_metrics

                exporter = stack.enter_context(live_loadgen_metrics(
                    self.labels, self.endpoint.metrics_url if self.scrape else None, self.monitor.port,
                    self.monitor.targets_dir, self.monitor.linger_s, self.progress))
            sink = JsonlSink(step_dir / "requests.jsonl")
            sinks: list[Sink] = [sink, *([watch] if watch else []), *([PrometheusSink(exporter)] if exporter else [])]
            record_stream = FanoutSink(*sinks) if len(sinks) > 1 else sink
            stack.callback(record_stream.close)
            ctx = LoadContext(self.endpoint.base_url, plan, workload, self.tokenizer, record_stream, unix_offset=0.0,
                              client=self.client, request_timeout_s=self.request_timeout_s, headers=self.headers)
            if exporter is not None:
                exporter.bind(ctx)  # its gauges read the load's live state at scrape time
            scraper = (stack.enter_context(MetricsScraper(self.endpoint.metrics_url, step_dir / "server_metrics.jsonl",
                                                          self.scrape_interval_s)) if self.scrape else None)
            self.progress(f"load: {plan.describe()} for {load.duration_s:g} s (warm-up {load.warmup_s:g} s)")
            capture = None
            if self.trace_dir is not None:
                capture = TraceCapture(self.endpoint.base_url, self.trace_dir, self.trace_source, self.headers)
                capture.start_after(load.warmup_s)

            def stop_when() -> bool:  # a record that cannot be written stops the load as a missed SLO does
                return sink.failing or (watch is not None and watch.decided())

            outcome: LoadOutcome
            workers = None
            if self.master:
                distributed = self.master.run(ctx, scenario, self.tokenizer.to_str(), stop_when=stop_when)
                outcome = distributed
                workers = [WorkerCpu(index=w.index, cpu_fraction=w.cpu_fraction, cpu_s=w.cpu_s)
                           for w in distributed.workers]
            else:
                outcome = run_load(ctx, progress=self.progress, stop_when=stop_when)
        sink.check()
        records = read_records(step_dir / "requests.jsonl")
        ran = None
        if outcome.interrupted or outcome.stopped_early:  # the window ends when the load stopped
            ran = (outcome.stopped_at or time.perf_counter()) - plan.start
        facts = RunFacts(duration_s=load.duration_s, warmup_s=load.warmup_s, cooldown_s=load.cooldown_s,
                         plan_start_unix=plan.start + ctx.unix_offset, target_rate=plan.target_rate,
                         client_cpu_fraction=outcome.client_cpu_fraction, interrupted=outcome.interrupted,
                         scheduled_in_window=plan.scheduled_in_window(until_s=ran),
                         load_processes=self.master.expected if self.master else 1,
                         max_error_rate=self.max_error_rate, ceiling=per_core_ceiling(),
                         in_flight_cap=load.max_in_flight if plan.open_loop else None, stopped_after_s=ran)
        missed = outcome.stopped_early and (watch is None or watch.verdict != "met")  # else its SLOs were surely met
        window_start, window_end = facts.window()
        parts = SummaryParts(
            workload=WorkloadFacts(requests_clamped_to_context=workload.clamped,
                                   conversations_cut_at_context=workload.conversations_cut),
            load=LoadFacts(plan=plan.describe(), stopped_early_slo_missed=missed, spec=load.model_dump(),
                           throughput_mode=load.type == "throughput"),
            server=summarize_server_metrics(step_dir / "server_metrics.jsonl", window_start, window_end,
                                            scraper.errors if scraper else 0),
            breakdown=self._breakdown(capture, step_dir) if capture is not None else None, workers=workers)
        summary = summarize(records, facts, self.slos, parts)
        summary.write(step_dir / "summary.json")
        return summary, outcome

    def _breakdown(self, capture: TraceCapture, step_dir: Path) -> OperatorBreakdown | None:
        try:
            breakdown = capture.finish()
        except ProfileError as error:
            self.progress(f"profile: none ({error})")
            return None
        if breakdown.trace is not None:
            try:
                breakdown.trace = os.path.relpath(breakdown.trace, step_dir)
            except ValueError:  # another drive
                pass
        self.progress(breakdown.render())
        return breakdown


def _slo_watch(slos: list[Slo], plan: LoadPlan) -> SloWatch:
    """The watch that stops an open-loop step early once its verdict on `slos` is certain."""
    watch = SloWatch(slos, plan.due_in_window())

    def pending() -> int:  # due in the window so far and not recorded yet: in flight, or about to be sent
        return plan.due_in_window(until_s=time.perf_counter() - plan.start) - watch.seen

    watch.pending = pending
    return watch


def run_session(plan: LoadTestPlan, progress: Callable[[str], None] = print) -> int:
    """Run a load test end to end; returns its exit status (tokenrig/exit_status.py)."""
    spec, scenario, remote, slos, profile = plan.spec, plan.scenario, plan.remote, plan.slos, plan.profile
    client, workers, profiling, scrape, seed_source = (plan.client, plan.workers, plan.profiling, plan.scrape,
                                                       plan.seed_source)
    # a server tokenrig did not start is named by what its user declared and it reports, not by the flags' defaults
    endpoint: Endpoint | None = None  # the server at --url; else the one tokenrig starts, once it has started
    if remote:
        endpoint, facts, metrics_problem = _existing_endpoint(remote, spec, scenario, client, progress)
        where = f"the server at {endpoint.base_url}"
    else:
        facts, metrics_problem = spec.describe(), None
        where = f"{spec.backend} backend, {spec.model.key} on {spec.gpu.key}"
    run_dir = new_run_dir(plan.results_root, scenario.name, facts["backend"], facts["model"], facts["gpu"])
    metadata = RunMetadata.new(run_id=run_dir.name, created_unix=time.time(), scenario=scenario.model_dump(),
                               seed=scenario.load.seed, seed_source=seed_source, server=facts,
                               slos=[slo.name + f"<={slo.threshold_s:g}s" for slo in slos or []],
                               search=profile.metadata(), **environment_facts())
    progress(f"run {run_dir.name}: scenario {scenario.name}, {where}, seed {scenario.load.seed} ({seed_source})")

    with contextlib.ExitStack() as stack:
        stack.enter_context(stop_signals_interrupt())  # SIGTERM and an inherited-ignored SIGINT stop it too
        trace_dir = None
        if profiling:
            trace_dir = profiling.trace_dir or run_dir / "traces"
            if not remote:
                spec.extra_args = [*spec.extra_args, *server_profile_args(spec.backend, trace_dir, profiling.steps)]
        master = None
        try:  # metadata.json is written once: when the load is ready, or with what is known when it cannot start
            if endpoint is None:  # no --url: tokenrig starts the server
                server = stack.enter_context(LaunchedServer(spec, run_dir / "server.log", progress=progress,
                                                            fit=plan.fit))
                launch = server.plan
                assert server.endpoint is not None and launch is not None, "a LaunchedServer entered has started"
                endpoint = server.endpoint
                # the exact command, environment, memory plan and batch limits; what the engine's log says it served
                metadata.server = ServerFacts.model_validate({**metadata.server.document(), **launch.describe(),
                                                              "served": server.served})
            if scrape and metrics_problem:  # every scrape of every step would fail
                progress(f"{endpoint.metrics_url} {metrics_problem}: the server exports no metrics there, so it is "
                         "not scraped (no running/waiting/KV-cache figures)")
                scrape = False
            metadata.endpoint = {"base_url": endpoint.base_url,
                                 "metrics_url": endpoint.metrics_url if scrape else None}
            if workers:
                from tokenrig.loadgen.distributed import DEFAULT_MASTER_PORT, Master
                from tokenrig.serve.launcher import free_port

                port = workers.port or (free_port() if workers.local == workers.workers else DEFAULT_MASTER_PORT)
                master = Master(workers.workers, workers.local, workers.bind_host, port, progress, client)
                stack.callback(master.close)
                metadata.load_generator_workers = {"workers": workers.workers, "local": workers.local,
                                                   "master": f"{workers.bind_host}:{port}"}
        finally:
            metadata.write(run_dir / "metadata.json")
        tokenizer = Tokenizer.from_file(str(Path(endpoint.tokenizer_dir) / "tokenizer.json"))
        labels = {"run_id": run_dir.name, "scenario": scenario.name, "backend": metadata.server.backend,
                  "model": endpoint.model_name, "gpu": metadata.server.gpu}
        session = Session(run_dir, endpoint, tokenizer, scenario, labels, slos, plan.monitor, progress, master=master,
                          headers=auth_headers(remote.api_key if remote else None), client=client,
                          scrape_interval_s=plan.scrape_interval_s, request_timeout_s=plan.request_timeout_s,
                          max_error_rate=plan.max_error_rate, trace_dir=trace_dir,
                          trace_source=_trace_source(metadata.server.backend), scrape=scrape)
        title = f"{scenario.name} | {labels['backend']} | {labels['model']} | {labels['gpu']}"
        if isinstance(profile, Search):
            status = _run_search(session, profile, title)
        else:
            step = profile.next_step(scenario.load, slos, [])
            assert step is not None, "a run that is no search has one step"
            summary, outcome = session.run_step(step.load, run_dir)
            progress("")
            progress(render(summary, f"{title} | {summary.plan}"))
            if outcome.lost_worker:
                progress(f"STOPPED: {outcome.lost_worker}")
            status = (exit_status.INTERRUPTED if outcome.interrupted
                      else exit_status.FAILED if summary.requests.too_many_errors or outcome.lost_worker
                      else exit_status.INVALID if not summary.load_generator.valid or summary.no_measurement
                      else exit_status.OK)
    progress(f"\nresults: {run_dir}")
    return status


def _trace_source(backend: str) -> str:
    if backend == "vllm":
        return "vLLM torch profiler"
    return "tokenrig hf engine, torch.profiler" if backend == "hf" else "server torch profiler"


def _run_search(session: Session, profile: Search, title: str) -> int:
    """Sweep or SLO search; writes search.json and prints the curve. Returns the exit status: FAILED when
    a load-generator worker was lost, or every step failed (a search past its capacity sees errors, but a
    search none of whose steps served is no measurement); NO_RATE_FOUND when --find-max found no rate;
    INVALID when a sweep's row is no verdict on its load (its load generator shaped it, or it measured nothing)."""
    progress = session.progress
    steps: list[StepResult] = []
    interrupted, lost = False, None

    def measure(plan: SearchStepPlan) -> StepResult:
        step_dir = session.run_dir / "steps" / f"{len(steps) + 1:02d}-{profile.label(plan.value)}"
        if session.scrape:
            wait_server_idle(session.endpoint.metrics_url, progress=progress)
        summary, outcome = session.run_step(plan.load, step_dir, stop_early=plan.stop_early)
        step = StepResult(plan.value, summary, stopped_early=summary.stopped_early, probe=plan.probe)
        steps.append(step)
        write_json(session.run_dir / "search.json", {"mode": profile.mode, "steps": [s.row() for s in steps]})
        if outcome.interrupted:  # the search must not judge a step cut short
            raise KeyboardInterrupt
        if outcome.lost_worker:
            raise WorkerLostError(outcome.lost_worker)
        return step

    try:
        walk(profile, session.scenario.load, session.slos, measure, progress)
        document = profile.document(steps)
    except KeyboardInterrupt:
        interrupted = True
        progress("  interrupted: the curve below covers the steps finished so far")
        document = {"mode": profile.mode, "stop_reason": "interrupted", "max_rate_meeting_slos": None}
    except WorkerLostError as error:
        lost = str(error)
        progress(f"  STOPPED: {lost}")
        document = {"mode": profile.mode, "stop_reason": f"stopped: {lost}", "max_rate_meeting_slos": None}
    document["steps"] = [s.row() for s in steps]
    write_json(session.run_dir / "search.json", document)
    progress("")
    progress(render_steps(document, title, session.slos))
    failed = [s.summary.requests for s in steps if s.summary.requests.too_many_errors]
    if steps and len(failed) == len(steps):
        progress(failed_line(failed[-1]))
    if interrupted:
        return exit_status.INTERRUPTED
    if lost is not None or (steps and len(failed) == len(steps)):
        return exit_status.FAILED
    if profile.mode == "find-max" and document.get("max_rate_meeting_slos") is None:
        return exit_status.NO_RATE_FOUND
    if any(not s.judged or s.summary.no_measurement for s in steps):
        return exit_status.INVALID
    return exit_status.OK

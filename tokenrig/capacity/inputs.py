"""Measured load tests as capacity inputs: every step of every run directory, and the --find-max searches.

Reads what `tokenrig loadtest` writes (metadata.json, summary.json, search.json, steps/NN-*/), so
results copied from another machine (docs/results) serve as they are. Each step becomes a
`MeasuredStep`: the serving configuration (engine, weights, model, GPU, TP, the engine's batch
limits as metadata.json's `server.batch_limits` records them: RunMetadata reads them from older files'
server commands), the scenario and the exact load plan it ran, and its summary. A `--url` run is what
its user declared (--backend, --gpu, --model, --quant, --tp) and its server told (metadata's
`reported`); a run whose GPU or model no profile names (a `--url` run that declared no --gpu records
`gpu: remote`) cannot be placed: it is skipped, with one note naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenrig.loadgen.load_profiles import profile_from_metadata
from tokenrig.loadgen.scenario import LoadPlanSpec, Scenario
from tokenrig.metrics.records import RequestRecord, read_records
from tokenrig.metrics.run_summary import RunSummary, SloJudgement
from tokenrig.metrics.slo import Slo, judge, recorded_slos
from tokenrig.metrics.verdict import StepResult
from tokenrig.profiles import UnknownProfileError, resolve_gpu, resolve_model
from tokenrig.report.compare import engine_label
from tokenrig.report.run_metadata import RunMetadata, ServerFacts


@dataclass
class MeasuredStep:
    """One measured load step: the configuration served, the load it ran, what it measured."""

    path: Path
    server: ServerFacts
    scenario: Scenario
    load: LoadPlanSpec
    summary: RunSummary

    @property
    def engine(self) -> str:
        return engine_label(self.server.document())

    @property
    def quant(self) -> str:
        return self.server.quant or "bf16"

    @property
    def model(self) -> str:
        return self.server.model

    @property
    def gpu(self) -> str:
        return self.server.gpu

    @property
    def tp(self) -> int:
        return (self.server.fit or {}).get("tp") or self.server.tp or 1

    @property
    def max_num_seqs(self) -> int | None:
        """Requests an engine step may hold, as the run recorded them (None: the engine's default)."""
        return self.server.batch_limits.max_num_seqs if self.server.batch_limits else None

    @property
    def max_batch_tokens(self) -> int | None:
        return self.server.batch_limits.max_batch_tokens if self.server.batch_limits else None

    def records(self) -> list[RequestRecord] | None:
        path = self.path / "requests.jsonl"
        return read_records(path) if path.exists() else None

    def unusable(self) -> str | None:
        """Why this step cannot calibrate a model of the engine, or None."""
        summary = self.summary
        if summary.interrupted:
            return "interrupted"
        if summary.stopped_early:
            return "stopped early (SLO already missed)"
        if not summary.load_generator.valid:
            return "load generator invalid"
        if summary.window.problem or not summary.requests.ok:
            return "no measured request"
        if summary.requests.failed:
            return f"{summary.requests.failed} failed requests"
        if not summary.latency_s.get("ttft") or not summary.latency_s.get("tpot"):
            return "no TTFT/TPOT"
        return None


@dataclass
class SearchRun:
    """A --find-max run: its SLOs, search.json and the step it reached, step by step."""

    path: Path
    slos: list[Slo]
    document: dict
    steps: list[MeasuredStep] = field(default_factory=list)

    @property
    def server(self) -> ServerFacts:
        return self.steps[0].server

    def best_for(self, slos: list[Slo]) -> tuple[MeasuredStep, SloJudgement] | str:
        """The highest-rate step meeting `slos` and its verdict (goodput, SLOs), or why none can be named.

        With the SLOs the run searched for, each step's recorded verdict counts; with others, each step
        is judged again from its requests.jsonl (a copy without it cannot answer other SLOs). Either way
        a step meets them by today's rules (a step that fell behind does not), whatever search.json says, and a
        probe (the search's short first look) is no answer."""
        same = set(slos) == set(self.slos)
        best = None
        for step, row in zip(self.steps, self.document["steps"]):
            if same:
                verdict = step.summary.slo
            else:
                records = step.records()
                if records is None:
                    return (f"searched for {', '.join(s.name for s in self.slos)}; judging other SLOs needs "
                            f"requests.jsonl, not kept in {step.path}")
                verdict = judge(records, slos, step.summary.window.seconds)
            result = StepResult(row["load"], step.summary.model_copy(update={"slo": verdict}),
                                stopped_early=row["stopped_early"], probe=row.get("probe", False))
            # a step that met the SLOs was judged against them: its verdict is there
            if (result.slo_met and verdict is not None and result.valid and not result.probe
                    and (best is None or result.load > best[0])):
                best = (result.load, step, verdict)
        if best is None:
            return "no step met the SLOs"
        return best[1], best[2]


def _step_dirs(run_dir: Path) -> list[Path]:
    return sorted(path for path in (run_dir / "steps").iterdir() if (path / "summary.json").exists())


def read_run(run_dir: Path) -> tuple[list[MeasuredStep], SearchRun | None]:
    """The measured steps of one load-test run directory, and its search if it was a --find-max run."""
    metadata = RunMetadata.read(run_dir / "metadata.json")
    scenario = Scenario.model_validate(metadata.scenario)
    server = metadata.server
    search_file = run_dir / "search.json"
    if not search_file.exists():
        if not (run_dir / "summary.json").exists():
            return [], None
        summary = RunSummary.read(run_dir / "summary.json")
        return [MeasuredStep(run_dir, server, scenario, scenario.load, summary)], None
    document = json.loads(search_file.read_text())
    assert metadata.search is not None, "a run that wrote search.json recorded its search in metadata.json"
    profile = profile_from_metadata(metadata.search)
    slos = recorded_slos(metadata.document())
    steps = []
    for step_dir, row in zip(_step_dirs(run_dir), document["steps"]):
        summary = RunSummary.read(step_dir / "summary.json")
        recorded = summary.load.spec if summary.load else None
        # summaries written before the step's plan was recorded: every step then ran with the scenario's seed
        load = (LoadPlanSpec.model_validate(recorded) if recorded
                else profile.step_load(scenario.load, row["load"], slos, step=0))
        steps.append(MeasuredStep(step_dir, server, scenario, load, summary))
    search = SearchRun(run_dir, slos, document, steps) if document["mode"] == "find-max" and steps else None
    return steps, search


def unplaceable(server: dict) -> str | None:
    """Why capacity cannot place a run serving this (its GPU or model is no profile), or None."""
    try:
        resolve_gpu(server.get("gpu") or "?")
        resolve_model(server.get("model") or "?")
    except UnknownProfileError as error:
        problem = str(error).split(";")[0]
        if server.get("backend") == "url" and server.get("gpu") == "remote":
            return f"{problem}: a --url run that declared no --gpu"
        return problem
    return None


def read_results(directories: list[Path], notes: list[str] | None = None) -> tuple[list[MeasuredStep], list[SearchRun]]:
    """Every load-test run directory under `directories` (metadata.json with a scenario and a server) that
    capacity can place; one line per run skipped goes to `notes`."""
    steps, searches = [], []
    for directory in directories:
        for metadata in sorted(Path(directory).rglob("metadata.json")):
            document = json.loads(metadata.read_text())
            if "scenario" not in document or "server" not in document:
                continue  # a training run or a matrix
            problem = unplaceable(document["server"])
            if problem:
                if notes is not None:
                    notes.append(f"skipped {metadata.parent}: {problem}")
                continue
            run_steps, search = read_run(metadata.parent)
            steps += run_steps
            if search:
                searches.append(search)
    return steps, searches

"""`tokenrig capacity`: how many GPUs of each type serve a target load within the SLOs, and what it costs.

For every GPU type x weight format x engine asked about, one row:

- measured: a --find-max run of exactly that configuration, model and scenario answers the SLOs
  (its best step's goodput); of several such runs, the one whose answer rests on the most requests;
- projected: otherwise the scenario's SLO search is replayed on that GPU type in virtual time
  (simulate.py), each engine step timed by the per-operator model fitted to the nearest operator
  profile of that engine (operators.py: same weights and GPU type first, else scaled by datasheet),
  or, where the engine was never profiled, by the roofline calibrated on its measured steps on the
  same class of device, GPU or CPU (calibrate.py); the row carries the held-out error band and what
  the projection rests on;
- neither (it does not fit, nothing measured that engine with those weights, no rate meets the
  SLOs): a note instead of a row.

cost.py turns each goodput into replicas, GPUs, dollars and energy; rows come cheapest first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tokenrig.capacity.calibrate import Calibration, Calibrator
from tokenrig.capacity.cost import ReplicaCapacity, size
from tokenrig.capacity.inputs import MeasuredStep, SearchRun
from tokenrig.capacity.operators import ChosenProfile, OperatorProfiles
from tokenrig.capacity.simulate import RequestBook, VirtualSearch
from tokenrig.loadgen.load_profiles import FindMax
from tokenrig.loadgen.scenario import Scenario
from tokenrig.metrics.run_summary import RunSummary
from tokenrig.metrics.slo import Slo
from tokenrig.profiles import GpuProfile, ModelProfile
from tokenrig.serve.fit import FitError, plan_fit

# the replica a projection sizes: the smallest TP holding the weights plus KV for this many of the
# scenario's largest requests at once (a replica that batches them, not the engines' one-sequence minimum)
PLANNING_CONCURRENCY = 16
LARGEST_REQUEST_SAMPLE = 256  # arrivals looked at to find the scenario's largest request


@dataclass
class CapacityQuestion:
    gpus: list[GpuProfile]
    model: ModelProfile
    quants: list[str]
    scenario: Scenario
    slos: list[Slo]
    target_rps: float | None = None
    headroom: float = 0.2
    prices: dict[str, float] = field(default_factory=dict)  # GPU key -> $/hour replacing the profile's
    engines: list[str] | None = None  # only these engine labels (or, where none is equal, those containing it)
    search: FindMax = field(default_factory=FindMax)

    def price(self, gpu: GpuProfile) -> float:
        return self.prices.get(gpu.key, gpu.price_usd_per_hour)

    def document(self) -> dict:
        return {"gpus": [g.key for g in self.gpus], "model": self.model.key, "quants": self.quants,
                "scenario": self.scenario.name, "slos": {s.name: s.threshold_s for s in self.slos},
                "target_rps": self.target_rps, "headroom": self.headroom, "engines": self.engines,
                "prices": {g.key: {"usd_per_hour": self.price(g), "overridden": g.key in self.prices,
                                   "source": g.sources.get("price"), "date": g.price_date} for g in self.gpus},
                "tdp_w": {g.key: g.tdp_w for g in self.gpus}}


@dataclass
class CapacityRow:
    gpu: str
    quant: str
    engine: str
    tp: int
    source: str  # measured | projected
    basis: str  # the run directory, or what the calibration rests on
    band: float | None  # projected: worst held-out relative error of the calibration
    goodput_rps: float
    goodput_output_tokens_per_s: float
    output_tokens_per_request: float
    input_tokens_per_request: float
    sizing: dict

    def document(self) -> dict:
        return dict(vars(self))


@dataclass
class CapacityAnswer:
    question: CapacityQuestion
    rows: list[CapacityRow]
    notes: list[str]
    calibrations: list[Calibration]

    def document(self) -> dict:
        return {"question": self.question.document(), "rows": [row.document() for row in self.rows],
                "notes": self.notes, "calibrations": [c.document() for c in self.calibrations]}


def device_class(gpu: str) -> str:
    """What a step's time scales with: a CPU's steps say nothing of a GPU's, and the other way round."""
    return "cpu" if gpu == "cpu" else "gpu"


def _per_request(summary: RunSummary) -> tuple[float, float]:
    ok = summary.requests.ok
    return summary.tokens.output_total / ok, summary.tokens.input_total / ok


class CapacityPlanner:
    def __init__(self, question: CapacityQuestion, steps: list[MeasuredStep], searches: list[SearchRun],
                 progress: Callable[[str], None] = print, notes: list[str] | None = None,
                 profiles: OperatorProfiles | None = None, calibrator: Calibrator | None = None):
        self.question = question
        self.notes = list(notes or [])  # about the inputs (runs skipped), ahead of the answer's own
        self.steps = steps
        self.profiles = profiles if profiles is not None else OperatorProfiles(steps, progress)
        self.searches = searches
        self.progress = progress
        self.calibrator = calibrator or Calibrator(progress)  # shared, its request books serve every planner

    def engines(self) -> list[str]:
        names = sorted({step.engine for step in self.steps})
        if not self.question.engines:
            return names
        chosen = set()
        for wanted in self.question.engines:
            chosen |= {wanted} if wanted in names else {name for name in names if wanted in name}
        return sorted(chosen)

    def answer(self) -> CapacityAnswer:
        q = self.question
        rows, notes, calibrations = [], list(self.notes), {}
        for engine in self.engines():
            for quant in q.quants:
                for gpu in q.gpus:
                    label = f"{gpu.key} {quant} {engine}"
                    row = self._measured(engine, quant, gpu, notes)
                    if row is None:
                        profile = self.profiles.nearest(engine, quant, gpu, q.model.key)
                        key = (engine, quant, device_class(gpu.key), profile.key if profile else None)
                        if key not in calibrations:
                            calibrations[key] = self._calibration(engine, quant, device_class(gpu.key), notes,
                                                                  profile)
                        calibration = calibrations[key]
                        if calibration is None:
                            continue
                        self.progress(f"projecting {label} (virtual-time SLO search)")
                        row = self._projected(calibration, gpu, profile, notes)
                    if row is not None:
                        rows.append(row)
        rows.sort(key=lambda r: (r.sizing["usd_per_hour"], r.sizing["usd_per_million_output_tokens"]))
        return CapacityAnswer(q, rows, notes, [c for c in calibrations.values() if c is not None])

    def _row(self, engine: str, quant: str, gpu: GpuProfile, tp: int, source: str, basis: str, band: float | None,
             goodput_rps: float, summary: RunSummary) -> CapacityRow:
        out_per_request, in_per_request = _per_request(summary)
        capacity = ReplicaCapacity(goodput_rps, out_per_request, in_per_request, tp)
        sizing = size(capacity, self.question.price(gpu), gpu.tdp_w, self.question.target_rps, self.question.headroom)
        return CapacityRow(gpu.key, quant, engine, tp, source, basis, band, goodput_rps,
                           goodput_rps * out_per_request, out_per_request, in_per_request, sizing.as_dict())

    def _measured(self, engine: str, quant: str, gpu: GpuProfile, notes: list[str]) -> CapacityRow | None:
        """The row a --find-max run of this configuration answers: of several, the one whose best step measured
        the most requests (a search of longer steps judges its percentiles on more samples); the latest on a tie."""
        q = self.question
        label = f"{gpu.key} {quant} {engine}"
        matching = [s for s in self.searches if s.steps[0].engine == engine and s.steps[0].quant == quant
                    and s.steps[0].gpu == gpu.key and s.steps[0].model == q.model.key
                    and s.steps[0].scenario.name == q.scenario.name]
        answers = []
        for search in sorted(matching, key=lambda s: s.path.name, reverse=True):
            best = search.best_for(q.slos)
            if isinstance(best, str):
                notes.append(f"{label}: measured run {search.path} not used: {best}")
            elif best[1].goodput_rps:
                answers.append((search, *best))
        if not answers:
            return None
        search, step, verdict = max(answers, key=lambda answer: answer[1].summary.requests.measured)
        for other, other_step, other_verdict in answers:
            if other is not search:
                notes.append(f"{label}: measured run {other.path} also answers, {other_verdict.goodput_rps:.2f} req/s "
                             f"from {other_step.summary.requests.measured} requests a step; {search.path} answers, "
                             f"from {step.summary.requests.measured}")
        return self._row(engine, quant, gpu, step.tp, "measured", str(search.path), None,
                         verdict.goodput_rps, step.summary)

    def _calibration(self, engine: str, quant: str, device: str, notes: list[str],
                     profile: ChosenProfile | None = None) -> Calibration | None:
        # a profiled step's latencies carry the profiler's cost; an operator profile is checked on every weight
        # format's steps (what each scales the profile by is the band's business), a roofline fitted to its own
        usable = [s for s in self.steps if s.engine == engine and (profile is not None or s.quant == quant)
                  and s.unusable() is None and s.summary.breakdown is None]
        same_device = [s for s in usable if device_class(s.gpu) == device]
        if not same_device:
            other = "GPU" if device == "cpu" else "CPU"
            elsewhere = f" (its {len(usable)} usable step{'s' * (len(usable) > 1)} ran on a {other})" if usable else ""
            notes.append(f"{engine} with {quant} weights: no measured step on a {device.upper()} to calibrate a "
                         f"projection on{elsewhere}{self._what_to_measure(engine, quant, device)}")
            return None
        if profile is not None:
            return self.calibrator.calibrate_on_operators(engine, quant, same_device, profile)
        return self.calibrator.calibrate(engine, quant, same_device)

    def _what_to_measure(self, engine: str, quant: str, device: str) -> str:
        """For a configuration nothing can calibrate: what was measured near it, and what would do."""
        near: dict[str, int] = {}
        for step in self.steps:
            if step.unusable() is None and device_class(step.gpu) == device and (step.engine, step.quant) != (
                    engine, quant) and (step.engine == engine or step.engine.split(",")[0] == engine.split(",")[0]
                                        and step.quant == quant):
                label = f"{step.engine} with {step.quant}"
                near[label] = near.get(label, 0) + 1
        measured = "; ".join(f"{label}: {count} steps" for label, count in sorted(near.items()))
        return ((f". Measured near it, not used (a roofline is fitted to one engine configuration and weight format, "
                 f"whose kernels set its step time): {measured}" if measured else "")
                + f". To project it, measure {engine} with {quant} weights on any {device.upper()}: load steps at a "
                  f"few loads (e.g. a closed-loop sweep of 1, 8 and 32 users), or an operator profile "
                  f"(`loadtest --profile-steps`)")

    def book(self) -> RequestBook:
        return self.calibrator.book_for(self.question.scenario, self.question.model)

    def largest_request(self) -> int:
        book = self.book()
        seed = self.question.scenario.load.seed
        return max(len(turn.prompt_ids) + turn.prepared.max_tokens for index in range(LARGEST_REQUEST_SAMPLE)
                   for turn in book.conversation(seed, index, None).turns)

    def _projected(self, calibration: Calibration, gpu: GpuProfile, profile: ChosenProfile | None,
                   notes: list[str]) -> CapacityRow | None:
        """The row a virtual-time SLO search on `calibration` answers for `gpu`; `profile` is the operator profile
        nearest `gpu`, which the calibration rests on when there is one (the calibration is made per profile)."""
        q = self.question
        label = f"{gpu.key} {calibration.quant} {calibration.engine}"
        try:
            tp = plan_fit(q.model, gpu, calibration.quant, concurrency=PLANNING_CONCURRENCY,
                          context_tokens=min(self.largest_request(), q.model.max_context),
                          kv_sequences=PLANNING_CONCURRENCY).tp
        except FitError:
            notes.append(f"{label}: {q.model.key} does not fit with {PLANNING_CONCURRENCY} of the scenario's "
                         f"largest requests on up to 8 GPUs")
            return None
        setup = calibration.model.setup(q.model, gpu, calibration.quant, tp)
        search = VirtualSearch(setup, self.book(), q.scenario.load, q.slos, q.search, self.progress)
        best = search.best_step()
        if best is None:
            notes.append(f"{label}: projected, no rate meets the SLOs ({search.result.stop_reason})")
            return None
        transfers = gpu.key in calibration.gpus
        if profile is not None:
            band = calibration.band_for(profile.kinds)
            basis = (profile.describe(with_scaling=False)
                     + (f"; {'; '.join(profile.scaled)}" if profile.scaled else "")
                     + f"; checked on {len(calibration.steps)} load steps on {', '.join(calibration.gpus)}"
                     + (f"; {band.describe()}" if band else ""))
        else:
            band = calibration.band_for()
            basis = (f"calibrated on {len(calibration.steps)} steps on {', '.join(calibration.gpus)}"
                     + ("" if transfers else f"; {gpu.key} not among them"))
        judged = best.summary.slo
        assert judged is not None, "the best step met every SLO, so it was judged against them"
        return self._row(calibration.engine, calibration.quant, gpu, tp, "projected", basis,
                         band.value if band else None, judged.goodput_rps, best.summary)

"""Calibrating the roofline to an engine: fit its parameters to measured steps, check on held-out ones.

For one engine configuration and weight format (e.g. 'hf, sdpa, CUDA graphs' with bf16), five
parameters are fitted so that virtual-time replays of the measured steps' exact loads reproduce
what they measured (TTFT p50, TPOT p50, output tokens/s): the roofline's compute and bandwidth
efficiencies, its host overhead per step and per sequence in a step, and the time a request takes
to reach the engine (HTTP, parsing, tokenization; it is in every measured TTFT). The fit minimises
squared log ratios plus a weak pull towards typical values (so that a parameter the data cannot
see stays typical): first a coarse grid over the two host overheads, which differ by orders of
magnitude between engines (vLLM's per-sequence cost is microseconds, transformers' a millisecond),
then Nelder-Mead from the best grid point (replays are discrete-event simulations, so
finite-difference gradients mislead). At most MAX_FIT_STEPS steps, spread over the list, are fitted.

The error band is the worst relative error of predictions for steps the model was not fitted on:
the steps beyond MAX_FIT_STEPS, and k-fold cross-validation over the fitted ones (k = their number,
at most 4: each fold predicted by a model fitted on the other folds). It measures how the model
transfers between the measured points (their GPUs and loads); a projection to a GPU type no point
ran on carries an error the band cannot see, and rows say so. Calibrate on two GPU types to
separate bandwidth from per-step overhead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from tokenrig.capacity.inputs import MeasuredStep
from tokenrig.capacity.operators import ChosenProfile, OperatorModel, ProfileKey, scalings
from tokenrig.capacity.simulate import EngineSetup, RequestBook, replay
from tokenrig.loadgen.scenario import Scenario
from tokenrig.metrics.run_summary import RunSummary
from tokenrig.profiles import GpuProfile, ModelProfile, resolve_gpu, resolve_model
from tokenrig.serve.engines.sim import RooflineParams

FIGURES = ("ttft_p50_s", "tpot_p50_s", "output_tokens_per_s")
STEP_TIME_FIGURES = ("tpot_p50_s", "output_tokens_per_s")
DEFAULTS = RooflineParams()
# a fit's parameters, in the order of its vector of logarithms (EngineModel.vector): compute_efficiency,
# bandwidth_efficiency, step_overhead_s, sequence_overhead_s, api_latency_s; where each fit starts and what it is
# pulled towards (RooflineParams' defaults; 10 us per sequence and 1 ms to reach the engine, as zero has no
# logarithm), and the bounds of each parameter
TYPICAL = (DEFAULTS.compute_efficiency, DEFAULTS.bandwidth_efficiency, DEFAULTS.step_overhead_s, 1e-5, 1e-3)
BOUNDS = ((0.005, 1.0), (0.005, 1.0), (1e-5, 1.0), (1e-8, 0.05), (1e-5, 1.0))
PRIOR_WEIGHT = 0.02  # residual per factor e between a parameter and its typical value
MAX_FOLDS = 4
MAX_FIT_STEPS = 8
# an operator projection's check replays each held-out step again with every step time this much longer, to see how
# much each figure moves with step time; a figure that moves less than MIN_ELASTICITY per unit (an open loop's
# tokens/s below saturation: its arrivals set it) says nothing about the step time
ELASTICITY_STEP = 0.1
# the load steps an operator calibration is checked on: enough that each group of what they scale has two or three
# (a group's bound from a single step is thin)
MAX_CHECK_STEPS = 12
LATENCY_STEPS = 4  # the least busy steps the time to reach the engine is taken from
MIN_ELASTICITY = 0.25
SCALING_NAMES = {"gpu": "GPU type by datasheet", "quant": "weight format by bytes", "model": "model by shapes"}
# the coarse start: host overhead per step and per sequence (seconds)
STEP_OVERHEAD_GRID = (5e-4, 5e-3, 5e-2)
SEQUENCE_OVERHEAD_GRID = (1e-6, 3e-5, 1e-3)


def figures(summary: RunSummary) -> dict[str, float]:
    """What a calibration fits, of a step with TTFT and TPOT samples (MeasuredStep.unusable screens the others)."""
    ttft, tpot = summary.latency_s.get("ttft"), summary.latency_s.get("tpot")
    if ttft is None or tpot is None:
        raise ValueError("a step without TTFT or TPOT samples has no figures to fit")
    return {"ttft_p50_s": ttft.p50, "tpot_p50_s": tpot.p50,
            "output_tokens_per_s": summary.throughput.output_tokens_per_s}


@dataclass(frozen=True)
class EngineModel:
    """What a calibration fits: the roofline parameters (batch limits included) and the API latency."""

    params: RooflineParams
    api_latency_s: float
    operators: OperatorModel | None = None  # step times by operator; the roofline's efficiencies then unused

    @classmethod
    def from_vector(cls, x: np.ndarray, limits: RooflineParams) -> EngineModel:
        compute, bandwidth, per_step, per_sequence, latency = map(float, np.exp(x))  # the vector's order
        return cls(replace(limits, compute_efficiency=compute, bandwidth_efficiency=bandwidth,
                           step_overhead_s=per_step, sequence_overhead_s=per_sequence), latency)

    def vector(self) -> np.ndarray:
        p = self.params
        return np.log([p.compute_efficiency, p.bandwidth_efficiency, p.step_overhead_s,
                       max(p.sequence_overhead_s, BOUNDS[3][0]), max(self.api_latency_s, BOUNDS[4][0])])

    def setup(self, model: ModelProfile, gpu: GpuProfile, quant: str, tp: int,
              limits: RooflineParams | None = None) -> EngineSetup:
        params = self.params if limits is None else replace(
            self.params, max_num_seqs=limits.max_num_seqs, max_batch_tokens=limits.max_batch_tokens)
        return EngineSetup(model, gpu, quant, tp, params, self.api_latency_s, self.operators)


def in_flight(step: MeasuredStep) -> float:
    """Requests the step held in flight on average (Little's law: completions/s x median end-to-end latency)."""
    e2e = step.summary.latency_s.get("e2e")
    return step.summary.throughput.requests_per_s * e2e.p50 if e2e else 0.0


def check_steps(steps: list[MeasuredStep], key: ProfileKey) -> list[MeasuredStep]:
    """The load steps an operator calibration is checked on: grouped by what predicting them scales the profile
    `key` by (operators.scalings), up to MAX_CHECK_STEPS taken round robin from the least scaled group, each group's
    with the most requests in flight first (goodput is decided where the engine is busiest)."""
    groups: dict[frozenset[str], list[MeasuredStep]] = {}
    for step in steps:
        groups.setdefault(scalings(key, step.gpu, step.quant, step.model, step.tp), []).append(step)
    order = sorted(groups, key=lambda scale: (len(scale), sorted(scale)))
    counts = dict.fromkeys(order, 0)
    while sum(counts.values()) < min(len(steps), MAX_CHECK_STEPS):
        for scale in order:
            if counts[scale] < len(groups[scale]) and sum(counts.values()) < MAX_CHECK_STEPS:
                counts[scale] += 1
    return [step for scale in order for step in sorted(groups[scale], key=in_flight, reverse=True)[:counts[scale]]]


def batch_limits(step: MeasuredStep) -> RooflineParams:
    """RooflineParams' defaults with the engine's own batch limits where the run recorded them."""
    updates = {}
    if step.max_num_seqs:
        updates["max_num_seqs"] = step.max_num_seqs
    if step.max_batch_tokens:
        updates["max_batch_tokens"] = step.max_batch_tokens
    return replace(DEFAULTS, **updates)


@dataclass
class HeldOut:
    step: MeasuredStep
    measured: dict[str, float]
    predicted: dict[str, float]
    judged: tuple[str, ...] = FIGURES  # the figures the band takes
    scalings: frozenset[str] = frozenset()  # what predicting it scaled the operator profile by (operators.scalings)
    elasticity: dict[str, float] | None = None  # d ln(figure) / d ln(step time), from a replay at 1 + ELASTICITY_STEP

    @property
    def error(self) -> float:
        """The worst relative error of the judged figures; with their elasticities, the worst relative error of the
        step time they imply (a figure's log error over its elasticity): what the projected rate scales with."""
        if any(not math.isfinite(self.predicted[k]) for k in self.judged):
            return math.inf
        if self.elasticity is not None:
            implied = [math.log(self.measured[k] / self.predicted[k]) / self.elasticity[k] for k in self.judged
                       if abs(self.elasticity[k]) >= MIN_ELASTICITY]
            if implied:
                return max(abs(math.exp(x) - 1) for x in implied)
        return max(abs(self.predicted[k] / self.measured[k] - 1) for k in self.judged)


@dataclass(frozen=True)
class Band:
    """A projection's error band and what it is made of (docs/capacity.md, "The band")."""

    value: float
    steps_error: float  # the worst error of the held-out load steps taken
    steps: int
    steps_scalings: tuple[frozenset[str], ...]  # what predicting those steps scaled (each group)
    terms: dict[str, float] = field(default_factory=dict)  # scaling -> its own check's error, added in quadrature
    floor: float | None = None  # the operator profile's own summed-time error: the band is never narrower
    unchecked: frozenset[str] = frozenset()  # scalings the projection makes that no check saw

    def describe(self) -> str:
        made = " and ".join(" + ".join(SCALING_NAMES[k].split(" by ")[0] for k in sorted(scale)) or "none"
                            for scale in self.steps_scalings)
        parts = [f"{self.steps} load steps ±{self.steps_error:.0%} (scaled: {made})"]
        parts += [f"{SCALING_NAMES[kind]} ±{error:.0%}" for kind, error in sorted(self.terms.items())]
        if self.floor is not None:
            parts.append(f"profile's own fit ±{self.floor:.0%} (floor)")
        text = f"band ±{self.value:.0%}: " + ", ".join(parts)
        if self.unchecked:
            text += "; not checked: " + ", ".join(SCALING_NAMES[k] for k in sorted(self.unchecked))
        return text

    def document(self) -> dict:
        return {"value": self.value, "steps_error": self.steps_error, "steps": self.steps,
                "steps_scalings": [sorted(scale) for scale in self.steps_scalings], "terms": self.terms,
                "floor": self.floor, "unchecked": sorted(self.unchecked)}


def combined_band(steps_error: float, terms: dict[str, float], floor: float | None) -> float:
    """Independent relative errors add in quadrature; the profile's own error is a floor."""
    return max(math.sqrt(steps_error ** 2 + sum(error ** 2 for error in terms.values())), floor or 0.0)


@dataclass
class Calibration:
    engine: str
    quant: str
    model: EngineModel
    steps: list[MeasuredStep]
    held_out: list[HeldOut] = field(default_factory=list)
    profile: ChosenProfile | None = None  # the operator profile the step times come from, if any

    @property
    def band(self) -> float | None:
        """The band of a projection that scales what the calibration's own profile scales (band_for)."""
        band = self.band_for(self.profile.kinds if self.profile else frozenset())
        return band.value if band else None

    def band_for(self, kinds: frozenset[str] = frozenset()) -> Band | None:
        """The error band of a projection that scales the profile by `kinds` (operators.scalings); None without a
        held-out check, infinite if a held-out replay measured nothing.

        Roofline: the worst held-out error. Operator profile: the held-out load steps whose prediction scaled the
        profile the way the projection does, in this order: exactly as it does; scaling less, each scaling they
        miss added in quadrature from its own check (weight format: OperatorProfiles.format_error); scaling more
        (each such group bounds the error, its own including scalings the projection does not make: the tightest
        bound); scaling less with a scaling nothing checked (named in `unchecked`). Never narrower than the
        profile's own summed-time error."""
        if not self.held_out:
            return None
        if self.profile is None:
            worst = max(h.error for h in self.held_out)
            return Band(worst, worst, len(self.held_out), ())
        checks = {"quant": self.profile.format_check[0]} if self.profile.format_check else {}
        groups: dict[frozenset[str], list[HeldOut]] = {}
        for held in self.held_out:
            groups.setdefault(held.scalings, []).append(held)

        def rank(scale: frozenset[str]) -> tuple[int, int, int]:
            missing, extra = kinds - scale, scale - kinds
            order = 0 if not extra and missing <= checks.keys() else 1 if not missing else 2 if not extra else 3
            return order, len(missing), len(extra)

        best = min(rank(scale)[0] for scale in groups)
        chosen: tuple[frozenset[str], ...]
        if best == 1:  # every group that scaled more bounds the error: the tightest bound answers
            chosen = (min((scale for scale in groups if rank(scale)[0] == 1),
                          key=lambda scale: (max(held.error for held in groups[scale]), sorted(scale))),)
        else:
            fewest = min(rank(scale) for scale in groups if rank(scale)[0] == best)
            chosen = tuple(sorted((scale for scale in groups if rank(scale) == fewest), key=sorted))
        taken = [held for scale in chosen for held in groups[scale]]
        missing = frozenset().union(*(kinds - scale for scale in chosen))
        terms = {kind: checks[kind] for kind in missing if kind in checks}
        steps_error = max(held.error for held in taken)
        floor = self.profile.model.fit_error
        return Band(combined_band(steps_error, terms, floor), steps_error, len(taken), chosen, terms, floor,
                    missing - checks.keys())

    @property
    def gpus(self) -> list[str]:
        return sorted({step.gpu for step in self.steps})

    def describe(self) -> str:
        p = self.model.params
        band = (f"held-out error ±{self.band:.0%}" if self.band is not None and math.isfinite(self.band)
                else "a held-out replay measured nothing" if self.band is not None else "one step: no held-out check")
        if self.profile:
            return (f"{self.engine} {self.quant}: step times by operator, {self.profile.describe()}; "
                    f"{self.model.api_latency_s * 1e3:.1f} ms to reach the engine; checked on {len(self.steps)} "
                    f"load steps on {', '.join(self.gpus)}; {band}")
        return (f"{self.engine} {self.quant}: compute efficiency {p.compute_efficiency:.3f}, bandwidth efficiency "
                f"{p.bandwidth_efficiency:.3f}, overhead {p.step_overhead_s * 1e3:.2f} ms per step + "
                f"{p.sequence_overhead_s * 1e6:.0f} us per sequence, {self.model.api_latency_s * 1e3:.1f} ms to reach "
                f"the engine; from {len(self.steps)} steps on {', '.join(self.gpus)}; {band}")

    def document(self) -> dict:
        p = self.model.params
        profile = None
        if self.profile:
            profile = {"gpu": self.profile.key.gpu, "model": self.profile.key.model, "quant": self.profile.key.quant,
                       "scaled": self.profile.scaled, "steps": self.profile.model.steps_fitted,
                       "fit_error": self.profile.model.fit_error, "sources": self.profile.model.sources}
        return {"engine": self.engine, "quant": self.quant, "operator_profile": profile,
                "compute_efficiency": p.compute_efficiency,
                "bandwidth_efficiency": p.bandwidth_efficiency, "step_overhead_s": p.step_overhead_s,
                "sequence_overhead_s": p.sequence_overhead_s, "api_latency_s": self.model.api_latency_s,
                "max_num_seqs": p.max_num_seqs, "max_batch_tokens": p.max_batch_tokens, "band": self.band,
                "gpus": self.gpus, "steps": [str(step.path) for step in self.steps],
                "band_derivation": band.document() if (band := self.band_for(
                    self.profile.kinds if self.profile else frozenset())) else None,
                "held_out": [{"step": str(h.step.path), "measured": h.measured, "predicted": h.predicted,
                              "scalings": sorted(h.scalings), "elasticity": h.elasticity, "error": h.error}
                             for h in self.held_out]}


class Calibrator:
    """Fits and checks calibrations; request books are built once per scenario and model."""

    def __init__(self, progress: Callable[[str], None] = print):
        self.progress = progress
        self._books: dict[tuple[str, str], RequestBook] = {}

    def book(self, step: MeasuredStep) -> RequestBook:
        return self.book_for(step.scenario, resolve_model(step.model))

    def book_for(self, scenario: Scenario, model: ModelProfile) -> RequestBook:
        """The scenario's requests for `model`, built once for every replay of it (calibrations, searches)."""
        key = (scenario.model_dump_json(), model.key)
        if key not in self._books:
            self._books[key] = RequestBook(scenario, model)
        return self._books[key]

    def predict(self, step: MeasuredStep, model: EngineModel) -> dict[str, float]:
        setup = model.setup(resolve_model(step.model), resolve_gpu(step.gpu), step.quant, step.tp, batch_limits(step))
        summary = replay(setup, self.book(step), step.load).summary
        if not summary.latency_s.get("ttft") or not summary.latency_s.get("tpot"):
            return {k: math.inf for k in FIGURES}
        return figures(summary)

    def fit(self, steps: list[MeasuredStep], start: EngineModel | None = None) -> EngineModel:
        """Fitted to `steps`; from `start` (a fold refit) or from the best point of the coarse grid."""
        from scipy.optimize import minimize

        measured = [figures(step.summary) for step in steps]
        typical = np.log(TYPICAL)
        bounds = np.log(BOUNDS)

        def cost(x: np.ndarray) -> float:
            model = EngineModel.from_vector(x, DEFAULTS)
            total = float(np.sum((PRIOR_WEIGHT * (x - typical)) ** 2))
            for step, observed in zip(steps, measured):
                predicted = self.predict(step, model)
                total += sum(math.log(min(predicted[k], 1e9) / observed[k]) ** 2 for k in FIGURES)
            return total

        if start is None:
            grid = [typical.copy() for _ in range(len(STEP_OVERHEAD_GRID) * len(SEQUENCE_OVERHEAD_GRID))]
            for x, (per_step, per_sequence) in zip(grid, [(a, b) for a in STEP_OVERHEAD_GRID
                                                          for b in SEQUENCE_OVERHEAD_GRID]):
                x[2:4] = np.log([per_step, per_sequence])
            x0, spread = min(grid, key=cost), 0.7  # simplex edges of a factor 2: explore
        else:
            x0, spread = np.clip(start.vector(), bounds[:, 0], bounds[:, 1]), 0.2  # a factor 1.2: refine
        simplex = np.vstack([x0] + [x0 + spread * np.eye(len(x0))[i] for i in range(len(x0))])
        solution = minimize(cost, x0, method="Nelder-Mead", bounds=bounds,
                            options={"initial_simplex": np.clip(simplex, bounds[:, 0], bounds[:, 1]),
                                     "xatol": 0.02, "fatol": 5e-4, "maxfev": 250 if start is None else 100})
        return EngineModel.from_vector(solution.x, DEFAULTS)

    def calibrate(self, engine: str, quant: str, steps: list[MeasuredStep]) -> Calibration:
        picked = sorted({round(i) for i in np.linspace(0, len(steps) - 1, min(len(steps), MAX_FIT_STEPS))})
        fitted = [steps[i] for i in picked]
        rest = [step for i, step in enumerate(steps) if i not in picked]
        self.progress(f"calibrating {engine} {quant} on {len(fitted)} of {len(steps)} measured steps")
        model = self.fit(fitted)
        held_out = [HeldOut(step, figures(step.summary), self.predict(step, model)) for step in rest]
        folds = min(len(fitted), MAX_FOLDS)
        if folds >= 2:
            for fold in range(folds):
                self.progress(f"  held-out check {fold + 1}/{folds}")
                kept = [step for index, step in enumerate(fitted) if index % folds != fold]
                refit = self.fit(kept, start=model)
                held_out += [HeldOut(step, figures(step.summary), self.predict(step, refit))
                             for index, step in enumerate(fitted) if index % folds == fold]
        model = EngineModel(replace(model.params, **{k: getattr(batch_limits(steps[0]), k)
                                                     for k in ("max_num_seqs", "max_batch_tokens")}),
                            model.api_latency_s)
        calibration = Calibration(engine, quant, model, steps, held_out)
        self.progress(f"  {calibration.describe()}")
        return calibration

    def calibrate_on_operators(self, engine: str, quant: str, steps: list[MeasuredStep],
                               profile: ChosenProfile) -> Calibration:
        """Step times from an operator profile; only the time a request takes to reach the engine is fitted,
        as the median gap between the TTFT p50 of the LATENCY_STEPS least busy steps of the asked weight format
        (else of any) and their replays' without that time.

        The check: `check_steps` of `steps` (any weight format of the engine). Each is predicted with the latency
        of the others (leave-one-out; the operator model was fitted to traces, not to these steps), and again with
        every step ELASTICITY_STEP longer, which says how much each figure moves with step time (HeldOut.error)."""
        used = check_steps(steps, profile.key)
        # the time to reach the engine from the least busy steps of the asked weight format (else of any): at low
        # load a TTFT is that time and the prompt's own; under load, mostly the queue, which the replay may not have
        own = [step for step in steps if step.quant == quant] or steps
        quiet = sorted(own, key=in_flight)[:LATENCY_STEPS]
        self.progress(f"calibrating {engine} {quant} on operator profiles, API latency from {len(quiet)} steps, "
                      f"checked on {len(used)} of {len(steps)}")
        limits = batch_limits(steps[0])
        bare = EngineModel(limits, 0.0, profile.model)
        gaps = [max(figures(step.summary)["ttft_p50_s"] - self.predict(step, bare)["ttft_p50_s"], 0.0)
                for step in quiet]
        model = replace(bare, api_latency_s=float(np.median(gaps)))
        held_out = []
        for step in used:
            others = [gap for gap, other in zip(gaps, quiet) if other is not step]  # never its own gap
            checked = replace(model, api_latency_s=float(np.median(others)) if others else model.api_latency_s)
            observed = figures(step.summary)
            predicted = self.predict(step, checked)
            longer = self.predict(step, replace(checked, operators=replace(profile.model,
                                                                           time_scale=1 + ELASTICITY_STEP)))
            elasticity = {k: math.log(longer[k] / predicted[k]) / math.log(1 + ELASTICITY_STEP)
                          if math.isfinite(longer[k]) and math.isfinite(predicted[k]) else 0.0 for k in FIGURES}
            held_out.append(HeldOut(step, observed, predicted, STEP_TIME_FIGURES,
                                    scalings(profile.key, step.gpu, step.quant, step.model, step.tp), elasticity))
        if len(used) < 2:
            held_out = []
        calibration = Calibration(engine, quant, model, steps, held_out, profile)
        self.progress(f"  {calibration.describe()}")
        return calibration

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
from dataclasses import dataclass, field, replace

import numpy as np

from tokenrig.capacity.inputs import MeasuredStep
from tokenrig.capacity.operators import ChosenProfile, OperatorModel
from tokenrig.capacity.simulate import EngineSetup, RequestBook, replay
from tokenrig.profiles import GpuProfile, ModelProfile, resolve_gpu, resolve_model
from tokenrig.metrics.run_summary import RunSummary
from tokenrig.serve.engines.sim import RooflineParams

FIGURES = ("ttft_p50_s", "tpot_p50_s", "output_tokens_per_s")
STEP_TIME_FIGURES = ("tpot_p50_s", "output_tokens_per_s")
DEFAULTS = RooflineParams()
NAMES = ("compute_efficiency", "bandwidth_efficiency", "step_overhead_s", "sequence_overhead_s", "api_latency_s")
# where each fit starts and what it is pulled towards (RooflineParams' defaults; 10 us per sequence and
# 1 ms to reach the engine, as zero has no logarithm), and the bounds of each parameter
TYPICAL = (DEFAULTS.compute_efficiency, DEFAULTS.bandwidth_efficiency, DEFAULTS.step_overhead_s, 1e-5, 1e-3)
BOUNDS = ((0.005, 1.0), (0.005, 1.0), (1e-5, 1.0), (1e-8, 0.05), (1e-5, 1.0))
PRIOR_WEIGHT = 0.02  # residual per factor e between a parameter and its typical value
MAX_FOLDS = 4
MAX_FIT_STEPS = 8
# the coarse start: host overhead per step and per sequence (seconds)
STEP_OVERHEAD_GRID = (5e-4, 5e-3, 5e-2)
SEQUENCE_OVERHEAD_GRID = (1e-6, 3e-5, 1e-3)


def figures(summary: RunSummary) -> dict[str, float]:
    latency = summary.latency_s
    return {"ttft_p50_s": latency.get("ttft").p50, "tpot_p50_s": latency.get("tpot").p50,
            "output_tokens_per_s": summary.throughput.output_tokens_per_s}


@dataclass(frozen=True)
class EngineModel:
    """What a calibration fits: the roofline parameters (batch limits included) and the API latency."""

    params: RooflineParams
    api_latency_s: float
    operators: OperatorModel | None = None  # step times by operator; the roofline's efficiencies then unused

    @classmethod
    def from_vector(cls, x: np.ndarray, limits: RooflineParams) -> EngineModel:
        values = dict(zip(NAMES, map(float, np.exp(x))))
        latency = values.pop("api_latency_s")
        return cls(replace(limits, **values), latency)

    def vector(self) -> np.ndarray:
        p = self.params
        return np.log([p.compute_efficiency, p.bandwidth_efficiency, p.step_overhead_s,
                       max(p.sequence_overhead_s, BOUNDS[3][0]), max(self.api_latency_s, BOUNDS[4][0])])

    def setup(self, model: ModelProfile, gpu: GpuProfile, quant: str, tp: int,
              limits: RooflineParams | None = None) -> EngineSetup:
        params = self.params if limits is None else replace(
            self.params, max_num_seqs=limits.max_num_seqs, max_batch_tokens=limits.max_batch_tokens)
        return EngineSetup(model, gpu, quant, tp, params, self.api_latency_s, self.operators)


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

    @property
    def error(self) -> float:
        return max(abs(self.predicted[k] / self.measured[k] - 1) for k in self.judged)


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
        """Worst held-out relative error (infinite if a held-out replay measured nothing), None without folds;
        on an operator profile, also no narrower than the profile's own held-out error of summed step time."""
        if not self.held_out:
            return None
        worst = max(h.error for h in self.held_out)
        if self.profile and self.profile.model.fit_error is not None:
            worst = max(worst, self.profile.model.fit_error)
        return worst

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
        return {"engine": self.engine, "quant": self.quant, "operator_profile": profile, "compute_efficiency": p.compute_efficiency,
                "bandwidth_efficiency": p.bandwidth_efficiency, "step_overhead_s": p.step_overhead_s,
                "sequence_overhead_s": p.sequence_overhead_s, "api_latency_s": self.model.api_latency_s,
                "max_num_seqs": p.max_num_seqs, "max_batch_tokens": p.max_batch_tokens, "band": self.band,
                "gpus": self.gpus, "steps": [str(step.path) for step in self.steps],
                "held_out": [{"step": str(h.step.path), "measured": h.measured, "predicted": h.predicted,
                              "error": h.error} for h in self.held_out]}


class Calibrator:
    """Fits and checks calibrations; request books are built once per scenario and model."""

    def __init__(self, progress=print):
        self.progress = progress
        self._books: dict[tuple[str, str], RequestBook] = {}

    def book(self, step: MeasuredStep) -> RequestBook:
        key = (step.scenario.model_dump_json(), step.model)
        if key not in self._books:
            self._books[key] = RequestBook(step.scenario, resolve_model(step.model))
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
        as the median gap between each measured step's TTFT p50 and its replay's without that time. Each step
        is then predicted with the latency of the others (leave-one-out), which is the band: the operator
        model was fitted to traces, not to these steps."""
        picked = sorted({round(i) for i in np.linspace(0, len(steps) - 1, min(len(steps), MAX_FIT_STEPS))})
        used = [steps[i] for i in picked]
        self.progress(f"calibrating {engine} {quant} on operator profiles, API latency from {len(used)} steps")
        limits = batch_limits(steps[0])
        bare = EngineModel(limits, 0.0, profile.model)
        measured = [figures(step.summary) for step in used]
        gaps = [max(m["ttft_p50_s"] - self.predict(step, bare)["ttft_p50_s"], 0.0) for step, m in zip(used, measured)]
        model = replace(bare, api_latency_s=float(np.median(gaps)))
        held_out = []
        for index, (step, observed) in enumerate(zip(used, measured)):
            others = gaps[:index] + gaps[index + 1:]
            latency = float(np.median(others)) if others else model.api_latency_s
            held_out.append(HeldOut(step, observed, self.predict(step, replace(model, api_latency_s=latency)),
                                    judged=STEP_TIME_FIGURES))
        if len(used) < 2:
            held_out = []
        calibration = Calibration(engine, quant, model, steps, held_out, profile)
        self.progress(f"  {calibration.describe()}")
        return calibration

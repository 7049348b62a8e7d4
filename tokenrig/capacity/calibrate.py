"""Calibrating the roofline to an engine: fit its efficiencies to measured steps, and check on held-out ones.

For one engine configuration and weight format (e.g. 'hf, sdpa, CUDA graphs' with bf16), the
four roofline parameters — compute efficiency, bandwidth efficiency, host overhead per step and
per sequence in a step — are fitted so that virtual-time replays of the measured steps' exact loads reproduce what they
measured: TTFT p50, TPOT p50 and output tokens/s (least squares on log ratios, with a weak pull
towards RooflineParams' defaults so that a parameter the data cannot see stays typical).

The error band is a leave-one-out check: each step is predicted by a model fitted on the others;
the band is the worst relative error of those predictions over the fitted figures. It measures
how well the model transfers between the calibration points (their GPUs and loads); a projection
to a GPU type no point ran on carries an error the band cannot see, and the rows say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from tokenrig.capacity.inputs import MeasuredStep
from tokenrig.capacity.simulate import EngineSetup, RequestBook, replay
from tokenrig.profiles import resolve_gpu, resolve_model
from tokenrig.serve.engines.sim import RooflineParams

FIGURES = ("ttft_p50_s", "tpot_p50_s", "output_tokens_per_s")
DEFAULTS = RooflineParams()
# where the fit starts and what it is pulled towards, each log-parameter with weight 0.02 per factor e:
# RooflineParams' defaults, and 10 us per sequence (that default is 0, which has no logarithm)
PRIOR = (DEFAULTS.compute_efficiency, DEFAULTS.bandwidth_efficiency, DEFAULTS.step_overhead_s, 1e-5)
PRIOR_WEIGHT = 0.02
# compute efficiency, bandwidth efficiency, overhead per step (s), overhead per sequence (s)
BOUNDS = ((0.005, 1.0), (0.005, 1.0), (1e-5, 1.0), (1e-8, 0.05))


def figures(summary: dict) -> dict[str, float]:
    latency = summary["latency_s"]
    return {"ttft_p50_s": latency["ttft"]["p50"], "tpot_p50_s": latency["tpot"]["p50"],
            "output_tokens_per_s": summary["throughput"]["output_tokens_per_s"]}


def _params(x: np.ndarray, limits: RooflineParams) -> RooflineParams:
    compute, bandwidth, overhead, per_sequence = np.exp(x)
    return replace(limits, compute_efficiency=float(compute), bandwidth_efficiency=float(bandwidth),
                   step_overhead_s=float(overhead), sequence_overhead_s=float(per_sequence))


def _vector(params: RooflineParams) -> np.ndarray:
    return np.log([params.compute_efficiency, params.bandwidth_efficiency, params.step_overhead_s,
                   max(params.sequence_overhead_s, BOUNDS[3][0])])


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

    @property
    def error(self) -> float:
        return max(abs(self.predicted[k] / self.measured[k] - 1) for k in FIGURES)


@dataclass
class Calibration:
    engine: str
    quant: str
    params: RooflineParams
    steps: list[MeasuredStep]
    held_out: list[HeldOut] = field(default_factory=list)

    @property
    def band(self) -> float | None:
        """Worst held-out relative error, or None with fewer than two steps (nothing to hold out)."""
        return max(h.error for h in self.held_out) if self.held_out else None

    @property
    def gpus(self) -> list[str]:
        return sorted({step.gpu for step in self.steps})

    def describe(self) -> str:
        p = self.params
        band = f"held-out error ±{self.band:.0%}" if self.band is not None else "one step: no held-out check"
        return (f"{self.engine} {self.quant}: compute efficiency {p.compute_efficiency:.3f}, bandwidth efficiency "
                f"{p.bandwidth_efficiency:.3f}, overhead {p.step_overhead_s * 1e3:.2f} ms per step + "
                f"{p.sequence_overhead_s * 1e6:.0f} us per sequence, from {len(self.steps)} steps on "
                f"{', '.join(self.gpus)}; {band}")

    def document(self) -> dict:
        p = self.params
        return {"engine": self.engine, "quant": self.quant, "compute_efficiency": p.compute_efficiency,
                "bandwidth_efficiency": p.bandwidth_efficiency, "step_overhead_s": p.step_overhead_s,
                "sequence_overhead_s": p.sequence_overhead_s,
                "max_num_seqs": p.max_num_seqs, "max_batch_tokens": p.max_batch_tokens, "band": self.band,
                "gpus": self.gpus, "steps": [str(step.path) for step in self.steps],
                "held_out": [{"step": str(h.step.path), "measured": h.measured, "predicted": h.predicted,
                              "error": h.error} for h in self.held_out]}


class Calibrator:
    """Fits and checks calibrations; request books are built once per scenario, model and seed."""

    def __init__(self, progress=print):
        self.progress = progress
        self._books: dict[tuple[str, str, int], RequestBook] = {}

    def book(self, step: MeasuredStep) -> RequestBook:
        key = (step.scenario.model_dump_json(), step.model, step.load.seed)
        if key not in self._books:
            self._books[key] = RequestBook(step.scenario, resolve_model(step.model), step.load.seed)
        return self._books[key]

    def predict(self, step: MeasuredStep, params: RooflineParams) -> dict[str, float]:
        limits = batch_limits(step)
        params = replace(params, max_num_seqs=limits.max_num_seqs, max_batch_tokens=limits.max_batch_tokens)
        setup = EngineSetup(resolve_model(step.model), resolve_gpu(step.gpu), step.quant, step.tp, params)
        summary = replay(setup, self.book(step), step.load).summary
        if not summary["latency_s"]["ttft"] or not summary["latency_s"]["tpot"]:
            return {k: math.inf for k in FIGURES}
        return figures(summary)

    def fit(self, steps: list[MeasuredStep], start: RooflineParams | None = None) -> RooflineParams:
        from scipy.optimize import least_squares

        measured = [figures(step.summary) for step in steps]
        prior = np.log(PRIOR)

        def residuals(x: np.ndarray) -> np.ndarray:
            params = _params(x, DEFAULTS)
            out = []
            for step, observed in zip(steps, measured):
                predicted = self.predict(step, params)
                out += [math.log(min(predicted[k], 1e9) / observed[k]) for k in FIGURES]
            return np.array(out + list(PRIOR_WEIGHT * (x - prior)))

        low, high = np.log([b[0] for b in BOUNDS]), np.log([b[1] for b in BOUNDS])
        x0 = np.clip(_vector(start) if start else prior, low + 1e-6, high - 1e-6)
        # steps of 5 % in each parameter: small enough to follow the trend, large enough that the
        # discrete scheduling events of a replay do not make the differences noise
        solution = least_squares(residuals, x0, bounds=(low, high), diff_step=0.05, x_scale=1.0, ftol=1e-3, xtol=1e-3, max_nfev=12)
        return _params(solution.x, DEFAULTS)

    def calibrate(self, engine: str, quant: str, steps: list[MeasuredStep]) -> Calibration:
        self.progress(f"calibrating {engine} {quant} on {len(steps)} measured steps")
        params = self.fit(steps)
        held_out = []
        if len(steps) >= 2:
            for index, step in enumerate(steps):
                others = steps[:index] + steps[index + 1:]
                self.progress(f"  held-out check {index + 1}/{len(steps)}: {step.path.name}")
                held_out.append(HeldOut(step, figures(step.summary), self.predict(step, self.fit(others, params))))
        limits = batch_limits(steps[0])
        params = replace(params, max_num_seqs=limits.max_num_seqs, max_batch_tokens=limits.max_batch_tokens)
        calibration = Calibration(engine, quant, params, steps, held_out)
        self.progress(f"  {calibration.describe()}")
        return calibration

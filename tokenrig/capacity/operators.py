"""An engine step's time as the sum of its operators' times, fitted to profiled steps (Vidur's method).

Each operator class of a serving breakdown (tokenrig/breakdown) gets a time function of the step's batch
and the model's shapes, with few parameters, fitted to the class's measured time over profiled steps of
one GPU type, engine and weight format:

| class | time per step |
|---|---|
| GEMM, by role (fitted on their sum) | layers x (launch + max(weight bytes / (BW e_bw), 2 params tokens / (F e_f))) |
| attention | layers x (launch + decode KV bytes read / (BW e_kv) + prefill pair FLOPs / (F e_pf)) |
| norms, activation, rotary, KV write, copies, input preparation, embedding, other | layers x (a + b tokens h / BW) |
| sampling and logits | a + b sequences V / BW |
| GPU idle (host, scheduler) | a + b sequences |

BW and F are the GPU profile's datasheet bandwidth and BF16 FLOP/s, h the hidden size, V the vocabulary.
Because each term is bytes or FLOPs over a datasheet rate, the same fitted parameters project a GPU type
with no profile of its own: GEMMs and prefill attention scale with compute, decode attention, small-batch
GEMMs and elementwise work with bandwidth; launches, sampling's fixed cost and the host's idle time stay.
Models of other shapes scale through their bytes and FLOPs. A projection that scaled anything says so.

The fit: GEMMs by bounded least squares on log time (the max() makes it nonlinear), every other class by
non-negative least squares on relative error. The model's own check is k-fold over the profiled steps:
`fit_error`, the worst fold's error of its held-out steps' summed time, and `step_error_p90`, the 90th
percentile of single held-out steps' errors (host stalls make single steps miss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import least_squares, nnls

from tokenrig.breakdown.table import OperatorBreakdown, StepRow
from tokenrig.capacity.inputs import MeasuredStep
from tokenrig.profiles import GpuProfile, ModelProfile, resolve_gpu, resolve_model
from tokenrig.serve.engines.sim import RooflineScheduler
from tokenrig.serve.fit import GROUP_SIZE, linear_bytes

GEMM_SHAPES = {"gemm_qkv": ("q_proj", "k_proj", "v_proj"), "gemm_o": ("o_proj",),
               "gemm_gate_up": ("gate_proj", "up_proj"), "gemm_down": ("down_proj",)}
PER_LAYER_ELEMENTWISE = ("norm", "activation", "rotary", "kv_cache_write", "copy", "embedding", "prepare", "other")
# GEMM time is fitted on the step's total over the roles (and the activation quantization that feeds FP8 GEMMs):
# the roles' split carries the classifier's uncertainty, their sum does not
GEMM_CLASSES = (*GEMM_SHAPES, "gemm_lm_head", "gemm_other", "quantize")
ATTENTION = ("attention_prefill", "attention_decode", "attention_mixed")
FOLDS = 4
TYPICAL_COMPUTE_EFFICIENCY = 0.6  # the roofline's default (serve/engines/sim.py RooflineParams)


@dataclass(frozen=True)
class Batch:
    """What a step computes, in the terms the model reads (a profiled step's row, or a replayed step's work)."""

    prefill_tokens: int
    decode_requests: int
    decode_kv_tokens: int = 0
    prefill_attention_pairs: int = 0
    sequences: int = 0  # requests in the step (each is sampled once it ends its prefill)

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_requests

    @classmethod
    def of_row(cls, row: StepRow) -> Batch:
        pairs = row.prefill_attention_pairs
        if pairs is None:  # vLLM's simple annotation: a prompt attending to itself
            pairs = row.prefill_tokens * row.prefill_tokens // max(2 * row.prefill_requests, 1)
        return cls(row.prefill_tokens, row.decode_requests, row.decode_kv_tokens or 0, pairs,
                   row.prefill_requests + row.decode_requests)


@dataclass(frozen=True)
class Shapes:
    """The model's bytes and FLOPs the time functions read, per GPU of a `tp`-way replica."""

    layers: int
    hidden: int
    vocab: int
    gemm_bytes: dict[str, float]  # per layer, weight bytes of each role (LM head: the whole)
    gemm_params: dict[str, float]  # per layer, multiply-adds per token of each role
    kv_bytes_per_token_layer: float
    pair_flops_layer: float  # QK^T and AV of one query-key pair, one layer

    @classmethod
    def of(cls, model: ModelProfile, quant: str, tp: int = 1) -> Shapes:
        h, i = model.hidden_size, model.config["intermediate_size"]
        q_dim, kv_dim = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
        dims = {"q_proj": (h, q_dim), "k_proj": (h, kv_dim), "v_proj": (h, kv_dim), "o_proj": (q_dim, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        quantized = quant if quant in ("bf16", "fp16", "int8", "fp8") or h % GROUP_SIZE == 0 else "bf16"
        gemm_bytes = {role: sum(linear_bytes(quantized, *dims[name]) for name in names) / tp
                      for role, names in GEMM_SHAPES.items()}
        gemm_params = {role: sum(dims[name][0] * dims[name][1] for name in names) / tp
                       for role, names in GEMM_SHAPES.items()}
        gemm_bytes["gemm_lm_head"] = 2.0 * h * model.vocab_size / tp
        gemm_params["gemm_lm_head"] = h * model.vocab_size / tp
        return cls(model.num_layers, h, model.vocab_size, gemm_bytes, gemm_params,
                   2 * max(model.num_kv_heads // tp, 1) * model.head_dim * 2.0,
                   4.0 * model.num_heads * model.head_dim / tp)


@dataclass
class OperatorModel:
    """Fitted per-operator times of one engine configuration and weight format, on the GPU type `gpu`."""

    gpu: GpuProfile  # the GPU type the profiles ran on
    quant: str
    gemm: tuple[float, float, float]  # launch per layer (s), e_bw, e_f
    attention: tuple[float, float, float]  # launch per layer (s), 1/e_kv, 1/e_pf
    elementwise: dict[str, tuple[float, float]]  # per class: a per layer (s), b (per token-hidden byte / BW)
    sampling: tuple[float, float]  # a (s), b (per sequence-vocab element / BW)
    idle: tuple[float, float]  # a (s), b (s per sequence)
    steps_fitted: int = 0
    unmeasured: list[str] = field(default_factory=list)  # parameters no profiled step could show ("prefill")
    borrowed: str | None = None  # where the unmeasured ones came from instead
    fit_error: float | None = None  # k-fold: worst fold's error of its held-out steps' summed time
    step_error_p90: float | None = None  # k-fold: 90th percentile of single held-out steps' errors
    sources: list[str] = field(default_factory=list)
    # every step's time times this: 1 in a projection; the band's check replays at 1 + a little to see how much a
    # step's figures move with step time (calibrate.py, implied step-time error)
    time_scale: float = 1.0

    def class_times(self, batch: Batch, shapes: Shapes, gpu: GpuProfile | None = None) -> dict[str, float]:
        """Seconds per operator class of one step on `gpu` (default: the profiled GPU type)."""
        gpu = gpu or self.gpu
        bw, flops = gpu.bandwidth_bytes_per_s, gpu.flops_per_s
        times = _gemm_times(self.gemm, batch, shapes, bw, flops)
        a, inv_kv, inv_pf = self.attention
        attention = shapes.layers * (a + inv_kv * batch.decode_kv_tokens * shapes.kv_bytes_per_token_layer / bw
                                     + inv_pf * batch.prefill_attention_pairs * shapes.pair_flops_layer / flops)
        times["attention"] = attention
        for name, (a, b) in self.elementwise.items():
            times[name] = shapes.layers * (a + b * batch.tokens * shapes.hidden * 2 / bw)
        a, b = self.sampling
        times["sampling"] = a + b * batch.sequences * shapes.vocab * 4 / bw
        a, b = self.idle
        times["gpu_idle"] = a + b * batch.sequences
        return times

    def step_time(self, batch: Batch, shapes: Shapes, gpu: GpuProfile | None = None) -> float:
        return sum(self.class_times(batch, shapes, gpu).values()) * self.time_scale

    def scaled_to(self, gpu: GpuProfile) -> bool:
        """Whether a projection to `gpu` scales this model by datasheet rates (a GPU type it was not profiled on)."""
        return gpu.key != self.gpu.key


def _gemm_times(gemm: tuple[float, float, float], batch: Batch, shapes: Shapes, bw: float,
                flops: float) -> dict[str, float]:
    launch, e_bw, e_f = gemm
    times = {}
    for role in (*GEMM_SHAPES, "gemm_lm_head"):
        layers = 1 if role == "gemm_lm_head" else shapes.layers
        tokens = batch.sequences if role == "gemm_lm_head" else batch.tokens  # logits only for sampled rows
        times[role] = layers * (launch + max(shapes.gemm_bytes[role] / (bw * e_bw),
                                             2 * shapes.gemm_params[role] * tokens / (flops * e_f)))
    return times


def _gemm_time(gemm, batch, shapes, bw, flops) -> float:
    return sum(_gemm_times(gemm, batch, shapes, bw, flops).values())


def _rows(breakdowns: list[OperatorBreakdown]) -> list[StepRow]:
    return [row for b in breakdowns for row in b.step_rows if row.span_ms > 0]


def _class_ms(row: StepRow, names) -> float:
    return sum(row.per_class_ms.get(name, 0.0) for name in names)


def fit_operator_model(breakdowns: list[OperatorBreakdown], model: ModelProfile, gpu: GpuProfile, quant: str,
                       tp: int = 1, sources: list[str] | None = None, check: bool = True) -> OperatorModel:
    """Fit every class's time function to the profiled steps of one GPU type, engine and weight format."""
    rows = _rows(breakdowns)
    if len(rows) < 3:
        raise ValueError(f"{len(rows)} profiled steps: at least 3 are needed to fit the operator model")
    shapes = Shapes.of(model, quant, tp)
    bw, flops = gpu.bandwidth_bytes_per_s, gpu.flops_per_s
    batches = [Batch.of_row(row) for row in rows]

    observed_gemm = [(batch, _class_ms(row, GEMM_CLASSES) / 1000) for row, batch in zip(rows, batches)]
    observed_gemm = [(batch, seconds) for batch, seconds in observed_gemm if seconds > 0]

    def gemm_residuals(x):
        gemm = tuple(math.exp(v) for v in x)
        return [math.log(_gemm_time(gemm, batch, shapes, bw, flops) / seconds) for batch, seconds in observed_gemm]

    gemm: tuple[float, float, float] = (0.0, 1.0, 1.0)
    if observed_gemm:
        solution = least_squares(gemm_residuals, x0=[math.log(5e-6), math.log(0.7), math.log(0.6)],
                                 bounds=([math.log(1e-8), math.log(0.01), math.log(0.01)],
                                         [math.log(1e-3), math.log(1.5), math.log(1.5)]))
        launch, e_bw, e_f = (float(math.exp(v)) for v in solution.x)
        gemm = (launch, e_bw, e_f)

    def nonneg(features: list[list[float]], seconds: list[float]) -> list[float]:
        """Non-negative least squares on relative error (each row divided by what it measured): one coefficient
        per feature (every row has the same features, and there are at least 3 rows)."""
        keep = [(f, s) for f, s in zip(features, seconds) if s > 0]
        if not keep:
            return [0.0] * len(features[0])
        a = np.array([[v / s for v in f] for f, s in keep])
        coefficients, _ = nnls(a, np.ones(len(keep)))
        return [float(c) for c in coefficients]

    layers = shapes.layers
    attention_launch, inv_kv, inv_pf = nonneg(
        [[layers, layers * b.decode_kv_tokens * shapes.kv_bytes_per_token_layer / bw,
          layers * b.prefill_attention_pairs * shapes.pair_flops_layer / flops] for b in batches],
        [_class_ms(row, ATTENTION) / 1000 for row in rows])
    elementwise: dict[str, tuple[float, float]] = {}
    for name in PER_LAYER_ELEMENTWISE:
        seconds = [row.per_class_ms.get(name, 0.0) / 1000 for row in rows]
        if any(seconds):
            per_layer, per_byte = nonneg([[layers, layers * b.tokens * shapes.hidden * 2 / bw] for b in batches],
                                         seconds)
            elementwise[name] = (per_layer, per_byte)
    sampling_a, sampling_b = nonneg([[1.0, b.sequences * shapes.vocab * 4 / bw] for b in batches],
                                    [row.per_class_ms.get("sampling", 0.0) / 1000 for row in rows])
    idle_a, idle_b = nonneg([[1.0, float(b.sequences)] for b in batches],
                            [row.per_class_ms.get("gpu_idle", 0.0) / 1000 for row in rows])
    ridge_tokens = min(shapes.gemm_bytes[role] / bw / (2 * shapes.gemm_params[role] / flops) for role in GEMM_SHAPES)
    prefill_seen = any(b.prefill_attention_pairs for b in batches) and any(b.tokens > ridge_tokens for b in batches)
    fitted = OperatorModel(gpu, quant, gemm, (attention_launch, inv_kv, inv_pf), elementwise,
                           (sampling_a, sampling_b), (idle_a, idle_b), len(rows),
                           unmeasured=[] if prefill_seen else ["prefill"], sources=list(sources or []))
    errors = _cross_validated_error(breakdowns, rows, model, gpu, quant, tp) if check else None
    if errors:
        fitted.fit_error, fitted.step_error_p90 = errors
    return fitted


def _cross_validated_error(breakdowns, rows, model, gpu, quant, tp) -> tuple[float, float] | None:
    """k-fold: each fold's steps predicted by a model fitted on the others. Returns the worst fold's error of
    their summed time (what throughput rests on) and the 90th percentile of single steps' errors (a step with
    a host stall is not what the model is for, but it is reported)."""
    folds = min(FOLDS, len(rows) // 3)
    if folds < 2:
        return None
    shapes = Shapes.of(model, quant, tp)
    worst_total, step_errors = 0.0, []
    for fold in range(folds):
        held = rows[fold::folds]
        kept = [row for index, row in enumerate(rows) if index % folds != fold]
        part = OperatorBreakdown(source="fold", device="gpu", steps=len(kept), span_s=0.0, classes={}, by_kind={},
                                 step_rows=kept)
        fitted = fit_operator_model([part], model, gpu, quant, tp, check=False)
        predicted = [fitted.step_time(Batch.of_row(row), shapes) for row in held]
        measured = [row.span_ms / 1000 for row in held]
        worst_total = max(worst_total, abs(sum(predicted) / sum(measured) - 1))
        step_errors += [abs(p / m - 1) for p, m in zip(predicted, measured)]
    return worst_total, float(np.percentile(step_errors, 90))


def batch_of_work(work) -> Batch:
    """A replayed step's batch (the sim scheduler's StepWork) in the model's terms."""
    # sequences as a profiled step's annotation counts them: every request with tokens in the step
    return Batch(work.prefill_tokens, work.decode_tokens, work.decode_kv_tokens, work.prefill_attention_pairs,
                 len(work.prefill_chunks) + work.decode_tokens)


class OperatorScheduler(RooflineScheduler):
    """The sim engine's scheduler (vLLM's batching, KV blocks, preemption, prefix cache) timing each step as
    the sum of its operators' times on `gpu`, plus TP's all-reduces, instead of the roofline."""

    def __init__(self, operators: OperatorModel, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.operators = operators
        self.shapes = Shapes.of(self.model, self.quant, self.tp)

    def step_time(self, work) -> float:
        batch = batch_of_work(work)
        return self.operators.step_time(batch, self.shapes, self.gpu) + self.all_reduce_s(batch.tokens)


@dataclass(frozen=True)
class ProfileKey:
    engine: str
    quant: str
    gpu: str
    model: str
    tp: int


def scalings(key: ProfileKey, gpu: str, quant: str, model: str, tp: int) -> frozenset[str]:
    """What a projection from the profile `key` to this configuration scales: "gpu" (another GPU type, by
    datasheet), "quant" (another weight format, by its bytes), "model" (another model or TP size, by its shapes)."""
    return frozenset(kind for kind, differs in (("gpu", gpu != key.gpu), ("quant", quant != key.quant),
                                                 ("model", (model, tp) != (key.model, key.tp))) if differs)


@dataclass
class ChosenProfile:
    """The operator model a projection uses and how far it had to travel to get there."""

    model: OperatorModel
    key: ProfileKey
    scaled: list[str]  # what differs from the question: "GPU type h200 from h100-sxm by datasheet", ...
    kinds: frozenset[str] = frozenset()  # the same as `scalings` names them
    format_check: tuple[float, str] | None = None  # where it scales weight format: OperatorProfiles.format_error

    def describe(self, with_scaling: bool = True) -> str:
        """What the projection rests on: the profile, its own check, what it borrowed and (unless the caller
        names its own) what it had to scale."""
        model = self.model
        basis = f"operators profiled on {self.key.gpu} ({self.key.model}, {self.key.quant}, {model.steps_fitted} steps"
        if model.fit_error is not None:
            basis += f", held-out step time ±{model.fit_error:.0%} summed, ±{model.step_error_p90:.0%} p90 per step"
        basis += ")"
        parts = [basis] + ([model.borrowed] if model.borrowed else []) + (self.scaled if with_scaling else [])
        return "; ".join(parts)


class OperatorProfiles:
    """The operator models fitted to every profiled step in the inputs, one per engine configuration, weight
    format, GPU type, model and TP size, and the nearest one to a question."""

    def __init__(self, steps: list[MeasuredStep], progress: Callable[[str], None] = print):
        groups: dict[ProfileKey, list[tuple[MeasuredStep, OperatorBreakdown]]] = {}
        for step in steps:
            breakdown = step.summary.breakdown
            if breakdown is not None and breakdown.device == "gpu":
                key = ProfileKey(step.engine, step.quant, step.gpu, step.model, step.tp)
                groups.setdefault(key, []).append((step, breakdown))
        self.fitted: dict[ProfileKey, OperatorModel] = {}  # each as its own steps showed it
        self.profiled: dict[ProfileKey, list[StepRow]] = {}  # the profiled steps each was fitted to
        for key, members in groups.items():
            breakdowns = [breakdown for _, breakdown in members]
            try:
                self.fitted[key] = fit_operator_model(breakdowns, resolve_model(key.model), resolve_gpu(key.gpu),
                                                      key.quant, key.tp, sources=[str(s.path) for s, _ in members])
                self.profiled[key] = _rows(breakdowns)
            except ValueError as error:
                progress(f"operator profile {key}: not used ({error})")
        self.models = self._completed()

    def _completed(self) -> dict[ProfileKey, OperatorModel]:
        """The fitted models, those whose steps held no compute-bound prefill completed by `_borrowed_prefill`."""
        return {key: self._borrowed_prefill(key, fitted) if "prefill" in fitted.unmeasured else fitted
                for key, fitted in self.fitted.items()}

    def _borrowed_prefill(self, key: ProfileKey, fitted: OperatorModel) -> OperatorModel:
        """A profile whose steps held no prefill big enough to be compute-bound cannot show the GEMMs' compute
        efficiency or prefill attention's: take them from the same engine's profile on the same GPU type that did
        (another weight format), else the roofline's typical values."""
        donors = [(k, m) for k, m in self.fitted.items() if k.engine == key.engine and k.gpu == key.gpu
                  and "prefill" not in m.unmeasured]
        if donors:
            donor_key, donor = max(donors, key=lambda item: item[1].steps_fitted)
            e_f, pair, source = donor.gemm[2], donor.attention[2], f"{donor_key.quant} on {donor_key.gpu}"
        else:
            e_f, pair, source = TYPICAL_COMPUTE_EFFICIENCY, 1 / TYPICAL_COMPUTE_EFFICIENCY, "typical values"
        return replace(fitted, gemm=(fitted.gemm[0], fitted.gemm[1], e_f),
                       attention=(fitted.attention[0], fitted.attention[1], pair),
                       borrowed=f"prefill compute from {source} (its own profile held no large prefill)")

    def without(self, engine: str, quant: str, gpu: str, model: str) -> OperatorProfiles:
        """These profiles less one configuration's, borrowing again among the rest (a held-out check must not
        see the case it checks, not even through what another profile borrowed from it)."""
        other = object.__new__(OperatorProfiles)
        other.fitted = {k: m for k, m in self.fitted.items()
                        if (k.engine, k.quant, k.gpu, k.model) != (engine, quant, gpu, model)}
        other.profiled = {k: rows for k, rows in self.profiled.items() if k in other.fitted}
        other.models = other._completed()
        return other

    def format_error(self, key: ProfileKey) -> tuple[float, str] | None:
        """How far `key`'s model travels to another weight format: the worst relative error of the summed time of
        another format's profiled steps (same engine, GPU type and model), each predicted through its format's
        bytes, and which format that was; None where the engine has no other format's profile there."""
        errors = []
        for other, rows in self.profiled.items():
            if other.quant == key.quant or (other.engine, other.gpu, other.model, other.tp) != (
                    key.engine, key.gpu, key.model, key.tp):
                continue
            shapes = Shapes.of(resolve_model(other.model), other.quant, other.tp)
            predicted = sum(self.models[key].step_time(Batch.of_row(row), shapes) for row in rows)
            measured = sum(row.span_ms for row in rows) / 1000
            errors.append((abs(predicted / measured - 1), other.quant))
        if not errors:
            return None
        error, quant = max(errors)
        return error, f"{key.quant} -> {quant} on {key.gpu}"

    def nearest(self, engine: str, quant: str, gpu: GpuProfile, model: str) -> ChosenProfile | None:
        """Same engine first; then the same weight format and GPU type, the same format on another GPU type
        (scaled by datasheet), another format on the same GPU type, anything of the engine; the same model
        before another (scaled through its shapes)."""
        candidates = [k for k in self.models if k.engine == engine]
        if not candidates:
            return None

        def distance(key: ProfileKey) -> tuple:
            return (key.quant != quant and key.gpu != gpu.key, key.quant != quant, key.gpu != gpu.key,
                    key.model != model, -self.models[key].steps_fitted)

        key = min(candidates, key=distance)
        kinds = scalings(key, gpu.key, quant, model, key.tp)
        scaled = []
        if key.gpu != gpu.key:
            scaled.append(f"GPU type {gpu.key} projected from {key.gpu} by datasheet (compute and bandwidth)")
        if key.quant != quant:
            scaled.append(f"{quant} weights projected from {key.quant} kernels by their bytes")
        if key.model != model:
            scaled.append(f"{model} projected from {key.model} by its shapes")
        return ChosenProfile(self.models[key], key, scaled, kinds,
                             self.format_error(key) if "quant" in kinds else None)

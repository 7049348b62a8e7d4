"""The error band of a capacity projection, against hand-worked numbers: which held-out load steps it takes (by what
predicting them scaled the operator profile), the checks it adds in quadrature, the profile's own error as its floor,
the step-time error a step's figures imply through their elasticities, and a weight format's own check; and the note
for a configuration nothing can calibrate."""

import math

import pytest

from tokenrig.breakdown.table import StepRow
from tokenrig.capacity.calibrate import Calibration, EngineModel, HeldOut, combined_band
from tokenrig.capacity.operators import ChosenProfile, OperatorModel, OperatorProfiles, ProfileKey, scalings
from tokenrig.profiles import resolve_gpu
from tokenrig.serve.engines.sim import RooflineParams

BF16 = ProfileKey("vllm", "bf16", "h100-sxm", "llama2-7b", 1)


def constant_model(quant: str, seconds: float, fit_error: float | None = None) -> OperatorModel:
    """Every step takes `seconds`: the GPU idle term alone (GEMMs at unbounded efficiency take no time)."""
    return OperatorModel(resolve_gpu("h100-sxm"), quant, gemm=(0.0, 1e30, 1e30), attention=(0.0, 0.0, 0.0),
                         elementwise={}, sampling=(0.0, 0.0), idle=(seconds, 0.0), fit_error=fit_error)


def held(error: float, scaled: set[str] = frozenset()) -> HeldOut:
    """A held-out step whose TPOT p50 was predicted `error` too low (tokens/s exact)."""
    measured = {"tpot_p50_s": 0.020, "output_tokens_per_s": 1000.0}
    predicted = {"tpot_p50_s": 0.020 * (1 - error), "output_tokens_per_s": 1000.0}
    return HeldOut(None, measured, predicted, ("tpot_p50_s", "output_tokens_per_s"), frozenset(scaled))


def calibration(steps: list[HeldOut], format_check: float | None = None, fit_error: float = 0.02) -> Calibration:
    profile = ChosenProfile(constant_model("bf16", 0.01, fit_error), BF16, [], frozenset(),
                            (format_check, "bf16 -> awq on h100-sxm") if format_check is not None else None)
    return Calibration("vllm", "bf16", EngineModel(RooflineParams(), 0.0, profile.model), [], steps, profile)


def test_independent_errors_add_in_quadrature_over_the_profiles_floor():
    assert combined_band(0.03, {"quant": 0.04}, 0.02) == pytest.approx(0.05)  # 3-4-5
    assert combined_band(0.03, {}, 0.045) == pytest.approx(0.045)  # never narrower than the profile's own fit
    assert combined_band(math.inf, {"quant": 0.04}, 0.02) == math.inf


def test_the_band_takes_the_steps_that_scaled_as_the_projection_does():
    same, gpu_and_format = held(0.03), held(0.30, {"gpu", "quant"})
    checked = calibration([same, gpu_and_format], format_check=0.04)
    # another weight format on the profile's GPU: its steps scaled nothing, the format's own check adds 4 %
    band = checked.band_for(frozenset({"quant"}))
    assert band.value == pytest.approx(0.05) and band.steps == 1 and band.terms == {"quant": 0.04}
    assert band.steps_scalings == (frozenset(),) and not band.unchecked
    # the profile's own GPU type, format and model: those steps alone (3 %, over the 2 % floor)
    assert checked.band_for(frozenset()).value == pytest.approx(0.03)
    # another GPU type: nothing checks it alone, so the steps that scaled more bound it (30 %)
    band = checked.band_for(frozenset({"gpu"}))
    assert band.value == pytest.approx(0.30) and band.steps_scalings == (frozenset({"gpu", "quant"}),)
    assert checked.band_for(frozenset({"gpu", "quant"})).value == pytest.approx(0.30)
    # each group that scaled more is a bound: the tightest answers (another model on that GPU type missed by 12 %)
    bounded = calibration([same, gpu_and_format, held(0.12, {"gpu", "model"})])
    band = bounded.band_for(frozenset({"gpu"}))
    assert band.value == pytest.approx(0.12) and band.steps_scalings == (frozenset({"gpu", "model"}),)
    # a step that scaled exactly the format answers for it before the format's own check does
    exact = calibration([same, gpu_and_format, held(0.06, {"quant"})], format_check=0.04)
    assert exact.band_for(frozenset({"quant"})).value == pytest.approx(0.06)


def test_a_scaling_nothing_checked_is_named():
    band = calibration([held(0.03)]).band_for(frozenset({"gpu"}))
    assert band.value == pytest.approx(0.03) and band.unchecked == frozenset({"gpu"})
    assert "not checked: GPU type by datasheet" in band.describe()


def test_a_figure_counts_by_the_step_time_it_implies():
    """TPOT p50 measured 22 ms, replayed 20 ms; 10 % longer steps made the replay's TPOT 21 % longer (elasticity 2,
    an open loop near saturation) and left its tokens/s, set by the arrivals, where it was: the step time is
    sqrt(1.1) - 1 = 4.9 % short, where TPOT's own error is 1 - 20/22 = 9.1 %."""
    measured = {"tpot_p50_s": 0.022, "output_tokens_per_s": 1000.0}
    predicted = {"tpot_p50_s": 0.020, "output_tokens_per_s": 1005.0}
    plain = HeldOut(None, measured, predicted, ("tpot_p50_s", "output_tokens_per_s"))
    assert plain.error == pytest.approx(1 - 20 / 22)
    implied = HeldOut(None, measured, predicted, ("tpot_p50_s", "output_tokens_per_s"),
                      elasticity={"tpot_p50_s": 2.0, "output_tokens_per_s": 0.05})
    assert implied.error == pytest.approx(math.sqrt(1.1) - 1)


def test_what_a_projection_scales_is_named_by_kind():
    assert scalings(BF16, "h100-sxm", "bf16", "llama2-7b", 1) == frozenset()
    assert scalings(BF16, "h200", "fp8", "llama2-7b", 1) == frozenset({"gpu", "quant"})
    assert scalings(BF16, "h100-sxm", "bf16", "llama2-13b", 2) == frozenset({"model"})


def test_a_weight_formats_check_is_the_other_formats_summed_time():
    """bf16's model takes 10 ms a step; AWQ's two profiled steps took 8 ms each: 20 ms predicted for 16 measured."""
    awq = ProfileKey("vllm", "awq", "h100-sxm", "llama2-7b", 1)
    profiles = object.__new__(OperatorProfiles)
    profiles.models = {BF16: constant_model("bf16", 0.010), awq: constant_model("awq", 0.008)}
    profiles.fitted = dict(profiles.models)
    row = StepRow(prefill_requests=0, prefill_tokens=0, decode_requests=1, decode_tokens=1, span_ms=8.0,
                  per_class_ms={"gpu_idle": 8.0})
    profiles.profiled = {BF16: [row], awq: [row, row]}
    error, which = profiles.format_error(BF16)
    assert error == pytest.approx(0.25, rel=1e-6) and which == "bf16 -> awq on h100-sxm"
    alone = profiles.without("vllm", "awq", "h100-sxm", "llama2-7b")
    assert alone.format_error(BF16) is None
    chosen = profiles.nearest("vllm", "fp8", resolve_gpu("h100-sxm"), "llama2-7b")
    assert chosen.kinds == frozenset({"quant"}) and chosen.format_check[0] == pytest.approx(0.25, rel=1e-6)


def test_a_configuration_nothing_calibrates_says_what_was_measured_near_it_and_what_to_measure():
    """hf with sdpa and CUDA graphs, bf16, left out: the same engine's AWQ steps and the hf backend's other bf16
    configurations ran on the H200, but a roofline is one configuration's and format's; the note names them and asks
    for load steps or a profile of exactly what was asked."""
    from pathlib import Path

    from tokenrig.capacity.inputs import read_results
    from tokenrig.capacity.planner import CapacityPlanner, CapacityQuestion
    from tokenrig.loadgen.scenario import load_scenario
    from tokenrig.metrics.slo import parse_slos
    from tokenrig.profiles import resolve_model

    runs = Path(__file__).resolve().parents[1] / "docs" / "results" / "serve-h200-2026-11-29"
    steps, _ = read_results([runs / "sdpa-graphs", runs / "awq-graphs", runs / "eager-graphs"])
    asked = "hf, sdpa, CUDA graphs, KV padding 1024"
    kept = [step for step in steps if (step.engine, step.quant) != (asked, "bf16")]
    question = CapacityQuestion(gpus=[resolve_gpu("h200")], model=resolve_model("llama2-7b"), quants=["bf16"],
                                scenario=load_scenario("chat"), slos=parse_slos("ttft_p99=500ms"), engines=[asked])
    answer = CapacityPlanner(question, kept, [], progress=lambda *_: None).answer()
    [note] = answer.notes
    assert not answer.rows
    assert note.startswith(f"{asked} with bf16 weights: no measured step on a GPU to calibrate a projection on. "
                           "Measured near it, not used")
    assert "hf, eager, CUDA graphs, KV padding 1024 with bf16: 4 steps" in note
    assert f"{asked} with awq: 4 steps" in note
    assert note.endswith(f"measure {asked} with bf16 weights on any GPU: load steps at a few loads (e.g. a closed-loop "
                         "sweep of 1, 8 and 32 users), or an operator profile (`loadtest --profile-steps`)")


def test_the_check_takes_each_scalings_busiest_steps_in_turn():
    """Against the H100 bf16 profile: the H100 bf16 chat search (nothing scaled), the H100 FP8 one (format) and the
    13B runs on the H200 (GPU type and model); 8 steps, in turn from the least scaled, busiest first."""
    from pathlib import Path

    from tokenrig.capacity.calibrate import check_steps, in_flight
    from tokenrig.capacity.inputs import read_results

    results = Path(__file__).resolve().parents[1] / "docs" / "results"
    steps, _ = read_results([results / "capacity-h100-2026-12-07", results / "serve-h200-vllm-2026-11-30" / "tp2-13b",
                             results / "serve-h200-vllm-followup-2026-11-30b" / "13b-64u"])
    usable = [step for step in steps if step.unusable() is None]  # 3 bf16, 2 FP8 on the H100; 3 13B on the H200
    checked = check_steps(usable, BF16)
    assert [sorted(scalings(BF16, s.gpu, s.quant, s.model, s.tp)) for s in checked] == [
        [], [], [], ["quant"], ["quant"], ["gpu", "model"], ["gpu", "model"], ["gpu", "model"]]
    assert [s.load.rate for s in checked[:3]] == [14.25, 13.5, 12.0]  # 37, 36 and 20 requests in flight
    assert [round(in_flight(s)) for s in checked[5:]] == [46, 30, 1]  # 13B chat at 64 users, TP 2 at 32 and 1

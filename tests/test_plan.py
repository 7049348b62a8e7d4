"""Arrival processes, stages and trace replay: pure functions of the seed, checked statistically."""

import json

import numpy as np
import pytest

from tokenrig.loadgen.plan import LoadPlan, read_trace, synthetic_offsets, trace_schedule
from tokenrig.loadgen.scenario import LoadPlanSpec, TraceReplay
from tokenrig.paths import SCENARIOS

KS_CRITICAL_1PCT = 1.63  # Kolmogorov-Smirnov: reject at the 1 % level above 1.63 * sqrt((n+m)/(n m))


def ks_two_sample(a, b) -> float:
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, side="right") / a.size
                                - np.searchsorted(b, grid, side="right") / b.size)))


def gaps_of(spec: LoadPlanSpec) -> np.ndarray:
    return np.diff(np.asarray(synthetic_offsets(spec)))


def test_poisson_gaps_are_exponential_at_the_rate():
    gaps = gaps_of(LoadPlanSpec(type="poisson", rate=50, duration_s=400, seed=3))
    assert gaps.size > 19_000
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    # one-sample KS against the exponential CDF
    sorted_gaps = np.sort(gaps)
    cdf = 1 - np.exp(-50 * sorted_gaps)
    empirical = np.arange(1, gaps.size + 1) / gaps.size
    assert np.max(np.abs(cdf - empirical)) < KS_CRITICAL_1PCT / np.sqrt(gaps.size)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_burstiness_is_the_coefficient_of_variation(cv):
    rate = 20.0
    gaps = gaps_of(LoadPlanSpec(type="gamma", rate=rate, burstiness=cv, duration_s=2000, seed=11))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.10)
    shape = 1 / cv**2
    reference = np.random.default_rng(0).gamma(shape, 1 / (shape * rate), size=gaps.size)
    # below a microsecond no timer tells gaps apart (and float offsets of ~1000 s cannot either);
    # with CV 4 a fifth of the gaps are that small, so compare the distributions from 1 µs up
    floor = 1e-6
    distance = ks_two_sample(np.maximum(gaps, floor), np.maximum(reference, floor))
    assert distance < KS_CRITICAL_1PCT * np.sqrt(2 / gaps.size)


def test_constant_rate_is_evenly_spaced_and_seeded_plans_repeat():
    offsets = synthetic_offsets(LoadPlanSpec(type="constant", rate=4, duration_s=10))
    assert len(offsets) == 40
    assert np.allclose(np.diff(offsets), 0.25)
    spec = LoadPlanSpec(type="poisson", rate=5, duration_s=20, seed=7)
    assert synthetic_offsets(spec) == synthetic_offsets(spec)
    assert synthetic_offsets(spec) != synthetic_offsets(spec.model_copy(update={"seed": 8}))


def test_stages_and_ramps_follow_the_rate_curve():
    spec = LoadPlanSpec.model_validate({"type": "poisson", "seed": 1, "stages": [
        {"duration_s": 100, "rate": 10}, {"duration_s": 100, "rate": 40, "ramp": True},
        {"duration_s": 100, "rate": 5}]})
    assert spec.duration_s == 300
    offsets = np.asarray(synthetic_offsets(spec))
    counts = [np.sum((offsets >= a) & (offsets < a + 50)) for a in range(0, 300, 50)]
    # expected per 50 s: 500, 500, ramp 10->25 (875), ramp 25->40 (1625), 250, 250
    for count, expected in zip(counts, [500, 500, 875, 1625, 250, 250]):
        assert count == pytest.approx(expected, rel=4 / np.sqrt(expected))  # within 4 sigma
    assert LoadPlan(spec).target_rate == pytest.approx(len(offsets) / 300)


def test_azure_trace_replay_reproduces_gaps_and_lengths_scaled():
    replay = TraceReplay(path="traces/AzureLLMInferenceTrace_conv.csv", speedup=4, start_s=60, length_scale=0.5)
    spec = LoadPlanSpec(type="trace", trace=replay, duration_s=30)
    schedule = trace_schedule(spec)
    rows = read_trace(replay.model_copy(update={"length_scale": 1.0}))
    window = [(t, row) for t, row in rows if 60 <= t < 60 + 30 * 4]
    assert len(schedule) == len(window) > 100
    for (offset, row), (stamp, original) in zip(schedule, window):
        assert offset == pytest.approx((stamp - 60) / 4)
        assert row.input_tokens == max(1, round(original.input_tokens * 0.5))
        assert row.output_tokens == max(1, round(original.output_tokens * 0.5))
    lines = (SCENARIOS / "traces/AzureLLMInferenceTrace_conv.csv").read_text().splitlines()
    assert lines[1].split(",")[1:] == [str(rows[0][1].input_tokens), str(rows[0][1].output_tokens)]


def test_mooncake_buckets_are_spread_and_keep_their_rows():
    spec = LoadPlanSpec(type="trace", duration_s=60, trace=TraceReplay(path="traces/mooncake_conversation_trace.jsonl"))
    schedule = trace_schedule(spec)
    raw = [json.loads(line) for line in (SCENARIOS / "traces/mooncake_conversation_trace.jsonl").open()]
    in_minute = [r for r in raw if r["timestamp"] < 60_000]
    assert len(schedule) == len(in_minute)
    offsets = np.asarray([t for t, _ in schedule])
    assert np.all(np.diff(offsets) >= 0)
    assert len(np.unique(np.round(offsets, 3))) > 0.95 * len(offsets)  # no longer 20 buckets of ~10
    for (offset, row), original in zip(schedule, in_minute):
        bucket = original["timestamp"] / 1000
        assert bucket <= offset < bucket + 3.01  # spread within its own ~3-s bucket
        assert row.hash_ids == tuple(original["hash_ids"]) and row.block_tokens == 512


def test_distributed_shares_partition_the_schedule():
    spec = LoadPlanSpec(type="poisson", rate=30, duration_s=10, seed=5)
    whole = LoadPlan(spec, start=0.0)
    single = [whole.next_slot(0.0) for _ in range(whole.scheduled_total)]
    shares = []
    for worker in range(3):
        plan = LoadPlan(spec, start=0.0, share=(worker, 3))
        while (slot := plan.next_slot(0.0)) is not None:
            shares.append(slot)
    assert sorted(shares, key=lambda s: s.index) == single


def test_a_ramped_closed_loop_spreads_its_users_first_requests():
    plan = LoadPlan(LoadPlanSpec(type="concurrency", users=4, ramp_s=2.0, duration_s=10), start=100.0)
    first = [plan.next_slot(now=99.0).due for _ in range(4)]
    assert first == pytest.approx([100.0, 100.5, 101.0, 101.5])
    assert plan.next_slot(now=103.0).due == 103.0  # later requests are due when a user takes them
    assert LoadPlan(LoadPlanSpec(type="concurrency", users=4, duration_s=10), start=100.0).next_slot(99.0).due == 100.0
    with pytest.raises(ValueError, match="ramp_s"):
        LoadPlanSpec(type="poisson", rate=5, ramp_s=1.0)

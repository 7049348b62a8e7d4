"""The walks of load profiles, with a fake measure: a real function that answers each step with a hand-made
summary, so the search logic is tested without a server: find-max's steps and stop reasons, sweeps' steps and
their end, and the settings metadata.json records."""

import json
from pathlib import Path

import pytest

from tests.summaries import step_summary
from tokenrig.loadgen.load_profiles import FindMax, SearchResult, StepPlan, Sweep, profile_from_metadata, walk
from tokenrig.loadgen.scenario import LoadPlanSpec
from tokenrig.loadgen.search import StepResult
from tokenrig.report.slo import parse_slos

BASE = LoadPlanSpec(type="poisson", rate=1.0, duration_s=60, seed=100)


def find_max_rate(measure, **settings) -> SearchResult:
    """The find-max walk with `measure(rate) -> StepResult`, to its conclusion."""
    profile = FindMax(**settings)
    return profile.conclude(walk(profile, BASE, None, lambda plan: measure(plan.value)))


def server(knee: float, window_s: float = 60.0, invalid_from: float | None = None):
    """A server that meets the SLOs up to `knee` req/s and misses them above; the load generator saturates
    from `invalid_from` req/s."""
    def measure(rate: float) -> StepResult:
        sent = round(rate * window_s)
        valid = invalid_from is None or rate < invalid_from
        return StepResult(rate, step_summary(window_s, sent, sent, slo_met=rate <= knee, valid=valid))
    return measure


def quiet(_line: str) -> None:
    pass


def test_the_search_probes_up_then_bisects_until_the_bracket_is_within_precision():
    result = find_max_rate(server(knee=10.0), start_rate=1.0, precision=0.05)
    # probe 1, 2, 4, 8, 16 (misses), then bisect: 12 (misses), 10 (meets), 11, 10.5 (miss): 10 .. 10.5 is 5 %
    assert [step.load for step in result.steps] == [1, 2, 4, 8, 16, 12, 10, 11, 10.5]
    assert (result.best, result.lowest_failing) == (10, 10.5)
    assert result.stop_reason == "bracketed within 5.0%"  # 10.5 / 10 - 1 is a hair above 0.05 in floating point


def test_the_search_probes_down_when_the_first_rate_misses():
    result = find_max_rate(server(knee=3.0), start_rate=16.0, precision=0.05)
    assert [step.load for step in result.steps[:3]] == [16, 8, 4]
    assert result.best <= 3.0 < result.lowest_failing and result.stop_reason.startswith("bracketed")


def test_slos_missed_at_every_rate_down_to_a_64th_of_the_start():
    result = find_max_rate(server(knee=0.001), start_rate=64.0)
    assert result.best is None and [step.load for step in result.steps] == [64, 32, 16, 8, 4, 2, 1]
    assert result.stop_reason == "SLOs missed even at 1 req/s"


def test_a_saturated_load_generator_ends_the_search_and_names_the_remedy():
    result = find_max_rate(server(knee=100.0, invalid_from=8.0), start_rate=1.0)
    assert [step.load for step in result.steps] == [1, 2, 4, 8]
    assert result.best == 4 and result.stop_reason == ("load generator invalid at 8 req/s (load generator CPU 97% "
                                                       "of a core): add load-generator workers (--workers N) or "
                                                       "lower the load")


@pytest.mark.parametrize("max_steps, reason", [
    (3, "step limit reached while probing"),  # 1, 2, 4 all meet: no bracket yet
    (6, "step limit reached (bracket 50.0% wide)"),  # 1, 2, 4, 8 meet, 16 and 12 miss: 8 .. 12
])
def test_the_step_limit_stops_the_search_and_says_where_it_stood(max_steps, reason):
    result = find_max_rate(server(knee=10.0), start_rate=1.0, precision=0.01, max_steps=max_steps)
    assert len(result.steps) == max_steps and result.stop_reason == reason


def test_a_step_that_fell_behind_or_had_errors_is_not_a_rate_that_met_the_slos():
    def measure(rate: float) -> StepResult:
        sent = round(rate * 60)
        # percentiles met everywhere, but from 6 req/s on the server completes only 5 req/s, and 4 req/s errs
        completed = min(sent, 5 * 60)
        return StepResult(rate, step_summary(60.0, sent, completed, slo_met=True, failed=3 if rate == 4 else 0))

    result = find_max_rate(measure, start_rate=1.0, precision=0.05)
    assert result.best < 4 and not any(step.slo_met for step in result.steps if step.load >= 4)


def sweep_walk(profile: Sweep, base: LoadPlanSpec, measure=None) -> tuple[list[StepPlan], list[StepResult], list[str]]:
    """The plans a sweep hands out, the steps it walked and its progress lines; `measure(plan)` answers
    each plan (by default a step that meets its SLOs at whatever load it was given)."""
    plans, lines = [], []

    def record(plan: StepPlan) -> StepResult:
        plans.append(plan)
        if measure:
            return measure(plan)
        return StepResult(plan.value, step_summary(60.0, round(plan.value * 60), round(plan.value * 60)))

    steps = walk(profile, base, None, record, progress=lines.append)
    return plans, steps, lines


def test_a_user_sweep_runs_each_count_in_order_closed_loop_with_its_own_seed_then_stops():
    base = LoadPlanSpec(type="poisson", rate=3.0, duration_s=30, warmup_s=5, cooldown_s=4, seed=100)
    profile = Sweep(loads=(1.0, 8.0, 32.0), users=True)
    plans, steps, lines = sweep_walk(profile, base)
    assert [step.load for step in steps] == [1, 8, 32]
    assert [(p.load.type, p.load.users, p.load.rate, p.load.seed) for p in plans] == [
        ("concurrency", 1, None, 100), ("concurrency", 8, None, 101), ("concurrency", 32, None, 102)]
    assert all(p.load.duration_s == 30 and p.load.cooldown_s == 4 and not p.stop_early for p in plans)
    assert lines == ["step 1: 1 users done", "step 2: 8 users done", "step 3: 32 users done"]
    assert profile.next_step(base, None, steps) is None
    assert [profile.label(p.value) for p in plans] == ["users-1", "users-8", "users-32"]


def test_a_rate_sweep_runs_open_loop_keeping_the_scenarios_arrival_process_and_length():
    gamma = LoadPlanSpec(type="gamma", rate=1.0, burstiness=2.0, duration_s=20, cooldown_s=8, seed=7)
    plans, steps, lines = sweep_walk(Sweep(loads=(0.5, 2.0)), gamma)
    assert [(p.load.type, p.load.rate, p.load.burstiness, p.load.seed) for p in plans] == [
        ("gamma", 0.5, 2.0, 7), ("gamma", 2.0, 2.0, 8)]
    assert all(p.load.duration_s == 20 and p.load.cooldown_s == 5 for p in plans)  # a cool-down of a 4th at most
    assert lines == ["step 1: 0.5 req/s done", "step 2: 2 req/s done"]
    closed = LoadPlanSpec(type="concurrency", users=4, duration_s=20, seed=7)
    plans, _, _ = sweep_walk(Sweep(loads=(3.0,)), closed)
    assert (plans[0].load.type, plans[0].load.rate) == ("poisson", 3.0)


def test_a_sweep_runs_every_value_whatever_its_steps_measure():
    """Unlike the SLO search, a sweep draws the whole curve: a step past the server's capacity, with errors
    or a saturated load generator, does not end it."""
    def overloaded(plan: StepPlan) -> StepResult:
        sent = round(plan.value * 60)
        return StepResult(plan.value, step_summary(60.0, sent, sent // 2, slo_met=False, failed=5, valid=False))

    profile = Sweep(loads=(4.0, 8.0, 16.0))
    _, steps, _ = sweep_walk(profile, LoadPlanSpec(type="poisson", rate=1.0, seed=0), overloaded)
    assert [step.load for step in steps] == [4, 8, 16] and all(step.saturated for step in steps)
    assert profile.document(steps) == {"mode": "sweep", "steps": [step.row() for step in steps]}


def test_find_max_steps_run_long_enough_for_their_slos_and_may_stop_early():
    base = LoadPlanSpec(type="concurrency", users=2, duration_s=60, warmup_s=2, cooldown_s=20, seed=5)
    profile = FindMax(start_rate=4.0, tail_samples=2, min_step_s=10, max_step_s=300)
    plan = profile.next_step(base, parse_slos("ttft_p99=1s"), [])
    # 2 samples beyond a p99: 200 requests, 50 s at 4 req/s after 2 s of warm-up
    assert (plan.value, plan.load.type, plan.load.rate, plan.load.duration_s) == (4.0, "poisson", 4.0, 52.0)
    assert plan.load.cooldown_s == 13.0 and plan.load.seed == 5 and plan.stop_early
    assert profile.next_step(base, None, []).load.duration_s == 60  # no SLOs: the scenario's length


@pytest.mark.parametrize("block", [
    {"mode": "sweep", "loads": [1.0, 32.0], "sweep_users": True, "start_rate": 1.0, "precision": 0.05,
     "tail_samples": 10, "min_step_s": 10.0, "max_step_s": 300.0, "max_steps": 16},
    {"mode": "find-max", "loads": None, "sweep_users": False, "start_rate": 4.0, "precision": 0.15,
     "tail_samples": 2, "min_step_s": 10.0, "max_step_s": 25.0, "max_steps": 16},
])
def test_the_search_block_of_metadata_keeps_its_shape_and_reads_back(block):
    """metadata.json's "search" as every run directory so far has it (docs/results): written the same, read back."""
    profile = profile_from_metadata(block)
    assert profile.metadata() == block and list(profile.metadata()) == list(block)


def test_every_recorded_search_in_docs_results_reads_back():
    blocks = [json.loads(path.read_text())["search"] for path in Path("docs/results").rglob("metadata.json")]
    blocks = [block for block in blocks if block]
    assert blocks
    for block in blocks:
        assert profile_from_metadata(block).metadata() == block

"""The walks of load profiles, with a fake measure: a real function that answers each step with a hand-made
summary, so the search logic is tested without a server: find-max's steps and stop reasons, its verdict rule
(met, missed or marginal at 95 %) and its interpolation, sweeps' steps and their end, and the settings
metadata.json records."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.summaries import step_summary
from tokenrig.errors import UsageError
from tokenrig.loadgen.load_profiles import (
    FindMax,
    SearchResult,
    StepPlan,
    Sweep,
    crossing,
    next_rate,
    profile_from_metadata,
    walk,
)
from tokenrig.loadgen.scenario import LoadPlanSpec
from tokenrig.metrics.slo import parse_slos, tail_design_effect, threshold_verdict
from tokenrig.metrics.verdict import StepResult
from tokenrig.report.console import render_steps

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


def test_the_search_probes_up_then_narrows_with_full_steps_until_the_bracket_is_within_precision():
    result = find_max_rate(server(knee=10.0), start_rate=1.0, precision=0.05)
    # probe 1, 2, 4, 8, 16 (misses); the hand-made steps have no percentiles to interpolate, so the full steps
    # go to the geometric middle: 11.3 (misses), 9.51 (meets), 10.4 (misses), 9.93 (meets): 4.4 % apart
    assert [round(step.load, 2) for step in result.steps] == [1, 2, 4, 8, 16, 11.31, 9.51, 10.37, 9.93]
    assert [step.probe for step in result.steps] == [True] * 5 + [False] * 4
    assert result.best == pytest.approx(9.93, abs=0.01) and result.lowest_failing == pytest.approx(10.37, abs=0.01)
    assert result.stop_reason == "bracketed within 4.4%"
    assert result.knee_interval == (result.best, result.lowest_failing)  # the hand-made verdicts are certain


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
    (6, "step limit reached (bracket 41.4% wide)"),  # 1, 2, 4, 8 meet, 16 and 11.3 miss: 8 .. 11.3
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
    slos = parse_slos("ttft_p99=1s")
    plan = profile.next_step(base, slos, [])
    # the first step is a probe: 20 requests, 5 s at 4 req/s, after 2 s of warm-up
    assert (plan.value, plan.load.type, plan.load.rate, plan.load.duration_s) == (4.0, "poisson", 4.0, 7.0)
    assert plan.probe and plan.stop_early and plan.load.seed == 5
    full = profile.step_load(base, 4.0, slos, 3)
    # a full step: 2 samples beyond a p99, 200 requests, 50 s at 4 req/s after 2 s of warm-up
    assert (full.duration_s, full.cooldown_s, full.seed) == (52.0, 13.0, 8)
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


def ttft_step(rate: float, p99_s: float, beyond: int, design_effect: float = 1.0, samples: int = 1000,
              probe: bool = False) -> StepResult:
    """A step at `rate` whose TTFT p99 over `samples` requests is `p99_s` against 200 ms, `beyond` of them over it,
    each sample worth 1 / `design_effect` independent ones."""
    sent = round(rate * samples / rate)
    summary = step_summary(samples / rate, sent, sent,
                           slos={"ttft_p99": (p99_s, 0.2, samples, beyond, design_effect)})
    return StepResult(rate, summary, probe=probe)


@pytest.mark.parametrize("samples, beyond, design_effect, verdict", [
    (1000, 2, 1, "met"),  # 1 % of 1000 is 10: 2 beyond is rare if p99 were at the threshold
    (1000, 10, 1, "marginal"),
    (1000, 20, 1, "missed"),
    (367, 0, 1, "marginal"),  # 0.99^367 = 2.5 %: too few for a p99 to be certain even with none beyond
    (368, 0, 1, "met"),
    (1000, 0, 3, "marginal"),  # slow requests in runs of 3: 1000 tell what 333 independent ones would
    (1000, 20, 2, "marginal"),  # 20 beyond, in pairs: 10 events in 500
    (1000, 60, 3, "missed"),
])
def test_a_step_is_certain_only_when_its_percentiles_exact_interval_lies_on_one_side(samples, beyond, design_effect,
                                                                                     verdict):
    result = threshold_verdict(samples, beyond, 99, design_effect=design_effect)
    assert result.verdict == verdict
    if result.certain:  # the posterior chance agrees with the certain verdicts (a uniform prior: near 97.5 %)
        assert result.probability_met > 0.97 if verdict == "met" else result.probability_met < 0.03


def test_the_design_effect_is_about_1_for_independent_latencies_and_large_for_runs_of_slow_ones():
    rng = np.random.default_rng(1)
    independent = rng.exponential(size=1000)
    bursts = np.repeat(rng.exponential(size=50), 20)  # the same latency 20 requests running
    assert tail_design_effect(independent) < 2.5 and tail_design_effect(bursts) > 10
    assert tail_design_effect(np.arange(50.0)) == 1.0  # too few for 10 batches of 10


def test_a_marginal_step_is_said_to_be_and_how_sure_and_the_interval_covers_it():
    steps = [ttft_step(50, 0.100, 0), ttft_step(80, 0.150, 1), ttft_step(84, 0.199, 9), ttft_step(88, 0.210, 12),
             ttft_step(120, 0.900, 600, design_effect=10)]
    result = FindMax(precision=0.05).conclude(steps)
    assert (result.best, result.lowest_failing) == (84, 88) and result.stop_reason == "bracketed within 4.8%"
    # 84 (9 beyond) and 88 (12 beyond) are both marginal: the knee is certain only between 80 and 120
    assert [step.certainty.verdict for step in steps] == ["met", "met", "marginal", "marginal", "missed"]
    assert result.knee_interval == (80, 120)
    assert result.knee == pytest.approx(84 + 4 * -np.log(0.199 / 0.2) / (np.log(0.21 / 0.2) - np.log(0.199 / 0.2)))
    assert result.reason() == ("bracketed within 4.8%; knee 84.4 req/s by interpolation, 95 %: 80 to 120 req/s")
    document = FindMax(precision=0.05).document(steps)
    table = render_steps(document, "t", parse_slos("ttft_p99=200ms"))
    assert "meets SLOs (marginal: 54% likely met)" in table and "misses SLOs (marginal: 21% likely met)" in table


def test_the_next_rate_is_where_the_percentile_interpolated_against_the_rate_crosses_its_threshold():
    met, missed = ttft_step(50, 0.100, 0), ttft_step(100, 0.800, 500, design_effect=10)
    # log(0.1 / 0.2) = -0.693 at 50 req/s, log(0.8 / 0.2) = 1.386 at 100: the line crosses 0 at 66.7 req/s
    assert next_rate([met, missed], 0.05) == pytest.approx(50 + 50 * 0.6931 / 2.0794, rel=1e-3)
    assert crossing(met, missed) == pytest.approx(66.67, rel=1e-3)
    # two met steps running: the missed end counts half as far from the threshold (Illinois), so the next rate
    # moves towards it: 73.8 req/s rather than plain regula falsi's 72.0
    steps = [met, missed, ttft_step(66.7, 0.164, 0), ttft_step(70, 0.181, 1)]
    low, high = np.log(0.181 / 0.2), np.log(4.0) / 2
    assert next_rate(steps, 0.05) == pytest.approx(70 + 30 * -low / (high - low), rel=1e-3)
    # a crossing hard by an end is moved half the precision inside, so that the step can close the bracket
    assert next_rate([ttft_step(50, 0.199, 5), missed], 0.05) == pytest.approx(50 * 1.025)
    assert next_rate([met, ttft_step(100, 0.2001, 11)], 0.05) == pytest.approx(100 / 1.025)


def test_a_probe_that_bounds_the_answer_is_judged_again_by_a_full_step():
    steps = [ttft_step(64, 0.05, 0, samples=20, probe=True), ttft_step(66, 0.9, 400, design_effect=10)]
    result = FindMax(precision=0.05).conclude(steps)
    assert result.next_rate == 64 and not result.next_probe and not result.stop_reason


def test_the_full_step_that_judged_a_probes_rate_again_ends_the_bracket():
    """A --url search at 3-s steps: the probe at 4 req/s missed (a first look), 2.67 met, the full step at 4 missed
    too; the bracket is within its precision, so the search stops (it ran the full step at 4 again 13 times)."""
    steps = [ttft_step(1, 0.05, 0, samples=20, probe=True), ttft_step(4, 0.25, 1, samples=20, probe=True),
             ttft_step(2.667, 0.1, 0), ttft_step(4, 0.25, 1, samples=20)]
    result = FindMax(precision=1.0).conclude(steps)
    assert result.next_rate is None and result.stop_reason.startswith("bracketed"), result
    assert (result.best, result.lowest_failing) == (2.667, 4)


def test_a_scenario_whose_users_ramp_up_searches_open_loop_rates():
    """A scenario's closed loop may spread its users' first requests (ramp_s); --find-max and a rate sweep step
    through open-loop rates from it, which have no users to ramp (the step's plan was refused)."""
    ramped = LoadPlanSpec(type="concurrency", users=8, ramp_s=0.8, duration_s=8, warmup_s=1.5)
    for step in (FindMax().step_load(ramped, 2.0, parse_slos("ttft_p90=300ms"), 0),
                 Sweep(loads=(2.0,)).step_load(ramped, 2.0, None, 0)):
        assert (step.type, step.rate, step.ramp_s) == ("poisson", 2.0, 0)


def test_probes_go_up_4x_while_far_under_the_slo_then_2x():
    far, near = ttft_step(8, 0.05, 0, samples=20, probe=True), ttft_step(8, 0.15, 0, samples=20, probe=True)
    assert FindMax().conclude([far]).next_rate == 32 and FindMax().conclude([near]).next_rate == 16


def late_server(knee: float, late_rates: dict[float, int]):
    """`server(knee)` whose load generator sends late, and is otherwise fine, the first `late_rates[rate]`
    times a rate is measured."""
    seen: dict[float, int] = {}

    def measure(rate: float) -> StepResult:
        seen[rate] = seen.get(rate, 0) + 1
        sent = round(rate * 60)
        late = seen[rate] <= late_rates.get(rate, 0)
        return StepResult(rate, step_summary(60.0, sent, sent, slo_met=rate <= knee, late_sends_only=late))
    return measure


def test_a_step_whose_one_fault_was_a_few_late_sends_is_run_again_not_the_end_of_the_search():
    """On a busy host the first step met every SLO with 4 of 313 sends late; the search stopped there, saying
    no rate met every SLO, while its table showed one that did."""
    lines: list[str] = []
    profile = FindMax(start_rate=1.0, precision=0.05)
    measure = late_server(10.0, {1.0: 1})
    steps = walk(profile, BASE, None, lambda plan: measure(plan.value), progress=lines.append)
    result = profile.conclude(steps)
    assert [step.load for step in steps[:3]] == [1, 1, 2] and result.stop_reason.startswith("bracketed")
    assert result.best <= 10 < result.lowest_failing and not result.notes
    assert lines[0] == "probe 1: 1 req/s -> meets SLOs (load generator late: run again)"
    assert "(sends late: run again)" in render_steps(profile.document(steps), "t", parse_slos("ttft_p99=1s"))


def test_a_step_late_twice_running_counts_and_the_search_says_so():
    profile = FindMax(start_rate=1.0, precision=0.05)
    measure = late_server(10.0, {4.0: 2})
    steps = walk(profile, BASE, None, lambda plan: measure(plan.value), progress=quiet)
    result = profile.conclude(steps)
    assert [step.load for step in steps[:5]] == [1, 2, 4, 4, 8] and result.best <= 10 < result.lowest_failing
    assert result.notes == ["4 req/s: sends late twice running (lag up to 40 ms): its verdict is counted, as the "
                            "load it offered was at most that much later and lighter"]
    document = profile.document(steps)
    assert document["notes"] == result.notes and document["max_rate_meeting_slos"] == result.best
    assert "note: 4 req/s: sends late twice running" in render_steps(document, "t", parse_slos("ttft_p99=1s"))


def test_the_conclusion_never_says_no_rate_met_when_a_row_did():
    """Late sends at 1 req/s (met), then a load generator out of CPU on the run again: no verdict to stand on,
    and the conclusion says why rather than that nothing met the SLOs."""
    steps = [StepResult(1.0, step_summary(60.0, 60, 60, late_sends_only=True)),
             StepResult(1.0, step_summary(60.0, 60, 60, valid=False))]
    profile = FindMax()
    result = profile.conclude(steps)
    assert result.best is None and result.next_rate is None and result.stop_reason.startswith("load generator invalid")
    table = render_steps(profile.document(steps), "t", parse_slos("ttft_p99=1s"))
    assert "no rate met every SLO with its load generator valid" in table and "no rate tried" not in table


def test_once_a_full_step_refutes_a_probe_the_search_trusts_full_steps_only():
    """13B on an H100: probes met at 8 and 16 req/s, full steps missed at 16.4 and 16, then the search spent
    three full steps narrowing towards the probe at 8 (8.83, 8.2) before judging 8 itself (missed)."""
    def measure(plan: StepPlan) -> StepResult:
        knee = 16.0 if plan.probe else 7.3  # a short probe does not see this server's overload
        sent = round(plan.value * 60)
        return StepResult(plan.value, step_summary(60.0, sent, sent, slo_met=plan.value <= knee))

    profile = FindMax(start_rate=8.0, precision=0.05)
    result = profile.conclude(walk(profile, BASE, None, measure))
    loads = [(round(step.load, 2), step.probe) for step in result.steps]
    refuted = next(i for i, (load, probe) in enumerate(loads) if not probe and load <= 16)
    # from the first full step at or below a probe that met: halving in full steps, then narrowing
    assert loads[refuted + 1:refuted + 3] == [(8, False), (4, False)]
    assert not any(probe for _, probe in loads[refuted:])
    assert result.best <= 7.3 < result.lowest_failing and result.stop_reason.startswith("bracketed")


@pytest.mark.parametrize("warmup, cooldown, shortest", [(30, 5, 35), (3, 5, 4)])
def test_a_longest_step_that_leaves_nothing_after_warm_up_and_cool_down_is_refused_by_flag(warmup, cooldown,
                                                                                          shortest):
    """A step's cool-down is cut to a quarter of the step: the shortest --max-step is the warm-up plus the
    scenario's cool-down, or 4/3 of the warm-up where that quarter is the shorter."""
    base = LoadPlanSpec(type="poisson", rate=1.0, duration_s=600, warmup_s=warmup, cooldown_s=cooldown)
    with pytest.raises(UsageError, match=f"--max-step {shortest:g} s .* give --max-step above {shortest:g},"):
        FindMax(max_step_s=shortest).check_window(base)
    FindMax(max_step_s=shortest * 1.01).check_window(base)
    slos = parse_slos("ttft_p99=1s")
    with pytest.raises(UsageError):
        FindMax(max_step_s=shortest).next_step(base, slos, [])

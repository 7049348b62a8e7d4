"""The command line's load settings over a scenario's: what each flag replaces, the profile the flags ask
for, where the seed comes from, and the refusals, worded for the flags."""

import pytest

from tokenrig.errors import UsageError
from tokenrig.loadgen.load_profiles import FindMax, SingleRun, Sweep
from tokenrig.loadgen.overrides import LoadOverrides, plan_run
from tokenrig.loadgen.scenario import Scenario
from tokenrig.metrics.slo import parse_slos

REQUESTS = [{"name": "short", "api": "chat", "input_tokens": {"dist": "fixed", "value": 64},
             "output_tokens": {"dist": "fixed", "value": 16}}]
SLOS = parse_slos("ttft_p99=500ms")


def scenario(**load) -> Scenario:
    return Scenario.model_validate({"name": "test", "requests": REQUESTS, "load": load})


CLOSED = scenario(type="concurrency", users=4, ramp_s=2, duration_s=30, warmup_s=3, seed=11)
STAGED = scenario(type="poisson", stages=[{"duration_s": 20, "rate": 1}, {"duration_s": 20, "rate": 5}])


def test_no_flags_run_the_scenario_once_as_written_with_its_seed():
    run = plan_run(CLOSED, LoadOverrides(), None)
    assert isinstance(run.profile, SingleRun) and run.scenario == CLOSED and run.seed_source == "scenario"


def test_seed_from_the_flag_the_scenario_or_a_fresh_draw():
    assert plan_run(CLOSED, LoadOverrides(seed=5), None).scenario.load.seed == 5
    assert plan_run(CLOSED, LoadOverrides(seed=5), None).seed_source == "--seed"
    draws = {plan_run(STAGED, LoadOverrides(), None).scenario.load.seed for _ in range(4)}
    assert plan_run(STAGED, LoadOverrides(), None).seed_source == "random" and len(draws) > 1


def test_rate_turns_any_load_into_an_open_loop_of_that_arrival_process():
    load = plan_run(CLOSED, LoadOverrides(rate=2.5, arrival="gamma", burstiness=3.0), None).scenario.load
    assert (load.type, load.rate, load.burstiness, load.ramp_s, load.duration_s) == ("gamma", 2.5, 3.0, 0, 30)
    staged = plan_run(STAGED, LoadOverrides(rate=2.0), None).scenario.load
    assert (staged.type, staged.rate, staged.stages, staged.duration_s) == ("poisson", 2.0, None, 40)


def test_users_turn_an_open_loop_into_a_closed_one():
    load = plan_run(STAGED, LoadOverrides(users=8, duration_s=12, warmup_s=1), None).scenario.load
    assert (load.type, load.users, load.rate, load.stages, load.duration_s, load.warmup_s) == (
        "concurrency", 8, None, None, 12, 1)


def test_find_max_starts_at_the_rate_given_or_at_one_request_per_second():
    run = plan_run(CLOSED, LoadOverrides(find_max=True, rate=3.0, precision=0.1, tail_samples=4, max_step_s=60),
                   SLOS)
    assert run.profile == FindMax(start_rate=3.0, precision=0.1, tail_samples=4, max_step_s=60)
    assert plan_run(CLOSED, LoadOverrides(find_max=True), SLOS).profile.start_rate == 1.0


def test_quick_is_a_find_max_of_fewer_samples_per_step():
    quick = plan_run(CLOSED, LoadOverrides(find_max=True, quick=True), SLOS).profile
    assert (quick.tail_samples, quick.min_step_s) == (3, 3.0)
    default = plan_run(CLOSED, LoadOverrides(find_max=True), SLOS).profile
    assert (default.tail_samples, default.min_step_s) == (10, 10.0)


def test_a_rate_sweep_over_a_closed_loop_scenario_runs_open_loop_from_its_first_value():
    run = plan_run(CLOSED, LoadOverrides(sweep="2, 4,8"), None)
    assert run.profile == Sweep(loads=(2.0, 4.0, 8.0))
    assert (run.scenario.load.type, run.scenario.load.rate) == ("poisson", 2.0)


def test_a_user_sweep_keeps_the_scenarios_load_for_the_profile_to_vary():
    run = plan_run(STAGED, LoadOverrides(users="sweep", sweep="1,16", rate=2.0), None)
    assert run.profile == Sweep(loads=(1.0, 16.0), users=True)
    assert (run.scenario.load.type, run.scenario.load.rate) == ("poisson", 2.0)


def test_find_max_over_a_ramped_closed_loop_scenario_steps_open_loop_without_the_ramp():
    run = plan_run(CLOSED, LoadOverrides(find_max=True), SLOS)
    step = run.profile.next_step(run.scenario.load, SLOS, []).load
    assert (step.type, step.rate, step.ramp_s, step.users, step.seed) == ("poisson", 1.0, 0, 4, 11)


def test_a_user_sweep_step_is_a_closed_loop_keeping_its_ramp():
    step = Sweep(loads=(3.0,), users=True).step_load(CLOSED.load.as_open_loop(2.0), 3.0, None, step=1)
    assert (step.type, step.users, step.rate, step.ramp_s, step.seed) == ("concurrency", 3, None, 0, 12)
    assert Sweep(loads=(3.0,), users=True).step_load(CLOSED.load, 3.0, None, step=0).ramp_s == 2


def test_the_throughput_mode_drops_every_other_shape_and_takes_its_streams_from_the_in_flight_cap():
    load = plan_run(STAGED, LoadOverrides(rate=float("inf"), max_in_flight=32), None).scenario.load
    assert (load.type, load.users, load.rate, load.stages, load.trace) == ("throughput", 32, None, None, None)


@pytest.mark.parametrize("overrides, slos, message", [
    (LoadOverrides(users=2, rate=1.0), None, "give --users (closed loop) or --rate (open loop), not both"),
    (LoadOverrides(find_max=True), None, "--find-max needs --slo, e.g. --slo ttft_p99=500ms,tpot_p99=50ms"),
    (LoadOverrides(sweep="1,two"), None, "--sweep takes comma-separated numbers, not '1,two'"),
    (LoadOverrides(find_max=True, quick=True, tail_samples=5), SLOS,
     "--quick sets the samples per step (--tail-samples 3): give one of them"),
    (LoadOverrides(quick=True), SLOS, "--quick is a setting of --find-max: add --find-max --slo ..."),
    (LoadOverrides(duration_s=2, warmup_s=3), None,
     "--duration 2 s leaves nothing to measure after the warm-up (--warmup 3 s) and cool-down (the scenario's "
     "load.cooldown_s 0 s): give --duration above 3, or a shorter --warmup"),
    (LoadOverrides(duration_s=3), None,  # the scenario's own 3-s warm-up
     "--duration 3 s leaves nothing to measure after the warm-up (the scenario's load.warmup_s 3 s) and cool-down "
     "(the scenario's load.cooldown_s 0 s): give --duration above 3, or a shorter --warmup"),
    (LoadOverrides(find_max=True, max_step_s=2.5, warmup_s=3), SLOS,
     "--max-step 2.5 s leaves nothing to measure after the warm-up (3 s) and cool-down (0 s): give --max-step above "
     "3, or a shorter --warmup"),
    (LoadOverrides(find_max=True, sweep="1,2"), SLOS,
     "give --find-max (search for the highest rate within the SLOs) or --sweep (run the rates given), not both"),
])
def test_settings_that_do_not_go_together_are_refused_by_flag(overrides, slos, message):
    with pytest.raises(UsageError) as error:
        plan_run(CLOSED, overrides, slos)
    assert str(error.value) == message


"""find_max_rate's walk and stop reasons, with a fake measure: a real function that answers each rate with a
hand-made summary, so the search logic is tested without a server."""

import pytest

from tests.summaries import step_summary
from tokenrig.loadgen.search import StepResult, find_max_rate


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
    result = find_max_rate(server(knee=10.0), start_rate=1.0, precision=0.05, progress=quiet)
    # probe 1, 2, 4, 8, 16 (misses), then bisect: 12 (misses), 10 (meets), 11, 10.5 (miss): 10 .. 10.5 is 5 %
    assert [step.load for step in result.steps] == [1, 2, 4, 8, 16, 12, 10, 11, 10.5]
    assert (result.best, result.lowest_failing) == (10, 10.5)
    assert result.stop_reason == "bracketed within 5.0%"  # 10.5 / 10 - 1 is a hair above 0.05 in floating point


def test_the_search_probes_down_when_the_first_rate_misses():
    result = find_max_rate(server(knee=3.0), start_rate=16.0, precision=0.05, progress=quiet)
    assert [step.load for step in result.steps[:3]] == [16, 8, 4]
    assert result.best <= 3.0 < result.lowest_failing and result.stop_reason.startswith("bracketed")


def test_slos_missed_at_every_rate_down_to_a_64th_of_the_start():
    result = find_max_rate(server(knee=0.001), start_rate=64.0, progress=quiet)
    assert result.best is None and [step.load for step in result.steps] == [64, 32, 16, 8, 4, 2, 1]
    assert result.stop_reason == "SLOs missed even at 1 req/s"


def test_a_saturated_load_generator_ends_the_search_and_names_the_remedy():
    result = find_max_rate(server(knee=100.0, invalid_from=8.0), start_rate=1.0, progress=quiet)
    assert [step.load for step in result.steps] == [1, 2, 4, 8]
    assert result.best == 4 and result.stop_reason == "load generator saturated at 8 req/s: add --workers"


@pytest.mark.parametrize("max_steps, reason", [
    (3, "step limit reached while probing"),  # 1, 2, 4 all meet: no bracket yet
    (6, "step limit reached (bracket 50.0% wide)"),  # 1, 2, 4, 8 meet, 16 and 12 miss: 8 .. 12
])
def test_the_step_limit_stops_the_search_and_says_where_it_stood(max_steps, reason):
    result = find_max_rate(server(knee=10.0), start_rate=1.0, precision=0.01, max_steps=max_steps, progress=quiet)
    assert len(result.steps) == max_steps and result.stop_reason == reason


def test_a_step_that_fell_behind_or_had_errors_is_not_a_rate_that_met_the_slos():
    def measure(rate: float) -> StepResult:
        sent = round(rate * 60)
        # percentiles met everywhere, but from 6 req/s on the server completes only 5 req/s, and 4 req/s errs
        completed = min(sent, 5 * 60)
        return StepResult(rate, step_summary(60.0, sent, completed, slo_met=True, failed=3 if rate == 4 else 0))

    result = find_max_rate(measure, start_rate=1.0, precision=0.05, progress=quiet)
    assert result.best < 4 and not any(step.slo_met for step in result.steps if step.load >= 4)

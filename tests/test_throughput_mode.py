"""The saturating throughput mode (`--rate inf`, as vllm bench serve's `--request-rate inf` and GuideLLM's
`--profile throughput`): `--max-in-flight` requests sent at once, each replaced the moment it ends, labelled as
throughput figures in the console, summary.json and the report."""

import json

import pytest

from tests.conftest import DATA, run_cli, run_dir_of
from tokenrig.errors import UsageError
from tokenrig.loadgen.overrides import LoadOverrides, plan_run
from tokenrig.loadgen.plan import LoadPlan
from tokenrig.loadgen.scenario import ScenarioError, load_scenario, parse_scenario
from tokenrig.metrics.records import read_records
from tokenrig.metrics.run_summary import THROUGHPUT_MODE_NOTE
from tokenrig.metrics.slo import parse_slos
from tokenrig.report.runs import find_runs

INF = float("inf")


def test_rate_inf_is_a_closed_loop_of_max_in_flight_streams_sent_at_once():
    run = plan_run(load_scenario("chat"), LoadOverrides(rate=INF, max_in_flight=8), None)
    load = run.scenario.load
    assert load.type == "throughput" and load.users == 8 and load.rate is None
    plan = LoadPlan(load, start=100.0)
    assert not plan.open_loop and plan.pool_size == 8 and plan.target_rate is None
    assert [plan.next_slot(100.0).due for _ in range(8)] == [100.0] * 8  # all due at the start, no ramp
    assert plan.describe() == "throughput mode: 8 requests in flight, each replaced as it ends"
    default = plan_run(load_scenario("chat"), LoadOverrides(rate=INF), None).scenario.load
    assert default.users == default.max_in_flight == 512
    capped = plan_run(load_scenario("chat"), LoadOverrides(rate=5, max_in_flight=16), None).scenario.load
    assert capped.type == "poisson" and LoadPlan(capped).pool_size == 16  # --max-in-flight: the open loop's cap
    yaml = parse_scenario(DATA.joinpath("timing.yaml").read_text().replace("type: concurrency", "type: throughput"))
    assert yaml.load.type == "throughput" and yaml.load.users


@pytest.mark.parametrize("overrides, message", [
    (LoadOverrides(rate=INF, find_max=True), "--rate inf is the throughput mode, one run saturating the server: "
                                             "drop --find-max"),
    (LoadOverrides(rate=INF, sweep="1,2"), "drop --sweep"),
    (LoadOverrides(rate=INF, burstiness=2.0), "--burstiness shapes open-loop arrivals"),
    (LoadOverrides(rate=INF, users=4), "give --users (closed loop) or --rate (open loop), not both"),
    (LoadOverrides(sweep="1,inf"), "--sweep takes finite numbers above 0"),
    (LoadOverrides(users=4, max_in_flight=8), "--max-in-flight caps an open loop (--rate)"),
])
def test_throughput_mode_refuses_what_does_not_go_with_it(overrides, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_run(load_scenario("chat"), overrides, parse_slos("ttft_p99=1s") if overrides.find_max else None)


def test_an_infinite_rate_in_a_scenario_file_is_refused():
    text = DATA.joinpath("timing.yaml").read_text().replace("type: concurrency", "type: poisson\n  rate: .inf")
    with pytest.raises(ScenarioError, match="load.rate"):
        parse_scenario(text)


def test_loadtest_rate_inf_saturates_and_says_its_figures_are_throughput(tmp_path):
    result = run_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "20", "--sim-tpot-ms", "5", "--rate", "inf",
                     "--max-in-flight", "6", "--scenario", str(DATA / "timing.yaml"), "--duration", "3",
                     "--warmup", "0.5", "--results", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert THROUGHPUT_MODE_NOTE in result.stdout
    assert "throughput mode: 6 requests in flight, each replaced as it ends" in result.stdout
    run_dir = run_dir_of(result)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["load"]["throughput_mode"] is True and summary["load"]["spec"]["type"] == "throughput"
    records = read_records(run_dir / "requests.jsonl")
    first = min(r.scheduled_at for r in records)
    # six sent at once, the rest as slots freed (the first can end no sooner than 20 + 49 x 5 ms after it was sent)
    assert sum(r.scheduled_at - first < 0.2 for r in records) == 6
    # never more than six in flight: each request is due (and sent) after one ends; E2E counts from the due time
    events = sorted([(r.scheduled_at, 1) for r in records] +
                    [(r.scheduled_at + r.e2e_s, -1) for r in records if r.e2e_s is not None])
    in_flight = peak = 0
    for _, change in events:
        in_flight += change
        peak = max(peak, in_flight)
    assert peak == 6
    [run] = find_runs([run_dir], progress=lambda *_: None).load
    assert THROUGHPUT_MODE_NOTE in run.steps[0].notices()  # the HTML report's notice for the run

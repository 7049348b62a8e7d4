"""The per-core chunk ceiling: the shipped figure or the one measured on this machine, what a plan asks for,
what `tokenrig loadtest` says before it starts, and the summary's validity check after."""

import dataclasses
import json

import pytest

from tests.conftest import REPO, run_cli
from tokenrig.loadgen.ceiling import (
    CEILING_FILE_ENV,
    capacity_advice,
    expected_chunk_rate,
    free_cores,
    per_core_ceiling,
    save_ceiling,
    this_machine,
    workers_needed,
)
from tokenrig.loadgen.plan import trace_schedule
from tokenrig.loadgen.scenario import load_scenario
from tokenrig.metrics.health import CHUNKS_PER_S_PER_CORE, SHIPPED, Ceiling
from tokenrig.metrics.records import RequestRecord
from tokenrig.metrics.summary import RunFacts, summarize

TIMING = REPO / "tests" / "data" / "timing.yaml"  # fixed 50 output tokens, 1 user


def with_load(scenario, **load):
    return scenario.model_copy(update={"load": scenario.load.model_copy(update=load)})


def test_expected_chunk_rate_of_closed_open_and_trace_plans():
    scenario = load_scenario(str(TIMING))
    assert scenario.mean_tokens("output_tokens") == 50
    assert expected_chunk_rate(with_load(scenario, users=300), tpot_s=0.010) == pytest.approx(30_000)
    poisson = with_load(scenario, type="poisson", rate=40.0, users=None)
    assert expected_chunk_rate(poisson) == pytest.approx(40 * 50)
    trace = load_scenario("azure_conv_replay")
    rows = trace_schedule(trace.load)
    assert expected_chunk_rate(trace) == pytest.approx(sum(r.output_tokens for _, r in rows) / trace.load.duration_s)


def test_advice_names_the_workers_a_plan_needs():
    assert capacity_advice(CHUNKS_PER_S_PER_CORE * 0.9, None, SHIPPED) is None
    assert capacity_advice(CHUNKS_PER_S_PER_CORE * 1.5, 2, SHIPPED) is None
    advice = capacity_advice(CHUNKS_PER_S_PER_CORE * 2.5, None, SHIPPED)
    assert "--workers 3" in advice and workers_needed(CHUNKS_PER_S_PER_CORE * 2.5, SHIPPED) == 3
    assert "(docs/results/loadgen-capacity.md)" in advice


def test_a_ceiling_measured_here_replaces_the_shipped_one_on_this_machine_only(tmp_path, monkeypatch):
    path = tmp_path / "ceiling.json"
    monkeypatch.setenv(CEILING_FILE_ENV, str(path))
    assert per_core_ceiling() == SHIPPED  # nothing measured yet
    assert save_ceiling(23_901.7, "2026-11-30 22:50 UTC by make bench-loadgen") == path
    measured = per_core_ceiling()
    assert measured.chunks_per_s == 23_901 and "measured on this machine 2026-11-30 22:50 UTC" in measured.source
    assert str(path) in measured.source
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "machine": "another host / another CPU / 64 CPUs"}))  # a shared home
    assert per_core_ceiling() == SHIPPED
    path.write_text("{not json")
    assert per_core_ceiling() == SHIPPED


def test_loadtest_cites_the_ceiling_measured_on_this_machine(tmp_path):
    env = {CEILING_FILE_ENV: str(tmp_path / "ceiling.json")}
    (tmp_path / "ceiling.json").write_text(json.dumps({"chunks_per_s": 400, "machine": this_machine(),
                                                       "measured": "2026-11-30 by make bench-loadgen"}))
    # 9 users at 10 ms a token: 900 chunks/s, under the shipped ceiling but over three of 400
    result = run_cli("loadtest", "--backend", "sim", "--model", "tiny", "--scenario", str(TIMING), "--users", "9",
                     "--sim-ttft-ms", "10", "--sim-tpot-ms", "10", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert ("one load-generator core times about 400 chunks/s exactly (measured on this machine 2026-11-30 by make "
            "bench-loadgen") in result.stdout
    assert "it needs --workers 3" in result.stdout


def test_loadtest_says_before_starting_that_a_plan_exceeds_one_core():
    users = int(CHUNKS_PER_S_PER_CORE * 0.010 * 2) + 1  # at 10 ms a token: just over two cores' worth
    result = run_cli("loadtest", "--backend", "sim", "--model", "tiny", "--scenario", str(TIMING),
                     "--users", str(users), "--sim-ttft-ms", "10", "--sim-tpot-ms", "10", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"warning: this plan streams about {users * 100:,} chunks/s" in result.stdout
    assert "it needs --workers 3" in result.stdout
    auto = run_cli("loadtest", "--backend", "sim", "--model", "tiny", "--scenario", str(TIMING), "--users", str(users),
                   "--sim-ttft-ms", "10", "--sim-tpot-ms", "10", "--dry-run", "--workers", "auto")
    chosen = min(3, free_cores())
    assert f"load generator: {chosen} process" in auto.stdout


def test_summary_is_invalid_past_the_ceiling_per_load_process():
    # one second of window, each request one chunk a millisecond: 1.5 x the ceiling in chunks/s
    per_request = 1000
    requests = int(CHUNKS_PER_S_PER_CORE * 1.5) // per_request
    records = [RequestRecord(request_id=i, request_class="c", api="chat", scheduled_at=100.0, send_lag_s=0.0,
                             slot_late=False, in_window=True, prompt_tokens_sent=8, max_tokens=per_request, status=200,
                             ttft_s=0.001, e2e_s=1.0,
                             chunk_offsets_s=[(k + 1) / per_request for k in range(per_request - 1)],
                             chunk_tokens=[1] * (per_request - 1), output_tokens_usage=per_request - 1)
               for i in range(requests)]
    facts = dict(duration_s=1.0, warmup_s=0.0, cooldown_s=0.0, plan_start_unix=100.0, target_rate=None,
                 client_cpu_fraction=0.5)
    one = summarize(records, RunFacts(**facts)).load_generator
    assert not one.valid and any("chunks/s per load-generator process" in p for p in one.problems)
    assert one.chunks_per_s_ceiling == CHUNKS_PER_S_PER_CORE
    two = summarize(records, RunFacts(**facts, load_processes=2)).load_generator
    assert two.valid, two.problems
    measured = Ceiling(CHUNKS_PER_S_PER_CORE * 2, "measured on this machine")  # a faster core measured here
    faster = summarize(records, RunFacts(**facts, ceiling=measured)).load_generator
    assert faster.valid and faster.chunks_per_s_ceiling == CHUNKS_PER_S_PER_CORE * 2, faster.problems
    slower_facts = RunFacts(**facts, load_processes=2, ceiling=Ceiling(4_000, "measured here"))
    slower = summarize(records, slower_facts).load_generator
    assert any("above the 4,000 one core times exactly (measured here)" in p for p in slower.problems)
    # a failed request's tokens are not throughput, but the client timed its chunks all the same
    failed = [dataclasses.replace(record, error="JSONDecodeError: garbage after the stream") for record in records]
    summary = summarize(failed, RunFacts(**facts))
    assert summary.throughput.output_tokens_per_s == 0
    assert any("chunks/s per load-generator process" in p for p in summary.load_generator.problems)


def test_a_run_past_the_ceiling_is_invalid_and_exits_4(tmp_path):
    """A ceiling of 20 chunks/s kept for this machine, 2 users streaming 100 chunks/s each: the console says
    INVALID RUN and the exit status says there is no answer (4), so a script does not take its numbers."""
    env = {CEILING_FILE_ENV: str(tmp_path / "ceiling.json")}
    (tmp_path / "ceiling.json").write_text(json.dumps({"chunks_per_s": 20, "machine": this_machine(),
                                                       "measured": "a test's own figure"}))
    result = run_cli("loadtest", "--backend", "sim", "--model", "tiny", "--scenario", str(TIMING), "--users", "2",
                     "--sim-ttft-ms", "10", "--sim-tpot-ms", "10", "--duration", "3", "--warmup", "0.5",
                     "--results", str(tmp_path / "results"), env=env)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "INVALID RUN: the load generator was the bottleneck" in result.stdout

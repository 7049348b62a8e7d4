"""Distributed load: a master and 2 local workers split one schedule and merge every record."""

import numpy as np
import pytest

from tests.conftest import load_summary, run_cli, run_dir_of
from tests.schedule import assert_latency_follows_schedule
from tokenrig.loadgen.records import read_records

ARGS = ("loadtest", "--backend", "sim", "--sim-ttft-ms", "100", "--sim-tpot-ms", "10",
        "--scenario", "tests/data/timing.yaml", "--rate", "12", "--duration", "6", "--warmup", "1")


def run(tmp_path, *extra):
    result = run_cli(*ARGS, "--results", str(tmp_path), *extra, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(result)
    return read_records(run_dir / "requests.jsonl"), load_summary(run_dir)


def test_two_workers_send_the_single_process_schedule_and_merge_exactly(tmp_path):
    single, single_summary = run(tmp_path / "one", "--seed", "7")
    merged, summary = run(tmp_path / "two", "--workers", "2", "--seed", "7")

    # the same seeded schedule, each arrival sent exactly once by one of the workers
    assert sorted(r.arrival_index for r in merged) == sorted(r.arrival_index for r in single) == list(range(len(single)))

    def offsets(records):
        start = min(r.scheduled_at for r in records)
        return np.asarray([r.scheduled_at - start for r in sorted(records, key=lambda r: r.arrival_index)])

    assert np.allclose(offsets(merged), offsets(single), atol=1e-3)
    assert [w["index"] for w in summary["load_generator"]["workers"]] == [0, 1]

    # percentiles are computed over every merged record, not averaged per worker
    ok = [r for r in merged if r.in_window and r.ok]
    assert summary["requests"]["ok"] == len(ok) and summary["requests"]["failed"] == 0
    for name, values in (("ttft", [r.ttft_s for r in ok]), ("itl", [g for r in ok for g in r.itl_gaps()])):
        for p in (50, 90, 99):
            assert summary["latency_s"][name][f"p{p}"] == np.percentile(values, p)

    # and they agree with one process sending the same schedule (the server's 100 ms / 10 ms)
    for name in ("itl", "tpot"):  # per-token times follow the server's absolute deadlines in both runs
        assert summary["latency_s"][name]["p50"] == pytest.approx(single_summary["latency_s"][name]["p50"], abs=0.002)
    assert_latency_follows_schedule(summary["latency_s"])  # TTFT carries each run's own request handling
    assert_latency_follows_schedule(single_summary["latency_s"])
    assert summary["load_generator"]["valid"], summary["load_generator"]["problems"]

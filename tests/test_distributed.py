"""Distributed load: a master and 2 local workers split one schedule and merge every record."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, load_summary, run_cli, run_dir_of
from tests.schedule import assert_latency_follows_schedule
from tokenrig.loadgen.plan import LoadPlan
from tokenrig.loadgen.scenario import LoadPlanSpec
from tokenrig.metrics.records import read_records

ARGS = ("loadtest", "--backend", "sim", "--sim-ttft-ms", "100", "--sim-tpot-ms", "10",
        "--scenario", "tests/data/timing.yaml", "--rate", "12", "--duration", "6", "--warmup", "1")


def run(tmp_path, *extra):
    """The run's records, summary and the load plan it followed."""
    result = run_cli(*ARGS, "--results", str(tmp_path), *extra, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(result)
    load = LoadPlanSpec.model_validate(json.loads((run_dir / "metadata.json").read_text())["scenario"]["load"])
    return read_records(run_dir / "requests.jsonl"), load_summary(run_dir), LoadPlan(load)


@pytest.mark.timing
def test_two_workers_send_the_single_process_schedule_and_merge_exactly(tmp_path):
    single, single_summary, plan = run(tmp_path / "one", "--seed", "7")
    merged, summary, _ = run(tmp_path / "two", "--workers", "2", "--seed", "7")

    # the same seeded schedule, each of its arrivals sent exactly once by one of the workers
    assert sorted(r.arrival_index for r in merged) == sorted(r.arrival_index for r in single) == list(
        range(plan.scheduled_total))

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


@pytest.mark.timing
def test_the_tgi_client_runs_on_workers(tmp_path):
    """`--client tgi --workers 2`: each worker sends its share through TGI's /generate_stream, every arrival of the
    plan once. Seeded: the Poisson plan of an unseeded run has a random number of arrivals (72 on average, fewer
    than 60 in 6 % of seeds)."""
    records, summary, plan = run(tmp_path, "--client", "tgi", "--workers", "2", "--seed", "7")
    assert [w["index"] for w in summary["load_generator"]["workers"]] == [0, 1]
    planned = plan.scheduled_total
    assert planned >= 60 and sorted(r.arrival_index for r in records) == list(range(planned))
    assert all(r.ok for r in records), {r.error for r in records}
    # details.generated_tokens is TGI's count; the TGI route reports no prompt usage (the OpenAI one does)
    assert all(r.output_tokens_usage == r.output_tokens_tokenizer == 50 and r.prompt_tokens_usage is None
               for r in records)
    assert_latency_follows_schedule(summary["latency_s"])


def _workers_of(pid: int) -> list[int]:
    """The load-generator worker processes a tokenrig process started (each in its own session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and b"tokenrig.loadgen.distributed" in command:
            found.append(int(entry.name))
    return found


@pytest.mark.timing
def test_a_killed_worker_stops_the_run_and_says_what_it_lost(tmp_path):
    """SIGKILL one of two workers 3 s into a 60-s load: the master sees it go missing (Locust's heartbeat),
    stops the step within seconds instead of waiting out the plan, names the worker and how many of its
    arrivals went unsent, keeps every record it received, and exits 1."""
    command = [sys.executable, "-m", "tokenrig.cli", *ARGS[:-4], "--duration", "60", "--warmup", "1",
               "--workers", "2", "--results", str(tmp_path)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("load:"):
                break
        time.sleep(3)
        workers = _workers_of(process.pid)
        assert len(workers) == 2, "".join(lines)
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = process.communicate(timeout=120)
        stopped_after = time.monotonic() - killed_at
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(lines) + output
    assert process.returncode == 1, output
    assert stopped_after < 25, output  # not the 57 s of plan left, plus the request timeout
    assert re.search(r"STOPPED: load-generator worker \d of 2 \(.+\) went missing .*: (\d+) of the (\d+) arrivals "
                     r"it owned were not sent", output), output
    run_dir = run_dir_of(subprocess.CompletedProcess(command, process.returncode, output, ""))
    records = read_records(run_dir / "requests.jsonl")
    assert records and load_summary(run_dir)["requests"]["total"] == len(records)

"""Distributed load: how the one plan is split over workers, and workers that connect from elsewhere.

tests/test_distributed.py runs two local workers against one process; here the split itself is
checked without processes, and then a run whose second worker is started by hand, as on another machine.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import DATA, REPO, load_summary, run_cli, run_dir_of
from tokenrig.loadgen.plan import LoadPlan
from tokenrig.loadgen.scenario import LoadPlanSpec, load_scenario
from tokenrig.metrics.records import read_records


def slots(plan: LoadPlan) -> list:
    taken = []
    while (slot := plan.next_slot(0.0)) is not None:
        taken.append(slot)
    return taken


def test_worker_i_of_n_sends_arrivals_i_i_plus_n_at_the_whole_plans_times():
    spec = LoadPlanSpec(type="poisson", rate=20, duration_s=5, seed=11)
    whole = slots(LoadPlan(spec, start=100.0))
    for worker in range(3):
        share = slots(LoadPlan(spec, start=100.0, share=(worker, 3)))
        assert [s.index for s in share] == list(range(worker, len(whole), 3))
        assert [s.due for s in share] == [whole[s.index].due for s in share]


def test_workers_beyond_the_arrivals_send_nothing():
    spec = LoadPlanSpec(type="constant", rate=1, duration_s=3)  # arrivals at 0, 1 and 2 s
    assert [len(slots(LoadPlan(spec, start=0.0, share=(worker, 5)))) for worker in range(5)] == [1, 1, 1, 0, 0]


def test_a_trace_is_split_with_its_rows():
    spec = load_scenario("azure_conv_replay").load
    whole = slots(LoadPlan(spec, start=0.0))
    second = slots(LoadPlan(spec, start=0.0, share=(1, 2)))
    assert second[0].index == 1 and len(second) == len(whole) // 2
    assert [(s.due, s.trace_row) for s in second] == [(whole[s.index].due, whole[s.index].trace_row) for s in second]
    assert all(s.trace_row is not None for s in second)


def test_a_ramped_closed_loop_keeps_its_ramp_across_workers():
    """4 users ramped over 2 s: user k's first request is due at 100 + 2 * k / 4. Worker 0 of 2 runs users 0
    and 2 (due 100.0 and 101.0), worker 1 users 1 and 3 (100.5 and 101.5): together, the one-process ramp."""
    spec = LoadPlanSpec(type="concurrency", users=4, ramp_s=2.0, duration_s=10)
    first = {}
    for worker in range(2):
        plan = LoadPlan(spec, start=100.0, share=(worker, 2))
        for _ in range(2):
            slot = plan.next_slot(now=99.0)
            first[slot.index] = slot.due
    assert first == pytest.approx({0: 100.0, 1: 100.5, 2: 101.0, 3: 101.5})


def test_more_local_workers_than_workers_is_refused_before_anything_starts(tmp_path):
    result = run_cli("loadtest", "--backend", "sim", "--scenario", str(DATA / "timing.yaml"), "--rate", "5",
                     "--workers", "2", "--local-workers", "3", "--results", str(tmp_path), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--local-workers must be between 0 and --workers" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir()), "a run started"


def test_a_remote_worker_started_as_the_master_says_sends_its_share(tmp_path):
    """--workers 2 --local-workers 1: the run waits, printing the command a remote worker runs; started that way
    (here on this machine), the worker sends its half of the schedule and every arrival is sent exactly once."""
    master = subprocess.Popen(
        [sys.executable, "-m", "tokenrig.cli", "loadtest", "--backend", "sim", "--sim-ttft-ms", "100",
         "--sim-tpot-ms", "10", "--scenario", str(DATA / "timing.yaml"), "--rate", "8", "--arrival", "constant",
         "--duration", "4", "--warmup", "0", "--workers", "2", "--local-workers", "1", "--results", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in iter(master.stdout.readline, ""):
        lines.append(line)
        if "remote workers: run on each" in line:
            break
    command = re.search(r"`(python -m tokenrig\.loadgen\.distributed [^`]+)`", lines[-1])
    assert command, "".join(lines)
    argv = command.group(1).replace("<this host>", "127.0.0.1").split()
    worker = subprocess.Popen([sys.executable, *argv[1:]], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
    try:
        output, _ = master.communicate(timeout=240)
        assert master.returncode == 0, "".join(lines) + output
        assert worker.wait(timeout=60) == 0  # the master lets its workers go when the run ends
    finally:
        for process in (master, worker):
            if process.poll() is None:
                process.kill()
    run_dir = run_dir_of(subprocess.CompletedProcess([], 0, "".join(lines) + output, ""))
    records = read_records(run_dir / "requests.jsonl")
    assert sorted(r.arrival_index for r in records) == list(range(32))  # 8 req/s x 4 s, evenly spaced
    summary = load_summary(run_dir)
    assert [w["index"] for w in summary["load_generator"]["workers"]] == [0, 1]
    assert summary["requests"]["ok"] == len(records) and summary["requests"]["failed"] == 0

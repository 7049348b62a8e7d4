"""Faults and bad input (docs/reliability.md): each case run through the real CLI against a real server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DATA, REPO, run_cli, run_dir_of

TIMING = str(DATA / "timing.yaml")


def prefix_cache_counters(metrics_url: str) -> tuple[float, float]:
    """(prompt tokens looked up, found) in the sim server's prefix cache so far."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    totals = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals["vllm:prefix_cache_queries_total"], totals["vllm:prefix_cache_hits_total"]


def cache_hit_rate_of_run(sim_server, tmp_path, *extra: str) -> tuple[float, dict]:
    """One short load test against the shared sim server: the prefix-cache hit rate its prompts got."""
    before = prefix_cache_counters(sim_server.endpoint.metrics_url)
    result = run_cli("loadtest", "--url", sim_server.endpoint.base_url, "--backend", "sim", "--model", "7b",
                     "--gpu", "h100-sxm", "--scenario", TIMING, "--users", "2", "--duration", "3", "--warmup", "0",
                     "--results", str(tmp_path), *extra, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    queries, hits = (after - start for after, start in zip(prefix_cache_counters(sim_server.endpoint.metrics_url),
                                                            before))
    assert queries > 0
    return hits / queries, json.loads((run_dir_of(result) / "metadata.json").read_text())


def test_repeat_runs_draw_fresh_prompts_unless_a_seed_is_given(sim_server, tmp_path):
    """Two identical runs on one prefix-caching server: without --seed the second gets no cache hits and
    each run records the fresh seed it drew; with the same --seed the prompts repeat (all served from cache)."""
    first_rate, first = cache_hit_rate_of_run(sim_server, tmp_path / "a")
    second_rate, second = cache_hit_rate_of_run(sim_server, tmp_path / "b")
    assert first["seed_source"] == second["seed_source"] == "random"
    assert first["seed"] != second["seed"] and first["scenario"]["load"]["seed"] == first["seed"]
    assert second_rate < 0.05, f"the second run's prompts were {second_rate:.0%} prefix-cache hits"

    cache_hit_rate_of_run(sim_server, tmp_path / "c", "--seed", "41")
    repeated_rate, repeated = cache_hit_rate_of_run(sim_server, tmp_path / "d", "--seed", "41")
    assert repeated["seed"] == 41 and repeated["seed_source"] == "--seed"
    assert repeated_rate > 0.5, f"the same --seed sent other prompts ({repeated_rate:.0%} cache hits)"


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tokenrig.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_requests(path_pattern: str, root: Path, timeout_s: float = 120) -> Path:
    """The first file matching `path_pattern` under root once it holds a finished request."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in root.glob(path_pattern):
            if path.stat().st_size > 0:
                return path
        time.sleep(0.2)
    raise AssertionError(f"no requests under {root}/{path_pattern} after {timeout_s:.0f} s")


def test_an_interrupted_find_max_step_is_no_verdict(tmp_path):
    """SIGTERM (what `timeout` sends) in the middle of a --find-max step whose requests all meet the SLO: the
    step is marked interrupted and judged neither way, and search.json names no max rate."""
    process = start_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "10", "--sim-tpot-ms", "1",
                        "--scenario", TIMING, "--find-max", "--rate", "4", "--slo", "ttft_p90=10s",
                        "--tail-samples", "20", "--max-step", "60", "--results", str(tmp_path))
    wait_for_requests("*/steps/01-*/requests.jsonl", tmp_path)
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    search = json.loads(next(tmp_path.glob("*/search.json")).read_text())
    assert search["stop_reason"] == "interrupted" and search["max_rate_meeting_slos"] is None
    step = search["steps"][-1]
    assert step["interrupted"] and not step["slo_met"], step
    assert "search interrupted: no max rate" in output and "max rate meeting every SLO" not in output

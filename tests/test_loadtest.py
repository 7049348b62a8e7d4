"""End-to-end load tests through the `tokenrig` CLI against real servers it starts itself."""

import http.server
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import DATA, REPO, load_summary, run_cli, run_dir_of, without_torch
from tests.schedule import assert_latency_follows_schedule
from tokenrig.metrics.records import read_records

TIMING = str(DATA / "timing.yaml")


def test_hf_tiny_load_test_end_to_end(tmp_path):
    result = run_cli("loadtest", "--scenario", TIMING, "--users", "4", "--duration", "10",
                     "--results", str(tmp_path), timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(result)
    for name in ("metadata.json", "requests.jsonl", "summary.json", "server.log"):
        assert (run_dir / name).exists(), name
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["server"]["backend"] == "hf" and "tokenrig.serve.server" in " ".join(metadata["server"]["command"])
    assert metadata["versions"]["torch"] and metadata["scenario"]["name"] == "timing"
    assert metadata["schema_version"] == 1 and metadata["server"]["batch_limits"]["max_batch_tokens"]
    records = read_records(run_dir / "requests.jsonl")
    assert len(records) >= 8
    assert all(r.ok for r in records), [r.error for r in records if not r.ok]
    for record in records:
        assert record.output_tokens_usage == record.max_tokens == 50
        assert record.output_tokens_tokenizer == 50
        assert sum(record.chunk_tokens) == 50
    summary = load_summary(run_dir)
    assert summary["requests"]["failed"] == 0
    assert summary["tokens"]["usage_vs_tokenizer_mismatches"] == 0
    assert summary["throughput"]["output_tokens_per_s"] > 0
    for line in ("TTFT", "ITL", "TPOT", "E2E", "throughput"):
        assert line in result.stdout


@pytest.mark.timing
@pytest.mark.parametrize("users", [1, 32])
def test_measured_latency_matches_the_sim_schedule(tmp_path, users):
    """The sim server sends token i at arrival + 100 ms + i * 10 ms: the client must measure that."""
    result = run_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "100", "--sim-tpot-ms", "10",
                     "--scenario", TIMING, "--users", str(users), "--duration", "10", "--results", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = load_summary(run_dir_of(result))
    latency = summary["latency_s"]
    assert summary["requests"]["failed"] == 0
    assert_latency_follows_schedule(latency)
    assert latency["ttft"]["min"] >= 0.100 - 0.001  # no request is measured earlier than the server sent


@pytest.mark.timing
def test_open_loop_poisson_against_roofline_sim(tmp_path):
    result = run_cli("loadtest", "--backend", "sim", "--gpu", "a800", "--model", "13b", "--rate", "4",
                     "--duration", "8", "--warmup", "1", "--results", str(tmp_path / "results"),
                     env=without_torch(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(result)
    summary = load_summary(run_dir)
    health = summary["load_generator"]
    assert health["target_rate_rps"] == 4
    assert 1.5 < health["achieved_send_rate_rps"] < 8  # Poisson over 7 s: loose but not vacuous
    assert health["valid"], health["problems"]
    records = read_records(run_dir / "requests.jsonl")
    gaps = [b.scheduled_at - a.scheduled_at for a, b in zip(records, sorted(records, key=lambda r: r.scheduled_at)[1:])]
    assert len({round(g, 3) for g in gaps}) > 3  # random arrivals, not a fixed cadence


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_cleanly_and_keeps_results(tmp_path, stop_signal):
    """Ctrl-C, SIGINT to a load test started with `&` (it inherits SIGINT ignored), and SIGTERM all stop it cleanly."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenrig.cli", "loadtest", "--backend", "sim", "--sim-ttft-ms", "50",
         "--sim-tpot-ms", "5", "--scenario", TIMING, "--users", "4", "--duration", "120", "--results", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    run_dir = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        runs = list(Path(tmp_path).iterdir())
        if runs and (runs[0] / "requests.jsonl").exists() and (runs[0] / "requests.jsonl").stat().st_size > 0:
            run_dir = runs[0]
            break
        time.sleep(0.2)
    assert run_dir, "load test never started"
    time.sleep(2)
    process.send_signal(stop_signal)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    summary = load_summary(run_dir)
    assert summary["interrupted"] and summary["requests"]["ok"] > 0
    metadata = json.loads((run_dir / "metadata.json").read_text())
    server_port = metadata["endpoint"]["base_url"].rsplit(":", 1)[1]
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"--port {server_port}" not in ps, "server still running after Ctrl-C"
    assert "interrupted" in output


class _StallingServer(http.server.BaseHTTPRequestHandler):
    """Accepts a streaming request, sends one chunk, then goes silent: an engine that hung mid-batch."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b'data: {"choices": [{"index": 0, "delta": {"content": " a"}}]}\n\n')
        self.wfile.flush()
        time.sleep(60)

    def log_message(self, *args):
        pass


def test_a_stalled_server_fails_requests_after_the_request_timeout(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StallingServer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        result = run_cli("loadtest", "--url", f"http://127.0.0.1:{server.server_port}", "--backend", "hf",
                         "--model", "tiny", "--scenario", TIMING, "--users", "2", "--duration", "2", "--warmup", "0",
                         "--request-timeout", "1.5", "--results", str(tmp_path), timeout=120)
        took = time.monotonic() - started
    finally:
        server.shutdown()
    assert result.returncode == 1 and "FAILED: 100% of" in result.stdout, result.stdout + result.stderr
    # the run ends by itself, about duration + timeout after the start, instead of waiting on the server
    assert took < 40, f"load test took {took:.0f} s against a silent server"
    summary = load_summary(run_dir_of(result))
    assert summary["requests"]["ok"] == 0 and summary["requests"]["failed"] >= 2
    kinds = [kind.lower() for kind in summary["requests"]["errors_by_type"]]
    assert any("timeout" in kind or "timed out" in kind for kind in kinds)


def test_scenario_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nrequests:\n  - name: a\n    input_tokens: {dist: fixed, value: 10}\n"
                   "    output_tokens: {dist: lognormal, median: -3, sigma: 1}\nload: {users: 2}\n")
    result = run_cli("loadtest", "--backend", "sim", "--scenario", str(bad))
    assert result.returncode == 2
    assert f"{bad}:5: requests.0.output_tokens.lognormal.median" in result.stderr


def test_compare_tables_real_runs_and_marks_a_window_nothing_was_scheduled_in(tmp_path):
    """Two sim runs: one measured, one whose 5-s requests outlast its 2-s window; --compare tables both."""
    common = ["loadtest", "--backend", "sim", "--scenario", TIMING, "--users", "2", "--warmup", "1"]
    measured = run_cli(*common, "--sim-ttft-ms", "100", "--sim-tpot-ms", "10", "--duration", "4",
                       "--results", str(tmp_path / "fast"))
    slow = run_cli(*common, "--sim-ttft-ms", "100", "--sim-tpot-ms", "100", "--duration", "3",
                   "--results", str(tmp_path / "slow"))
    assert measured.returncode == 0 and slow.returncode == 4, measured.stderr + slow.stderr  # 4: nothing measured
    assert "NO MEASUREMENT: no request was scheduled inside the 2.0-s window" in slow.stdout
    assert "NO MEASUREMENT" not in measured.stdout
    fast_summary = load_summary(run_dir_of(measured))

    table = run_cli("loadtest", "--compare", str(tmp_path / "fast"), str(tmp_path / "slow"))
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| sim ")]
    assert len(rows) == 2 and all("2 concurrent users" in row for row in rows)
    cells = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    assert cells[0] == "sim tiny cpu, bf16, sim TTFT 100 ms, TPOT 10 ms" and cells[2] == "3"
    assert cells[3] == str(fast_summary["requests"]["ok"])
    tpot = fast_summary["latency_s"]["tpot"]
    assert cells[5] == f"{tpot['p50'] * 1000:.1f} / {tpot['p99'] * 1000:.1f}"
    assert rows[1].split("|")[4].strip() == "0"
    assert f"{run_dir_of(slow).name} (sim" in table.stdout
    assert "no measurement: no request was scheduled" in table.stdout

    older = json.loads((run_dir_of(slow) / "summary.json").read_text())  # as written before window.problem
    del older["window"]["problem"]
    (run_dir_of(slow) / "summary.json").write_text(json.dumps(older))
    again = run_cli("loadtest", "--compare", str(tmp_path / "slow"))
    assert "no measurement: no request was scheduled inside the window" in again.stdout

    empty = run_cli("loadtest", "--compare", str(tmp_path / "nothing-here"))
    assert empty.returncode == 2 and "no load-test runs" in empty.stderr


def test_an_open_loop_past_a_slow_servers_in_flight_cap_is_the_servers_verdict(tmp_path):
    """10 req/s of 1-s requests against an in-flight cap of 4: arrivals queue for a slot while the client idles.
    The server is saturated (it completes 4 req/s); the load generator is not to blame, and the run is valid."""
    scenario = tmp_path / "capped.yaml"
    scenario.write_text(Path(TIMING).read_text().replace("type: concurrency\n  users: 1\n  duration_s: 10",
                                                         "type: poisson\n  rate: 10\n  max_in_flight: 4\n"
                                                         "  duration_s: 3"))
    result = run_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "10", "--sim-tpot-ms", "20",
                     "--scenario", str(scenario), "--warmup", "0.5", "--results", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SERVER SATURATED: " in result.stdout and "the open loop's cap of 4" in result.stdout, result.stdout
    assert "INVALID RUN" not in result.stdout and "the load generator was the bottleneck" not in result.stdout
    health = load_summary(run_dir_of(result))["load_generator"]
    assert health["valid"] and health["slot_late_requests"] > 0 and "server completed" in health["server_saturated"]


@pytest.mark.timing  # its probes' verdicts (saturated, late) move with a neighbouring test's load
def test_a_find_max_that_finds_no_rate_exits_5(tmp_path):
    """TTFT is 100 ms at every rate, the SLO 20 ms: the search walks down, finds nothing, and says so by its
    exit status (tokenrig/exit_status.py), not 0."""
    result = run_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "100", "--sim-tpot-ms", "1",
                     "--scenario", TIMING, "--find-max", "--rate", "8", "--slo", "ttft_p90=20ms", "--tail-samples", "1",
                     "--max-step", "1", "--warmup", "0", "--results", str(tmp_path))
    assert result.returncode == 5, result.stdout + result.stderr
    assert "no rate tried met every SLO" in result.stdout


def test_the_console_says_draining_after_the_load_and_no_locust_spawn_rate_warning(tmp_path):
    """1 s of 2 req/s against 6.5-s requests: the progress line 5 s in says how many are still in flight, not
    [1s/1s] again; spawning the open loop's 512 users in the lead time draws no Locust warning."""
    result = run_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "6500", "--sim-tpot-ms", "1",
                     "--scenario", TIMING, "--rate", "2", "--arrival", "constant", "--duration", "1", "--warmup", "0",
                     "--results", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "[draining 2 in flight, 4s past the 1s of load] done      0" in output, output
    assert "[    1s/1s]" not in output and "spawn rate is very high" not in output

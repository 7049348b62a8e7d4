"""Faults and bad input (docs/reliability.md): each case run through the real CLI against a real server."""

from __future__ import annotations

import http.server
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DATA, REPO, instant_server_env, load_summary, run_cli, run_dir_of
from tokenrig.metrics.records import read_records
from tokenrig.profiles import resolve_model
from tokenrig.serve.checkpoint import tokenizer_dir
from tokenrig.serve.launcher import free_port

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


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_find_max_step_is_no_verdict(tmp_path, stop_signal):
    """Ctrl-C, or SIGTERM (what `timeout` sends), in the middle of a --find-max step whose requests all meet the
    SLO: the step is marked interrupted and judged neither way, and search.json names no max rate."""
    process = start_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "10", "--sim-tpot-ms", "1",
                        "--scenario", TIMING, "--find-max", "--rate", "4", "--slo", "ttft_p90=10s",
                        "--tail-samples", "20", "--max-step", "60", "--results", str(tmp_path))
    wait_for_requests("*/steps/01-*/requests.jsonl", tmp_path)
    time.sleep(2)
    process.send_signal(stop_signal)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    search = json.loads(next(tmp_path.glob("*/search.json")).read_text())
    assert search["stop_reason"] == "interrupted" and search["max_rate_meeting_slos"] is None
    step = search["steps"][-1]
    assert step["interrupted"] and not step["slo_met"], step
    assert "search interrupted: no max rate" in output and "max rate meeting every SLO" not in output


class FaultServer:
    """A real HTTP server on loopback that answers the n-th POST (from 0) with `respond(n, handler)`,
    and /v1/models with the model tokenrig asks for: a server that fails in a scripted way."""

    def __init__(self, respond, model: str = "tiny", max_model_len: int = 2048, metrics_pages: int = 0):
        """`metrics_pages`: how many GET /metrics get a (figureless) Prometheus page before it answers 404."""
        outer = self
        self.posts = 0
        self.metrics_pages = metrics_pages
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    body = json.dumps({"object": "list", "data": [{"id": model, "object": "model",
                                                                   "max_model_len": max_model_len}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                elif self.path == "/metrics" and outer.metrics_pages > 0:
                    outer.metrics_pages -= 1
                    body = b"# HELP process_start_time_seconds Start time.\n"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4")
                else:
                    body = b"not found"
                    self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.request_body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    number, outer.posts = outer.posts, outer.posts + 1
                respond(number, self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def chunk_line(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).encode() + b"\n\n"


def stream_reply(handler, words: int, done: bool = True, usage: int | None = None, extra: bytes = b"") -> None:
    """A streamed chat reply of `words` one-token chunks, then optional raw bytes, usage and [DONE]."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Connection", "close")
    handler.end_headers()
    for _ in range(words):
        handler.wfile.write(chunk_line(" word"))
        handler.wfile.flush()
    handler.wfile.write(extra)
    if usage is not None:
        handler.wfile.write(b"data: " + json.dumps({"choices": [], "usage": {
            "prompt_tokens": 64, "completion_tokens": usage}}).encode() + b"\n\n")
    if done:
        handler.wfile.write(b"data: [DONE]\n\n")
    handler.wfile.flush()
    handler.close_connection = True


def error_reply(handler, status: int, message: str, headers: dict | None = None) -> None:
    body = json.dumps({"error": {"message": message, "code": status}}).encode()
    handler.send_response(status)
    for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                       **(headers or {})}.items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)


def fault_run(server: FaultServer, tmp_path: Path, *extra: str, users: str = "2", duration: str = "2"):
    """A short closed-loop load test of the fault server (tiny model's tokenizer, timing scenario)."""
    return run_cli("loadtest", "--url", server.url, "--backend", "hf", "--model", "tiny", "--scenario", TIMING,
                   "--users", users, "--duration", duration, "--warmup", "0", "--request-timeout", "5",
                   "--results", str(tmp_path), *extra, timeout=120, env=instant_server_env())


def test_a_run_past_the_max_error_rate_fails_loudly_and_counts_no_failed_tokens(tmp_path):
    """Every other request gets 503 (Retry-After) and every fourth breaks off after 5 tokens with garbage:
    the run says FAILED with the error mix in words and exits 1; the broken streams' tokens are not
    throughput; a generous --max-error-rate lets the same server pass."""
    def respond(number, handler):
        if number % 2:
            error_reply(handler, 503, "overloaded", {"Retry-After": "1"})
        elif number % 4 == 2:
            stream_reply(handler, 5, done=False, extra=b"data: {not json\n\n")
        else:
            stream_reply(handler, 50, usage=50)

    with FaultServer(respond) as server:
        result = fault_run(server, tmp_path / "strict")
        lenient = fault_run(server, tmp_path / "lenient", "--max-error-rate", "90%")
    assert result.returncode == 1, result.stdout + result.stderr
    failed = next(line for line in result.stdout.splitlines() if line.startswith("FAILED: "))
    assert "HTTP 503" in failed and "JSONDecodeError" in failed and "overloaded" in failed, failed
    requests_line = next(line for line in result.stdout.splitlines() if line.startswith("requests "))
    assert "{" not in requests_line and "HTTP 503" in requests_line, requests_line
    run_dir = run_dir_of(result)
    summary = load_summary(run_dir)
    records = read_records(run_dir / "requests.jsonl")
    # throughput counts tokens that arrived inside the window; a stream still running at its end is cut there
    start, end = summary["window"]["start_unix"], summary["window"]["end_unix"]
    ok_tokens = sum(tokens for r in records if r.ok for offset, tokens in zip(r.chunk_offsets_s, r.chunk_tokens)
                    if start <= r.scheduled_at + offset < end)
    all_tokens = sum(tokens for r in records for offset, tokens in zip(r.chunk_offsets_s, r.chunk_tokens)
                     if start <= r.scheduled_at + offset < end)
    assert any(sum(r.chunk_tokens) == 5 and not r.ok for r in records)
    assert ok_tokens < all_tokens
    assert summary["throughput"]["output_tokens_per_s"] * summary["window"]["seconds"] == pytest.approx(ok_tokens)
    assert summary["requests"]["too_many_errors"] and summary["requests"]["error_rate"] > 0.5
    assert lenient.returncode == 0 and "FAILED" not in lenient.stdout, lenient.stdout + lenient.stderr


@pytest.mark.timing
def test_an_interrupted_run_keeps_its_health_checks_and_reports_in_flight_requests_as_cancelled(tmp_path):
    """SIGTERM 3 s into an open loop of 5-s requests at 500 req/s (far past the 512-request in-flight cap):
    the summary still judges the load generator (it sent a fraction of the arrivals due before the stop: INVALID),
    and the requests in flight at the stop are cancelled, not failed."""
    process = start_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "10", "--sim-tpot-ms", "100",
                        "--scenario", TIMING, "--rate", "500", "--duration", "60", "--warmup", "0",
                        "--results", str(tmp_path))
    wait_for_requests("*/server_metrics.jsonl", tmp_path)
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    run_dir = next(tmp_path.iterdir())
    summary = load_summary(run_dir)
    health, requests = summary["load_generator"], summary["requests"]
    assert not health["valid"] and any("scheduled arrivals" in problem for problem in health["problems"]), health
    assert requests["cancelled"] > 0 and requests["failed"] == 0, requests
    records = read_records(run_dir / "requests.jsonl")
    assert len(records) == requests["ok"] + requests["cancelled"] + requests["excluded_warmup_cooldown"]
    assert "cancelled (in flight when the load stopped)" in output and "INVALID RUN" in output


@pytest.mark.parametrize("args, says", [
    (["--rate", "0"], "argument --rate: must be above 0"),
    (["--rate", "nan"], "argument --rate: must be a finite number"),  # inf is the throughput mode
    (["--users", "0"], "argument --users: at least 1 user"),
    (["--rate", "2", "--users", "3"], "give --users (closed loop) or --rate (open loop), not both"),
    (["--request-timeout", "-1"], "argument --request-timeout: must be above 0"),
    (["--slo", "ttft_p99=500"], "SLO 'ttft_p99=500' has no unit: write ttft_p99=500ms or ttft_p99=500s"),
    (["--slo", "ttft_p99=0ms"], "the threshold must be above 0"),
    (["--slo", "ttft_p99=1s,ttft_p99=2s"], "SLO ttft_p99 is given twice"),
    (["--max-error-rate", "120%"], "is not between 0 and 1"),
    (["--results", "FILE"], "is a file, not a directory"),
    # what the plan and the per-core ceiling cannot do is refused before anything is drawn or spawned
    (["--rate", "1e9", "--duration", "5"], "--rate: this plan streams about 50,000,000,000 chunks/s, over 10 times"),
    (["--users", "100000"], "--users: this plan streams about 10,000,000 chunks/s, over 10 times"),
    (["--find-max", "--sweep", "1,2", "--slo", "ttft_p99=1s"], "give --find-max (search for the highest rate"),
    (["--duration", "1"], "--duration 1 s leaves nothing to measure after the warm-up (the scenario's "
                          "load.warmup_s 1 s)"),
    (["--find-max", "--slo", "ttft_p99=1s", "--max-step", "1"], "--max-step 1 s leaves nothing to measure after "
                                                                  "the warm-up (1 s)"),
    (["--quant", "int3"], "unknown quantization 'int3'"),
])
def test_bad_input_is_refused_with_one_line(tmp_path, args, says):
    (tmp_path / "FILE").write_text("")
    args = [str(tmp_path / "FILE") if arg == "FILE" else arg for arg in args]
    result = run_cli("loadtest", "--backend", "sim", "--scenario", TIMING, *args, timeout=60, cwd=REPO)
    assert result.returncode == 2, result.stdout + result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not list(tmp_path.glob("*/metadata.json")), "a run started"


def test_the_stream_parser_reads_empty_data_lines_and_json_array_chunks(tmp_path):
    """An empty `data:` line is legal SSE; some servers batch chunks into one JSON array: both parse."""
    def respond(number, handler):
        pair = json.dumps([{"choices": [{"index": 0, "delta": {"content": " word"}}]}] * 2).encode()
        stream_reply(handler, 10, usage=50, extra=b"data:\n\n" + b"data: " + pair + b"\n\n" + chunk_line(" word") * 28)

    with FaultServer(respond) as server:
        result = fault_run(server, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    records = read_records(run_dir_of(result) / "requests.jsonl")
    assert records and all(r.ok and r.output_tokens_tokenizer == 40 for r in records), records[0]


def test_a_plain_json_reply_is_reported_as_not_an_event_stream(tmp_path):
    """The server streams the pre-flight request, then answers plain JSON: each such request is an error."""
    def respond(number, handler):
        if number == 0:
            stream_reply(handler, 2)
            return
        body = json.dumps({"choices": [{"index": 0, "message": {"content": "hi"}}]}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with FaultServer(respond) as server:
        result = fault_run(server, tmp_path)
    summary = load_summary(run_dir_of(result))
    assert list(summary["requests"]["errors_by_type"]) == ["not an event stream"], summary["requests"]
    assert "Content-Type application/json" in summary["requests"]["error_examples"]["not an event stream"]


def test_a_content_type_sent_twice_streams_as_one():
    """A reply whose Content-Type header comes twice is read as HTTP reads a repeated field, its values joined:
    the stream is an event stream, not a failed request."""
    from tokenrig.loadgen.clients import StreamResult, openai  # gevent's HTTP client: loaded by this test alone

    def respond(number, handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(chunk_line(" word") * 3 + b"data: [DONE]\n\n")
        handler.close_connection = True

    with FaultServer(respond) as server:
        client, prefix = openai.connect(server.url)
        result = openai.stream(client, prefix + "/v1/chat/completions", b"{}", dict(openai.HEADERS),
                               StreamResult(time.perf_counter()), [0.0])
    assert result.error is None and result.texts == [" word"] * 3, result


def test_a_p99_from_few_samples_is_flagged_not_printed_plain(tmp_path):
    result = run_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "20", "--sim-tpot-ms", "2",
                     "--scenario", TIMING, "--users", "1", "--duration", "2", "--warmup", "0",
                     "--results", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = load_summary(run_dir_of(result))
    ttft = summary["latency_s"]["ttft"]
    assert ttft["count"] < 100 and ttft["p99_ci95"] is None
    assert summary["latency_s"]["itl"]["p99_ci95"] is not None  # thousands of gaps: an interval
    ttft_row = next(line for line in result.stdout.splitlines() if line.startswith("TTFT "))
    assert ttft_row.split()[3] == f"{ttft['p99'] * 1000:.1f}*", ttft_row  # the p99 column, flagged
    assert f"* p99 from too few samples for a 95 % confidence interval (about 380 needed): TTFT ({ttft['count']})" \
        in result.stdout


def test_tokens_trust_the_stream_and_short_or_cut_streams_are_marked(tmp_path):
    """A server claiming 999 tokens for 20 streamed (of 50 asked): TPOT is per streamed token, the request is
    marked truncated, and the console shows both counts. A stream whose connection closes before [DONE] is
    an incomplete answer: failed, not ok."""
    def respond(number, handler):
        if number % 3 == 2:
            stream_reply(handler, 30, done=False)
        else:
            stream_reply(handler, 20, usage=999)

    with FaultServer(respond) as server:
        result = fault_run(server, tmp_path, "--max-error-rate", "100%")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(result)
    records = read_records(run_dir / "requests.jsonl")
    short = [r for r in records if r.ok]
    assert short and all(r.output_tokens == 20 and r.truncated and r.output_tokens_usage == 999 for r in short)
    cut = [r for r in records if not r.ok]
    expected = "incomplete stream: the connection closed before [DONE], after 30 content chunks"
    assert cut and all(r.error.startswith(expected) for r in cut)
    summary = load_summary(run_dir)
    tpot_p50 = summary["latency_s"]["tpot"]["p50"]
    # the summary's TPOT is over the requests due inside the window; a closed loop sends one more at its end
    assert tpot_p50 == pytest.approx(statistics.median((r.e2e_s - r.ttft_s) / 19 for r in short if r.in_window))
    tokens_line = next(line for line in result.stdout.splitlines() if line.startswith("tokens "))
    ok = summary["requests"]["ok"]
    assert tokens_line == (f"tokens       {ok} of {ok} requests' usage differs from the tokens streamed (streamed "
                           f"counted); {ok} of {ok} truncated (short of max_tokens)")


def test_a_stop_while_a_server_holds_the_body_open_after_done_keeps_the_complete_answers(tmp_path):
    """A server that keeps each body open after [DONE]: the client waits up to BODY_END_WAIT_S for its end, to
    keep the connection, then drops it. Ctrl-C during that wait leaves the answer as it ended: ok, not cancelled."""
    def respond(number, handler):
        stream_reply(handler, 5, usage=5)
        time.sleep(3)  # the body ends when the connection closes, long after [DONE]

    with FaultServer(respond) as server:
        process = start_cli("loadtest", "--url", server.url, "--backend", "hf", "--model", "tiny", "--scenario", TIMING,
                            "--users", "2", "--duration", "60", "--warmup", "0", "--results", str(tmp_path))
        wait_for_requests("*/requests.jsonl", tmp_path)
        time.sleep(1.2)  # each request then waits 0.25 s in 0.26 s: the stop falls in that wait
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    records = read_records(next(tmp_path.glob("*/requests.jsonl")))
    ended = [r for r in records if r.e2e_s is not None and len(r.chunk_offsets_s) == 5]
    assert len(ended) >= 4 and all(r.ok for r in ended), [(len(r.chunk_offsets_s), r.error) for r in records]


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def production_like(api_key: str, served: str):
    """Answers only with the right bearer token (401 otherwise) and only for its served name (404 as vLLM)."""
    seen = []

    def respond(number, handler):
        seen.append((handler.headers.get("Authorization"), handler.request_body["model"]))
        if handler.headers.get("Authorization") != f"Bearer {api_key}":
            error_reply(handler, 401, "invalid API key")
        elif handler.request_body["model"] != served:
            error_reply(handler, 404, f"The model `{handler.request_body['model']}` does not exist.")
        else:
            stream_reply(handler, 50, usage=50)
    return respond, seen


def test_url_reaches_an_https_server_with_an_api_key_and_its_served_model_name(tmp_path):
    """HTTPS with a self-signed certificate the client trusts (SSL_CERT_FILE), the key from OPENAI_API_KEY, the
    model name from /v1/models: every request succeeds, the key is in no file of the run, and the run is labelled
    by its URL and model, not as an hf server on a CPU."""
    import ssl

    cert, key = self_signed_cert(tmp_path)
    respond, seen = production_like("sk-secret-123", "org/served-7b")
    with FaultServer(respond, model="org/served-7b") as server:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
        env = {**os.environ, "OPENAI_API_KEY": "sk-secret-123", "SSL_CERT_FILE": str(cert), **instant_server_env()}
        result = subprocess.run(
            [sys.executable, "-m", "tokenrig.cli", "loadtest", "--url", f"https://127.0.0.1:{server.server.server_port}",
             "--model", "tiny", "--scenario", TIMING, "--users", "2", "--duration", "2", "--warmup", "0",
             "--results", str(tmp_path / "runs")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(result)
    records = read_records(run_dir / "requests.jsonl")
    assert records and all(r.ok for r in records), records[0].error
    assert {entry for entry in seen} == {("Bearer sk-secret-123", "org/served-7b")}
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert "sk-secret-123" not in path.read_text(errors="replace"), path
    assert "sk-secret-123" not in result.stdout + result.stderr
    metadata = json.loads((run_dir / "metadata.json").read_text())
    # --model is what the user declared; backend and GPU were not declared, and the server told only its context
    assert metadata["server"] == {"backend": "url", "url": f"https://127.0.0.1:{server.server.server_port}",
                                  "model": "tiny", "gpu": "remote", "served_model": "org/served-7b",
                                  "declared": ["model"], "reported": {"owned_by": None, "engine": None,
                                                                      "max_model_len": 2048, "kv_cache": None}}
    assert "timing | url | org/served-7b | remote" in result.stdout and "| hf |" not in result.stdout
    assert "--tokenizer gives its tokenizer.json or Hub name" in result.stdout  # how to count prompts without one


def test_url_with_a_wrong_path_or_an_untrusted_certificate_says_what_was_asked_and_how_to_fix_it(tmp_path):
    """--url http://host/v2: /v2/v1/models answers 404, said in one line (not a silent fall back to the profile's
    model name). An HTTPS server whose self-signed certificate nothing trusts: the line names --ca-cert and
    SSL_CERT_FILE; --ca-cert FILE then carries the test request and the load (the load client trusts what the
    pre-flight trusts)."""
    import ssl

    cert, key = self_signed_cert(tmp_path)
    with FaultServer(lambda number, handler: stream_reply(handler, 50, usage=50), model="served-7b") as server:
        common = ["loadtest", "--model", "tiny", "--scenario", TIMING, "--users", "1", "--duration", "2",
                  "--warmup", "0", "--results", str(tmp_path / "runs")]
        wrong_path = run_cli(*common, "--url", server.url + "/v2", timeout=60)
        assert wrong_path.returncode == 2, wrong_path.stdout + wrong_path.stderr
        assert wrong_path.stderr.strip() == (
            f"tokenrig: error: {server.url}/v2/v1/models answered HTTP 404 (not found) when asked which model it "
            "serves: check --url (its path comes before /v1), or name the model with --served-model NAME")

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
        https = f"https://127.0.0.1:{server.server.server_port}"
        untrusted = run_cli(*common, "--url", https, timeout=60, env={"SSL_CERT_FILE": ""})
        assert untrusted.returncode == 2, untrusted.stdout + untrusted.stderr
        assert len(untrusted.stderr.strip().splitlines()) == 1
        assert (f"{https}: TLS certificate verification failed (self-signed certificate): trust the CA that signed the "
                "server's certificate with --ca-cert FILE (or SSL_CERT_FILE=FILE)") in untrusted.stderr
        trusted = run_cli(*common, "--url", https, "--ca-cert", str(cert), timeout=120,
                          env={"SSL_CERT_FILE": "", **instant_server_env()})
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    records = read_records(run_dir_of(trusted) / "requests.jsonl")
    assert records and all(r.ok for r in records), records[0].error


def test_a_url_server_without_metrics_is_found_out_once_and_not_scraped(tmp_path):
    """A server whose /metrics answers 404: one note before the load, no scrape, no 'N of N scrapes failed'
    line; with --no-scrape, not even the note (the page is still read once for what the server tells of itself)."""
    with FaultServer(lambda number, handler: stream_reply(handler, 20, usage=20)) as server:
        common = ["loadtest", "--url", server.url, "--model", "tiny", "--scenario", TIMING, "--rate", "5",
                  "--duration", "2", "--warmup", "0", "--scrape-interval", "0.2"]
        found = run_cli(*common, "--results", str(tmp_path / "found"), timeout=60)
        skipped = run_cli(*common, "--no-scrape", "--results", str(tmp_path / "skipped"), timeout=60)
    # 4 (INVALID) is no failure of what this test checks: two late sends of ten on a busy 2-core host make one
    assert found.returncode in (0, 4) and skipped.returncode in (0, 4), found.stdout + found.stderr + skipped.stderr
    note = (f"{server.url}/metrics answered HTTP 404: the server exports no metrics there, so it is not scraped "
            "(no running/waiting/KV-cache figures)")
    assert found.stdout.count(note) == 1, found.stdout
    for result in (found, skipped):
        run_dir = run_dir_of(result)
        assert "scrapes of its /metrics failed" not in result.stdout
        assert not (run_dir / "server_metrics.jsonl").exists()
        assert json.loads((run_dir / "metadata.json").read_text())["endpoint"]["metrics_url"] is None
    assert "exports no metrics" not in skipped.stdout


def test_url_preflight_stops_before_the_load_with_one_line(tmp_path):
    respond, _ = production_like("sk-right", "served-7b")
    refused_port = free_port()
    with FaultServer(respond, model="served-7b") as server, \
            FaultServer(lambda number, handler: error_reply(handler, 200, "plain JSON")) as plain:
        cases = {
            "no key": ([server.url], "HTTP 401, no API key was given: pass --api-key KEY or set OPENAI_API_KEY"),
            "wrong key": ([server.url, "--api-key", "sk-wrong"], "the API key given was refused"),
            "wrong model": ([server.url, "--api-key", "sk-right", "--served-model", "other"],
                            "does not serve 'other' (it serves served-7b): pass --served-model NAME"),
            "refused, no scheme": ([f"127.0.0.1:{refused_port}"],
                                   f"cannot reach http://127.0.0.1:{refused_port}: [Errno 111] Connection refused"),
            "not a stream": ([plain.url], "not an event stream"),
            "bad tokenizer": ([server.url, "--api-key", "sk-right", "--tokenizer", str(tmp_path)],
                              "give a directory holding tokenizer.json, the tokenizer.json file"),
        }
        for name, (args, says) in cases.items():
            result = run_cli("loadtest", "--url", *args, "--model", "tiny", "--scenario", TIMING, "--users", "1",
                             "--results", str(tmp_path / "runs"), timeout=60)
            assert result.returncode == 2 and says in result.stderr, (name, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
    assert not (tmp_path / "runs").exists(), "a run directory was made for a server that failed its pre-flight"


def stall_before_headers(number, handler):
    if number == 0:  # the pre-flight request
        return stream_reply(handler, 2)
    time.sleep(8)


def reset_mid_stream(number, handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.end_headers()
    handler.wfile.write(chunk_line(" word") * 5)
    handler.wfile.flush()
    if number:  # then an abortive close: the client's socket gets a TCP reset, not an orderly end
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for stream in (handler.rfile, handler.wfile, handler.connection):  # the last reference closes the socket
            stream.close()


def huge_chunk(number, handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.end_headers()
    handler.wfile.write(chunk_line(" word" * 200_000))  # one 1-MB event carrying 200,000 tokens
    handler.wfile.write(b"data: [DONE]\n\n")
    handler.close_connection = True


def too_many_requests(number, handler):
    if number == 0:
        return stream_reply(handler, 2)
    error_reply(handler, 429, "rate limited", {"Retry-After": "30"})


@pytest.mark.parametrize("respond, error_kind", [
    (stall_before_headers, "timeout"),
    (reset_mid_stream, "ConnectionResetError"),
    (huge_chunk, None),
    (too_many_requests, "HTTP 429"),
])
def test_every_request_sent_to_a_faulty_server_is_accounted(tmp_path, respond, error_kind):
    """Each request the server received (the pre-flight one aside) is a record, ok or failed by its kind; the exit
    status says whether the run failed."""
    with FaultServer(respond) as server:
        result = fault_run(server, tmp_path, "--request-timeout", "2")
        received = server.posts - 1
    run_dir = run_dir_of(result)
    records = read_records(run_dir / "requests.jsonl")
    summary = load_summary(run_dir)
    requests = summary["requests"]
    assert len(records) == received == (requests["ok"] + requests["failed"] + requests["cancelled"]
                                        + requests["excluded_warmup_cooldown"]), requests
    if error_kind is None:
        assert result.returncode == 0 and requests["failed"] == 0, result.stdout + result.stderr
        assert all(r.output_tokens == 200_000 and r.truncated is False for r in records)
    else:
        assert result.returncode == 1 and "FAILED" in result.stdout, result.stdout + result.stderr
        assert requests["ok"] == 0 and any(error_kind in kind.lower() or error_kind in kind
                                           for kind in requests["errors_by_type"]), requests


def test_a_server_killed_mid_run_fails_the_rest_loudly_and_loses_no_record(tmp_path):
    """SIGKILL to the sim server 2 s into a 6-s run: the streams it was serving and every later request fail by
    kind, every request is a record, the run ends on time with FAILED and exit 1."""
    process = start_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "50", "--sim-tpot-ms", "20",
                        "--scenario", TIMING, "--users", "2", "--duration", "6", "--warmup", "0",
                        "--request-timeout", "5", "--results", str(tmp_path))
    wait_for_requests("*/requests.jsonl", tmp_path)
    run_dir = next(tmp_path.iterdir())
    port = json.loads((run_dir / "metadata.json").read_text())["endpoint"]["base_url"].rsplit(":", 1)[1]
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    server_pid = next(int(line.split()[0]) for line in ps.splitlines()
                      if "tokenrig.serve.server" in line and f"--port {port}" in line)
    time.sleep(1)
    os.kill(server_pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1 and "FAILED: " in output, output
    summary = load_summary(run_dir)
    requests = summary["requests"]
    records = read_records(run_dir / "requests.jsonl")
    assert requests["ok"] > 0 and requests["failed"] > 0 and requests["cancelled"] == 0, requests
    assert len(records) == requests["ok"] + requests["failed"] + requests["excluded_warmup_cooldown"]
    assert all(r.ok or r.error for r in records)
    assert "Traceback" not in output


def test_fit_takes_the_max_model_len_its_advice_names():
    result = run_cli("fit", "--gpu", "h100-sxm", "--model", "7b", "--max-model-len", "2048", timeout=60)
    assert result.returncode == 0 and "--max-model-len 2048" in result.stdout, result.stdout + result.stderr


def test_a_taken_exporter_port_stops_the_run_with_one_line_and_no_server_left(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "10", "--sim-tpot-ms", "1", "--scenario",
                         TIMING, "--users", "1", "--duration", "2", "--metrics-port", str(port),
                         "--prometheus-targets", str(tmp_path / "targets"), "--results", str(tmp_path / "runs"),
                         timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--metrics-port {port}: Address already in use" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    metadata = json.loads(next((tmp_path / "runs").glob("*/metadata.json")).read_text())
    server_port = metadata["endpoint"]["base_url"].rsplit(":", 1)[1]
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"--port {server_port} " not in ps, "the server outlived the run"


def test_a_scrape_target_that_is_down_leaves_the_load_test_measuring_and_says_so(tmp_path):
    """The server answers requests but its /metrics, there when the run checked it, is gone (404) from then on:
    every scrape fails and is counted, the load test itself is untouched."""
    with FaultServer(lambda number, handler: stream_reply(handler, 50, usage=50), metrics_pages=1) as server:
        result = fault_run(server, tmp_path, "--scrape-interval", "0.5")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = load_summary(run_dir_of(result))
    assert summary["requests"]["ok"] > 0 and summary["requests"]["failed"] == 0
    scrapes = summary["server"]
    assert scrapes["scrapes"] == 0 and scrapes["scrape_errors"] >= 3, scrapes
    assert f"server       {scrapes['scrape_errors']} of {scrapes['scrape_errors']} scrapes of its /metrics failed" \
        in result.stdout


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_the_server_starts_stops_everything_with_130(tmp_path, stop_signal):
    process = start_cli("loadtest", "--backend", "sim", "--scenario", TIMING, "--users", "1", "--duration", "30",
                        "--results", str(tmp_path))
    lines = iter(process.stdout.readline, "")
    started = next(line for line in lines if line.startswith("starting sim server: "))
    time.sleep(0.5)  # the server process is up, not healthy yet (it takes seconds to load)
    process.send_signal(stop_signal)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "Traceback" not in output and "interrupted" in output
    assert not list(tmp_path.glob("*/requests.jsonl")), "the load started after the stop signal"
    port = started.split("--port ", 1)[1].split()[0]
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"--port {port} " not in ps, "the server outlived the run"


def test_records_that_cannot_be_written_stop_the_run_loudly(tmp_path):
    """A 40-kB file-size limit (what a full disk does to a write): the load stops as soon as a record cannot be
    written, the error says which file, why and how many records were lost, exit 1, and every record written
    before is intact."""
    limit = 40_000
    tokenizer_dir(resolve_model("tiny"))  # written before the limit: a tokenizer is larger than 40 kB
    process = subprocess.run(
        [sys.executable, "-m", "tokenrig.cli", "loadtest", "--backend", "sim", "--sim-ttft-ms", "10", "--sim-tpot-ms",
         "1", "--scenario", TIMING, "--users", "2", "--duration", "20", "--warmup", "0", "--results", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert process.returncode == 1, process.stdout + process.stderr
    run_dir = next(tmp_path.iterdir())
    assert f"cannot write {run_dir / 'requests.jsonl'}: File too large; the load was stopped" in process.stderr
    assert "Traceback" not in process.stderr and len(process.stderr.strip().splitlines()) == 1, process.stderr
    records = read_records(run_dir / "requests.jsonl")
    assert records and all(r.ok for r in records)
    assert (run_dir / "requests.jsonl").stat().st_size <= limit


def test_a_run_directory_deleted_mid_run_stops_the_run_loudly(tmp_path):
    process = start_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "10", "--sim-tpot-ms", "1",
                        "--scenario", TIMING, "--users", "2", "--duration", "60", "--warmup", "0",
                        "--results", str(tmp_path))
    records = wait_for_requests("*/requests.jsonl", tmp_path)
    shutil.rmtree(records.parent)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output
    assert f"tokenrig: error: {records} was deleted during the run: the load was stopped" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_during_the_drain_cancels_the_requests_still_in_flight(tmp_path, stop_signal):
    """2 users of 5-s requests for a 2-s plan: Ctrl-C or SIGTERM 3 s in, while the run waits for the requests in
    flight after the plan's end. They are cancelled, not failed; exit 130."""
    process = start_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "10", "--sim-tpot-ms", "100",
                        "--scenario", TIMING, "--users", "2", "--duration", "2", "--warmup", "0",
                        "--results", str(tmp_path))
    next(line for line in iter(process.stdout.readline, "") if line.startswith("load: "))
    time.sleep(3)
    process.send_signal(stop_signal)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    run_dir = next(tmp_path.iterdir())
    requests = load_summary(run_dir)["requests"]
    assert requests["cancelled"] == 2 and requests["failed"] == 0 and requests["ok"] == 0, requests
    assert len(read_records(run_dir / "requests.jsonl")) == 2
    assert "Traceback" not in output


def test_the_help_examples_can_be_pasted_into_a_shell():
    """The capacity example spans two lines: the help shows its backslash, so the pasted command is one."""
    from tokenrig.cli.parser import EXAMPLES

    lines = EXAMPLES.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("tokenrig capacity"))
    assert lines[start].endswith(" \\") and lines[start + 1].strip().startswith("--scenario chat")
    assert "--quant bf16,awq       --scenario" not in EXAMPLES

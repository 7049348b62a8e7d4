"""Server /metrics scraping (vLLM, SGLang, TGI and tokenrig names) and the TGI client user, over real servers."""

import json
import threading
import time

import pytest
import requests

from tests.conftest import DATA, SGLANG_0_5_17_PAGE, VLLM_0_26_PAGE, load_summary, run_cli, run_dir_of
from tests.schedule import assert_latency_follows_schedule
from tokenrig.metrics.records import read_records
from tokenrig.serve.scrape import (
    COUNTERS,
    GAUGES,
    MetricsScraper,
    parse_metrics,
    summarize_server_metrics,
    wait_server_idle,
)

VLLM_PAGE = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 400.0
"""
TGI_PAGE = """# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 7
# TYPE tgi_queue_size gauge
tgi_queue_size 2
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 5120
"""


def test_engine_names_map_to_one_vocabulary():
    assert parse_metrics(VLLM_PAGE) == {"running": 3, "waiting": 1, "kv_cache_usage": 0.25,
                                        "prefix_cache_queries": 1000, "prefix_cache_hits": 400}
    assert parse_metrics(TGI_PAGE) == {"running": 7, "waiting": 2, "batch_tokens": 5120}


def test_an_older_vllm_exporting_old_and_new_names_side_by_side_is_not_counted_twice():
    page = VLLM_PAGE + """# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:gpu_prefix_cache_queries counter
vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
"""
    assert parse_metrics(page)["kv_cache_usage"] == 0.25 and parse_metrics(page)["prefix_cache_queries"] == 1000
    only_old = page.replace("vllm:kv_cache_usage_perc{", "vllm:other{").replace("vllm:prefix_cache_queries_total{",
                                                                                 "vllm:other_total{")
    assert parse_metrics(only_old)["kv_cache_usage"] == 0.25 and parse_metrics(only_old)["prefix_cache_queries"] == 1000


def test_a_real_vllm_0_26_page_gives_every_figure_tokenrig_reads_from_vllm():
    """Scraped on an H200 between load steps, after 1833 requests of 512 in / 128 out (tokenrig's cross-check
    sweep, then `vllm bench serve` at 1 and 32 streams): the gauges are idle, the counters are not."""
    figures = parse_metrics(VLLM_0_26_PAGE.read_text())
    assert figures == {"running": 0, "waiting": 0, "kv_cache_usage": 0, "preemptions": 0,
                       "prompt_tokens": 938496, "generation_tokens": 234624,  # 1833 x 512, 1833 x 128
                       "prefix_cache_queries": 938496, "prefix_cache_hits": 37696}
    vllm_figures = {key for key, names in {**GAUGES, **COUNTERS}.items() if any(n.startswith("vllm:") for n in names)}
    assert vllm_figures <= figures.keys()


def test_a_real_vllm_0_26_page_under_load_reads_its_running_requests_and_kv_cache():
    """Scraped on an H200 10 s into a 16-user chat run (docs/results/serve-h200-vllm-followup.md): 16 requests
    running, none waiting, 5.4 % of the 229,904-token KV cache in use, no prefix-cache hits (fresh prompts)."""
    figures = parse_metrics((VLLM_0_26_PAGE.parent / "vllm-0.26.0-metrics-under-load.txt").read_text())
    assert figures == {"running": 16, "waiting": 0, "kv_cache_usage": pytest.approx(0.0539393), "preemptions": 0,
                       "prompt_tokens": 112333, "generation_tokens": 19908,
                       "prefix_cache_queries": 112333, "prefix_cache_hits": 0}
    assert figures["running"] > 0 and figures["kv_cache_usage"] > 0


def test_an_sglang_0_5_17_page_gives_every_figure_tokenrig_reads():
    """The page SGLang 0.5.17's collectors render (multiprocess mode) for 32 streams of 512 in / 128 out, 1238
    requests done, 64 radix-cache hit tokens a request: queries are its prompt tokens, hits its cached tokens."""
    figures = parse_metrics(SGLANG_0_5_17_PAGE.read_text())
    assert figures == {"running": 32, "waiting": 0, "kv_cache_usage": pytest.approx(18432 / 466000), "preemptions": 0,
                       "prompt_tokens": 1238 * 512, "generation_tokens": 1238 * 128,
                       "prefix_cache_queries": 1238 * 512, "prefix_cache_hits": 1238 * 64}


def test_summary_of_gauges_and_counter_deltas_inside_the_window(tmp_path):
    path = tmp_path / "server_metrics.jsonl"
    rows = [{"t": 10.0, "running": 1, "prefix_cache_queries": 0, "prefix_cache_hits": 0},
            {"t": 11.0, "running": 3, "prefix_cache_queries": 100, "prefix_cache_hits": 10},
            {"t": 12.0, "running": 5, "prefix_cache_queries": 300, "prefix_cache_hits": 70},
            {"t": 13.0, "running": 50, "prefix_cache_queries": 900, "prefix_cache_hits": 900}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = summarize_server_metrics(path, 11.0, 13.0)
    assert summary["scrapes_in_window"] == 2 and summary["running"] == {"mean": 4, "max": 5}
    assert summary["prefix_cache_queries"] == {"increase": 200, "per_s": 200}
    assert summary["prefix_cache_hit_rate"] == pytest.approx(60 / 200)


def test_scraping_the_hf_server_while_it_serves(hf_server, tmp_path):
    base = hf_server.endpoint.base_url
    out = tmp_path / "server_metrics.jsonl"
    body = {"prompt": "fana gele", "max_tokens": 200, "ignore_eos": True}
    request = threading.Thread(target=requests.post, args=(f"{base}/v1/completions",), kwargs={"json": body,
                                                                                             "timeout": 120})
    with MetricsScraper(hf_server.endpoint.metrics_url, out, interval_s=0.1) as scraper:
        request.start()
        request.join()
        time.sleep(0.25)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert scraper.errors == 0 and len(rows) >= 3
    gaps = [b["t"] - a["t"] for a, b in zip(rows, rows[1:])]
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.1, abs=0.03)  # fixed cadence
    assert max(row["running"] for row in rows) == 1  # the request was seen in the batch
    assert rows[-1]["generation_tokens"] - rows[0].get("generation_tokens", 0) == 200  # exported from the 1st request


@pytest.mark.timing
def test_tgi_user_measures_the_sim_schedule_through_generate_stream(tmp_path):
    """InferenceClient against the sim server's TGI API: TTFT 100 ms and 10 ms per token, as the OpenAI user sees."""
    result = run_cli("loadtest", "--backend", "sim", "--sim-ttft-ms", "100", "--sim-tpot-ms", "10", "--client", "tgi",
                     "--scenario", str(DATA / "timing.yaml"), "--users", "4", "--duration", "8",
                     "--scrape-interval", "0.5", "--results", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(result)
    summary = load_summary(run_dir)
    assert summary["requests"]["failed"] == 0 and summary["requests"]["ok"] >= 8
    latency = summary["latency_s"]
    # InferenceClient builds each request through httpx after the due time (~1-3 ms more than the OpenAI
    # user's geventhttpclient), counted against TTFT as client-side time should be
    assert_latency_follows_schedule(latency)
    for record in read_records(run_dir / "requests.jsonl"):
        assert record.output_tokens_usage == record.output_tokens_tokenizer == 50  # details.generated_tokens
    assert summary["server"]["scrapes_in_window"] >= 10 and summary["server"]["running"]["max"] >= 1
    assert (run_dir / "server_metrics.jsonl").exists()


class _PagesServer:
    """A real HTTP /metrics endpoint that serves the given pages in turn, then the last one forever."""

    def __init__(self, pages: list[str]):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.pages, self.served = list(pages), 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = owner.pages[min(owner.served, len(owner.pages) - 1)].encode()
                owner.served += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()


# vLLM's gauges with Prometheus sample timestamps (ms): a hand parser read the timestamp as the value
BUSY_WITH_TIMESTAMPS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3 1764490000000
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 2 1764490000000
"""
IDLE_WITH_TIMESTAMPS = BUSY_WITH_TIMESTAMPS.replace(" 3 ", " 0 ").replace(" 2 ", " 0 ")


@pytest.mark.parametrize("busy, idle, label", [
    (BUSY_WITH_TIMESTAMPS, IDLE_WITH_TIMESTAMPS, "5 requests"),
    (TGI_PAGE, TGI_PAGE.replace(" 7\n", " 0\n").replace(" 2\n", " 0\n"), "9 requests"),
])
def test_wait_server_idle_reads_the_queue_through_the_shared_parser(busy, idle, label):
    messages = []
    with _PagesServer([busy, busy, idle]) as server:
        started = time.monotonic()
        wait_server_idle(server.url, timeout_s=30, poll_s=0.05, progress=messages.append)
        assert time.monotonic() - started < 5 and server.served == 3
    assert messages == [f"  waiting for the server to drain {label} left from the previous step"]


def test_wait_server_idle_gives_up_on_a_page_that_does_not_parse_instead_of_crashing():
    messages = []
    with _PagesServer(["# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} many\n"]) \
            as server:
        wait_server_idle(server.url, timeout_s=30, poll_s=0.05, progress=messages.append)
    assert len(messages) == 1 and "does not parse" in messages[0]


def test_wait_server_idle_returns_at_once_without_an_endpoint_or_queue_figures():
    from tokenrig.serve.launcher import free_port

    messages = []
    wait_server_idle(f"http://127.0.0.1:{free_port()}/metrics", timeout_s=30, progress=messages.append)
    with _PagesServer(["# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 4.5\n"]) as server:
        wait_server_idle(server.url, timeout_s=30, poll_s=0.05, progress=messages.append)
        assert server.served == 1
    assert messages == []


def test_wait_server_idle_stops_waiting_at_its_timeout():
    messages = []
    with _PagesServer([BUSY_WITH_TIMESTAMPS]) as server:
        wait_server_idle(server.url, timeout_s=0.3, poll_s=0.05, progress=messages.append)
    assert messages[-1] == "  server still busy after 0 s; measuring anyway" and len(messages) == 2

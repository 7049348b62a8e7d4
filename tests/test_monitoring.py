"""Monitoring against a real Prometheus: every dashboard query returns data from real runs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SGLANG_0_5_17_PAGE, VLLM_0_26_PAGE, run_cli, run_dir_of
from tokenrig.monitor.dashboards import DASHBOARDS, panel_queries, render
from tokenrig.monitor.discovery import TargetFile
from tokenrig.monitor.local import prometheus_config
from tokenrig.paths import GRAFANA
from tokenrig.serve.launcher import free_port
from tokenrig.serve.scrape import MetricsScraper, summarize_server_metrics

DASHBOARD_DIR = GRAFANA / "dashboards"

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None and not os.environ.get("TOKENRIG_REQUIRE_PROMETHEUS"),
    reason="prometheus not installed (apt-get install prometheus; .ci/run does)")


def test_committed_dashboards_match_the_code_and_grafanas_schema():
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    for name, build in DASHBOARDS.items():
        committed = json.loads((DASHBOARD_DIR / f"tokenrig-{name}.json").read_text())
        assert committed == render(build()), f"tokenrig/grafana/dashboards is stale: run make dashboards ({name})"
        reparsed = json.loads(json.dumps(Dashboard.from_json(committed), cls=JSONEncoder))
        assert reparsed == committed, f"{name}: fields outside Grafana's dashboard schema"
        variables = {v["name"] for v in committed["templating"]["list"]}
        if name in ("loadtest", "server"):
            assert variables == {"run_id", "scenario", "backend", "model", "gpu"}
        if name == "training":
            assert variables == {"run_id", "scenario", "backend", "model", "gpu", "mode"}
        for panel in committed["panels"]:
            if panel["type"] != "row":
                assert panel["targets"] and len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def _query_range(base: str, expr: str, start: float, end: float) -> list:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1"})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _has_values(result: list) -> bool:
    return any(value != "NaN" for series in result for _, value in series["values"])


def _concrete(expr: str) -> str:
    """What Grafana would send with every variable at 'All'."""
    return re.sub(r"\$\w+", ".*", expr.replace("$__rate_interval", "15s"))


@contextlib.contextmanager
def _prometheus(tmp_path: Path):
    """A real Prometheus running the shipped prometheus.yml's tokenrig job as `make monitor` aims it at a targets
    directory, scraping and rediscovering every second; yields its URL and the targets directory it watches."""
    config = prometheus_config(tmp_path / "targets")
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] == "tokenrig"]
    config["scrape_configs"][0]["file_sd_configs"][0]["refresh_interval"] = "1s"
    (tmp_path / "targets").mkdir()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", tmp_path / "targets"
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)


@needs_prometheus
def test_every_panel_query_returns_data_from_real_runs(tmp_path):
    with _prometheus(tmp_path) as (base, targets):
        start = time.time()
        training = subprocess.Popen(
            [sys.executable, "-m", "tokenrig.cli", "train", "--model", "tiny", "--gpu", "cpu", "--zero", "0",
             "--steps", "6", "--warmup-steps", "1", "--profile-steps", "0", "--seq-len", "64", "--micro-batch", "2",
             "--prometheus-targets", str(targets), "--results", str(tmp_path / "results")],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        result = run_cli("loadtest", "--backend", "sim", "--gpu", "a800", "--model", "13b", "--rate", "3",
                         "--duration", "15", "--warmup", "1", "--prometheus-targets", str(targets),
                         "--results", str(tmp_path / "results"))
        assert result.returncode == 0, result.stdout + result.stderr
        training_output, _ = training.communicate(timeout=600)
        assert training.returncode == 0, training_output
        assert not list(targets.iterdir()), "target files must be removed when the runs end"
        end = time.time()
        run_id = run_dir_of(result).name
        up = _query_range(base, f'up{{run_id="{run_id}"}}', start, end)
        assert {s["metric"]["role"] for s in up} == {"loadgen", "server"}
        assert _has_values(_query_range(base, 'up{role="train"}', start, end))
        empty = []
        for name in ("loadtest", "server", "training"):
            for title, expr in panel_queries(render(DASHBOARDS[name]())):
                if not _has_values(_query_range(base, _concrete(expr), start, end)):
                    empty.append(f"{name} / {title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)


def _replayed(page: str, elapsed_s: float) -> str:
    """The page as a live server would show it elapsed_s later: every counter and histogram sample grows in
    proportion (buckets stay monotonic), gauges stay."""
    lines, growing = [], False
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            growing = line.split()[3] in ("counter", "histogram")
        elif growing and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            line = f"{series} {float(value) * (1 + elapsed_s / 10)!r}"
        lines.append(line)
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _live_page(page: str):
    """A loopback /metrics replaying the page; yields its host:port."""
    started = time.monotonic()

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):
            body = _replayed(page, time.monotonic() - started).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _label_values(base: str, label: str, selector: str) -> list[str]:
    """What Grafana's label_values(selector, label) variable query asks Prometheus."""
    params = urllib.parse.urlencode({"match[]": selector})
    with urllib.request.urlopen(f"{base}/api/v1/label/{label}/values?{params}", timeout=10) as response:
        return json.loads(response.read())["data"]


@needs_prometheus
@pytest.mark.parametrize("backend, page, gpu", [("vllm", VLLM_0_26_PAGE, "h200"),
                                                ("sglang", SGLANG_0_5_17_PAGE, "h100-sxm")])
def test_every_server_panel_query_returns_data_from_each_engines_page(tmp_path, backend, page, gpu):
    """vLLM 0.26's page was captured on an H200; SGLang 0.5.17's is built from its metric definitions."""
    run_id = f"{page.stem}-fixture"
    labels = {"run_id": run_id, "scenario": "fixed-512x128", "backend": backend, "model": "llama2-7b", "gpu": gpu}
    dashboard = render(DASHBOARDS["server"]())
    queries = panel_queries(dashboard)
    with _prometheus(tmp_path) as (base, targets), _live_page(page.read_text()) as address:
        TargetFile.announce(targets, "server", address, labels)
        start = time.time()
        while True:  # 1-s scrapes until every panel, filtered on this run, has data
            time.sleep(1)
            end = time.time()
            empty = [f"{title}: {expr}" for title, expr in queries
                     if not _has_values(_query_range(base, _concrete(expr.replace("$run_id", run_id)), start, end))]
            if not empty or end - start > 25:
                break
        up = _query_range(base, f'up{{run_id="{run_id}",role="server"}}', start, end)
        assert up and {value for _, value in up[0]["values"]} == {"1"}, up
        assert not empty, f"server panels without data from {page.name}:\n" + "\n".join(empty)
        for variable in dashboard["templating"]["list"]:  # label_values(<selector>, <label>)
            selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"]).groups()
            assert labels[label] in _label_values(base, label, selector), variable["query"]


def test_the_scraper_reads_an_sglang_page_as_it_grows(tmp_path):
    """SGLang 0.5.17's page served live (counters growing) through the scraper and its window summary."""
    out = tmp_path / "server_metrics.jsonl"
    with _live_page(SGLANG_0_5_17_PAGE.read_text()) as address:
        with MetricsScraper(f"http://{address}/metrics", out, interval_s=0.25) as scraper:
            time.sleep(1.2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    summary = summarize_server_metrics(out, rows[0]["t"], rows[-1]["t"] + 1, scraper.errors)
    assert summary["scrape_errors"] == 0 and summary["scrapes_in_window"] >= 4
    assert summary["running"] == {"mean": 32, "max": 32} and summary["kv_cache_usage"]["max"] > 0
    assert summary["generation_tokens"]["per_s"] > 0
    assert summary["prefix_cache_hit_rate"] == pytest.approx(64 / 512)  # radix-cache hits over prompt tokens


@needs_prometheus
def test_sigterm_stops_the_monitor_wrappers_prometheus_and_a_docker_without_daemon_is_named(tmp_path):
    """`make monitor`'s wrapper stopped by SIGTERM (a script, a service manager) stops its Prometheus too; a
    docker client whose daemon does not answer is not reported as Docker being there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # what the docker CLI does on a machine where the daemon is not running
    (bin_dir / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon at "
                                    "unix:///var/run/docker.sock. Is the docker daemon running?' >&2\nexit 1\n")
    (bin_dir / "docker").chmod(0o755)
    port = free_port()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    wrapper = subprocess.Popen([sys.executable, "-m", "tokenrig.monitor.local", "--listen", f"127.0.0.1:{port}",
                                "--data", str(tmp_path / "data")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    children = []
    try:
        deadline = time.monotonic() + 60
        while not children and time.monotonic() < deadline:
            time.sleep(0.2)
            children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(wrapper.pid)], capture_output=True,
                                                            text=True).stdout.split()]
        assert children, "the wrapper started no Prometheus"
        wrapper.send_signal(signal.SIGTERM)
        output, _ = wrapper.communicate(timeout=60)
        assert wrapper.returncode == 0, output
        assert ("A docker client is here, but its daemon does not answer (Cannot connect to the Docker daemon at "
                "unix:///var/run/docker.sock. Is the docker daemon running?)") in output
        assert "Docker is here" not in output
        assert not any(Path(f"/proc/{pid}").exists() for pid in children), "Prometheus outlived its wrapper"
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.communicate()


def test_a_stop_signal_while_the_wrapper_starts_its_child_still_stops_the_childs_group(tmp_path):
    """A SIGTERM that reached `make monitor`'s wrapper while it was forking Prometheus was raised inside Popen:
    the wrapper died (exit -2) and left the child running. Here the signal is sent from inside the real Popen,
    after its fork; the wrapper must still stop the child's whole group and exit 0."""
    marker = tmp_path / "still-running"
    script = f"""
import os, signal, subprocess, sys

class SignalledWhileStarting(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # lands before Popen has returned the child's handle

subprocess.Popen = SignalledWhileStarting
from tokenrig.monitor.local import run_until_stopped
sys.exit(run_until_stopped(["sh", "-c", "sleep 30 & wait; touch {marker}"]))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    wrapper = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    leftover = subprocess.run(["pgrep", "-f", f"touch {marker}"], capture_output=True, text=True).stdout.split()
    for pid in leftover:
        os.killpg(int(pid), signal.SIGKILL)
    assert wrapper.returncode == 0, wrapper.stdout + wrapper.stderr
    assert not leftover and time.monotonic() - started < 20  # stopped at once, not after the child's 30 s

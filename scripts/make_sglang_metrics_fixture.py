"""Write tests/fixtures/sglang-<version>-metrics-under-load.txt: the /metrics page an SGLang server shows under load,
built from SGLang's own metric definitions (no SGLang server can run without a GPU).

    python scripts/make_sglang_metrics_fixture.py

The metrics are the ones tests/data/sglang-<version>-cli.json lists (scripts/gen_sglang_cli.py reads them from
sglang/srt/observability/metrics_collector.py: names, types, help, label names, buckets, multiprocess modes).
They are registered with prometheus_client in multiprocess mode and exposed through a MultiProcessCollector,
as SGLang's server does (utils/common.py set_prometheus_multiproc_dir, add_prometheus_middleware), with the
label values SGLang sets on a unified server (engine_type "unified", ranks 0, is_streaming "true" for the
OpenAI streaming requests tokenrig sends, cache_source "device") and values of one load: `LOAD` below, a
7B model on one H100 at 32 streams of 512 prompt + 128 output tokens, 60 s in. The values are chosen, not
measured; the page's header says so.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.5.17"
LOAD = {"streams": 32, "prompt_tokens": 512, "output_tokens": 128, "seconds": 60, "ttft_s": 0.09, "tpot_s": 0.0115,
        "kv_pool_tokens": 466_000, "prefix_hit_tokens_per_request": 64, "model": "llama2-7b"}
LABEL_VALUES = {"model_name": LOAD["model"], "engine_type": "unified", "tp_rank": "0", "pp_rank": "0",
                "moe_ep_rank": "0", "is_streaming": "true", "cache_source": "device"}
HEADER = """# SGLang {version} /metrics page, BUILT (not captured from a running server)
# by scripts/make_sglang_metrics_fixture.py: the metric names, types, help texts, label names, buckets and
# multiprocess modes of SGLang {version}'s SchedulerMetricsCollector and TokenizerMetricsCollector (read from
# the wheel by scripts/gen_sglang_cli.py), registered with prometheus_client {client} in multiprocess mode as
# SGLang's server does, and filled with the chosen values of one load: {streams} streams of {prompt_tokens} in /
# {output_tokens} out, {seconds} s in, TTFT {ttft_s} s, TPOT {tpot_s} s, a {kv_pool_tokens}-token KV pool,
# {prefix_hit_tokens_per_request} radix-cache hit tokens per request. Gauges in prometheus_client's "all" mode
# carry the rendering process's pid, as SGLang's scheduler processes' do.
# Not rendered (buckets computed at run time): {skipped}.
"""


def _requests_done() -> int:
    per_request_s = LOAD["ttft_s"] + LOAD["tpot_s"] * (LOAD["output_tokens"] - 1)
    return int(LOAD["streams"] * LOAD["seconds"] / per_request_s)


def _fill(metric, spec: dict, rng: random.Random) -> None:
    """Values consistent with LOAD for the metrics tokenrig reads; zeros (as SGLang shows them idle) elsewhere."""
    labels = {name: LABEL_VALUES.get(name, "") for name in spec["labels"]}
    child = metric.labels(**labels) if labels else metric
    done, name = _requests_done(), spec["name"]
    in_use = LOAD["streams"] * (LOAD["prompt_tokens"] + LOAD["output_tokens"] // 2)
    gauges = {"sglang:num_running_reqs": LOAD["streams"], "sglang:num_queue_reqs": 0,
              "sglang:token_usage": in_use / LOAD["kv_pool_tokens"], "sglang:num_used_tokens": in_use,
              "sglang:kv_used_tokens": in_use, "sglang:kv_available_tokens": LOAD["kv_pool_tokens"] - in_use,
              "sglang:max_total_num_tokens": LOAD["kv_pool_tokens"], "sglang:context_len": 4096,
              "sglang:gen_throughput": LOAD["streams"] / LOAD["tpot_s"],
              "sglang:cache_hit_rate": LOAD["prefix_hit_tokens_per_request"] / LOAD["prompt_tokens"],
              "sglang:is_cuda_graph": 1, "sglang:utilization": 0.93, "sglang:page_size": 1,
              "sglang:weight_memory_usage_gb": 12.6}
    counters = {"sglang:prompt_tokens_total": done * LOAD["prompt_tokens"],
                "sglang:generation_tokens_total": done * LOAD["output_tokens"],
                "sglang:num_requests_total": done,
                "sglang:cached_tokens_total": done * LOAD["prefix_hit_tokens_per_request"]}
    observations = {"sglang:time_to_first_token_seconds": lambda: rng.gauss(LOAD["ttft_s"], 0.02),
                    "sglang:inter_token_latency_seconds": lambda: rng.gauss(LOAD["tpot_s"], 0.0015),
                    "sglang:e2e_request_latency_seconds":
                        lambda: rng.gauss(LOAD["ttft_s"] + LOAD["tpot_s"] * (LOAD["output_tokens"] - 1), 0.1),
                    "sglang:prompt_tokens_histogram": lambda: LOAD["prompt_tokens"],
                    "sglang:uncached_prompt_tokens_histogram":
                        lambda: LOAD["prompt_tokens"] - LOAD["prefix_hit_tokens_per_request"],
                    "sglang:generation_tokens_histogram": lambda: LOAD["output_tokens"],
                    "sglang:queue_time_seconds": lambda: abs(rng.gauss(0.004, 0.002))}
    if spec["type"] == "gauge":
        child.set(gauges.get(name, 0))
    elif spec["type"] == "counter":
        child.inc(counters.get(name, 0))
    elif name in observations:
        # inter-token latency: one observation per output token after the first
        count = done * (LOAD["output_tokens"] - 1) if name == "sglang:inter_token_latency_seconds" else done
        for _ in range(count):
            child.observe(max(observations[name](), 0.0))


def build_page(cli: dict) -> str:
    """The page, rendered as SGLang's /metrics route renders it."""
    with tempfile.TemporaryDirectory() as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # before prometheus_client is imported, as SGLang does
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

        rng = random.Random(17)
        skipped = []
        for spec in cli["metrics"]:
            kwargs = {"name": spec["name"], "documentation": spec["help"], "labelnames": spec["labels"]}
            if spec["type"] == "gauge":
                metric = Gauge(**kwargs, multiprocess_mode=spec.get("multiprocess_mode", "all"))
            elif spec["type"] == "counter":
                metric = Counter(**kwargs)
            elif spec["type"] == "histogram" and spec.get("buckets"):
                metric = Histogram(**kwargs, buckets=spec["buckets"])
            else:
                skipped.append(spec["name"])
                continue
            _fill(metric, spec, rng)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry).decode()
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    header = HEADER.format(version=cli["sglang_version"], client=version("prometheus-client"),
                           skipped=", ".join(skipped) or "none", **LOAD)
    return header + body


def main() -> None:
    cli = json.loads((ROOT / "tests" / "data" / f"sglang-{VERSION}-cli.json").read_text())
    out = ROOT / "tests" / "fixtures" / f"sglang-{VERSION}-metrics-under-load.txt"
    out.write_text(build_page(cli))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

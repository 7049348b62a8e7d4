"""Grafana dashboards, generated from code with grafana-foundation-sdk (Grafana's typed schema).

`python -m tokenrig.monitor.dashboards [DIR]` (or `make dashboards`) writes one JSON file per
dashboard (default: the shipped tokenrig/grafana/dashboards/): load test, server/engine, training,
GPU (DCGM exporter names). Every panel filters on the template variables run, scenario, backend,
model and gpu, so several benchmarks can be watched and compared side by side. The server dashboard's
queries select each figure under every engine's name for it (the backend registry's metric maps), so
vLLM, SGLang and tokenrig's own servers fill the same panels. The tests evaluate every panel query
against a real Prometheus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

from tokenrig.metrics.registry import by_row
from tokenrig.paths import GRAFANA
from tokenrig.serve.backends import preferred_metric_names

DATASOURCE = DataSourceRef(type_val="prometheus", uid="tokenrig-prometheus")
RUN_VARIABLES = ("run_id", "scenario", "backend", "model", "gpu")
SELECTOR = ",".join(f'{label}=~"${label}"' for label in RUN_VARIABLES)


def _variables(dashboard: db.Dashboard, metric: str, labels=RUN_VARIABLES) -> db.Dashboard:
    """Template variables whose values are `metric`'s labels (a metric name or a series selector)."""
    for label in labels:
        dashboard = dashboard.with_variable(
            db.QueryVariable(label).label(label).datasource(DATASOURCE)
            .query(f"label_values({metric}, {label})").multi(True).include_all(True).all_value(".*")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))
    return dashboard


def _panel(title: str, unit: str, *queries: tuple[str, str], width: int = 12) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).height(8).span(width)
    for ref_id, (expr, legend) in zip("ABCDEFGH", queries):
        panel = panel.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id))
    return panel


def _quantiles(metric: str, selector: str, by: str = "run_id") -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[$__rate_interval])))",
             f"p{int(q * 100)} {{{{{by}}}}}") for q in (0.5, 0.99)]


def _engines(figure: str, selector: str, suffix: str = "") -> str:
    """A series selector for one server figure under every engine's name for it (name + suffix, e.g. _bucket)."""
    names = "|".join(name + suffix for name in preferred_metric_names(figure))
    return f'{{__name__=~"{names}",{selector}}}'


def _engine_quantiles(figure: str, selector: str, by: str = "run_id") -> list[tuple[str, str]]:
    buckets = _engines(figure, selector, "_bucket")
    return [(f"histogram_quantile({q}, sum by (le, {by}) (rate({buckets}[$__rate_interval])))",
             f"p{int(q * 100)} {{{{{by}}}}}") for q in (0.5, 0.99)]


def loadtest_dashboard() -> db.Dashboard:
    s = SELECTOR
    d = (db.Dashboard("tokenrig — load test").uid("tokenrig-loadtest").tags(["tokenrig", "loadtest"])
         .refresh("5s").time("now-30m", "now"))
    d = _variables(d, "tokenrig_requests_total")
    d = d.with_row(db.Row("Latency (client side, from the scheduled send time)"))
    for metric in by_row():
        d = d.with_panel(_panel(metric.title, metric.unit, *_quantiles(metric.prometheus_name, s)))
    d = d.with_row(db.Row("Throughput and load"))
    d = d.with_panel(_panel("Output tokens/s", "short",
                            (f"sum by (run_id) (rate(tokenrig_output_tokens_total{{{s}}}[$__rate_interval]))",
                             "{{run_id}}")))
    d = d.with_panel(_panel("Requests/s by outcome", "reqps",
                            (f"sum by (run_id, outcome) (rate(tokenrig_requests_total{{{s}}}[$__rate_interval]))",
                             "{{outcome}} {{run_id}}")))
    d = d.with_panel(_panel("Target vs achieved send rate", "reqps",
                            (f"sum by (run_id) (tokenrig_target_request_rate{{{s}}})", "target {{run_id}}"),
                            (f"sum by (run_id) (rate(tokenrig_requests_sent_total{{{s}}}[$__rate_interval]))",
                             "achieved {{run_id}}")))
    d = d.with_panel(_panel("Requests in flight", "short",
                            (f"sum by (run_id) (tokenrig_requests_in_flight{{{s}}})", "in flight {{run_id}}")))
    d = d.with_row(db.Row("Load-generator health"))
    d = d.with_panel(_panel("Schedule lag (actual - scheduled send)", "s",
                            *_quantiles("tokenrig_schedule_lag_seconds", s)))
    d = d.with_panel(_panel("Input tokens/s", "short",
                            (f"sum by (run_id) (rate(tokenrig_input_tokens_total{{{s}}}[$__rate_interval]))",
                             "{{run_id}}")))
    return d


def server_dashboard() -> db.Dashboard:
    """The engines' own figures, each under every engine's name for it (vLLM's names are tokenrig's servers' too)."""
    s = SELECTOR
    d = (db.Dashboard("tokenrig — server / engine").uid("tokenrig-server")
         .tags(["tokenrig", "server", "vllm", "sglang"]).refresh("5s").time("now-30m", "now"))
    d = _variables(d, '{__name__=~"%s"}' % "|".join(preferred_metric_names("running")))
    d = d.with_panel(_panel("Requests running / waiting", "short",
                            (f"sum by (run_id) ({_engines('running', s)})", "running {{run_id}}"),
                            (f"sum by (run_id) ({_engines('waiting', s)})", "waiting {{run_id}}")))
    d = d.with_panel(_panel("KV-cache usage", "percentunit",
                            (f"max by (run_id) ({_engines('kv_cache_usage', s)})", "{{run_id}}")))
    d = d.with_panel(_panel("Token throughput", "short",
                            (f"sum by (run_id) (rate({_engines('generation_tokens', s)}[$__rate_interval]))",
                             "generated {{run_id}}"),
                            (f"sum by (run_id) (rate({_engines('prompt_tokens', s)}[$__rate_interval]))",
                             "prompt {{run_id}}")))
    # vLLM labels finished requests by finished_reason; SGLang's count has no such label (the legend shows none)
    d = d.with_panel(_panel("Finished requests/s", "reqps",
                            (f"sum by (run_id, finished_reason) (rate({_engines('finished_requests', s)}"
                             f"[$__rate_interval]))", "{{finished_reason}} {{run_id}}")))
    d = d.with_panel(_panel("Server TTFT", "s", *_engine_quantiles("ttft_seconds", s)))
    d = d.with_panel(_panel("Server inter-token latency", "s", *_engine_quantiles("itl_seconds", s)))
    d = d.with_panel(_panel("Server end-to-end latency", "s", *_engine_quantiles("e2e_seconds", s)))
    return d


def training_dashboard() -> db.Dashboard:
    labels = RUN_VARIABLES + ("mode",)
    s = ",".join(f'{label}=~"${label}"' for label in labels)
    d = (db.Dashboard("tokenrig — training").uid("tokenrig-train").tags(["tokenrig", "train"])
         .refresh("5s").time("now-30m", "now"))
    d = _variables(d, "tokenrig_train_tokens_per_second", labels)
    d = d.with_panel(_panel("Tokens/s (all GPUs)", "short",
                            (f"sum by (run_id) (tokenrig_train_tokens_per_second{{{s}}})", "{{run_id}}")))
    d = d.with_panel(_panel("MFU and HFU", "percentunit",
                            (f"avg by (run_id) (tokenrig_train_mfu_ratio{{{s}}})", "MFU {{run_id}}"),
                            (f"avg by (run_id) (tokenrig_train_hfu_ratio{{{s}}})", "HFU {{run_id}}")))
    d = d.with_panel(_panel("Step time", "s", (f"max by (run_id) (tokenrig_train_step_seconds{{{s}}})", "{{run_id}}")))
    d = d.with_panel(_panel("Model FLOP/s per GPU", "flops",
                            (f"avg by (run_id) (tokenrig_train_model_flops_per_second_per_gpu{{{s}}})", "{{run_id}}")))
    d = d.with_panel(_panel("Memory (rank 0)", "bytes",
                            (f"max by (run_id, kind) (tokenrig_train_memory_bytes{{{s}}})", "{{kind}} {{run_id}}")))
    d = d.with_panel(_panel("Loss", "short", (f"avg by (run_id) (tokenrig_train_loss{{{s}}})", "{{run_id}}")))
    d = d.with_panel(_panel("Steps/s by phase", "short",
                            (f"sum by (run_id, phase) (rate(tokenrig_train_steps_total{{{s}}}[$__rate_interval]))",
                             "{{phase}} {{run_id}}")))
    return d


def gpu_dashboard() -> db.Dashboard:
    """NVIDIA DCGM exporter metric names (dcgm-exporter's default counters)."""
    labels = ("Hostname", "gpu")
    selector = ",".join(f'{label}=~"${label}"' for label in labels)
    d = (db.Dashboard("tokenrig — GPUs (DCGM)").uid("tokenrig-gpu").tags(["tokenrig", "gpu", "dcgm"])
         .refresh("5s").time("now-30m", "now"))
    d = _variables(d, "DCGM_FI_DEV_GPU_UTIL", labels)
    for title, metric, unit in (("GPU utilisation", "DCGM_FI_DEV_GPU_UTIL", "percent"),
                                ("Tensor pipe active", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "percentunit"),
                                ("Framebuffer used", "DCGM_FI_DEV_FB_USED", "decmbytes"),
                                ("Power", "DCGM_FI_DEV_POWER_USAGE", "watt"),
                                ("Memory copy utilisation", "DCGM_FI_DEV_MEM_COPY_UTIL", "percent"),
                                ("Temperature", "DCGM_FI_DEV_GPU_TEMP", "celsius")):
        d = d.with_panel(_panel(title, unit, (f"{metric}{{{selector}}}", "{{Hostname}} GPU {{gpu}}")))
    return d


DASHBOARDS = {"loadtest": loadtest_dashboard, "server": server_dashboard, "training": training_dashboard,
              "gpu": gpu_dashboard}


def render(builder: db.Dashboard) -> dict:
    return json.loads(json.dumps(builder.build(), cls=JSONEncoder))


def panel_queries(dashboard_json: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of every panel."""
    return [(panel["title"], target["expr"]) for panel in dashboard_json.get("panels", [])
            for target in panel.get("targets", []) if "expr" in target]


def write_all(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in DASHBOARDS.items():
        path = directory / f"tokenrig-{name}.json"
        path.write_text(json.dumps(render(build()), indent=2, sort_keys=True) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else GRAFANA / "dashboards"):
        print(written)

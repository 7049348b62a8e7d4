"""Training's Prometheus exporter: gauges set from each StepRecord as the run writes it.

Names are in base units (seconds, bytes, FLOP/s, ratios) and are the ones the Grafana training
dashboard (tokenrig/monitor/dashboards.py) queries. Every series carries run_id, scenario (the
run's configuration label), backend (deepspeed), model, gpu and mode labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from tokenrig.train.flops import StepFlops
from tokenrig.train.records import StepRecord

RUN_LABELS = ("run_id", "scenario", "backend", "model", "gpu", "mode")


class TrainMetrics:
    def __init__(self, labels: dict[str, str], flops: StepFlops, world_size: int, peak_tflops: float):
        self.registry = CollectorRegistry()
        self.flops, self.world_size, self.peak_flops = flops, world_size, peak_tflops * 1e12
        names = list(RUN_LABELS)
        values = [labels[name] for name in RUN_LABELS]

        def gauge(name, doc):
            return Gauge(name, doc, names, registry=self.registry).labels(*values)

        self.tokens_per_second = gauge("tokenrig_train_tokens_per_second",
                                       "Tokens trained per second, all GPUs, last step")
        self.step_time = gauge("tokenrig_train_step_seconds", "Duration of the last optimizer step")
        self.flops_per_second = gauge("tokenrig_train_model_flops_per_second_per_gpu",
                                      "Model FLOP/s per GPU achieved in the last step")
        self.mfu = gauge("tokenrig_train_mfu_ratio", "Model FLOPs utilisation of the last step (0..1)")
        self.hfu = gauge("tokenrig_train_hfu_ratio", "Hardware FLOPs utilisation (recomputation counted), last step")
        memory = Gauge("tokenrig_train_memory_bytes", "Rank 0's memory: peak GPU allocated/reserved, host resident",
                       names + ["kind"], registry=self.registry)
        self.allocated = memory.labels(*values, "gpu_allocated_peak")
        self.reserved = memory.labels(*values, "gpu_reserved_peak")
        self.host = memory.labels(*values, "host_resident")
        self.loss = gauge("tokenrig_train_loss", "Training loss of the last step")
        self.steps = Counter("tokenrig_train_steps", "Finished steps by phase", names + ["phase"],
                             registry=self.registry)
        self.label_values = values

    def observe(self, record: StepRecord) -> None:
        self.steps.labels(*self.label_values, record.phase).inc()
        tokens_per_s = record.tokens / record.step_time_s
        per_gpu = tokens_per_s / self.world_size
        self.tokens_per_second.set(tokens_per_s)
        self.step_time.set(record.step_time_s)
        self.flops_per_second.set(self.flops.model_per_token * per_gpu)
        self.mfu.set(self.flops.model_per_token * per_gpu / self.peak_flops)
        self.hfu.set(self.flops.hardware_per_token * per_gpu / self.peak_flops)
        self.loss.set(record.loss)
        self.host.set(record.host_rss_bytes)
        if record.gpu_allocated_peak_bytes is not None:
            self.allocated.set(record.gpu_allocated_peak_bytes)
            self.reserved.set(record.gpu_reserved_peak_bytes or 0)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

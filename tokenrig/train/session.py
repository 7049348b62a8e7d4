"""One training run end to end: run dir -> DeepSpeed launcher -> live step records -> summary + breakdown.

The ranks are started by DeepSpeed's own launcher (`python -m deepspeed.launcher.runner`, with
a hostfile for several nodes), exactly as a DeepSpeed user would start them. This process only
watches: it tails steps.jsonl for progress and Prometheus gauges, and after the launcher exits
it writes summary.json and the breakdown. Ctrl-C stops the ranks after their current step and
still summarises every measured step.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tokenrig.interrupts import stop_signals_interrupt
from tokenrig.jsonfile import write_json
from tokenrig.monitor.discovery import MonitorOptions, TargetFile
from tokenrig.monitor.exporter import wait_for_final_scrape
from tokenrig.report.rundir import environment_facts, new_run_dir
from tokenrig.train import breakdown
from tokenrig.train.dsconfig import deepspeed_config
from tokenrig.train.flops import training_flops
from tokenrig.train.kernels import unavailable
from tokenrig.train.records import StepRecord, read_outcomes, read_steps
from tokenrig.train.spec import TrainSpec, TrainSpecError
from tokenrig.train.summary import summarize

# leave the shared hosts' NVLink multicast off in every rank (see the device notes in docs/results)
RANK_ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
STOP_GRACE_S = 90


def _package_versions() -> dict[str, str]:
    import importlib.metadata

    versions = {}
    for package in ("deepspeed", "peft", "bitsandbytes", "transformers", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher_command(spec: TrainSpec, run_dir: Path, master_port: int) -> list[str]:
    command = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--master_port", str(master_port)]
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if spec.hostfile:
        command += ["--hostfile", spec.hostfile, "--num_nodes", str(spec.nodes), "--num_gpus", str(spec.gpus)]
    elif visible and spec.device == "cuda":
        # the runner ignores CUDA_VISIBLE_DEVICES once --num_gpus is given; --include keeps the user's choice
        if len(visible) < spec.gpus:
            raise TrainSpecError(f"gpus={spec.gpus} but CUDA_VISIBLE_DEVICES lists {len(visible)}: {','.join(visible)}")
        command += ["--include", "localhost:" + ",".join(visible[:spec.gpus])]
    else:
        command += ["--num_gpus", str(spec.gpus)]
    return command + ["--module", "tokenrig.train.worker", str(run_dir)]


def _progress_line(spec: TrainSpec, record: StepRecord, flops_per_token: float) -> str:
    total = spec.warmup_steps + spec.steps + spec.profile_steps
    tokens_per_s = record.tokens / record.step_time_s
    mfu = flops_per_token * tokens_per_s / spec.world_size / (spec.gpu_profile.tflops_bf16 * 1e12)
    memory = (f"  GPU mem {record.gpu_allocated_peak_bytes / 1e9:.1f} GB"
              if record.gpu_allocated_peak_bytes is not None else f"  host {record.host_rss_bytes / 1e9:.2f} GB")
    utilisation = f"  MFU {mfu:6.1%}" if spec.device != "cpu" else ""
    return (f"  step {record.step:>3}/{total} {record.phase:<8} {record.step_time_s * 1e3:9.1f} ms "
            f"{tokens_per_s:11,.0f} tok/s{utilisation}  loss {record.loss:7.3f}{memory}")


def run_training(spec: TrainSpec, results: Path, monitor: MonitorOptions | None = None, quiet: bool = False,
                 run_dir: Path | None = None, prices: dict[str, float] | None = None) -> dict:
    """Run one configuration; returns the summary (also written to run_dir/summary.json). `prices` (GPU key ->
    $/hour, from --price) replace the GPU profile's in the cost.

    A kernel choice this host cannot run (kernels.unavailable) raises TrainSpecError before any run directory.
    """
    say = (lambda *_: None) if quiet else print
    reason = unavailable(spec)
    if reason:
        raise TrainSpecError(reason)
    run_dir = run_dir or new_run_dir(results, "train", spec.label())
    run_dir.mkdir(parents=True, exist_ok=True)
    ds_config = deepspeed_config(spec)
    (run_dir / "spec.json").write_text(spec.model_dump_json(indent=2))
    write_json(run_dir / "ds_config.json", ds_config)
    command = launcher_command(spec, run_dir, _free_port())
    write_json(run_dir / "metadata.json", {"run_id": run_dir.name, "kind": "train", "spec": spec.model_dump(),
                                           "launcher_command": command, "gpu_profile": spec.gpu_profile.model_dump(),
                                           "model_profile": spec.model_profile.model_dump(),
                                           "train_packages": _package_versions(), **environment_facts()})
    flops = training_flops(spec.model_profile, spec.seq_len, spec.mode, spec.recompute, spec.lora_rank,
                           spec.lora_targets)
    metrics = target = None
    if monitor is not None:
        from tokenrig.train.exporter import TrainMetrics

        labels = {"run_id": run_dir.name, "scenario": spec.label(), "backend": "deepspeed",
                  "model": spec.model_profile.key, "gpu": spec.gpu_profile.key, "mode": spec.mode}
        metrics = TrainMetrics(labels, flops, spec.world_size, spec.gpu_profile.tflops_bf16)
        port = metrics.serve(monitor.port)
        say(f"Prometheus metrics: http://127.0.0.1:{port}/metrics")
        target = TargetFile.announce(monitor.targets_dir, "train", f"127.0.0.1:{port}", labels)

    say(f"training {spec.label()} -> {run_dir}")
    say(f"  {shlex.join(command)}")
    # expandable segments: a 7B step on one 141 GB GPU otherwise fails on fragmentation, not on size
    environment = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ, **RANK_ENVIRONMENT}
    interrupted = False
    seen = 0
    with stop_signals_interrupt(), open(run_dir / "launcher.log", "w") as log:
        # its own process group: a Ctrl-C here reaches the ranks once, through os.killpg below
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                   start_new_session=True)
        try:
            while True:
                finished = process.poll() is not None
                records = read_steps(run_dir / "steps.jsonl")
                for record in records[seen:]:
                    say(_progress_line(spec, record, flops.model_per_token))
                    if metrics:
                        metrics.observe(record)
                seen = len(records)
                if finished:
                    break
                time.sleep(0.5)
        except KeyboardInterrupt:
            interrupted = True
            say("  stopping: the ranks finish their current step (Ctrl-C again to abandon it)")
            _signal_group(process, signal.SIGINT)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                _signal_group(process, signal.SIGKILL)
                process.wait()
    if monitor is not None and target:
        wait_for_final_scrape(monitor.linger_s)
        target.remove()
    return finish(spec, run_dir, process.returncode, interrupted, say, (prices or {}).get(spec.gpu_profile.key))


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def finish(spec: TrainSpec, run_dir: Path, returncode: int, interrupted: bool, say=print,
           price_usd_per_hour: float | None = None) -> dict:
    steps = read_steps(run_dir / "steps.jsonl")
    outcomes = read_outcomes(run_dir)
    if any(o.status == "oom" for o in outcomes):
        status = "oom"
    elif interrupted or any(o.status == "interrupted" for o in outcomes):
        status = "interrupted"
    elif returncode == 0 and any(o.status == "ok" for o in outcomes):
        status = "ok"
    else:
        status = "error"
    messages = [o.message for o in outcomes if o.message]
    summary = {"run_id": run_dir.name, "label": spec.label(), "status": status, "launcher_returncode": returncode,
               "message": messages[0] if messages else (None if status != "error" else _log_tail(run_dir)),
               "spec": spec.model_dump(), **summarize(spec, steps, price_usd_per_hour)}
    trainable = [o.trainable_params for o in outcomes if o.trainable_params]
    if trainable:
        summary["trainable_params"] = trainable[0]
    raw = run_dir / "breakdown-raw.json"
    if raw.exists() and summary.get("step_time_s"):
        import json

        result = json.loads(raw.read_text())
        # the rows are a mean over the profiled steps, so they are checked against the mean of their timings
        profiled = [s.step_time_s for s in steps if s.phase == "profiled"]
        verdict = breakdown.check(result, sum(profiled) / len(profiled) * 1e3, summary["step_time_s"]["median"] * 1e3)
        breakdown.write(result, verdict, run_dir, spec.label())
        summary["breakdown_check"] = verdict
        # kernel times do not change under the profiler, so the share is of the unprofiled step
        summary["comm_share"] = sum(row["total_ms"] for row in result["rows"]
                                    if row["category"] in breakdown.COMMUNICATION) / verdict["unprofiled_step_ms"]
    write_json(run_dir / "summary.json", summary)
    say(render(summary))
    return summary


def _log_tail(run_dir: Path, lines: int = 15) -> str:
    log = run_dir / "launcher.log"
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join(text[-lines:])


def render(summary: dict) -> str:
    lines = [f"{summary['label']}: {summary['status']}"]
    if summary["status"] not in ("ok", "interrupted") and summary.get("message"):
        lines.append(f"  {summary['message']}")
    if "step_time_s" in summary:
        step = summary["step_time_s"]
        lines += [
            f"  measured steps     {summary['measured_steps']} (after {summary['warmup_steps']} warm-up)",
            f"  step time          median {step['median'] * 1e3:.1f} ms  p10 {step['p10'] * 1e3:.1f}  "
            f"p90 {step['p90'] * 1e3:.1f}  stdev {step['stdev'] * 1e3:.1f}",
            f"  tokens/s           {summary['tokens_per_s']:,.0f} total, "
            f"{summary['tokens_per_s_per_gpu']:,.0f} per GPU",
            f"  TFLOP/s per GPU    {summary['achieved_tflops_per_gpu']:.2f} model, "
            f"{summary['hardware_tflops_per_gpu']:.2f} hardware"
            + (f" (peak {summary['peak_tflops_per_gpu']:g})" if summary.get("mfu") is not None else ""),
            (f"  MFU                {summary['mfu']:.1%}  (HFU {summary['hfu']:.1%}; 6N-MFU {summary['mfu_6n']:.1%}, "
             "nominal: 6 x all parameters, as public figures count)" if summary.get("mfu") is not None else
             "  MFU                not on CPU: no measured peak FLOP/s to hold the FLOP/s above against"),
            f"  loss               {summary['loss']['first']:.3f} -> {summary['loss']['last']:.3f}",
        ]
    if summary.get("cost"):
        cost = summary["cost"]
        lines.append(f"  cost               ${cost['usd_per_billion_tokens']:,.2f} per billion tokens trained "
                     f"({cost['gpus']} GPU(s) at ${cost['usd_per_gpu_hour']:.2f}/h, {cost['price_source']})")
    memory = summary.get("memory") or {}
    if memory.get("gpu_allocated_peak_bytes"):
        lines.append(f"  GPU memory peak    {memory['gpu_allocated_peak_bytes'] / 2**30:.1f} GiB allocated, "
                     f"{memory['gpu_reserved_peak_bytes'] / 2**30:.1f} GiB reserved (rank 0)")
    if memory.get("host_rss_peak_bytes"):
        lines.append(f"  host memory peak   {memory['host_rss_peak_bytes'] / 2**30:.2f} GiB RSS (rank 0)")
    if "breakdown_check" in summary:
        check = summary["breakdown_check"]
        verdict = "ok" if check["ok"] else "OUTSIDE TOLERANCE"
        lines.append(f"  breakdown          rows sum to {check['rows_total_ms']:.1f} ms vs "
                     f"{check['profiled_step_ms']:.1f} ms timed ({check['deviation']:.1%} apart, tolerance "
                     f"{check['tolerance']:.0%}): {verdict}; {breakdown.overhead_text(check['profiler_overhead'])}")
    lines.append(f"  results            {summary['run_id']}")
    return "\n".join(lines)

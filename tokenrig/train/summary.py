"""Step records -> the run's figures: step time, tokens/s, TFLOP/s, MFU/HFU, $ per billion tokens, memory, loss.

Warm-up and profiled steps are excluded; docs/metrics.md defines every figure. On CPU the FLOP/s are
real but the utilisations (MFU, HFU, 6N-MFU) are left out: there is no measured peak to hold them against.
"""

from __future__ import annotations

import numpy as np

from tokenrig.capacity.cost import usd_per_billion_tokens_trained
from tokenrig.train.flops import training_flops, utilisation
from tokenrig.train.records import StepRecord
from tokenrig.train.spec import TrainSpec


def training_cost(spec: TrainSpec, tokens_per_s: float, price_usd_per_hour: float | None = None) -> dict:
    """$ per billion tokens trained at `tokens_per_s`, at the GPU profile's price or the one given (--price)."""
    gpu = spec.gpu_profile
    price = gpu.price_usd_per_hour if price_usd_per_hour is None else price_usd_per_hour
    return {"gpus": spec.world_size, "usd_per_gpu_hour": price,
            "price_source": "--price" if price_usd_per_hour is not None else f"{gpu.key} profile, {gpu.price_date}",
            "usd_per_billion_tokens": usd_per_billion_tokens_trained(spec.world_size, price, tokens_per_s)}


def summarize(spec: TrainSpec, steps: list[StepRecord], price_usd_per_hour: float | None = None) -> dict:
    measured = [s for s in steps if s.phase == "measured"]
    flops = training_flops(spec.model_profile, spec.seq_len, spec.mode, spec.recompute, spec.lora_rank,
                           spec.lora_targets)
    peak = spec.gpu_profile.tflops_bf16
    result: dict = {"measured_steps": len(measured),
                    "warmup_steps": sum(s.phase == "warmup" for s in steps),
                    "tokens_per_step": spec.tokens_per_step,
                    "flops_per_token": {"model": flops.model_per_token, "hardware": flops.hardware_per_token,
                                        "nominal_6n": flops.nominal_6n_per_token},
                    "peak_tflops_per_gpu": peak}
    if measured:
        times = np.array([s.step_time_s for s in measured])
        tokens_per_s = spec.tokens_per_step * len(times) / times.sum()
        per_gpu = tokens_per_s / spec.world_size
        achieved, mfu = utilisation(flops.model_per_token, per_gpu, peak)
        hardware, hfu = utilisation(flops.hardware_per_token, per_gpu, peak)
        _, mfu_6n = utilisation(flops.nominal_6n_per_token, per_gpu, peak)
        if spec.device == "cpu":  # the cpu profile's peak is a notional figure, not this CPU's: no utilisation
            mfu = hfu = mfu_6n = None
        result.update(
            step_time_s={"median": float(np.median(times)), "mean": float(times.mean()),
                         "p10": float(np.percentile(times, 10)), "p90": float(np.percentile(times, 90)),
                         "min": float(times.min()), "max": float(times.max()),
                         "stdev": float(times.std(ddof=1)) if len(times) > 1 else 0.0},
            tokens_per_s=tokens_per_s, tokens_per_s_per_gpu=per_gpu,
            achieved_tflops_per_gpu=achieved, mfu=mfu, hardware_tflops_per_gpu=hardware, hfu=hfu, mfu_6n=mfu_6n,
            cost=training_cost(spec, tokens_per_s, price_usd_per_hour),
            loss={"first": measured[0].loss, "last": measured[-1].loss,
                  "finite": bool(np.isfinite([s.loss for s in measured]).all())})
    if steps:
        result["memory"] = {
            "gpu_allocated_peak_bytes": max((s.gpu_allocated_peak_bytes or 0) for s in steps) or None,
            "gpu_reserved_peak_bytes": max((s.gpu_reserved_peak_bytes or 0) for s in steps) or None,
            "host_rss_peak_bytes": max(s.host_rss_bytes for s in steps)}
    return result

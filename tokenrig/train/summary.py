"""Step records -> the run's figures: step time, tokens/s, TFLOP/s, MFU/HFU, memory, loss.

Warm-up and profiled steps are excluded; docs/metrics.md defines every figure. On CPU the FLOP/s are
real but the utilisations (MFU, HFU, 6N-MFU) are left out: there is no measured peak to hold them against.
"""

from __future__ import annotations

import numpy as np

from tokenrig.train.flops import training_flops, utilisation
from tokenrig.train.records import StepRecord
from tokenrig.train.spec import TrainSpec


def summarize(spec: TrainSpec, steps: list[StepRecord]) -> dict:
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
            loss={"first": measured[0].loss, "last": measured[-1].loss,
                  "finite": bool(np.isfinite([s.loss for s in measured]).all())})
    if steps:
        result["memory"] = {
            "gpu_allocated_peak_bytes": max((s.gpu_allocated_peak_bytes or 0) for s in steps) or None,
            "gpu_reserved_peak_bytes": max((s.gpu_reserved_peak_bytes or 0) for s in steps) or None,
            "host_rss_peak_bytes": max(s.host_rss_bytes for s in steps)}
    return result

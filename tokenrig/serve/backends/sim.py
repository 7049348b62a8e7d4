"""The sim backend: tokenrig's server with the simulated engine (roofline or fixed schedule).

It reads only the model's tokenizer; timing comes from the GPU and model profiles, the
quantization's weight bytes, the TP size and the roofline efficiencies asked for.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenrig.serve.backends import LaunchPlan


def model_dir(spec, progress=print, write: bool = True) -> Path:
    from tokenrig.serve.checkpoint import tokenizer_dir

    return tokenizer_dir(spec.model, write=write)


def launch_plan(spec, model_dir: Path, port: int) -> LaunchPlan:
    if spec.attention is not None:
        from tokenrig.serve.launcher import LaunchError

        raise LaunchError("the sim backend models one attention cost; drop --attention")
    command = [sys.executable, "-m", "tokenrig.serve.server", "--engine", "sim", "--model", spec.model.key,
               "--model-dir", str(model_dir), "--host", spec.host, "--port", str(port), "--gpu", spec.gpu.key,
               "--quant", spec.quant, "--tp", str(spec.tp or 1)]
    if spec.max_num_seqs:
        command += ["--max-num-seqs", str(spec.max_num_seqs)]
    if spec.max_model_len:
        command += ["--max-model-len", str(spec.max_model_len)]
    for flag, value in (("--sim-compute-efficiency", spec.sim_compute_efficiency),
                        ("--sim-bandwidth-efficiency", spec.sim_bandwidth_efficiency),
                        ("--sim-step-overhead-ms", spec.sim_step_overhead_ms),
                        ("--sim-sequence-overhead-us", spec.sim_sequence_overhead_us)):
        if value is not None:
            command += [flag, str(value)]
    if spec.sim_ttft_ms is not None:
        command += ["--sim-ttft-ms", str(spec.sim_ttft_ms), "--sim-tpot-ms", str(spec.sim_tpot_ms)]
    return LaunchPlan(command + spec.extra_args, env={})

"""The sim backend: tokenrig's server with the simulated engine (roofline or fixed schedule).

It reads only the model's tokenizer; timing comes from the GPU and model profiles, the
quantization's weight bytes, the TP size and the roofline efficiencies asked for.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenrig.serve.backends import LaunchPlan
from tokenrig.serve.engines.sim import ROOFLINE_FLAGS, flag_dest


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
    for flag, *_ in ROOFLINE_FLAGS:
        value = getattr(spec, flag_dest(flag))
        if value is not None:
            command += [flag, str(value)]
    if spec.sim_ttft_ms is not None:
        command += ["--sim-ttft-ms", str(spec.sim_ttft_ms), "--sim-tpot-ms", str(spec.sim_tpot_ms)]
    return LaunchPlan(command + spec.extra_args, env={})

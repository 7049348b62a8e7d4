"""The sim backend: tokenrig's server with the simulated engine (roofline or fixed schedule).

It reads only the model's tokenizer; timing comes from the GPU and model profiles, the
quantization's weight bytes, the TP size and the roofline efficiencies asked for (`SimOptions`),
and its KV cache is what the fit planner gives that configuration (`--gpu-memory-utilization`).
"""

from __future__ import annotations

from pathlib import Path

from tokenrig.serve.backends import vllm
from tokenrig.serve.backends.base import Backend, BatchLimits, LaunchPlan, plan_for, tokenrig_server_command
from tokenrig.serve.checkpoint import tokenizer_dir
from tokenrig.serve.fit import DEFAULT_GPU_MEMORY_UTILIZATION, FitPlan
from tokenrig.serve.spec import LaunchError, ServerSpec, SimOptions


def model_dir(spec: ServerSpec, progress=print, write: bool = True) -> Path:
    return tokenizer_dir(spec.model, write=write)


def launch_plan(spec: ServerSpec, model_dir: Path, port: int, fit: FitPlan | None = None) -> LaunchPlan:
    if spec.attention is not None:
        raise LaunchError("the sim backend models one attention cost; drop --attention")
    # the roofline engine holds the model's weights and KV cache in the GPU profile's memory: without --tp it
    # takes the smallest TP the fit planner finds (llama2-70b bf16 on h100-sxm: 2), as a GPU backend does
    fit = fit or (None if spec.options_as(SimOptions).fixed_schedule or spec.tp else plan_for(spec))
    tp = spec.tp or (fit.tp if fit else 1)
    command = tokenrig_server_command("sim", spec, model_dir, port) + ["--quant", spec.quant, "--tp", str(tp)]
    if spec.max_num_seqs:
        command += ["--max-num-seqs", str(spec.max_num_seqs)]
    if spec.max_model_len:
        command += ["--max-model-len", str(spec.max_model_len)]
    if spec.gpu_memory_utilization != DEFAULT_GPU_MEMORY_UTILIZATION:
        command += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    limits = BatchLimits.known(max_num_seqs=spec.max_num_seqs)  # else the engine's own default
    return LaunchPlan(command + spec.options_as(SimOptions).to_args() + spec.extra_args, env={}, fit=fit,
                      batch_limits=limits)


BACKEND = Backend(
    name="sim", summary="simulated engine", options=SimOptions, model_dir=model_dir, launch_plan=launch_plan,
    metrics=vllm.METRICS,  # tokenrig's server exports vLLM's names
    max_seqs_flags=("--max-num-seqs",), setup="Installed with tokenrig")

"""ServerSpec from the command line: each backend's flags, declared once, reach its server; a flag the
backend would not use is refused, and defaults are never taken for flags given."""

import argparse

import pytest

from tests.conftest import run_cli
from tokenrig.profiles import resolve_gpu, resolve_model
from tokenrig.serve.backends import launch_plan
from tokenrig.serve.server import build_engine, build_parser
from tokenrig.serve.spec import (
    HfOptions,
    LaunchError,
    ServerSpec,
    SimOptions,
    TgiOptions,
    VllmOptions,
    add_server_arguments,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return parser.parse_args(list(argv))


def server_args(spec: ServerSpec) -> argparse.Namespace:
    """What tokenrig's server process parses from the backend's launch command."""
    command = launch_plan(spec, "/models/m", 8000).command
    return build_parser().parse_args(command[command.index("tokenrig.serve.server") + 1:])


@pytest.mark.parametrize("argv, message", [
    (["--backend", "sim", "--prefix-caching"],
     "--prefix-caching is an option of the vllm/sglang/tgi backend, not of the sim"),
    (["--backend", "hf", "--no-prefix-caching"],
     "--prefix-caching is an option of the vllm/sglang/tgi backend, not of the hf"),
    (["--backend", "tgi", "--gpu", "h200", "--nvls"], "--nvls is an option of the vllm/sglang backend, not of the tgi"),
    (["--backend", "vllm", "--gpu", "h200", "--cuda-graphs"], "--cuda-graphs is an option of the hf backend"),
    (["--backend", "vllm", "--gpu", "h200", "--compile-level", "0"], "--compile-level is an option of the hf"),
    (["--backend", "hf", "--sim-tpot-ms", "5"], "--sim-tpot-ms is an option of the sim backend, not of the hf"),
    (["--backend", "sim", "--concurrency", "8"], "the sim backend does not use --concurrency"),
    (["--backend", "sim", "--sim-ttft-ms", "5", "--sim-tpot-ms", "1", "--tp", "2"], "does not use --tp"),
    (["--backend", "sim", "--sim-ttft-ms", "5", "--sim-tpot-ms", "1", "--gpu-memory-utilization", "0.9"],
     "does not use --gpu-memory-utilization"),
    (["--backend", "sim", "--sim-ttft-ms", "5", "--sim-tpot-ms", "1", "--sim-compute-efficiency", "0.5"],
     "does not use --sim-compute-efficiency"),
])
def test_a_flag_the_backend_would_not_use_is_refused_by_name(argv, message):
    with pytest.raises(LaunchError, match=message):
        ServerSpec.from_args(parse(*argv))


@pytest.mark.parametrize("backend", ["hf", "sim", "vllm", "tgi"])
def test_defaults_are_not_flags_given(backend):
    """`tokenrig capacity --backend B` and a plain `loadtest` build their specs from every default."""
    spec = ServerSpec.from_args(parse("--backend", backend, "--gpu", "h200"), concurrency=32)
    assert spec.options == type(spec.options)() and spec.concurrency == 32 and spec.gpu_memory_utilization == 0.9


def test_what_each_backend_uses_is_accepted():
    sim = ServerSpec.from_args(parse("--backend", "sim", "--tp", "2", "--max-num-seqs", "8", "--gpu-memory-utilization",
                                     "0.8", "--sim-compute-efficiency", "0.5", "--model", "7b", "--gpu", "a800"))
    assert sim.tp == 2 and sim.options == SimOptions(sim_compute_efficiency=0.5)
    vllm = ServerSpec.from_args(parse("--backend", "vllm", "--gpu", "h200", "--no-prefix-caching", "--nvls"))
    assert vllm.options == VllmOptions(prefix_caching=False, nvls=True)
    tgi = ServerSpec.from_args(parse("--backend", "tgi", "--gpu", "h200", "--prefix-caching"))
    assert tgi.options == TgiOptions(prefix_caching=True) and launch_plan(tgi, "/m", 1).env["PREFIX_CACHING"] == "1"
    hf = ServerSpec.from_args(parse("--cuda-graphs", "--kv-padding-tokens", "1024", "--compile-level", "0"))
    assert hf.options == HfOptions(cuda_graphs=True, kv_padding_tokens=1024)


def test_sim_ttft_without_tpot_is_refused_before_any_server_starts():
    """It used to reach the server as `--sim-tpot-ms None`, and the server died in argparse."""
    with pytest.raises(LaunchError, match="--sim-ttft-ms and --sim-tpot-ms go together"):
        ServerSpec.from_args(parse("--backend", "sim", "--sim-ttft-ms", "5"))
    dry = run_cli("serve", "--backend", "sim", "--sim-ttft-ms", "5", "--dry-run")
    assert dry.returncode == 2 and "--sim-ttft-ms and --sim-tpot-ms go together" in dry.stderr, dry.stdout
    assert "None" not in dry.stdout
    with pytest.raises(LaunchError, match="go together"):  # the server says the same when run by hand
        build_engine(build_parser().parse_args(["--engine", "sim", "--model", "tiny", "--model-dir", "/m", "--port",
                                                "1", "--sim-tpot-ms", "5"]))


def test_the_cli_refuses_an_unused_flag_with_a_usage_error():
    refused = run_cli("serve", "--backend", "sim", "--no-prefix-caching", "--dry-run")
    assert refused.returncode == 2 and "--prefix-caching is an option of the vllm/sglang/tgi backend" in refused.stderr


@pytest.mark.parametrize("options", [
    HfOptions(compile_level=2, cuda_graphs=False, kv_padding_tokens=512, quant_kernel="gptq_triton"),
    HfOptions(cuda_graphs=True),
])
def test_hf_options_reach_the_server_as_given(options):
    spec = ServerSpec("hf", *_profiles("7b", "h200"), device="cuda", quant="gptq", options=options)
    assert HfOptions.from_args(server_args(spec)) == options


@pytest.mark.parametrize("options", [
    SimOptions(sim_ttft_ms=5, sim_tpot_ms=0.5),
    SimOptions(sim_compute_efficiency=0.3, sim_bandwidth_efficiency=0.4, sim_step_overhead_ms=3,
               sim_sequence_overhead_us=20),
])
def test_sim_options_reach_the_server_as_given(options):
    assert SimOptions.from_args(server_args(ServerSpec("sim", *_profiles("7b", "a800"), options=options))) == options


def test_the_roofline_flags_set_the_engine_in_its_units():
    options = SimOptions(sim_compute_efficiency=0.3, sim_bandwidth_efficiency=0.4, sim_step_overhead_ms=3,
                         sim_sequence_overhead_us=20)
    engine, _ = build_engine(server_args(ServerSpec("sim", *_profiles("7b", "a800"), options=options)))
    params = engine.params
    assert (params.compute_efficiency, params.bandwidth_efficiency) == (0.3, 0.4)
    assert params.step_overhead_s == pytest.approx(0.003) and params.sequence_overhead_s == pytest.approx(20e-6)


def test_the_sim_engine_takes_the_gpu_memory_utilization_asked_for():
    """llama2-7b bf16 on an A800 at 0.5: 42.95 GB usable (half of 81,920 MiB) - 13.48 GB weights - 0.44 GB
    activations (a 4096-token prefill chunk at 98,816 B a token, 256 sequences' fp32 logits) - 2 GB runtime
    = 27.04 GB of KV cache, at 0.5 MiB a token 51,565 tokens."""
    engine, _ = build_engine(server_args(ServerSpec("sim", *_profiles("7b", "a800"), gpu_memory_utilization=0.5)))
    assert engine.kv_capacity_tokens == 51565
    default = launch_plan(ServerSpec("sim", *_profiles("7b", "a800")), "/m", 1).command
    assert "--gpu-memory-utilization" not in default  # the command of a default run is what it always was


def test_describe_records_every_setting_under_its_old_name():
    """Run metadata (and `loadtest --compare`, which labels engines from it) read these keys."""
    spec = ServerSpec("sim", *_profiles("7b", "a800"), options=SimOptions(sim_ttft_ms=5, sim_tpot_ms=1))
    described = spec.describe()
    assert set(described) == {
        "backend", "model", "gpu", "device", "quant", "attention", "tp", "max_model_len", "concurrency",
        "max_num_seqs", "gpu_memory_utilization", "compile_level", "cuda_graphs", "prefix_caching", "nvls",
        "quant_kernel", "kv_padding_tokens", "sim_ttft_ms", "sim_tpot_ms", "sim_compute_efficiency",
        "sim_bandwidth_efficiency", "sim_step_overhead_ms", "sim_sequence_overhead_us"}
    assert described["sim_ttft_ms"] == 5 and described["compile_level"] == 0 and described["nvls"] is False


def test_options_of_another_backend_are_refused():
    with pytest.raises(LaunchError, match="the vllm backend takes VllmOptions, not HfOptions"):
        ServerSpec("vllm", *_profiles("7b", "h200"), options=HfOptions())


def _profiles(model: str, gpu: str):
    return resolve_model(model), resolve_gpu(gpu)


def test_a_user_sweep_plans_the_server_for_its_largest_step():
    """A profiled hf sweep 1,8,32 on an H100 once ran every step on a server planned for 1 stream: 8 and 32 users
    queued behind --max-num-seqs 1."""
    dry = run_cli("loadtest", "--backend", "hf", "--gpu", "h100-sxm", "--model", "7b", "--scenario", "chat",
                  "--users", "sweep", "--sweep", "1,8,32", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "--max-num-seqs 32" in dry.stdout

"""Launch commands of every backend x quantization x attention, parsed by the engines' own flags.

vLLM and TGI cannot be installed without a GPU, so their commands are parsed by reference parsers
built from their sources (tests/engine_flags.py, versions noted there); tokenrig's own server
command is parsed by its real parser. The launcher's process handling runs against real servers.
"""

import shlex
from pathlib import Path

import pytest

from tests.conftest import run_cli, start_server
from tests.engine_flags import parse_tgi, parse_vllm
from tokenrig.profiles import resolve_gpu, resolve_model
from tokenrig.serve.backends import launch_plan, model_dir
from tokenrig.serve.spec import HfOptions, LaunchError, ServerSpec, SimOptions, VllmOptions

MODEL_DIR = Path("/models/synthetic")


def spec(backend, model="13b", gpu="a800", **kwargs) -> ServerSpec:
    g = resolve_gpu(gpu)
    return ServerSpec(backend=backend, model=resolve_model(model), gpu=g, device="cpu" if g.key == "cpu" else "cuda",
                      **kwargs)


@pytest.mark.parametrize("quant", ["bf16", "fp16", "gptq", "awq"])
@pytest.mark.parametrize("attention", [None, "flash", "noflash", "FLASHINFER"])
@pytest.mark.parametrize("tp", [None, 2])
def test_vllm_command_parses_with_vllm_flags(quant, attention, tp):
    plan = launch_plan(spec("vllm", quant=quant, attention=attention, tp=tp), MODEL_DIR, 8123)
    args = parse_vllm(plan.command, plan.env)
    assert args.model_tag == str(MODEL_DIR) and args.served_model_name == ["llama2-13b"]
    assert args.load_format == "dummy" and args.port == 8123
    # 26 GB of bf16 weights (7.3 GB in 4-bit) fit one A800: vLLM pages its KV cache, so TP 2 only when asked
    assert args.tensor_parallel_size == plan.fit.tp == (tp or 1)
    assert args.max_model_len == 4096 and args.max_num_seqs == 16 and args.gpu_memory_utilization == 0.9
    assert args.quantization == {"gptq": "gptq_marlin", "awq": "awq_marlin"}.get(quant)
    assert args.dtype == ("bfloat16" if quant == "bf16" else "float16")
    expected_backend = {None: None, "flash": "FLASH_ATTN", "noflash": "TRITON_ATTN", "FLASHINFER": "FLASHINFER"}
    assert args.attention_backend == expected_backend[attention]  # a flag since 0.26: VLLM_ATTENTION_BACKEND is gone
    multicast_off = args.tensor_parallel_size > 1  # every VLLM_* name was checked against vLLM's envs.py above
    assert (args.compilation_config == {"pass_config": {"fuse_allreduce_rms": False}}) == multicast_off
    assert (plan.env.get("VLLM_FLASHINFER_ALLREDUCE_BACKEND") == "trtllm") == multicast_off


def test_vllm_tp_and_prefix_caching_follow_the_plan():
    plan = launch_plan(spec("vllm", model="70b", gpu="h100-sxm", options=VllmOptions(prefix_caching=False),
                            concurrency=64), MODEL_DIR, 1)
    args = parse_vllm(plan.command, plan.env)
    # 138 GB of weights over two H100s' 77 GB usable each leave KV for the engine to page 64 users through
    assert args.tensor_parallel_size == 2 and args.enable_prefix_caching is False and args.max_num_seqs == 64


@pytest.mark.parametrize("quant", ["bf16", "fp16", "int8", "gptq", "awq"])
@pytest.mark.parametrize("attention", [None, "flash", "noflash", "flashinfer"])
def test_tgi_command_and_docker_line_parse_with_tgi_flags(quant, attention):
    plan = launch_plan(spec("tgi", quant=quant, attention=attention), MODEL_DIR, 8124)
    assert plan.command[0] == "text-generation-launcher"
    args = parse_tgi(plan.command[1:], plan.env)
    assert args.model_id == str(MODEL_DIR) and args.port == 8124 and args.num_shard == plan.fit.tp
    assert args.max_total_tokens == plan.fit.max_model_len
    assert args.max_batch_total_tokens == max(plan.fit.max_batch_total_tokens, args.max_batch_prefill_tokens)
    image = plan.docker.index("ghcr.io/huggingface/text-generation-inference:3.0.1")
    in_container = parse_tgi(plan.docker[image + 1:], plan.env)
    assert in_container.model_id == "/data/model" and f"{MODEL_DIR}:/data/model" in plan.docker
    for key, value in plan.env.items():
        assert f"{key}={value}" in plan.docker
    assert args.quantize == {"gptq": "gptq", "awq": "awq", "int8": "eetq"}.get(quant)
    assert args.dtype == {"bf16": "bfloat16", "fp16": "float16"}.get(quant)
    expected = {None: None, "flash": "flashdecoding", "noflash": "paged", "flashinfer": "flashinfer"}[attention]
    assert plan.env.get("ATTENTION") == expected


def test_tgi_70b_4bit_on_4090s_shards_over_two():
    plan = launch_plan(spec("tgi", model="70b", gpu="rtx4090", quant="awq"), MODEL_DIR, 1)
    args = parse_tgi(plan.command[1:], plan.env)
    # 36.6 GB of 4-bit weights: 18.3 GB a card of the 23.2 GB usable of 24,564 MiB, room for ~10k tokens of KV
    assert args.num_shard == 2 and args.quantize == "awq" and args.dtype is None


@pytest.mark.parametrize("quant", ["bf16", "fp16", "gptq", "awq"])
@pytest.mark.parametrize("attention", [None, "eager", "sdpa", "flash_attention_2", "flash", "noflash"])
def test_hf_command_parses_with_tokenrigs_server_parser(quant, attention):
    from tokenrig.serve.server import build_parser

    options = HfOptions(compile_level=1, cuda_graphs=True, kv_padding_tokens=1024)
    plan = launch_plan(spec("hf", model="7b", gpu="h200", quant=quant, attention=attention, options=options),
                       MODEL_DIR, 8125)
    args = build_parser().parse_args(plan.command[3:])
    assert plan.command[1:3] == ["-m", "tokenrig.serve.server"]
    assert args.engine == "hf" and args.device == "cuda" and args.port == 8125
    assert args.dtype == ("bfloat16" if quant == "bf16" else "float16")
    assert args.attn_implementation == {None: "sdpa", "flash": "flash_attention_2", "noflash": "eager"}.get(
        attention, attention)
    assert args.compile_level == 1 and args.cuda_graphs is True and args.max_num_seqs == 16
    assert args.kv_padding_tokens == 1024
    eager = args.attn_implementation == "eager"
    assert 0.85 * plan.fit.kv_capacity_tokens < args.kv_cache_tokens < plan.fit.kv_capacity_tokens
    assert args.max_batch_tokens < 8192 if eager else args.max_batch_tokens == 8192


def test_hf_paged_cache_leaves_room_for_transformers_masks_and_read_back_on_an_h100():
    # 7B on one H100: the plan's 61.1 GB of KV was refused by transformers' footprint check (65.4 GB with its
    # read-back and masks > 63.9 GB available); the launched cache must pay for both inside the KV budget
    plan = launch_plan(spec("hf", model="7b", gpu="h100-sxm", quant="bf16"), MODEL_DIR, 8125)
    fit, command = plan.fit, plan.command
    tokens = int(command[command.index("--kv-cache-tokens") + 1])
    step = int(command[command.index("--max-batch-tokens") + 1])
    kv, layers = fit.kv_bytes_per_token, 32
    footprint = tokens * kv * (1 + 1 / layers) + 2 * 2 * step * (tokens + step)
    assert footprint <= fit.kv_budget_bytes < footprint + kv
    assert 100_000 < tokens < 110_000 < fit.kv_capacity_tokens


@pytest.mark.parametrize("backend,kwargs,message", [
    ("vllm", {"quant": "int8"}, "no int8 weight-only path"),
    ("hf", {"tp": 2}, "runs on one GPU"),
    ("vllm", {"attention": "eager"}, "not available on the vllm backend"),
    ("tgi", {"gpu": "cpu"}, "serves on a GPU"),
])
def test_impossible_configurations_are_refused_with_the_way_out(backend, kwargs, message):
    with pytest.raises(LaunchError, match=message):
        launch_plan(spec(backend, **kwargs), MODEL_DIR, 1)


def test_hf_plans_for_the_one_gpu_it_runs_on():
    """The hf backend is single-GPU: its KV cache is what one card holds, not a TP-2 plan's per-GPU share."""
    from tokenrig.serve.fit import FitError, plan_fit
    from tokenrig.serve.server import build_parser

    plan = launch_plan(spec("hf", model="7b", gpu="h200", concurrency=64, max_model_len=1024,
                            quant="gptq", options=HfOptions(quant_kernel="gptq_triton")), MODEL_DIR, 1)
    args = build_parser().parse_args(plan.command[3:])
    one_gpu = plan_fit(resolve_model("7b"), resolve_gpu("h200"), "gptq", concurrency=64, context_tokens=1024, tp=1)
    assert plan.fit.tp == 1 and plan.fit.kv_capacity_tokens == one_gpu.kv_capacity_tokens
    assert 0.85 * one_gpu.kv_capacity_tokens < args.kv_cache_tokens < one_gpu.kv_capacity_tokens
    assert args.quant_kernel == "gptq_triton" and args.max_num_seqs == 64
    # 138 GB of 70B bf16 weights exceed one H200's 129 GB usable: refused, not silently planned for two
    with pytest.raises(FitError, match="does not fit on 1 x h200"):
        launch_plan(spec("hf", model="70b", gpu="h200", concurrency=64), MODEL_DIR, 1)


def test_hf_eager_steps_are_small_enough_for_its_materialised_attention_scores():
    from tokenrig.serve.server import build_parser

    def step_tokens(attention, concurrency):
        plan = launch_plan(spec("hf", model="7b", gpu="h200", concurrency=concurrency, max_model_len=1024,
                                attention=attention), MODEL_DIR, 1)
        return build_parser().parse_args(plan.command[3:]).max_batch_tokens

    assert step_tokens("sdpa", 64) == 8192
    # a full 64 x 1024-token batch: scores of 32 heads x step x (65,536 + step) KV x 10 B within half of
    # the 10 % of the 141 GB the plan leaves (7 GB); 8192-token steps would need ~190 GB
    eager_64 = step_tokens("eager", 64)
    assert 128 <= eager_64 < 2048 and 32 * eager_64 * (64 * 1024 + eager_64) * 10 <= 0.05 * 141e9
    assert step_tokens("eager", 8) > eager_64  # fewer streams, less KV per step, larger steps
    capped = launch_plan(spec("hf", model="7b", gpu="h200", concurrency=64, max_model_len=1024, attention="eager",
                              max_num_seqs=8), MODEL_DIR, 1)
    assert build_parser().parse_args(capped.command[3:]).max_batch_tokens > eager_64  # the engine's own batch limit


def test_hf_on_cpu_bounds_its_kv_cache_instead_of_taking_host_memory():
    from tokenrig.serve.server import build_parser

    plan = launch_plan(spec("hf", model="tiny", gpu="cpu"), MODEL_DIR, 1)
    args = build_parser().parse_args(plan.command[3:])
    assert args.kv_cache_tokens == 64 * 2048 and args.max_batch_tokens == 2048  # ~130 MB of KV for tiny


def test_quantized_model_dirs_are_named_by_quantization(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENRIG_MODELS", str(tmp_path))
    assert model_dir(spec("vllm", quant="gptq"), write=False) == tmp_path / "llama2-13b-gptq-config"
    assert model_dir(spec("tgi", quant="awq"), write=False) == tmp_path / "llama2-13b-awq"
    assert model_dir(spec("hf", quant="bf16"), write=False) == tmp_path / "llama2-13b"
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_dry_run_prints_command_env_and_fit_without_starting_anything():
    result = run_cli("serve", "--backend", "tgi", "--gpu", "rtx4090", "--model", "70b", "--quant", "gptq",
                     "--attention", "flashinfer", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert "on 2 x rtx4090" in lines["fit"] and lines["env"] == "ATTENTION=flashinfer"
    parse_tgi(shlex.split(lines["command"])[1:], {"ATTENTION": "flashinfer"})
    assert lines["docker"].startswith("docker run --gpus all")
    refused = run_cli("serve", "--backend", "vllm", "--gpu", "rtx4090", "--model", "70b", "--tp", "4", "--dry-run")
    assert refused.returncode == 3 and "--quant gptq --tp 2 --gpu rtx4090" in refused.stderr


def test_a_missing_engine_is_named_with_its_install_line(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    server = start_server(tmp_path_factory, "vllm", model="7b", gpu="h100-sxm", device="cuda")
    with pytest.raises(LaunchError, match=r"(?s)vllm is not installed.*pip install vllm==0\.26\.0.*vllm serve"):
        with server:
            pass
    assert server.process is None


def test_health_wait_gives_up_stops_the_server_and_shows_its_log(tmp_path_factory):
    # the sim server needs well over 0.5 s to import its dependencies and answer /health
    server = start_server(tmp_path_factory, "sim", options=SimOptions(sim_ttft_ms=1, sim_tpot_ms=1))
    server.health_timeout_s = 0.5
    with pytest.raises(LaunchError, match=r"not healthy after 0\.5 s \(polled http://127\.0\.0\.1:\d+/health\)"):
        with server:
            pass
    assert server.process.poll() is not None  # stopped, not left behind


def test_hf_gpu_engines_get_expandable_segments_unless_the_user_chose_an_allocator(monkeypatch):
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert launch_plan(spec("hf", model="7b", gpu="h200"), MODEL_DIR, 1).env == {
        "PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    assert launch_plan(spec("hf", model="tiny", gpu="cpu"), MODEL_DIR, 1).env == {}
    dry = run_cli("serve", "--backend", "hf", "--gpu", "h200", "--model", "7b", "--dry-run")
    assert dry.returncode == 0 and "env: PYTORCH_ALLOC_CONF=expandable_segments:True" in dry.stdout, dry.stderr
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")  # the older name counts too
    assert launch_plan(spec("hf", model="7b", gpu="h200"), MODEL_DIR, 1).env == {}


def test_the_sim_engine_without_tp_takes_the_smallest_that_fits_and_serves(tmp_path):
    """llama2-70b bf16 (138 GB of weights) on h100-sxm: --help promises the smallest TP that fits, 2; at TP 1
    the roofline server died at start (KV cache -118.7 GB)."""
    assert "--tp 2" in shlex.join(launch_plan(spec("sim", model="70b", gpu="h100-sxm"), MODEL_DIR, 0).command)
    assert "--tp 4" in shlex.join(launch_plan(spec("sim", model="70b", gpu="h100-sxm", tp=4), MODEL_DIR, 0).command)
    result = run_cli("loadtest", "--backend", "sim", "--gpu", "h100-sxm", "--model", "70b", "--users", "1",
                     "--scenario", str(Path(__file__).parent / "data" / "timing.yaml"), "--duration", "3",
                     "--warmup", "0.5", "--results", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert " ok, 0 failed" in result.stdout

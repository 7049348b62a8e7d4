"""The sglang backend: its commands parsed by SGLang 0.5.17's own flags (tests/data/sglang-0.5.17-cli.json, generated
from the wheel by scripts/gen_sglang_cli.py), the multicast safeguard and --nvls, its batch limits, and what its log
proves it served.

No SGLang log was captured yet (no GPU run of it): the log lines below are SGLang 0.5.17's own format strings
(model_executor/model_runner.py "Load weight end. ...", entrypoints/engine.py f"{server_args=}") filled with chosen
values, so they check that tokenrig reads what SGLang writes, not what a real run measured.
"""

import importlib.util

import pytest

from tests.conftest import run_cli
from tests.engine_flags import DATA, parse_sglang, regenerate, sglang_cli
from tests.test_backends import MODEL_DIR, spec
from tokenrig.serve.backends import BACKENDS, launch_plan
from tokenrig.serve.backends import sglang as sglang_backend
from tokenrig.serve.launcher import LaunchedServer
from tokenrig.serve.spec import LaunchError, SglangOptions

MULTICAST_FLAGS = ("--enable-nccl-nvls", "--enable-symm-mem", "--enable-torch-symm-mem")


def test_committed_cli_is_what_the_generator_reads_from_the_wheel():
    result = regenerate("sglang", sglang_cli()["sglang_version"])
    if isinstance(result, str):
        pytest.skip(result)
    generated, committed = result
    assert generated == committed


def test_cli_is_for_the_sglang_version_tokenrig_pins():
    (committed,) = DATA.glob("sglang-*-cli.json")
    assert sglang_cli()["sglang_version"] == sglang_backend.SGLANG_VERSION
    assert committed.name == f"sglang-{sglang_backend.SGLANG_VERSION}-cli.json"


@pytest.mark.parametrize("quant", ["bf16", "fp16", "fp8", "gptq", "awq"])
@pytest.mark.parametrize("attention", [None, "flash", "noflash", "fa3", "flashinfer", "triton"])
@pytest.mark.parametrize("tp", [None, 2])
def test_sglang_command_parses_with_sglang_flags(quant, attention, tp):
    plan = launch_plan(spec("sglang", quant=quant, attention=attention, tp=tp), MODEL_DIR, 8123)
    args = parse_sglang(plan.command, plan.env)
    assert args.model_path == str(MODEL_DIR) and args.served_model_name == "llama2-13b" and args.port == 8123
    assert args.load_format == "dummy" and args.enable_metrics
    assert args.tp_size == plan.fit.tp == (tp or 1)
    assert args.context_length == 4096 and args.max_running_requests == 16 and args.chunked_prefill_size == 8192
    assert args.mem_fraction_static is None  # SGLang's own unless --gpu-memory-utilization
    assert args.quantization == {"gptq": "gptq_marlin", "awq": "awq_marlin", "fp8": "fp8"}.get(quant)
    assert args.dtype == ("bfloat16" if quant in ("bf16", "fp8") else "float16")
    expected = {None: None, "flash": "fa3", "noflash": "triton", "fa3": "fa3", "flashinfer": "flashinfer",
                "triton": "triton"}
    assert args.attention_backend == expected[attention]
    assert not args.disable_radix_cache  # the radix cache is SGLang's default
    multicast_off = args.tp_size > 1  # every SGLANG_* name and value was checked against environ.py above
    assert args.enforce_disable_flashinfer_allreduce_fusion == multicast_off
    assert (plan.env == sglang_backend.NO_MULTICAST_ENV) == multicast_off
    assert not (args.enable_nccl_nvls or args.enable_symm_mem or args.enable_torch_symm_mem)


def test_prefix_caching_memory_and_batch_limits_follow_the_flags():
    off = launch_plan(spec("sglang", model="7b", gpu="h100-sxm", options=SglangOptions(prefix_caching=False),
                           gpu_memory_utilization=0.85, max_num_seqs=64), MODEL_DIR, 1)
    args = parse_sglang(off.command, off.env)
    assert args.disable_radix_cache and args.mem_fraction_static == 0.85 and args.max_running_requests == 64
    on = launch_plan(spec("sglang", model="7b", gpu="h100-sxm", options=SglangOptions(prefix_caching=True)),
                     MODEL_DIR, 1)
    assert not parse_sglang(on.command, on.env).disable_radix_cache
    assert (off.batch_limits.max_num_seqs, off.batch_limits.max_batch_tokens) == (64, off.fit.prefill_chunk_tokens)
    assert off.batch_limits.gpu_memory_utilization == 0.85 and on.batch_limits.gpu_memory_utilization is None
    # how a run recorded before the structured limits is read: the same limits from its command line
    limits = BACKENDS["sglang"].batch_limits(off.command)
    assert (limits.max_num_seqs, limits.max_batch_tokens) == (64, off.fit.prefill_chunk_tokens)
    assert BACKENDS["vllm"].batch_limits(off.command).max_num_seqs is None  # vLLM's flags differ


@pytest.mark.parametrize("extra, env, message", [
    (["--attention-backend", "fa5"], {}, "invalid choice"),
    (["--quantization", "gptq_marln"], {}, "invalid choice"),
    (["--enable-radix-cache"], {}, "unrecognized arguments"),
    (["--tensor-parallel"], {}, "unrecognized arguments"),
    (["--context-length", "4.5Ki"], {}, "no decimals with Ki"),
    ([], {"SGLANG_OPT_USE_CUSTOM_ALL_REDUCE_V3": "0"}, "not an environment variable of SGLang"),
    ([], {"SGLANG_OPT_USE_CUSTOM_ALL_REDUCE_V2": "off"}, "not a boolean"),
])
def test_wrong_or_renamed_flags_and_env_vars_fail(extra, env, message):
    plan = launch_plan(spec("sglang", model="7b", gpu="h100-sxm"), MODEL_DIR, 1)
    with pytest.raises(ValueError, match=message):
        parse_sglang(plan.command + extra, env)


def test_tricky_values_parse_as_sglang_parses_them():
    plan = launch_plan(spec("sglang", model="7b", gpu="h100-sxm"), MODEL_DIR, 1)
    args = parse_sglang(plan.command + ["--context-length", "4Ki", "--max-total-tokens", "25.6k",
                                        "--tensor-parallel-size", "2", "--model", "/m"], {})
    assert args.context_length == 4096 and args.max_total_tokens == 25600 and args.tp_size == 2
    assert args.model_path == "/m"


def test_multicast_is_off_at_tp2_unless_nvls_and_dry_run_shows_it():
    safe = launch_plan(spec("sglang", model="70b", gpu="h200", tp=2, max_model_len=2048), MODEL_DIR, 1)
    args = parse_sglang(safe.command, safe.env)
    assert safe.env == {"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0",
                        "SGLANG_OPT_USE_CUSTOM_ALL_REDUCE_V2": "0"}
    assert args.enforce_disable_flashinfer_allreduce_fusion and not set(MULTICAST_FLAGS) & set(safe.command)
    allowed = launch_plan(spec("sglang", model="70b", gpu="h200", tp=2, max_model_len=2048,
                               options=SglangOptions(nvls=True)), MODEL_DIR, 1)
    assert allowed.env == {} and "--enforce-disable-flashinfer-allreduce-fusion" not in allowed.command
    assert not set(MULTICAST_FLAGS) & set(allowed.command)  # --nvls leaves SGLang's defaults, enables nothing
    single = launch_plan(spec("sglang", model="7b", gpu="h200"), MODEL_DIR, 1)
    assert single.env == {} and "--enforce-disable-flashinfer-allreduce-fusion" not in single.command

    dry = run_cli("serve", "--backend", "sglang", "--gpu", "h200", "--model", "70b", "--tp", "2", "--max-model-len",
                  "2048", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for line in ("env: TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "env: NCCL_NVLS_ENABLE=0",
                 "env: SGLANG_OPT_USE_CUSTOM_ALL_REDUCE_V2=0", "--enforce-disable-flashinfer-allreduce-fusion",
                 "NVLink multicast off"):
        assert line in dry.stdout
    with_nvls = run_cli("serve", "--backend", "sglang", "--gpu", "h200", "--model", "70b", "--tp", "2",
                        "--max-model-len", "2048", "--nvls", "--dry-run")
    assert with_nvls.returncode == 0 and "NCCL_NVLS_ENABLE" not in with_nvls.stdout
    assert "--enforce-disable-flashinfer-allreduce-fusion" not in with_nvls.stdout


@pytest.mark.parametrize("argv, message", [
    (["--quant", "int8"], "no int8 weight-only path"),
    (["--attention", "FLASH_ATTN"], "--attention 'FLASH_ATTN' is not available on the sglang backend"),
    (["--gpu", "cpu"], "serves on a GPU"),
])
def test_what_sglang_cannot_serve_is_refused_in_one_line(argv, message):
    result = run_cli("serve", "--backend", "sglang", "--model", "7b", *(["--gpu", "h100-sxm"] * ("--gpu" not in argv)),
                     *argv, "--dry-run")
    assert result.returncode == 2 and message in result.stderr


def _log(weights_gib: float, quant: str = "", **resolved: str) -> str:
    """Lines in SGLang 0.5.17's formats, with chosen values (see the module docstring)."""
    args = {"model_path": "'/m'", "attention_backend": "'fa3'", "enable_nccl_nvls": "False", "enable_symm_mem": "False",
            "enable_torch_symm_mem": "False", "flashinfer_allreduce_fusion_backend": "None",
            "enforce_disable_flashinfer_allreduce_fusion": "False", **resolved}
    quant_str = f"quant={quant}, bits=4, " if quant else ""
    return (f"[2026-12-07 10:00:00] server_args=ServerArgs({', '.join(f'{k}={v}' for k, v in args.items())})\n"
            f"[2026-12-07 10:00:09 TP0] Load weight end. elapsed=4.12 s, type=LlamaForCausalLM, {quant_str}"
            f"avail mem=66.41 GB, mem usage={weights_gib:.2f} GB.\n")


@pytest.mark.parametrize("quant, weights", [("bf16", 12.59), ("fp8", 6.78), ("gptq", 3.70), ("awq", 3.74)])
def test_served_weights_match_the_requested_quantization(quant, weights):
    server = spec("sglang", model="7b", gpu="h100-sxm", quant=quant)
    facts = sglang_backend.served_facts(_log(weights, quant="gptq" if quant == "gptq" else ""))
    assert facts["weights_gib_per_gpu"] == weights and facts["attention_backend"] == "fa3"
    assert facts["multicast"] == []
    assert sglang_backend.check_served(server, launch_plan(server, MODEL_DIR, 1), facts) is None


def test_bf16_weights_served_for_fp8_are_refused():
    server = spec("sglang", model="7b", gpu="h100-sxm", quant="fp8")
    problem = sglang_backend.check_served(server, launch_plan(server, MODEL_DIR, 1),
                                          sglang_backend.served_facts(_log(12.59)))
    assert problem and "SGLang loaded 12.59 GiB" in problem and "not fp8" in problem


def test_multicast_that_sglang_resolved_at_tp2_is_refused_unless_nvls():
    server = spec("sglang", model="70b", gpu="h200", tp=2, max_model_len=2048)
    plan = launch_plan(server, MODEL_DIR, 1)
    planned = plan.fit.weight_bytes / 2**30
    safe = sglang_backend.served_facts(_log(planned, enforce_disable_flashinfer_allreduce_fusion="True",
                                            flashinfer_allreduce_fusion_backend="'trtllm'"))
    assert safe["multicast"] == [] and sglang_backend.check_served(server, plan, safe) is None
    symmetric = sglang_backend.served_facts(_log(planned, enable_symm_mem="True",
                                                 flashinfer_allreduce_fusion_backend="'mnnvl'"))
    assert symmetric["multicast"] == ["enable_symm_mem", "flashinfer_allreduce_fusion_backend=mnnvl"]
    assert "enable_symm_mem" in sglang_backend.check_served(server, plan, symmetric)
    allowed = spec("sglang", model="70b", gpu="h200", tp=2, max_model_len=2048, options=SglangOptions(nvls=True))
    assert sglang_backend.check_served(allowed, plan, symmetric) is None


def test_a_missing_sglang_is_named_with_how_to_install_it(tmp_path):
    """`python -m sglang.launch_server` with no sglang importable here: refused before a process starts."""
    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here")
    server = LaunchedServer(spec("sglang", model="tiny", gpu="h100-sxm"), tmp_path / "server.log",
                            progress=lambda m: None)
    with pytest.raises(LaunchError, match="is not installed on this machine.*pip install sglang==0.5.17"):
        server.start()
    assert server.process is None


def test_the_metric_names_tokenrig_reads_are_sglangs():
    """Every SGLang name the scraper and the dashboards read is one SGLang 0.5.17 registers on every server."""
    registered = {metric["name"]: metric["type"] for metric in sglang_cli()["metrics"]}
    for figure, names in sglang_backend.METRICS.items():
        for name in names:
            assert name in registered, f"{figure}: {name} is not a metric of SGLang 0.5.17"
    assert {registered[sglang_backend.METRICS[f][0]] for f in ("ttft_seconds", "itl_seconds", "e2e_seconds")} == {
        "histogram"}
    assert registered["sglang:cached_tokens_total"] == registered["sglang:prompt_tokens_total"] == "counter"

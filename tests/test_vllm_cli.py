"""vLLM's command line, generated from its source: the committed file, the reference parser built from
it, and the names tokenrig reads from or writes for vLLM (metrics, GPTQ's quantization_config)."""

import json
import re

import pytest

from tests.engine_flags import DATA, parse_vllm, parse_vllm_bench_serve, regenerate, vllm_cli
from tokenrig.paths import GRAFANA
from tokenrig.profiles import resolve_model

SERVE = ["vllm", "serve", "/models/m", "--served-model-name", "m", "--port", "8000"]


def test_committed_cli_is_what_the_generator_reads_from_the_wheel():
    result = regenerate("vllm", vllm_cli()["vllm_version"])
    if isinstance(result, str):
        pytest.skip(result)
    generated, committed = result
    assert generated == committed


def test_cli_is_for_the_vllm_version_tokenrig_pins():
    from tokenrig.serve.backends.vllm import VLLM_VERSION

    (committed,) = DATA.glob("vllm-*-cli.json")
    assert vllm_cli()["vllm_version"] == VLLM_VERSION and committed.name == f"vllm-{VLLM_VERSION}-cli.json"


def test_tricky_flags_parse_as_vllm_parses_them():
    args = parse_vllm(SERVE + ["-cc", '{"pass_config": {"fuse_allreduce_rms": false}}', "-O3",
                               "--no-enable-prefix-caching", "--max-model-len", "4k", "--max-num-batched-tokens", "8K",
                               "--attention-backend", "flash_attn", "-q", "gptq_marlin", "--load-format", "dummy",
                               "-tp", "2", "--dtype", "float16"], {})
    assert args.compilation_config == {"pass_config": {"fuse_allreduce_rms": False}}
    assert args.optimization_level == "3" and args.enable_prefix_caching is False
    assert args.max_model_len == 4000 and args.max_num_batched_tokens == 8192
    assert args.attention_backend == "flash_attn" and args.tensor_parallel_size == 2
    assert parse_vllm(SERVE + ["--enable-prefix-caching", "--max-model-len", "auto"], {}).max_model_len == -1
    for method in ("fp8", "gptq_marlin", "awq_marlin"):
        assert parse_vllm(SERVE + ["--quantization", method], {}).quantization == method
    python_m = ["/usr/bin/python3", "-m", "vllm.entrypoints.cli.main", "serve", "/models/m", "--port", "1"]
    assert parse_vllm(python_m, {}).model_tag == "/models/m"


@pytest.mark.parametrize("extra,env,message", [
    (["--quantization", "gptq_marln"], {}, "not a vLLM quantization method"),
    (["--load-format", "dumy"], {}, "not a vLLM load format"),
    (["--attention-backend", "XFORMERS"], {}, "is not one of"),
    (["--enable-prefix-cache"], {}, "unrecognized arguments"),
    (["--max-model-len", "4.5K"], {}, "invalid"),
    (["-cc", '{"pass_config": {"fuse_allreduce_rmsnorm": false}}'], {}, "PassConfig has no field"),
    (["-cc", '{"pass_config": {"fuse_allreduce_rms": "no"}}'], {}, "must be true or false"),
    (["--dtype", "bf16"], {}, "invalid choice"),
    ([], {"VLLM_ATTENTION_BACKEND": "FLASH_ATTN"}, "not an environment variable of vLLM"),
    ([], {"VLLM_FLASHINFER_ALLREDUCE_BACKEND": "nvls"}, "is not one of"),
    ([], {"VLLM_ALLREDUCE_USE_SYMM_MEM": "false"}, "reads it with int"),
])
def test_wrong_or_renamed_flags_and_env_vars_fail(extra, env, message):
    with pytest.raises(ValueError, match=message):
        parse_vllm(SERVE + extra, env)


def test_multicast_safeguard_names_are_vllms():
    env = {"VLLM_FLASHINFER_ALLREDUCE_BACKEND": "trtllm", "VLLM_ALLREDUCE_USE_SYMM_MEM": "0", "NCCL_NVLS_ENABLE": "0"}
    args = parse_vllm(SERVE + ["--compilation-config", '{"pass_config": {"fuse_allreduce_rms": false}}'], env)
    assert args.compilation_config["pass_config"]["fuse_allreduce_rms"] is False


def test_vllm_bench_serve_command_of_the_truth_cross_check():
    args = parse_vllm_bench_serve([
        "python3", "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai",
        "--base-url", "http://127.0.0.1:8000", "--endpoint", "/v1/completions", "--model", "/models/llama2-7b-config",
        "--served-model-name", "llama2-7b", "--tokenizer", "/models/llama2-7b-config", "--dataset-name", "random",
        "--random-input-len", "512", "--random-output-len", "128", "--random-range-ratio", "0", "--ignore-eos",
        "--num-prompts", "320", "--max-concurrency", "32", "--request-rate", "inf", "--burstiness", "1",
        "--num-warmups", "32", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", "/tmp/r", "--result-filename", "c32.json", "--ready-check-timeout-sec", "600"])
    assert args.max_concurrency == 32 and args.ignore_eos and args.request_rate == float("inf")
    with pytest.raises(ValueError, match="unrecognized"):
        parse_vllm_bench_serve(["vllm", "bench", "serve", "--random-input", "512"])


def _exported(name: str) -> bool:
    """Whether a sample name is one vLLM's V1 engine exports (counters end in _total, histograms in _bucket...)."""
    metrics = vllm_cli()["metrics"]
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return (name in metrics["gauges"] or name.removesuffix("_total") in metrics["counters"]
            or base in metrics["histograms"])


def test_every_vllm_metric_tokenrig_reads_exports_or_charts_exists_in_the_pinned_vllm():
    from tokenrig.serve.api import ServerMetrics
    from tokenrig.serve.scrape import COUNTERS, GAUGES

    for key, names in {**GAUGES, **COUNTERS}.items():
        if names[0].startswith("vllm:"):  # the preferred name is current; later ones are older vLLMs' fallbacks
            assert _exported(names[0]), key
    own = {metric.name for metric in ServerMetrics("m").registry.collect()}
    assert own and all(_exported(name) for name in own), own
    dashboard = json.loads((GRAFANA / "dashboards" / "tokenrig-server.json").read_text())
    queried = set(re.findall(r"vllm:[a-z0-9_]+", json.dumps(dashboard)))
    assert queried and all(_exported(name) for name in queried), queried


def _vllm_gptq_quantizes(prefix: str, modules: list) -> bool:
    """vLLM 0.26's rule for a GPTQ linear (quantization/utils/gptq_utils.py is_layer_gptq_quantized, after
    AutoGPTQConfig.maybe_update_config flattened the lists): a fused layer's shards by substring."""
    flat = [name for group in modules for name in group]
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    proj = prefix.rsplit(".", 1)[-1]
    shards = [prefix.replace(proj, shard) for shard in fused.get(proj, [proj])]
    return all(any(name in shard for name in flat) for shard in shards)


def test_gptq_config_dir_names_every_decoder_linear_for_vllm_dummy_weights(tmp_path):
    from tokenrig.serve.checkpoint import config_dir

    model = resolve_model("7b")
    path = config_dir(model, root=tmp_path, quant="gptq")
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    modules = config["modules_in_block_to_quantize"]
    for layer in (0, model.num_layers - 1):
        for proj in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            assert _vllm_gptq_quantizes(f"model.layers.{layer}.{proj}", modules), proj
    assert not _vllm_gptq_quantizes("lm_head", modules) and config["lm_head"] is False
    # a directory written before this fix (no list: vLLM quantized nothing) is rewritten
    stale = dict(config)
    del stale["modules_in_block_to_quantize"]
    full = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**full, "quantization_config": stale}))
    config_dir(model, root=tmp_path, quant="gptq")
    assert "modules_in_block_to_quantize" in json.loads((path / "config.json").read_text())["quantization_config"]

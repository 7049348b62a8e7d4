"""A model profile from a Hugging Face config.json: exact parameter counts of Mistral-, Qwen2- and Llama-3-shaped
models (GQA, tied embeddings, q/k/v biases), and fit, sim, capacity and checkpoints working from the file.

The config.json files in tests/data/models/ carry the fields of the models' published configs."""

import json
from math import prod

import pytest

from tests.conftest import DATA, run_cli, run_dir_of
from tokenrig.profiles import UnknownProfileError, resolve_gpu, resolve_model
from tokenrig.serve.checkpoint import parameter_shapes
from tokenrig.serve.fit import plan_fit, weight_bytes

MODELS = DATA / "models"


# the totals the model cards and safetensors indexes give
@pytest.mark.parametrize("name, total", [("mistral-7b-v0.1", 7_241_732_096), ("qwen2.5-7b", 7_615_616_512),
                                         ("llama-3.1-8b", 8_030_261_248), ("qwen2.5-0.5b", 494_032_768)])
def test_parameter_counts_of_real_configs_match_published_totals_and_transformers(name, total):
    model = resolve_model(str(MODELS / name / "config.json"))
    assert model.key == name and model.path == str((MODELS / name / "config.json").resolve())
    # transformers' own module tree on the meta device, each stored tensor once (a tied embedding: once)
    assert model.num_params == total == sum(prod(shape) for shape in parameter_shapes(model).values())


def test_gqa_tied_embeddings_and_biases_reach_the_memory_plan():
    qwen_small, mistral = resolve_model(str(MODELS / "qwen2.5-0.5b")), resolve_model(str(MODELS / "mistral-7b-v0.1"))
    # bf16 weights are exactly 2 bytes a parameter: the tied embedding counted once, the biases counted
    assert weight_bytes(qwen_small) == 2 * qwen_small.num_params
    assert weight_bytes(mistral) == 2 * mistral.num_params
    # a tied embedding is still the output projection: its matmul is done per token
    h, v = qwen_small.hidden_size, qwen_small.vocab_size
    assert qwen_small.num_matmul_params == qwen_small.num_params - (2 * 24 + 1) * h - qwen_small.bias_params
    assert qwen_small.num_matmul_params > v * h
    # GQA: 8 KV heads of 128 over 32 layers, 2 bytes: 128 KiB a token (llama2-7b's 32 heads: 512 KiB)
    assert mistral.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2
    plan = plan_fit(mistral, resolve_gpu("h100-sxm"), concurrency=16)
    assert plan.tp == 1 and plan.weight_bytes == 2 * mistral.num_params


@pytest.mark.parametrize("config, message", [
    ({"model_type": "mixtral", "hidden_size": 4096}, "model_type 'mixtral' is not supported"),
    ({"model_type": "llama", "hidden_size": 4096}, "needs positive whole numbers for intermediate_size"),
])
def test_unsupported_or_incomplete_configs_are_refused_in_one_line(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownProfileError, match=message):
        resolve_model(str(tmp_path / "config.json"))
    result = run_cli("fit", "--gpu", "h100-sxm", "--model", str(tmp_path / "config.json"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr
    missing = run_cli("fit", "--gpu", "h100-sxm", "--model", str(tmp_path / "nowhere" / "config.json"))
    assert missing.returncode == 2 and "no such config.json" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_fit_and_model_list_read_a_config_file():
    result = run_cli("fit", "--gpu", "rtx4090", "--model", str(MODELS / "qwen2.5-7b" / "config.json"))
    # 15.2 GB of bf16 weights do not fit a 24 GB card with room for its context: the planner says what would
    assert result.returncode == 0 or "what would fit" in result.stderr, result.stderr
    ok = run_cli("fit", "--gpu", "h100-sxm", "--model", str(MODELS / "llama-3.1-8b"))
    assert ok.returncode == 0 and "llama-3.1-8b" in ok.stdout and "--tensor-parallel-size 1" in ok.stdout, ok.stderr


def test_a_sim_load_test_serves_a_config_file_model(tmp_path):
    """The sim server is a process of its own: it must rebuild the profile from the file, not from a name."""
    config = MODELS / "mistral-7b-v0.1" / "config.json"
    result = run_cli("loadtest", "--backend", "sim", "--gpu", "h100-sxm", "--model", str(config), "--users", "2",
                     "--duration", "4", "--warmup", "1", "--results", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(result)
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["server"]["model"] == "mistral-7b-v0.1" and str(config.resolve()) in metadata["server"]["command"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["requests"]["ok"] > 0 and summary["requests"]["failed"] == 0


def test_capacity_projects_a_config_file_model_on_the_roofline():
    """What `tokenrig capacity` replays for a projected row: a search on the simulated replica of the model."""
    from tokenrig.capacity.simulate import EngineSetup, RequestBook, VirtualSearch
    from tokenrig.loadgen.load_profiles import FindMax
    from tokenrig.loadgen.scenario import load_scenario
    from tokenrig.metrics.slo import parse_slos
    from tokenrig.serve.engines.sim import RooflineParams

    scenario = load_scenario(str(DATA / "capacity.yaml"))
    best = {}
    for name in ("mistral-7b-v0.1", "qwen2.5-7b"):
        model = resolve_model(str(MODELS / name))
        setup = EngineSetup(model, resolve_gpu("h100-sxm"), "bf16", 1, RooflineParams())
        search = VirtualSearch(setup, RequestBook(scenario, model), scenario.load, parse_slos("tpot_p90=30ms"),
                               FindMax(start_rate=2, tail_samples=2, precision=0.2, max_step_s=10),
                               progress=lambda *_: None)
        best[name] = search.result.best
    assert all(best.values()), best


def test_a_random_weight_checkpoint_is_built_from_a_config_file(tmp_path):
    """What the hf backend serves (and `tokenrig model make` writes): a qwen2-shaped model with GQA, q/k/v biases
    and a tied embedding, loaded by transformers and generating."""
    from transformers import AutoModelForCausalLM

    from tokenrig.serve.checkpoint import config_dir, make_checkpoint

    shape = json.loads((MODELS / "qwen2.5-0.5b" / "config.json").read_text())
    shape.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, bos_token_id=1, eos_token_id=2)
    (tmp_path / "small-qwen").mkdir()
    (tmp_path / "small-qwen" / "config.json").write_text(json.dumps(shape))
    model = resolve_model(str(tmp_path / "small-qwen"))
    path = make_checkpoint(model, root=tmp_path / "models", progress=lambda *_: None)
    assert path.name == model.cache_name and path.name.startswith("small-qwen-")
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert loaded.config.model_type == "qwen2" and loaded.config.tie_word_embeddings
    assert sum(p.numel() for p in loaded.parameters()) == model.num_params
    out = loaded.generate(loaded.dummy_inputs["input_ids"][:1, :3] % 4096, max_new_tokens=4, min_new_tokens=4,
                          do_sample=False)
    assert out.shape[1] == 7
    # vLLM's directory (config + tokenizer, random weights made by vLLM) carries the same architecture
    written = json.loads((config_dir(model, root=tmp_path / "models") / "config.json").read_text())
    assert written["model_type"] == "qwen2" and written["num_key_value_heads"] == 2

import pytest

from tests.conftest import run_cli
from tokenrig.profiles import UnknownProfileError, gpu_profiles, model_profiles, resolve_gpu, resolve_model
from tokenrig.serve.checkpoint import parameter_shapes

REQUIRED_GPUS = {"a800", "a100-80g", "h100-sxm", "h200", "rtx4090", "rtx3090", "l40s", "cpu"}
REQUIRED_MODELS = {"tiny", "llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b"}


def test_required_profiles_exist_with_sources():
    gpus = gpu_profiles()
    assert REQUIRED_GPUS <= set(gpus)
    for gpu in gpus.values():
        assert gpu.memory_gb > 0 and gpu.bandwidth_gbs > 0 and gpu.tflops_bf16 > 0 and gpu.tdp_w > 0
        assert gpu.sources.get("specs") and gpu.sources.get("price"), gpu.key
    assert REQUIRED_MODELS <= set(model_profiles())


@pytest.mark.parametrize("name,key", [("13b", "llama2-13b"), ("LLAMA2-7B", "llama2-7b"), ("8b", "llama3-8b"),
                                      ("llama_2_70b", "llama2-70b"), ("tiny", "tiny")])
def test_model_names_and_aliases_resolve(name, key):
    assert resolve_model(name).key == key


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownProfileError, match="known GPUs: a800, a100-80g"):
        resolve_gpu("b300")
    with pytest.raises(UnknownProfileError, match=r"known models: tiny, llama2-7b \(7b"):
        resolve_model("mistral")


@pytest.mark.parametrize("name,billions", [("llama2-7b", 6.738), ("llama2-13b", 13.016),
                                           ("llama2-70b", 68.977), ("llama3-8b", 8.030)])
def test_parameter_counts_match_published_sizes_and_transformers(name, billions):
    model = resolve_model(name)
    assert model.num_params / 1e9 == pytest.approx(billions, abs=0.001)
    shapes = parameter_shapes(model)
    from math import prod

    assert sum(prod(shape) for shape in shapes.values()) == model.num_params


def test_cli_unknown_gpu_is_a_clear_error():
    result = run_cli("loadtest", "--gpu", "a900", "--dry-run")
    assert result.returncode == 2
    assert "unknown GPU 'a900'; known GPUs:" in result.stderr and "h200" in result.stderr


def test_cli_malformed_arguments_are_rejected():
    result = run_cli("loadtest", "--users", "many")
    assert result.returncode == 2
    assert "argument --users: a whole number of users" in result.stderr and "'many'" in result.stderr
    result = run_cli("loadtest", "--backend", "sim", "--duration", "-5", "--dry-run")
    assert result.returncode != 0 and "argument --duration: must be above 0" in result.stderr


def test_gpu_without_cuda_says_what_it_would_run(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("loadtest", "--gpu", "a800", "--model", "13b")
    assert result.returncode != 0
    assert "--engine hf --model llama2-13b" in result.stderr and "--backend sim" in result.stderr

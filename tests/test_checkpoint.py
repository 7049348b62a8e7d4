import json

import pytest
import torch
from tokenizers import Tokenizer

from tokenrig.profiles import resolve_model
from tokenrig.serve.checkpoint import is_complete, make_checkpoint
from tokenrig.serve.tokenizer import build_tokenizer, content_words


def test_tokenizer_counts_one_token_per_word_and_has_exact_vocab():
    tokenizer = build_tokenizer(32000)
    assert tokenizer.get_vocab_size() == 32000
    words = content_words(tokenizer)[:300]
    assert len(tokenizer.encode(" ".join(words), add_special_tokens=False).ids) == 300
    assert tokenizer.decode(tokenizer.encode(" ".join(words[:5])).ids) == " ".join(words[:5])
    assert build_tokenizer(128256).get_vocab_size() == 128256


def test_tiny_checkpoint_loads_in_transformers_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_checkpoint(resolve_model("tiny"), root=tmp_path, progress=lambda *_: None)
    assert is_complete(path)
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] == 128 and config["vocab_size"] == 32000
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "fana gele"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 12
    assert torch.allclose(model.model.norm.weight.float(), torch.ones(128))
    assert Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size() == 32000
    # a second call reuses the finished checkpoint instead of rewriting it
    mtime = (path / "model.safetensors").stat().st_mtime
    make_checkpoint(resolve_model("tiny"), root=tmp_path, progress=lambda *_: None)
    assert (path / "model.safetensors").stat().st_mtime == mtime


def test_cli_model_make_and_list(tmp_path):
    from tests.conftest import run_cli

    result = run_cli("model", "make", "tiny", "--out", str(tmp_path))
    assert result.returncode == 0 and "random weights" in result.stdout
    assert (tmp_path / "tiny" / "model.safetensors").exists()
    listing = run_cli("model", "list").stdout
    assert "llama2-70b" in listing and "68.98B" in listing


@pytest.mark.parametrize("quant", ["gptq", "awq"])
def test_tiny_4bit_checkpoint_has_the_standard_layout_loads_and_generates(tmp_path, quant):
    """The GPTQ / AWQ layouts, checked by loading them with transformers + gptqmodel (CPU kernels)."""
    pytest.importorskip("gptqmodel", reason="GPTQ/AWQ loading needs gptqmodel + optimum (make setup installs them)")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tokenrig.serve.fit import weight_bytes

    model_profile = resolve_model("tiny")
    path = make_checkpoint(model_profile, root=tmp_path, quant=quant, progress=lambda *_: None)
    assert path.name == f"tiny-{quant}"
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == quant and config["bits"] == 4 and config["group_size"] == 128
    with safe_open(str(path / "model.safetensors"), "pt") as stored:
        names = set(stored.keys())
        down = "model.layers.0.mlp.down_proj"  # in 384, out 128
        qweight, scales = stored.get_tensor(f"{down}.qweight"), stored.get_tensor(f"{down}.scales")
        assert qweight.dtype == torch.int32 and scales.dtype == torch.float16
        assert tuple(qweight.shape) == ((384 // 8, 128) if quant == "gptq" else (384, 128 // 8))
        assert tuple(stored.get_tensor(f"{down}.qzeros").shape) == (3, 128 // 8) and tuple(scales.shape) == (3, 128)
        assert (f"{down}.g_idx" in names) == (quant == "gptq") and f"{down}.weight" not in names
        total = sum(stored.get_tensor(n).numel() * stored.get_tensor(n).element_size() for n in names)
    assert total == weight_bytes(model_profile, quant)  # the fit planner counts exactly what is stored

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    assert model.hf_quantizer.quantization_config.quant_method.value == quant
    out = model.generate(torch.tensor([[1, 40, 41, 42]]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (1, 12)


@pytest.mark.parametrize("quant,kernel,layer", [
    pytest.param("gptq", "gptq_torch", "TorchLinear", marks=pytest.mark.slow),  # ~25 s of torch.compile of the kernel
    ("awq", "torch_awq", "AwqTorchLinear")])
def test_hf_engine_loads_4bit_checkpoints_with_the_kernel_asked_for(tmp_path, quant, kernel, layer):
    """--quant-kernel picks gptqmodel's kernel: left to itself it takes the CPU's AVX-512 kernels here, and on
    Hopper JIT-builds Machete after downloading CUTLASS, which an offline GPU host cannot."""
    pytest.importorskip("gptqmodel", reason="GPTQ/AWQ loading needs gptqmodel + optimum (make setup installs them)")
    from transformers import AutoModelForCausalLM

    from tokenrig.serve.engines.hf import HFEngine
    from tokenrig.serve.spec import HfOptions

    path = make_checkpoint(resolve_model("tiny"), root=tmp_path, quant=quant, progress=lambda *_: None)
    override = HFEngine(str(path), options=HfOptions(quant_kernel=kernel))._quantization_override()
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **override)
    assert model.hf_quantizer.quantization_config.backend == kernel
    down_proj = type(model.model.layers[0].mlp.down_proj)
    assert down_proj.__name__ == layer
    out = model.generate(torch.tensor([[1, 40, 41, 42]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        HFEngine(str(make_checkpoint(resolve_model("tiny"), root=tmp_path, progress=lambda *_: None)),
                 options=HfOptions(quant_kernel=kernel))._quantization_override()

import json

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

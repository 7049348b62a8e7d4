"""The benchmarks run as `make bench-*` runs them, on the tiny model on CPU."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_hf_decode_times_each_configuration_in_its_own_process(tmp_path):
    out = tmp_path / "decode"
    result = subprocess.run(
        [sys.executable, "benchmarks/hf_decode.py", "--configs", "eager", "sdpa+kv=2048", "sdpa+graphs+kvpad=1024", "--prompt-tokens", "64",
         "--output-tokens", "9", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(out.with_suffix(".json").read_text())
    eager, small_cache, graphs = document["results"]
    assert not any("error" in entry for entry in document["results"]), document
    assert graphs["cuda_graphs"] is True and graphs["kv_padding_tokens"] == 1024  # on CPU transformers runs it without
    assert small_cache["kv_tokens"] == 2048 and eager["kv_tokens"] > 2048  # the server's own CPU bound
    for entry in document["results"]:
        assert entry["requests"][0]["tokens"] == 9 and entry["tpot_ms"] > 0
    assert document["roofline_ms"] > 0
    assert "| sdpa+kv=2048 | 2048 |" in result.stdout and "1.00x" in result.stdout


def test_hf_decode_refuses_an_unknown_option_before_loading_anything():
    result = subprocess.run([sys.executable, "benchmarks/hf_decode.py", "--configs", "sdpa+turbo"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode != 0 and "unknown option 'turbo'" in result.stderr

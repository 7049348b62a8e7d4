"""`loadtest --url --tokenizer`: a local tokenizer.json or its directory, or a Hugging Face Hub model name, taken
from the Hub's cache or the Hub; a Hub that cannot be reached is one line (exit 2), not a traceback or a minute
of retries. No Hub is reachable from the test machines: the Hub name is served from a cache laid out as
huggingface_hub lays it out, and the unreachable Hub is a closed loopback port."""

import json
import shutil
import time

import pytest

from tests.conftest import DATA, run_cli, run_dir_of
from tokenrig.profiles import resolve_model
from tokenrig.serve.checkpoint import tokenizer_dir as profile_tokenizer_dir
from tokenrig.serve.launcher import free_port
from tokenrig.serve.remote import RemoteError, tokenizer_dir

SCENARIO = str(DATA / "timing.yaml")


def test_local_tokenizer_file_and_directory(tmp_path):
    directory = profile_tokenizer_dir(resolve_model("tiny"))
    assert tokenizer_dir(str(directory)) == directory
    assert tokenizer_dir(str(directory / "tokenizer.json")) == directory
    for wrong in (str(tmp_path), str(tmp_path / "tokenizer.json"), "./no/such/dir"):
        with pytest.raises(RemoteError, match="give a directory holding tokenizer.json"):
            tokenizer_dir(wrong)


def hub_cache(root, repo: str, files) -> None:
    """A Hugging Face cache holding `files` as the main revision of model `repo` (huggingface_hub's layout)."""
    commit = "0" * 40
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in files:
        shutil.copy(file, snapshot / file.name)


def test_a_hub_name_counts_with_the_cached_tokenizer(tmp_path, sim_server):
    source = profile_tokenizer_dir(resolve_model("llama2-7b"))
    hub_cache(tmp_path / "hub", "acme/chat-7b", [source / "tokenizer.json", source / "tokenizer_config.json"])
    # the Hub's address is a closed port: the name must come from the cache without asking it
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "TOKENRIG_MODELS": str(tmp_path / "models")}
    result = run_cli("loadtest", "--url", sim_server.endpoint.base_url, "--tokenizer", "acme/chat-7b",
                     "--scenario", SCENARIO, "--users", "2", "--duration", "2", "--warmup", "0",
                     "--results", str(tmp_path / "runs"), env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "word-level tokenizer of the" not in result.stdout  # it did not fall back to the profile's
    run_dir = run_dir_of(result)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["requests"]["ok"] > 0 and summary["requests"]["failed"] == 0


def test_an_unreachable_hub_is_one_line_at_once(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    result = run_cli("loadtest", "--url", f"http://127.0.0.1:{free_port()}", "--tokenizer", "acme/not-cached",
                     "--results", str(tmp_path / "runs"), env=env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--tokenizer acme/not-cached: not a local path, and the Hugging Face Hub at" in result.stderr
    assert "cannot be reached" in result.stderr
    assert time.monotonic() - started < 60  # transformers alone retries for ~50 s
    assert not (tmp_path / "runs").exists()


def test_tokenizer_without_url_is_refused():
    result = run_cli("loadtest", "--backend", "sim", "--tokenizer", "acme/chat-7b", "--dry-run")
    assert result.returncode == 2 and "--tokenizer goes with --url" in result.stderr

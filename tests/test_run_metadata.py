"""metadata.json as RunMetadata: written with its schema version and the server's structured batch limits, read
back as written, and every file an earlier tokenrig wrote (docs/results) still read, its batch limits recovered
from the server command it recorded."""

import json
from pathlib import Path

import pytest

from tests.test_backends import MODEL_DIR, spec
from tokenrig.report.run_metadata import METADATA_SCHEMA_VERSION, RunMetadata, ServerFacts
from tokenrig.serve.backends import BACKENDS, launch_plan
from tokenrig.serve.backends.base import BatchLimits
from tokenrig.serve.remote import ServerReport, server_facts

REPO = Path(__file__).resolve().parent.parent
COMMITTED = sorted((REPO / "docs/results").rglob("metadata.json"))
FOLLOWUP_13B = (REPO / "docs/results/serve-h200-vllm-followup-2026-11-30b/13b-64u"
                / "20261130-154059-chat-vllm-llama2-13b-h200/metadata.json")


def committed_load_tests() -> list[Path]:
    return [path for path in COMMITTED if "scenario" in json.loads(path.read_text())]


def test_there_are_committed_runs_to_read():
    assert len(committed_load_tests()) > 50


@pytest.mark.parametrize("path", committed_load_tests(), ids=lambda path: path.parent.name)
def test_every_committed_metadata_file_loads_as_version_0_with_its_batch_limits(path):
    document = json.loads(path.read_text())
    metadata = RunMetadata.read(path)
    assert metadata.schema_version == 0 and metadata.run_id == document["run_id"]
    assert metadata.server.backend == document["server"]["backend"] and metadata.scenario == document["scenario"]
    server = document["server"]
    backend = BACKENDS.get(server["backend"])
    if backend and server.get("command"):  # a launched server: what its command set
        launched = backend.batch_limits(server["command"])
        assert metadata.server.batch_limits.max_num_seqs == launched.max_num_seqs or server.get("max_num_seqs")
        assert metadata.server.batch_limits.max_batch_tokens == launched.max_batch_tokens
    # everything else reads back as it was written
    recovered = metadata.server.batch_limits.model_dump(exclude_unset=True)
    assert metadata.document() == {**document, "schema_version": 0, "server": {**server, "batch_limits": recovered}}


def test_an_old_files_batch_limits_come_from_its_record_then_its_command_then_what_was_asked():
    old = json.loads(FOLLOWUP_13B.read_text())
    limits = RunMetadata.model_validate(old).server.batch_limits
    assert (limits.max_num_seqs, limits.max_batch_tokens) == (64, 8192)
    declared = {**old, "server": {**old["server"], "batch_limits": {"max_num_seqs": 1}}}
    limits = RunMetadata.model_validate(declared).server.batch_limits
    assert (limits.max_num_seqs, limits.max_batch_tokens) == (1, 8192)  # what is recorded as such first
    asked = {**old, "server": {"backend": "sim", "model": "llama2-7b", "gpu": "a800", "max_num_seqs": 8}}
    assert RunMetadata.model_validate(asked).server.batch_limits.max_num_seqs == 8
    url = {**old, "server": {"backend": "url", "gpu": "remote", "model": "llama2-7b"}}
    assert RunMetadata.model_validate(url).server.batch_limits == BatchLimits()


def test_a_new_run_is_written_with_its_version_and_read_back_as_written(tmp_path):
    plan = launch_plan(spec("vllm", model="7b", gpu="h100-sxm", max_num_seqs=48), MODEL_DIR, 8000)
    server = {**spec("vllm", model="7b", gpu="h100-sxm", max_num_seqs=48).describe(), **plan.describe()}
    metadata = RunMetadata.new(run_id="r1", created_unix=1.5, scenario={"name": "chat"}, seed=3,
                               seed_source="--seed", server=server, slos=["ttft_p99<=0.5s"], search=None,
                               host="h", cpu_count=2, versions={"tokenrig": "0"}, git_sha=None, platform="p")
    metadata.write(tmp_path / "metadata.json")
    written = json.loads((tmp_path / "metadata.json").read_text())
    assert written["schema_version"] == METADATA_SCHEMA_VERSION == 1
    assert written["server"]["batch_limits"] == {"max_num_seqs": 48, "max_batch_tokens": plan.fit.prefill_chunk_tokens,
                                                 "gpu_memory_utilization": 0.9}
    assert written["server"]["compile_level"] == 0  # a backend's option, kept as it is
    assert "endpoint" not in written and "load_generator_workers" not in written  # only what the run set
    assert RunMetadata.read(tmp_path / "metadata.json").document() == written


@pytest.mark.parametrize("backend, gpu", [("vllm", "h100-sxm"), ("sglang", "h100-sxm"), ("tgi", "h100-sxm"),
                                          ("hf", "h100-sxm"), ("hf", "cpu"), ("sim", "a800")])
@pytest.mark.parametrize("max_num_seqs", [None, 24])
def test_a_launch_plans_batch_limits_are_what_its_command_sets(backend, gpu, max_num_seqs):
    """So capacity reads a new run's limits as it read an old run's command line."""
    plan = launch_plan(spec(backend, model="7b", gpu=gpu, max_num_seqs=max_num_seqs), MODEL_DIR, 8000)
    from_command = BACKENDS[backend].batch_limits(plan.command)
    assert plan.batch_limits.max_num_seqs == from_command.max_num_seqs
    assert plan.batch_limits.max_batch_tokens == from_command.max_batch_tokens


def test_a_url_runs_batch_limits_are_what_its_user_declared_and_its_server_told():
    report = ServerReport(engine="vllm", kv_cache={"num_gpu_blocks": 100, "block_size": 16,
                                                   "kv_cache_size_tokens": 1600, "gpu_memory_utilization": 0.8})
    facts = ServerFacts.model_validate(server_facts({"max_num_seqs": 32}, "http://h:1", "m", report))
    assert facts.batch_limits == BatchLimits(max_num_seqs=32, kv_cache_tokens=1600, kv_cache_blocks=100,
                                             kv_block_tokens=16, gpu_memory_utilization=0.8)
    assert facts.reported.kv_cache["num_gpu_blocks"] == 100 and facts.declared == ["max_num_seqs"]
    assert "batch_limits" not in server_facts({}, "http://h:1", "m", ServerReport())  # nothing known, nothing said

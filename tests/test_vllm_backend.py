"""The vllm backend beyond its flags: FP8, the multicast safeguard and --nvls, the `python -m` entry point,
and what the server's own log proves it served (real vLLM 0.26.0 start-up logs from an H200,
tests/fixtures/vllm-0.26.0-logs/, 2026-11-30)."""

import re
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli, start_server
from tests.engine_flags import parse_vllm
from tests.test_backends import MODEL_DIR, spec
from tokenrig.serve.backends import launch_plan
from tokenrig.serve.backends import vllm as vllm_backend
from tokenrig.serve.spec import SimOptions, VllmOptions

LOGS = Path(__file__).parent / "fixtures" / "vllm-0.26.0-logs"


def served(name: str) -> dict:
    return vllm_backend.served_facts((LOGS / f"{name}.log").read_text())


def test_fp8_is_vllms_online_quantization_of_the_bf16_model():
    plan = launch_plan(spec("vllm", model="7b", gpu="h200", quant="fp8"), MODEL_DIR, 1)
    args = parse_vllm(plan.command, plan.env)
    assert args.quantization == "fp8" and args.dtype == "bfloat16" and args.tensor_parallel_size == 1
    assert plan.fit.weight_bytes == pytest.approx(7.0e9, rel=0.05)  # 1 byte a linear weight + 16-bit embeddings


def test_multicast_is_off_at_tp2_unless_nvls_and_dry_run_shows_it():
    safe = launch_plan(spec("vllm", model="70b", gpu="h200", tp=2, max_model_len=2048), MODEL_DIR, 1)
    parse_vllm(safe.command, safe.env)
    assert safe.env == {"VLLM_FLASHINFER_ALLREDUCE_BACKEND": "trtllm", "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
                        "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    compilation_config = safe.command[safe.command.index("--compilation-config") + 1]
    assert compilation_config == '{"pass_config":{"fuse_allreduce_rms":false}}'
    allowed = launch_plan(spec("vllm", model="70b", gpu="h200", tp=2, max_model_len=2048,
                               options=VllmOptions(nvls=True)), MODEL_DIR, 1)
    assert allowed.env == {} and "--compilation-config" not in allowed.command
    single = launch_plan(spec("vllm", model="7b", gpu="h200"), MODEL_DIR, 1)
    assert single.env == {} and "--compilation-config" not in single.command  # nothing to all-reduce at TP 1

    dry = run_cli("serve", "--backend", "vllm", "--gpu", "h200", "--model", "70b", "--tp", "2", "--max-model-len",
                  "2048", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for line in ("env: VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm", "env: VLLM_ALLREDUCE_USE_SYMM_MEM=0",
                 "env: NCCL_NVLS_ENABLE=0", "NVLink multicast off"):
        assert line in dry.stdout
    with_nvls = run_cli("serve", "--backend", "vllm", "--gpu", "h200", "--model", "70b", "--tp", "2",
                        "--max-model-len", "2048", "--nvls", "--dry-run")
    assert "NCCL_NVLS_ENABLE" not in with_nvls.stdout and "fuse_allreduce_rms" not in with_nvls.stdout


def test_vllm_runs_as_a_python_module_where_only_its_package_is_on_the_path(tmp_path, monkeypatch):
    """An offline host with vLLM's wheels unpacked on PYTHONPATH has the package but no `vllm` script."""
    package = tmp_path / "site" / "vllm"
    (package / "entrypoints" / "cli").mkdir(parents=True)
    for init in (package, package / "entrypoints", package / "entrypoints" / "cli"):
        (init / "__init__.py").write_text("")
    (package / "entrypoints" / "cli" / "main.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    plan = launch_plan(spec("vllm", model="7b", gpu="h200"), MODEL_DIR, 1)
    assert plan.command[:4] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    parse_vllm(plan.command, plan.env)
    (tmp_path / "bin").mkdir()
    script = tmp_path / "bin" / "vllm"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert launch_plan(spec("vllm", model="7b", gpu="h200"), MODEL_DIR, 1).command[:2] == ["vllm", "serve"]


@pytest.mark.parametrize("log, weights, kernels, attention", [
    ("7b-bf16", 12.55, None, "FLASH_ATTN"),
    ("7b-gptq", 3.68, {"AutoGPTQLinearMethod": "MacheteLinearKernel"}, "FLASH_ATTN"),
    ("7b-awq", 3.74, {"AutoAWQMarlinLinearMethod": "MacheteLinearKernel"}, "FLASH_ATTN"),
    ("7b-fp8", 6.74, {"Fp8PerTensorOnlineLinearMethod": "CutlassFP8ScaledMMLinearKernel"}, "FLASH_ATTN"),
    ("7b-bf16-flashinfer", 12.55, None, "FLASHINFER"),
    ("70b-bf16-tp2", 64.24, None, "FLASH_ATTN"),
])
def test_the_log_says_what_was_served(log, weights, kernels, attention):
    facts = served(log)
    assert facts["weights_gib_per_gpu"] == weights and facts["attention_backend"] == attention
    assert facts.get("linear_kernels") == kernels


@pytest.mark.parametrize("log, quant, model, tp", [
    ("7b-bf16", "bf16", "7b", 1), ("7b-gptq", "gptq", "7b", 1), ("7b-awq", "awq", "7b", 1),
    ("7b-fp8", "fp8", "7b", 1), ("70b-bf16-tp2", "bf16", "70b", 2),
])
def test_each_served_quantization_matches_its_plan(log, quant, model, tp):
    server = spec("vllm", model=model, gpu="h200", quant=quant, tp=tp, max_model_len=2048)
    assert vllm_backend.check_served(server, launch_plan(server, MODEL_DIR, 1), served(log)) is None


def test_bf16_weights_served_for_gptq_are_refused():
    """What vLLM 0.26 did with a GPTQ config lacking modules_in_block_to_quantize: 12.55 GiB, bf16's size."""
    server = spec("vllm", model="7b", gpu="h200", quant="gptq")
    problem = vllm_backend.check_served(server, launch_plan(server, MODEL_DIR, 1), served("7b-bf16"))
    assert problem and "loaded 12.55 GiB" in problem and "not gptq" in problem


def test_tp2_all_reduce_backends_are_read_and_a_multicast_one_is_refused():
    facts = served("70b-bf16-tp2")
    assert facts["allreduce_backends"] == ["CUSTOM", "PYNCCL"]
    server = spec("vllm", model="70b", gpu="h200", tp=2, max_model_len=2048)
    plan = launch_plan(server, MODEL_DIR, 1)
    symmetric = dict(facts, allreduce_backends=["SYMM_MEM", "CUSTOM", "PYNCCL"])
    assert "SYMM_MEM" in vllm_backend.check_served(server, plan, symmetric)
    allowed = spec("vllm", model="70b", gpu="h200", tp=2, max_model_len=2048, options=VllmOptions(nvls=True))
    assert vllm_backend.check_served(allowed, plan, symmetric) is None


def test_the_startup_wait_reports_progress_until_healthy(tmp_path_factory):
    """vLLM compiles and captures graphs for minutes before /health answers: the wait says how long so far."""
    messages = []
    server = start_server(tmp_path_factory, "sim", options=SimOptions(sim_ttft_ms=1, sim_tpot_ms=1))
    server.progress, server.progress_every_s = messages.append, 0.1
    with server:
        pass
    waits = [m for m in messages if m.strip().startswith("waiting for the server:")]
    assert waits and messages.index(waits[-1]) < next(i for i, m in enumerate(messages) if "server healthy" in m)
    assert all(re.fullmatch(r"\s*waiting for the server: \d+ s of [\d.]+ s; log: .*", w) for w in waits)

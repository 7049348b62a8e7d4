"""Shared fixtures: real servers on loopback ports, started and stopped by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenrig.profiles import resolve_gpu, resolve_model
from tokenrig.serve.launcher import LaunchedServer
from tokenrig.serve.spec import ServerSpec

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
VLLM_0_26_PAGE = Path(__file__).resolve().parent / "fixtures" / "vllm-0.26.0-metrics.txt"


@pytest.fixture(scope="session", autouse=True)
def _models_cache(tmp_path_factory):
    """Checkpoints go to one per-session cache unless the user points TOKENRIG_MODELS elsewhere."""
    if "TOKENRIG_MODELS" not in os.environ:
        os.environ["TOKENRIG_MODELS"] = str(tmp_path_factory.mktemp("models"))
    yield


def start_server(tmp_path_factory, backend: str, model: str = "tiny", gpu: str = "cpu", **kwargs) -> LaunchedServer:
    spec = ServerSpec(backend=backend, model=resolve_model(model), gpu=resolve_gpu(gpu), **kwargs)
    log = tmp_path_factory.mktemp(f"{backend}-server") / "server.log"
    return LaunchedServer(spec, log, health_timeout_s=300, progress=lambda *_: None)


@pytest.fixture(scope="session")
def hf_server(tmp_path_factory):
    with start_server(tmp_path_factory, "hf") as server:
        yield server


@pytest.fixture(scope="session")
def sim_server(tmp_path_factory):
    with start_server(tmp_path_factory, "sim", model="llama2-7b", gpu="h100-sxm") as server:
        yield server


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `tokenrig ...` as a user would, in its own process (Locust patches the interpreter)."""
    return subprocess.run([sys.executable, "-m", "tokenrig.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO)


def run_dir_of(result: subprocess.CompletedProcess) -> Path:
    for line in result.stdout.splitlines():
        if line.startswith("results: "):
            return Path(line.split("results: ", 1)[1].strip())
    raise AssertionError(f"no results line in output:\n{result.stdout}\n{result.stderr}")


def load_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# The sim engine's roofline as the capacity and report tests set it: not RooflineParams' defaults, so a
# calibration that recovers it has learnt it from the runs.
KNOWN_ROOFLINE = {"compute_efficiency": 0.35, "bandwidth_efficiency": 0.45, "step_overhead_ms": 4.0}


@pytest.fixture(scope="session")
def known_engine_runs(tmp_path_factory):
    """Real sim-server load tests of llama2-7b with KNOWN_ROOFLINE: closed-loop sweeps (1 and 8 users) on
    an RTX 3090 and an H200 profile, whose bandwidths differ 5x (so bandwidth and per-step overhead
    separate) and whose compute differs 14x (so a 600-token prefill takes 320 against 23 ms, and host
    latency in TTFT cannot pass for compute), and a --find-max search on an A800 profile, a GPU the
    sweeps never ran on."""
    results = tmp_path_factory.mktemp("known-engine")
    # --seed 0: the runs these tolerances were measured on (a run otherwise draws a fresh seed)
    common = ["--backend", "sim", "--model", "7b", "--scenario", str(DATA / "capacity.yaml"), "--seed", "0",
              "--sim-compute-efficiency", str(KNOWN_ROOFLINE["compute_efficiency"]),
              "--sim-bandwidth-efficiency", str(KNOWN_ROOFLINE["bandwidth_efficiency"]),
              "--sim-step-overhead-ms", str(KNOWN_ROOFLINE["step_overhead_ms"])]
    runs = {}
    for name, args in (("rtx3090", ["--gpu", "rtx3090", "--users", "sweep", "--sweep", "1,8", "--duration", "6"]),
                       ("h200", ["--gpu", "h200", "--users", "sweep", "--sweep", "1,8", "--duration", "6"]),
                       ("a800", ["--gpu", "a800", "--find-max", "--rate", "2", "--slo", "ttft_p90=300ms",
                                 "--tail-samples", "2", "--max-step", "6", "--precision", "0.25"])):
        result = run_cli("loadtest", *common, *args, "--results", str(results / name), timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = run_dir_of(result)
    return runs

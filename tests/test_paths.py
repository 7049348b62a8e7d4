"""Shipped data is found through the package, from any working directory and from an installed wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO, load_summary, run_dir_of
from tokenrig.loadgen.plan import LoadPlan
from tokenrig.loadgen.scenario import known_scenarios, load_scenario
from tokenrig.paths import GRAFANA, SCENARIOS
from tokenrig.train.matrix import find_matrix, load_matrix

SHIPPED = ("scenarios", "grafana")  # data directories under tokenrig/, every file of which must ship


def shipped_files() -> set[str]:
    package = REPO / "tokenrig"
    return {path.relative_to(REPO).as_posix() for directory in SHIPPED for path in (package / directory).rglob("*")
            if path.is_file()}


def test_scenarios_traces_and_matrices_resolve_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"chat", "mooncake_replay", "azure_conv_replay"} <= set(known_scenarios())
    for name in known_scenarios():
        assert load_scenario(name).name == name
    replay = load_scenario("mooncake_replay").load  # its trace path is relative to the shipped scenarios
    assert LoadPlan(replay, start=0.0).scheduled_total > 0
    assert find_matrix("study-7b") == SCENARIOS / "train" / "study-7b.yaml"
    assert load_matrix("eight-gpu").name and load_matrix("scaling-7b").name
    assert (GRAFANA / "prometheus.yml").is_file() and (GRAFANA / "dashboards" / "tokenrig-loadtest.json").is_file()


def test_the_wheel_ships_the_data_and_runs_a_scenario_from_elsewhere(tmp_path):
    """Build the wheel from a copy of the source, install it on its own, and from an unrelated directory run a
    trace-replay scenario on the sim backend and list a training matrix by name."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "tokenrig", source / "tokenrig", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=120)
    wheel = next((tmp_path / "dist").glob("tokenrig-*.whl"))
    assert shipped_files() <= set(zipfile.ZipFile(wheel).namelist())
    assert "tokenrig/scenarios/traces/LICENSES/CC-BY-4.0_AzurePublicDataset_LICENSE.txt" in shipped_files()

    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=120)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}

    def tokenrig(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tokenrig.cli", *args], capture_output=True, text=True,
                              cwd=elsewhere, env=env, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import tokenrig; print(tokenrig.__file__)"], capture_output=True,
                           text=True, cwd=elsewhere, env=env, check=True).stdout
    assert Path(where.strip()).is_relative_to(tmp_path / "site")
    run = tokenrig("loadtest", "--backend", "sim", "--sim-ttft-ms", "20", "--sim-tpot-ms", "2",
                   "--scenario", "mooncake_replay", "--duration", "3", "--warmup", "0", "--results", "results")
    assert run.returncode == 0, run.stdout + run.stderr
    summary = load_summary(elsewhere / run_dir_of(run))
    assert summary["requests"]["ok"] > 0 and summary["requests"]["failed"] == 0
    matrix = tokenrig("train", "--matrix", "study-7b", "--dry-run")
    assert matrix.returncode == 0 and "llama2-7b-lora-z2-1xh200" in matrix.stdout, matrix.stdout + matrix.stderr

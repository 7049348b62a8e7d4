"""Where tokenrig's shipped data lives: scenarios, traces, training matrices, Grafana files.

They are package data (pyproject.toml lists them), found next to this module, so `--scenario chat`
and `--matrix study-7b` resolve the same from any working directory and from an installed wheel.
What a run writes (results/, the Prometheus targets directory) stays relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SCENARIOS = PACKAGE_DIR / "scenarios"  # relative data paths inside a scenario (traces, prompt files) resolve here
SERVING_SCENARIOS = SCENARIOS / "serving"
TRAINING_MATRICES = (SCENARIOS / "train", SCENARIOS / "matrix")
GRAFANA = PACKAGE_DIR / "grafana"  # dashboards, prometheus.yml, provisioning, docker-compose.yml

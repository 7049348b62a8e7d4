"""Prometheus file-based service discovery: each exporter announces itself with a target file.

A load test (and each of its distributed workers), the server it started and a training run
write `<dir>/<run-id>-<role>.json` in Prometheus' file_sd format, labelled with the run's
identity; prometheus.yml watches the directory, so new runs and workers are found without
editing any config. The file is removed when the exporter stops.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TARGETS_DIR = Path(os.environ.get("TOKENRIG_PROMETHEUS_TARGETS", "grafana/targets"))


@dataclass
class MonitorOptions:
    """Live Prometheus metrics for a run: exporter port (0 = any free one), discovery directory, and how
    long the exporter stays up after the run so Prometheus scrapes the final values."""

    port: int = 0
    targets_dir: Path = DEFAULT_TARGETS_DIR
    linger_s: float = 5.0


class TargetFile:
    def __init__(self, directory: Path, name: str, targets: list[str], labels: dict[str, str]):
        self.path = Path(directory) / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": targets, "labels": labels}], indent=2))
        tmp.replace(self.path)  # Prometheus must never read a half-written file

    @classmethod
    def announce(cls, directory: Path, role: str, address: str, labels: dict[str, str]) -> TargetFile:
        """`<run-id>-<role>.json`: one exporter at host:port, labelled with the run and its role."""
        return cls(directory, f"{labels['run_id']}-{role}", [address], {**labels, "role": role})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

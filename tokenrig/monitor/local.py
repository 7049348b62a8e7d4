"""`make monitor`: start what this machine can run of the monitoring stack and say where to look.

Runs Prometheus (Debian's `prometheus` package, or any on PATH) in the foreground with the shipped
tokenrig/grafana/prometheus.yml, aimed at the targets directory runs announce themselves in
(`--prometheus-targets`' default: grafana/targets in the working directory). Grafana needs Docker
(tokenrig/grafana/docker-compose.yml) with a daemon that answers; without it, Prometheus' own UI shows the
same PromQL the dashboards use. SIGTERM or Ctrl-C stops Prometheus' whole process group with it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tokenrig.monitor.discovery import DEFAULT_TARGETS_DIR
from tokenrig.paths import GRAFANA

STOP_POLL_S = 0.2  # how soon a stop signal is acted on


def prometheus_config(targets_dir: Path) -> dict:
    """The shipped prometheus.yml with its tokenrig job watching `targets_dir`: a relative file_sd path
    would resolve next to the config file, inside the installed package."""
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        for discovery in job.get("file_sd_configs", []):
            discovery["files"] = [str(targets_dir.resolve() / Path(pattern).name) for pattern in discovery["files"]]
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenrig.monitor.local", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:9090")
    parser.add_argument("--data", type=Path, default=Path("results") / "prometheus-data")
    args = parser.parse_args(argv)
    targets = DEFAULT_TARGETS_DIR
    targets.mkdir(parents=True, exist_ok=True)
    print(grafana_advice())
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        print("Prometheus is not installed: `apt-get install prometheus` (Debian/Ubuntu) or use the compose file.",
              file=sys.stderr)
        return 1
    print(f"Prometheus: http://{args.listen}  (targets: {targets}/; Ctrl-C stops it)")
    print(f"Start a monitored run in another shell: make loadtest ARGS='--prometheus-targets {targets}'")
    with tempfile.TemporaryDirectory(prefix="tokenrig-prometheus-") as config_dir:
        config = Path(config_dir) / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(targets)))
        command = [prometheus, f"--config.file={config}", f"--storage.tsdb.path={args.data}",
                   f"--web.listen-address={args.listen}"]
        return run_until_stopped(command)


def run_until_stopped(command: list[str]) -> int:
    """Run `command` in a process group of its own until it exits, or until Ctrl-C or SIGTERM reaches this
    process: then its whole group is stopped (SIGTERM, SIGKILL after 30 s), so no Prometheus outlives
    the wrapper that a script or a service manager stopped. A stop signal only sets a flag: raised as an
    exception it could land inside Popen after the fork, leaving a Prometheus nobody had the handle of."""
    stops: list[int] = []
    handlers = {number: signal.signal(number, lambda received, _frame: stops.append(received))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        child = subprocess.Popen(command, start_new_session=True)
        while not stops:
            try:
                return child.wait(timeout=STOP_POLL_S)
            except subprocess.TimeoutExpired:
                pass
        os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        return 0
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def grafana_advice() -> str:
    """Where Grafana can come from here: Docker whose daemon answers, or the dashboards' JSON for another one.
    A docker client on PATH is not enough: without its daemon `docker compose up` fails."""
    elsewhere = (f"its dashboards are in {GRAFANA / 'dashboards'} for any Grafana you have, and Prometheus' UI "
                 "below runs the same queries")
    if not shutil.which("docker"):
        return f"Grafana is not installable on this machine (no Docker); {elsewhere}."
    try:
        check = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                               text=True, timeout=15)
        answer = (check.stderr.strip().splitlines() or ["no answer"])[0] if check.returncode else None
    except subprocess.TimeoutExpired:
        answer = "no answer in 15 s"
    if answer:
        return (f"A docker client is here, but its daemon does not answer ({answer}): start Docker to run "
                f"Grafana with `docker compose -f {GRAFANA / 'docker-compose.yml'} up -d`; meanwhile {elsewhere}.")
    return (f"Docker is here: `docker compose -f {GRAFANA / 'docker-compose.yml'} up -d` starts Prometheus + "
            "Grafana (http://localhost:3000) with tokenrig's dashboards.")


if __name__ == "__main__":
    sys.exit(main())

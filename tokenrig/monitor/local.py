"""`make monitor`: start what this machine can run of the monitoring stack and say where to look.

Runs Prometheus (Debian's `prometheus` package, or any on PATH) in the foreground with
grafana/prometheus.yml, which discovers load tests and training runs through grafana/targets/.
Grafana needs Docker (grafana/docker-compose.yml); without it, Prometheus' own UI shows the
same PromQL the dashboards use.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenrig.monitor.local", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:9090")
    parser.add_argument("--data", type=Path, default=REPO / "results" / "prometheus-data")
    args = parser.parse_args(argv)
    (REPO / "grafana" / "targets").mkdir(parents=True, exist_ok=True)
    if shutil.which("docker"):
        print("Docker is here: `docker compose -f grafana/docker-compose.yml up -d` starts Prometheus + Grafana "
              "(http://localhost:3000) with tokenrig's dashboards.")
    else:
        print("Grafana is not installable on this machine (no Docker); its dashboards are in grafana/dashboards/ "
              "for any Grafana you have, and Prometheus' UI below runs the same queries.")
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        print("Prometheus is not installed: `apt-get install prometheus` (Debian/Ubuntu) or use the compose file.",
              file=sys.stderr)
        return 1
    print(f"Prometheus: http://{args.listen}  (targets: grafana/targets/; Ctrl-C stops it)")
    print("Start a monitored run in another shell: make loadtest ARGS='--prometheus-targets grafana/targets'")
    command = [prometheus, f"--config.file={REPO / 'grafana' / 'prometheus.yml'}",
               f"--storage.tsdb.path={args.data}", f"--web.listen-address={args.listen}"]
    try:
        return subprocess.run(command).returncode
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

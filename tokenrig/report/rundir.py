"""Run directories: results/<run-id>/ with metadata.json, requests.jsonl, summary.json, server.log.

A run directory describes itself: versions, git commit, host, the resolved scenario and
server command. It is written incrementally so a crash or Ctrl-C keeps what was measured.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import socket
import subprocess
import time
from pathlib import Path

import tokenrig
from tokenrig.errors import UserError
from tokenrig.serve.backends import BACKENDS

# the serving engines' packages (vllm, sglang) come from the backend registry
PACKAGES = ("torch", "transformers", "locust", "tokenizers", "aiohttp", "prometheus-client", "deepspeed")


class ResultsDirError(UserError, OSError):
    """The results root cannot hold run directories (a file, unwritable, ...)."""


def new_run_dir(root: Path, *parts: str) -> Path:
    if root.exists() and not root.is_dir():
        raise ResultsDirError(f"--results {root} is a file, not a directory: "
                              "give a directory (it is created if missing)")
    # a served model's name may hold '/' (org/model): one path component per run
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + "-".join(re.sub(r"[^\w.-]", "_", p) for p in parts if p)
    path = root / run_id
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / f"{run_id}-{suffix}"
    try:
        path.mkdir(parents=True)
    except OSError as error:
        raise ResultsDirError(f"cannot create a run directory under --results {root}: "
                              f"{error.strerror or error}") from None
    return path


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(tokenrig.__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_facts() -> dict:
    versions = {"tokenrig": tokenrig.__version__, "python": platform.python_version()}
    engines = [backend.package for backend in BACKENDS.values() if backend.package and backend.package not in PACKAGES]
    for package in [*PACKAGES, *engines]:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"versions": versions, "git_sha": _git_sha(), "host": socket.gethostname(),
            "platform": platform.platform(), "cpu_count": __import__("os").cpu_count()}

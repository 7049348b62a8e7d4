"""Start a server process, wait until it is healthy, capture its log, stop it cleanly.

`ServerSpec` says what to run; `LaunchedServer` is a context manager that spawns the process
in its own session (so a terminal Ctrl-C reaches tokenrig, which then stops the server in
order), polls /health, and on exit sends SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tokenrig.profiles import GpuProfile, ModelProfile

BACKENDS = ("hf", "sim")


class LaunchError(RuntimeError):
    pass


@dataclass
class ServerSpec:
    backend: str
    model: ModelProfile
    gpu: GpuProfile
    device: str = "cpu"
    attn_implementation: str = "sdpa"
    max_num_seqs: int | None = None
    sim_ttft_ms: float | None = None
    sim_tpot_ms: float | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    extra_args: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"backend": self.backend, "model": self.model.key, "gpu": self.gpu.key, "device": self.device,
                "attn_implementation": self.attn_implementation, "max_num_seqs": self.max_num_seqs,
                "sim_ttft_ms": self.sim_ttft_ms, "sim_tpot_ms": self.sim_tpot_ms}


@dataclass
class Endpoint:
    base_url: str
    metrics_url: str
    model_name: str
    tokenizer_dir: Path
    max_context: int


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def server_command(spec: ServerSpec, model_dir: Path, port: int) -> list[str]:
    if spec.backend not in BACKENDS:
        raise LaunchError(f"unknown backend {spec.backend!r}; known backends: {', '.join(BACKENDS)}")
    command = [sys.executable, "-m", "tokenrig.serve.server", "--engine", spec.backend, "--model", spec.model.key,
               "--model-dir", str(model_dir), "--host", spec.host, "--port", str(port), "--gpu", spec.gpu.key]
    if spec.backend == "hf":
        command += ["--device", spec.device, "--attn-implementation", spec.attn_implementation]
    if spec.max_num_seqs:
        command += ["--max-num-seqs", str(spec.max_num_seqs)]
    if spec.sim_ttft_ms is not None:
        command += ["--sim-ttft-ms", str(spec.sim_ttft_ms), "--sim-tpot-ms", str(spec.sim_tpot_ms)]
    return command + spec.extra_args


def prepare_model_dir(spec: ServerSpec, progress=print) -> Path:
    """The checkpoint the server reads: full weights for hf, only the tokenizer for sim."""
    from tokenrig.serve.checkpoint import checkpoint_dir, is_complete, make_checkpoint, tokenizer_dir

    if spec.backend == "sim":
        return tokenizer_dir(spec.model)
    if not is_complete(checkpoint_dir(spec.model)):
        progress(f"writing synthetic {spec.model.key} checkpoint to {checkpoint_dir(spec.model)} (random weights)")
    return make_checkpoint(spec.model, progress=progress)


class LaunchedServer:
    def __init__(self, spec: ServerSpec, log_path: Path, health_timeout_s: float = 900, progress=print):
        self.spec = spec
        self.log_path = log_path
        self.health_timeout_s = health_timeout_s
        self.progress = progress
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self.endpoint: Endpoint | None = None

    def __enter__(self) -> LaunchedServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Endpoint:
        model_dir = prepare_model_dir(self.spec, self.progress)
        port = self.spec.port or free_port(self.spec.host)
        self.command = server_command(self.spec, model_dir, port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.progress(f"starting {self.spec.backend} server: {shlex.join(self.command)}")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()
        base_url = f"http://{self.spec.host}:{port}"
        self._wait_healthy(base_url)
        self.endpoint = Endpoint(base_url, f"{base_url}/metrics", self.spec.model.key, model_dir,
                                 self.spec.model.max_context)
        return self.endpoint

    def _wait_healthy(self, base_url: str) -> None:
        deadline = time.monotonic() + self.health_timeout_s
        started = time.monotonic()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LaunchError(f"server exited with code {self.process.returncode} before it was healthy; "
                                  f"last log lines:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                    if response.status == 200:
                        self.progress(f"server healthy at {base_url} after {time.monotonic() - started:.1f} s")
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise LaunchError(f"server not healthy after {self.health_timeout_s:.0f} s; log: {self.log_path}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait(self) -> int:
        return self.process.wait()

    def stop(self, grace_s: float = 15) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass

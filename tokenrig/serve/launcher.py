"""Start a server process, wait until it is healthy, capture its log, stop it cleanly.

`ServerSpec` (serve/spec.py) says what to run; a backend (`tokenrig.serve.backends`) turns it into a
command and environment; `LaunchedServer` is a context manager that spawns that process in its own session
(so a terminal Ctrl-C reaches tokenrig, which then stops the server in order), polls its health
route, and on exit sends SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tokenrig.serve import backends
from tokenrig.serve.backends.base import LaunchPlan
from tokenrig.serve.fit import FitPlan
from tokenrig.serve.spec import Endpoint, LaunchError, ServerSpec


def _die_with_parent():
    """A preexec hook asking Linux to SIGTERM the server when tokenrig dies, even by SIGKILL.

    The server runs in its own session (so Ctrl-C reaches tokenrig, which stops it in order); without
    this, a tokenrig killed outright leaves a GPU server holding its memory and port.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: the hook only calls into libc
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _program_installed(command: list[str]) -> bool:
    """The program is on PATH, and for `python -m package...` the package imports from here (an engine's wheels
    unpacked on PYTHONPATH count: the server inherits this environment)."""
    if shutil.which(command[0]) is None:
        return False
    if command[1:2] == ["-m"]:
        return importlib.util.find_spec(command[2].split(".")[0]) is not None
    return True


class LaunchedServer:
    def __init__(self, spec: ServerSpec, log_path: Path, health_timeout_s: float = 900, progress=print,
                 progress_every_s: float = 15, fit: FitPlan | None = None):
        self.spec = spec
        self.fit = fit  # the spec's fit plan when planned already
        self.log_path = log_path
        self.health_timeout_s = health_timeout_s
        self.progress_every_s = progress_every_s
        self.served: dict = {}  # what the engine's log says it served (backends that read it)
        self.progress = progress
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self.plan: LaunchPlan | None = None  # once started
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
        model_dir = backends.model_dir(self.spec, self.progress)
        port = self.spec.port or free_port(self.spec.host)
        self.plan = plan = backends.launch_plan(self.spec, model_dir, port, self.fit)
        self.command = plan.command
        if not _program_installed(self.command):
            raise LaunchError(f"{self.command[0]} is not installed on this machine. "
                              f"{backends.BACKENDS[self.spec.backend].setup}\n"
                              f"The command it would run: {shlex.join(self.command)}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in plan.env.items())
        env_prefix = env_text + " " if env_text else ""
        self.progress(f"starting {self.spec.backend} server: {env_prefix}{shlex.join(self.command)}")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **plan.env)
        self.process = process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                  start_new_session=True, preexec_fn=_die_with_parent())
        log.close()
        base_url = f"http://{self.spec.host}:{port}"
        self._wait_healthy(process, base_url + plan.health_path)
        self._check_served(plan)
        max_context = (plan.fit.max_model_len if plan.fit is not None
                       else self.spec.max_model_len or self.spec.model.max_context)
        self.endpoint = Endpoint(base_url, base_url + plan.metrics_path, self.spec.model.key, model_dir,
                                 max_context)
        return self.endpoint

    def _wait_healthy(self, process: subprocess.Popen, health_url: str) -> None:
        """Poll the health route; every `progress_every_s` say how long it has taken and the log's last line
        (vLLM compiles and captures CUDA graphs for minutes before it answers)."""
        started = time.monotonic()
        deadline = started + self.health_timeout_s
        next_report = started + self.progress_every_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise LaunchError(f"server exited with code {process.returncode} before it was healthy; "
                                  f"last log lines:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(health_url, timeout=2) as response:
                    if response.status == 200:
                        self.progress(f"server healthy at {health_url} after {time.monotonic() - started:.1f} s")
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() >= next_report:
                last = self.log_tail(1).strip()[-160:]
                self.progress(f"  waiting for the server: {time.monotonic() - started:.0f} s of "
                              f"{self.health_timeout_s:g} s; log: {last}")
                next_report += self.progress_every_s
            time.sleep(0.2)
        raise LaunchError(f"server not healthy after {self.health_timeout_s:g} s (polled {health_url}); "
                          f"log {self.log_path} ends:\n{self.log_tail()}")

    def _check_served(self, plan: LaunchPlan) -> None:
        """Read from the log what the engine served; refuse a server that is not what was asked for."""
        backend = backends.BACKENDS[self.spec.backend]
        if backend.read_served is None:
            return
        self.served = backend.read_served(self.log_path.read_text(errors="replace"))
        if self.served:
            self.progress("served: " + ", ".join(f"{key} {value}" for key, value in self.served.items()))
        problem = backend.check_served(self.spec, plan, self.served) if backend.check_served else None
        if problem:
            raise LaunchError(problem)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait(self) -> int:
        if self.process is None:
            raise LaunchError("the server was never started: start() it before waiting on it")
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

"""Start a server process, wait until it is healthy, capture its log, stop it cleanly.

`ServerSpec` says what to run; a backend (`tokenrig.serve.backends`) turns it into a command and
environment; `LaunchedServer` is a context manager that spawns that process in its own session
(so a terminal Ctrl-C reaches tokenrig, which then stops the server in order), polls its health
route, and on exit sends SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path

from tokenrig.profiles import GpuProfile, ModelProfile


class LaunchError(RuntimeError):
    pass



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

@dataclass
class ServerSpec:
    """Everything that decides how a server is launched; backends turn it into a command."""

    backend: str
    model: ModelProfile
    gpu: GpuProfile
    device: str = "cpu"
    quant: str = "bf16"  # bf16, fp16, int8, gptq, awq (4-bit, group 128)
    attention: str | None = None  # backend's own name or the portable 'flash' / 'noflash'; None = its default
    tp: int | None = None  # None: the fit planner picks the smallest that fits
    max_model_len: int | None = None  # None: the model's context
    concurrency: int = 16  # requests the KV cache must hold at once (fit planning and batch limits)
    max_num_seqs: int | None = None  # engine batch limit; None: the plan's concurrency
    gpu_memory_utilization: float = 0.90
    compile_level: int = 0  # hf: torch.compile level of transformers' continuous batching (0 = off)
    cuda_graphs: bool | None = None  # hf: CUDA graphs over the static paged cache (None = transformers decides)
    prefix_caching: bool | None = None  # vllm/tgi: None = the engine's default
    nvls: bool = False  # vllm at TP > 1: allow NVLink multicast (off unless asked: it can take shared GPUs down)
    quant_kernel: str | None = None  # hf: gptqmodel kernel for GPTQ/AWQ (None = gptqmodel's own choice)
    kv_padding_tokens: int | None = None  # hf with CUDA graphs: KV read padded to a multiple of this
    sim_ttft_ms: float | None = None
    sim_tpot_ms: float | None = None
    sim_compute_efficiency: float | None = None  # sim roofline: None = RooflineParams' default
    sim_bandwidth_efficiency: float | None = None
    sim_step_overhead_ms: float | None = None
    sim_sequence_overhead_us: float | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    extra_args: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"backend": self.backend, "model": self.model.key, "gpu": self.gpu.key, "device": self.device,
                "quant": self.quant, "attention": self.attention, "tp": self.tp, "max_model_len": self.max_model_len,
                "concurrency": self.concurrency, "max_num_seqs": self.max_num_seqs,
                "gpu_memory_utilization": self.gpu_memory_utilization, "compile_level": self.compile_level,
                "cuda_graphs": self.cuda_graphs, "prefix_caching": self.prefix_caching, "nvls": self.nvls,
                "quant_kernel": self.quant_kernel,
                "kv_padding_tokens": self.kv_padding_tokens,
                "sim_ttft_ms": self.sim_ttft_ms, "sim_tpot_ms": self.sim_tpot_ms,
                "sim_compute_efficiency": self.sim_compute_efficiency,
                "sim_bandwidth_efficiency": self.sim_bandwidth_efficiency,
                "sim_step_overhead_ms": self.sim_step_overhead_ms,
                "sim_sequence_overhead_us": self.sim_sequence_overhead_us}


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


def prepare_model_dir(spec: ServerSpec, progress=print) -> Path:
    """The checkpoint (or config/tokenizer directory) the backend's server reads, written on first use."""
    from tokenrig.serve.backends import prepare_model_dir as backend_model_dir

    return backend_model_dir(spec, progress)


class LaunchedServer:
    def __init__(self, spec: ServerSpec, log_path: Path, health_timeout_s: float = 900, progress=print,
                 progress_every_s: float = 15):
        self.spec = spec
        self.log_path = log_path
        self.health_timeout_s = health_timeout_s
        self.progress_every_s = progress_every_s
        self.served: dict = {}  # what the engine's log says it served (backends that read it)
        self.progress = progress
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self.plan = None  # the backend's LaunchPlan, once started
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
        from tokenrig.serve.backends import launch_plan

        model_dir = prepare_model_dir(self.spec, self.progress)
        port = self.spec.port or free_port(self.spec.host)
        self.plan = launch_plan(self.spec, model_dir, port)
        self.command = self.plan.command
        if shutil.which(self.command[0]) is None:
            raise LaunchError(f"{self.command[0]} is not installed on this machine. {self.plan.install_hint or ''}\n"
                              f"The command it would run: {shlex.join(self.command)}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.plan.env.items())
        self.progress(f"starting {self.spec.backend} server: {env_text + ' ' if env_text else ''}{shlex.join(self.command)}")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.plan.env)
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_die_with_parent())
        log.close()
        base_url = f"http://{self.spec.host}:{port}"
        self._wait_healthy(base_url + self.plan.health_path)
        self._check_served()
        max_context = (self.plan.fit.max_model_len if self.plan.fit is not None
                       else self.spec.max_model_len or self.spec.model.max_context)
        self.endpoint = Endpoint(base_url, base_url + self.plan.metrics_path, self.spec.model.key, model_dir,
                                 max_context)
        return self.endpoint

    def _wait_healthy(self, health_url: str) -> None:
        """Poll the health route; every `progress_every_s` say how long it has taken and the log's last line
        (vLLM compiles and captures CUDA graphs for minutes before it answers)."""
        started = time.monotonic()
        deadline = started + self.health_timeout_s
        next_report = started + self.progress_every_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LaunchError(f"server exited with code {self.process.returncode} before it was healthy; "
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

    def _check_served(self) -> None:
        """Read from the log what the engine served; refuse a server that is not what was asked for."""
        if self.plan.read_served is None:
            return
        self.served = self.plan.read_served(self.log_path.read_text(errors="replace"))
        if self.served:
            self.progress("served: " + ", ".join(f"{key} {value}" for key, value in self.served.items()))
        problem = self.plan.check_served(self.spec, self.plan, self.served) if self.plan.check_served else None
        if problem:
            raise LaunchError(problem)

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

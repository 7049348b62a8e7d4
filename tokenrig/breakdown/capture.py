"""Taking a kernel trace of a serving engine during a load step.

Each backend's plug-in says which server flags make its engine trace N steps on request (`profile_args`):
vLLM 0.26's own torch profiler (`--profiler-config`, each step annotated with its batch), or tokenrig's hf
engine (`--profile-dir`, serve/engines/step_profiler.py); both serve POST /start_profile and /stop_profile.
A load step with profiling asks for a trace once its warm-up is over, asks the server to stop when the
load is over (the engine has usually stopped by itself), and reads the newest trace the server wrote.

Profiling costs the engine time (the profiler's own work and, when it stops, writing the trace), so a
profiled step's latencies are not a clean measurement: profile in runs of their own, never in an SLO search.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tokenrig.breakdown.table import OperatorBreakdown, breakdown
from tokenrig.breakdown.trace import read_trace

TRACE_PATTERN = "*.pt.trace.json*"


class ProfileError(RuntimeError):
    """A profile that was asked for cannot be taken (wrong backend, no trace directory, no trace written)."""


def profiled_backends() -> tuple[str, ...]:
    """The backends whose plug-in says how to make their server trace its engine steps."""
    from tokenrig.serve.backends import BACKENDS

    return tuple(name for name, backend in BACKENDS.items() if backend.profile_args is not None)


def server_profile_args(backend: str, trace_dir: Path, steps: int) -> list[str]:
    """The server flags that make a launched engine record `steps` engine steps into `trace_dir` on request."""
    from tokenrig.serve.backends import BACKENDS

    plugin = BACKENDS.get(backend)
    if plugin is None or plugin.profile_args is None:
        raise ProfileError(f"--profile-steps: the {backend} backend has no kernels to trace; "
                           f"profiling works with {' and '.join(profiled_backends())}")
    return plugin.profile_args(trace_dir, steps)


def _post(url: str, headers: dict, timeout_s: float) -> None:
    request = urllib.request.Request(url, data=b"", method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()


@dataclass
class TraceCapture:
    """Asks the server at `base_url` for a trace `after_s` into a step, and reads it back from `trace_dir`."""

    base_url: str
    trace_dir: Path
    source: str
    headers: dict = field(default_factory=dict)
    stop_timeout_s: float = 600.0  # writing a trace of a large model's steps takes minutes
    _timer: threading.Timer | None = None
    _asked_at: float | None = None
    error: str | None = None

    def start_after(self, after_s: float) -> None:
        self._timer = threading.Timer(max(after_s, 0.0), self._start)
        self._timer.daemon = True
        self._timer.start()

    def _start(self) -> None:
        self._asked_at = time.time()
        try:
            _post(f"{self.base_url}/start_profile", self.headers, 30)
        except (urllib.error.URLError, OSError) as error:
            self.error = f"POST /start_profile failed: {error}"

    def finish(self) -> OperatorBreakdown:
        """Stop the profiler if it still runs, then the breakdown of the trace it wrote."""
        if self._timer:
            self._timer.cancel()
        asked_at = self._asked_at
        if asked_at is None:
            raise ProfileError("the load ended before its warm-up did: no profile was asked for")
        if self.error:
            raise ProfileError(self.error)
        try:
            _post(f"{self.base_url}/stop_profile", self.headers, self.stop_timeout_s)
        except (urllib.error.URLError, OSError) as error:
            raise ProfileError(f"POST /stop_profile failed: {error}") from None
        trace = self.newest_trace(asked_at)
        result = breakdown(read_trace(trace), self.source)
        if not result.steps:
            raise ProfileError(f"{trace} holds no annotated engine steps")
        return result.model_copy(update={"trace": str(trace)})

    def newest_trace(self, asked_at: float, wait_s: float = 30.0) -> Path:
        """The newest trace written since the profile was asked for at `asked_at` (the engine may still be
        writing it)."""
        deadline = time.time() + wait_s
        while True:
            fresh = [p for p in self.trace_dir.glob(TRACE_PATTERN) if p.stat().st_mtime >= asked_at - 1]
            if fresh:
                return max(fresh, key=lambda p: (p.stat().st_mtime, p.stat().st_size))
            if time.time() > deadline:
                raise ProfileError(f"the server wrote no trace into {self.trace_dir}")
            time.sleep(0.5)

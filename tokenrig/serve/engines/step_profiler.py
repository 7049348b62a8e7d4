"""torch.profiler for tokenrig's hf engine, driven as vLLM's is: /start_profile, N engine steps, a trace file.

The engine's model forward is wrapped: each call is annotated with vLLM's step annotation
(`execute_<n>_context_...`, tokenrig/breakdown/trace.py), its batch read from the continuous-batching
arguments (cumulative query and key lengths: a request with one query token and more keys is decoding,
any other is a prefill chunk). The profiler starts and stops on the engine's own thread, at the first
forward after /start_profile and after `max_steps` annotated steps (or at /stop_profile), and writes a
gzipped Chrome trace into the trace directory. Reading the batch lengths costs a small host copy per
step, only while the profiler runs.
"""

from __future__ import annotations

import gzip
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tokenrig.breakdown.trace import StepComposition

if TYPE_CHECKING:
    import torch


def composition_of(kwargs: dict) -> StepComposition | None:
    """The batch of one continuous-batching forward, from its cumulative query and key lengths."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if isinstance(cu_k, dict):
        cu_k = next(iter(cu_k.values()), None)
    if cu_q is None or cu_k is None:
        return None
    q, k = cu_q.tolist(), cu_k.tolist()
    prefill_n = prefill_tokens = prefill_kv = prefill_pairs = decode_n = decode_kv = 0
    for index in range(min(len(q), len(k)) - 1):
        query, keys = q[index + 1] - q[index], k[index + 1] - k[index]
        if query <= 0:
            continue
        if query == 1 and keys > 1:
            decode_n, decode_kv = decode_n + 1, decode_kv + keys
        else:
            prefill_n, prefill_tokens = prefill_n + 1, prefill_tokens + query
            prefill_kv, prefill_pairs = prefill_kv + keys, prefill_pairs + query * keys
    return StepComposition(prefill_n, prefill_tokens, decode_n, decode_n, prefill_kv, prefill_pairs, decode_kv)


class StepProfiler:
    """Profiles `max_steps` forwards of a model after `request_start`; the trace lands in `trace_dir`."""

    def __init__(self, trace_dir: Path, max_steps: int):
        self.trace_dir = Path(trace_dir)
        self.max_steps = max_steps
        self._lock = threading.Lock()
        self._requested = False
        self._profiler: torch.profiler.profile | None = None
        self._steps = 0
        self._in_step = False  # a profiled forward runs on the engine's thread
        self._stop_asked = False  # /stop_profile came during that forward: it stops the profiler when it ends
        self.last_trace: Path | None = None

    def wrap(self, model) -> None:
        forward = model.forward

        def annotated_forward(*args, **kwargs):
            if not self._requested and self._profiler is None:
                return forward(*args, **kwargs)
            import torch

            with self._lock:
                if self._requested and self._profiler is None:
                    self._start()
                composition = composition_of(kwargs) if self._profiler is not None else None
                self._in_step = composition is not None
            if composition is None:
                return forward(*args, **kwargs)
            try:
                with torch.profiler.record_function(composition.annotation()):
                    return forward(*args, **kwargs)
            finally:
                with self._lock:
                    self._in_step = False
                    self._steps += 1
                    if self._steps >= self.max_steps or self._stop_asked:
                        self._finish()

        model.forward = annotated_forward

    def request_start(self) -> None:
        with self._lock:
            self._requested = True

    def request_stop(self) -> None:
        """Stop (from any thread) if the engine has not stopped it after its steps: now, or while a profiled
        forward runs, when it ends (torch's profiler stopped under an open step annotation crashes the process)."""
        with self._lock:
            self._requested = False
            if self._in_step:
                self._stop_asked = True
            elif self._profiler is not None:
                self._finish()

    def _start(self) -> None:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
        profiler.start()
        self._profiler, self._steps = profiler, 0

    def _finish(self) -> None:
        """Stop and write the trace (under the lock, the profiler running)."""
        profiler, self._profiler, self._requested, self._stop_asked = self._profiler, None, False, False
        if profiler is None:
            raise RuntimeError("the step profiler is not running")
        profiler.stop()
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        path = self.trace_dir / f"hf-engine.{time.time_ns()}.pt.trace.json"
        profiler.export_chrome_trace(str(path))
        with open(path, "rb") as raw, gzip.open(f"{path}.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        path.unlink()
        self.last_trace = Path(f"{path}.gz")

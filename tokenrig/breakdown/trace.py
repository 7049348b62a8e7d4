"""A torch-profiler trace (Chrome trace JSON, optionally gzipped) as engine steps and their kernels.

Engine steps are the profiler annotations vLLM 0.26 writes around each `execute_model` when its profiler
config sets `detailed_trace_annotation` (tokenrig's own engines write the same names):

    execute_<tokens>_context_<n>(sq<tokens>sk<kv>sqsq<q*q>sqsk<q*kv>)_generation_<n>(sq<tokens>sk<kv>...)

so each step carries its batch: prefill requests and tokens (context phase), decode requests and tokens,
and the KV tokens each phase attends over (sk). A step owns the device work launched from the start of
its annotation to the start of the next one (sampling runs after `execute_model` returns); the device
work is GPU kernels, memcopies and memsets, matched to their launch through the trace's correlation ids.
A trace with no GPU activity (the hf engine on a CPU) uses the outermost CPU operators inside each step
instead, so the same breakdown runs on any machine.
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_DETAILED = re.compile(
    r"execute_(?P<total>\d+)_context_(?P<ctx_n>\d+)\(sq(?P<ctx_q>\d+)sk(?P<ctx_k>\d+)sqsq\d+sqsk(?P<ctx_qk>\d+)\)"
    r"_generation_(?P<gen_n>\d+)\(sq(?P<gen_q>\d+)sk(?P<gen_k>\d+)sqsq\d+sqsk\d+\)")
_SIMPLE = re.compile(r"execute_context_(?P<ctx_n>\d+)\((?P<ctx_q>\d+)\)_generation_(?P<gen_n>\d+)\((?P<gen_q>\d+)\)")
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass(frozen=True)
class StepComposition:
    """One engine step's batch. kv_* are None when the annotation did not carry them (vLLM's simple form)."""

    prefill_requests: int
    prefill_tokens: int
    decode_requests: int
    decode_tokens: int
    prefill_kv_tokens: int | None = None  # context each prefill chunk ends at, summed
    prefill_attention_pairs: int | None = None  # query x key pairs of the prefill chunks (causal work)
    decode_kv_tokens: int | None = None  # KV tokens the decoding requests read

    @property
    def kind(self) -> str:
        if self.prefill_tokens and self.decode_tokens:
            return "mixed"
        return "prefill" if self.prefill_tokens else "decode"

    def annotation(self) -> str:
        """The annotation vLLM writes for this step (detailed form); tokenrig's engines write the same."""
        return (f"execute_{self.prefill_tokens + self.decode_tokens}_context_{self.prefill_requests}"
                f"(sq{self.prefill_tokens}sk{self.prefill_kv_tokens or 0}sqsq0sqsk{self.prefill_attention_pairs or 0})"
                f"_generation_{self.decode_requests}(sq{self.decode_tokens}sk{self.decode_kv_tokens or 0}sqsq0sqsk0)")


def parse_annotation(name: str) -> StepComposition | None:
    """The step composition an `execute_...` annotation names, or None for any other name."""
    match = _DETAILED.fullmatch(name)
    if match:
        g = {key: int(value) for key, value in match.groupdict().items()}
        return StepComposition(g["ctx_n"], g["ctx_q"], g["gen_n"], g["gen_q"], g["ctx_k"], g["ctx_qk"], g["gen_k"])
    match = _SIMPLE.fullmatch(name)
    if match:
        g = {key: int(value) for key, value in match.groupdict().items()}
        return StepComposition(g["ctx_n"], g["ctx_q"], g["gen_n"], g["gen_q"])
    return None


@dataclass(frozen=True)
class Kernel:
    """One piece of device work (or, in a CPU trace, one outermost CPU operator): name, start, duration (µs)."""

    name: str
    start_us: float
    duration_us: float
    category: str = "kernel"

    @property
    def end_us(self) -> float:
        return self.start_us + self.duration_us


@dataclass
class ProfiledStep:
    composition: StepComposition
    launch_start_us: float  # the annotation's start on the host
    kernels: list[Kernel] = field(default_factory=list)  # in start order

    def busy_us(self) -> float:
        """Time the device was doing this step's work: the union of its kernels' intervals."""
        busy, end = 0.0, float("-inf")
        for kernel in self.kernels:
            start = max(kernel.start_us, end)
            if kernel.end_us > start:
                busy += kernel.end_us - start
            end = max(end, kernel.end_us)
        return busy


@dataclass
class EngineTrace:
    """The profiled steps of one trace, in order, and where they came from."""

    steps: list[ProfiledStep]
    device: str  # "gpu": kernels from the device's timeline; "cpu": outermost CPU operators
    source: str = ""

    def step_spans_us(self) -> list[float]:
        """Each step's device span: from its first kernel's start to the next step's first kernel's start (the
        last step: to its own last kernel's end). Span minus busy time is the device idle between kernels:
        host work, scheduling, launch gaps."""
        spans = []
        for index, step in enumerate(self.steps):
            if not step.kernels:
                spans.append(0.0)
                continue
            following = next((s.kernels[0].start_us for s in self.steps[index + 1:] if s.kernels), None)
            end = following if following is not None else max(k.end_us for k in step.kernels)
            spans.append(max(end - step.kernels[0].start_us, step.busy_us()))
        return spans


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        document = json.load(handle)
    return document["traceEvents"] if isinstance(document, dict) else document


def read_trace(path: Path) -> EngineTrace:
    """The engine steps of a torch-profiler trace, each with the device work it launched."""
    events = [e for e in load_events(path) if e.get("ph") == "X"]
    annotated = [(e, parse_annotation(e.get("name", ""))) for e in events if e.get("cat") == "user_annotation"]
    compositions = sorted(((e, c) for e, c in annotated if c is not None), key=lambda pair: pair[0]["ts"])
    marks = [e for e, _ in compositions]
    steps = [ProfiledStep(composition, float(e["ts"])) for e, composition in compositions]
    if not steps:
        return EngineTrace([], "gpu", str(path))
    starts = [step.launch_start_us for step in steps]
    device_work = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    if device_work:
        launched_at = {e["args"]["correlation"]: float(e["ts"]) for e in events
                       if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
        for event in sorted(device_work, key=lambda e: e["ts"]):
            launch = launched_at.get(event.get("args", {}).get("correlation"))
            index = bisect.bisect_right(starts, launch) - 1 if launch is not None else -1
            if index >= 0:
                steps[index].kernels.append(Kernel(event["name"], float(event["ts"]), float(event["dur"]),
                                                   event["cat"]))
        return EngineTrace(steps, "gpu", str(path))
    return EngineTrace(_cpu_steps(events, steps, marks), "cpu", str(path))


def _cpu_steps(events: list[dict], steps: list[ProfiledStep], marks: list[dict]) -> list[ProfiledStep]:
    """Steps whose work is the outermost CPU operators on the annotation's thread, inside the annotation."""
    for step, mark in zip(steps, marks):
        begin, end, thread = float(mark["ts"]), float(mark["ts"]) + float(mark["dur"]), mark.get("tid")
        inside = sorted((e for e in events if e.get("cat") == "cpu_op" and e.get("tid") == thread
                         and begin <= e["ts"] and e["ts"] + e["dur"] <= end), key=lambda e: (e["ts"], -e["dur"]))
        covered_until = float("-inf")
        for event in inside:
            if event["ts"] >= covered_until:  # not nested in the previous outermost operator
                step.kernels.append(Kernel(event["name"], float(event["ts"]), float(event["dur"]), "cpu_op"))
                covered_until = event["ts"] + event["dur"]
    return steps

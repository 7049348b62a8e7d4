"""A trace's time by operator class: the breakdown a load step reports, and its console table.

Per class: device time summed over the profiled steps, its share of the steps' device span, and its mean
per step; GPU idle is span minus busy time (host work, scheduling, launch gaps between kernels). Per step
kind (prefill, decode, mixed): how many steps, their mean batch and their mean time by class, which is what
the per-operator performance model is fitted to. `steps` keeps every step's composition and its time by
class, so a model can be fitted again without the trace.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from pydantic import BaseModel

from tokenrig.breakdown.operators import CLASSES, LABELS, classify_step
from tokenrig.breakdown.trace import EngineTrace, read_trace


class ClassTime(BaseModel):
    time_s: float
    share: float
    per_step_ms: float


class KindRow(BaseModel):
    steps: int
    mean_prefill_tokens: float
    mean_decode_requests: float
    mean_decode_kv_tokens: float | None
    mean_step_ms: float
    per_class_ms: dict[str, float]


class StepRow(BaseModel):
    prefill_requests: int
    prefill_tokens: int
    decode_requests: int
    decode_tokens: int
    prefill_kv_tokens: int | None = None
    prefill_attention_pairs: int | None = None
    decode_kv_tokens: int | None = None
    span_ms: float
    per_class_ms: dict[str, float]


class OperatorBreakdown(BaseModel):
    """Where the engine's device time went during the profiled steps of a load step."""

    source: str  # what recorded the trace, e.g. "vLLM 0.26 torch profiler"
    device: str  # "gpu" (kernels) or "cpu" (outermost CPU operators)
    trace: str | None = None  # the trace file, relative to the step directory where it was kept
    steps: int
    span_s: float
    classes: dict[str, ClassTime]
    by_kind: dict[str, KindRow]
    step_rows: list[StepRow]
    unclassified: dict[str, float] = {}  # the longest kernels filed as 'other', name -> seconds
    kernels: dict[str, dict[str, float]] = {}  # per class, its longest kernels by name (seconds): what was filed where

    def render(self) -> str:
        """The console table: one row per operator class with time in it, largest first."""
        lines = [f"operator breakdown: {self.steps} engine steps, {self.span_s * 1000:.1f} ms of "
                 f"{self.device.upper()} time ({self.source})",
                 f"  {'operator':<28}{'ms/step':>9}{'share':>8}"]
        for name, row in sorted(self.classes.items(), key=lambda item: -item[1].time_s):
            if row.time_s > 0:
                lines.append(f"  {LABELS.get(name, name):<28}{row.per_step_ms:>9.3f}{row.share:>8.1%}")
        kinds = ", ".join(f"{kind} {row.steps} (mean {row.mean_step_ms:.2f} ms, {row.mean_prefill_tokens:.0f} "
                          f"prefill tokens, {row.mean_decode_requests:.1f} decoding)"
                          for kind, row in self.by_kind.items())
        lines.append(f"  steps by kind: {kinds}")
        return "\n".join(lines)


def breakdown(trace: EngineTrace, source: str, longest_others: int = 8,
              longest_per_class: int = 3) -> OperatorBreakdown:
    spans = trace.step_spans_us()
    totals: dict[str, float] = defaultdict(float)
    others: dict[str, float] = defaultdict(float)
    by_name: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    rows = []
    for step, span in zip(trace.steps, spans):
        per_class: dict[str, float] = defaultdict(float)
        for kernel, name in zip(step.kernels, classify_step(step)):
            per_class[name] += kernel.duration_us
            by_name[name][kernel.name[:160]] += kernel.duration_us / 1e6
            if name == "other":
                others[kernel.name] += kernel.duration_us / 1e6
        per_class["gpu_idle"] = max(span - step.busy_us(), 0.0)
        for name, value in per_class.items():
            totals[name] += value
        c = step.composition
        rows.append(StepRow(prefill_requests=c.prefill_requests, prefill_tokens=c.prefill_tokens,
                            decode_requests=c.decode_requests, decode_tokens=c.decode_tokens,
                            prefill_kv_tokens=c.prefill_kv_tokens, prefill_attention_pairs=c.prefill_attention_pairs,
                            decode_kv_tokens=c.decode_kv_tokens, span_ms=span / 1000,
                            per_class_ms={k: round(v / 1000, 5) for k, v in per_class.items() if v}))
    span_total = sum(spans)
    count = max(len(trace.steps), 1)
    classes = {name: ClassTime(time_s=totals[name] / 1e6, share=totals[name] / span_total if span_total else 0.0,
                               per_step_ms=totals[name] / 1000 / count)
               for name in CLASSES if totals.get(name)}
    return OperatorBreakdown(source=source, device=trace.device, steps=len(trace.steps), span_s=span_total / 1e6,
                             classes=classes, by_kind=_by_kind(rows), step_rows=rows,
                             unclassified=dict(sorted(others.items(), key=lambda kv: -kv[1])[:longest_others]),
                             kernels={name: dict(sorted(names.items(), key=lambda kv: -kv[1])[:longest_per_class])
                                      for name, names in by_name.items() if name != "other"})


def _by_kind(rows: list[StepRow]) -> dict[str, KindRow]:
    groups: dict[str, list[StepRow]] = defaultdict(list)
    for row in rows:
        kind = "mixed" if row.prefill_tokens and row.decode_tokens else "prefill" if row.prefill_tokens else "decode"
        groups[kind].append(row)
    result = {}
    for kind in ("prefill", "mixed", "decode"):
        group = groups.get(kind)
        if not group:
            continue
        n = len(group)
        per_class: dict[str, float] = defaultdict(float)
        for row in group:
            for name, value in row.per_class_ms.items():
                per_class[name] += value / n
        kv = [row.decode_kv_tokens for row in group if row.decode_kv_tokens is not None]
        result[kind] = KindRow(steps=n, mean_prefill_tokens=sum(r.prefill_tokens for r in group) / n,
                               mean_decode_requests=sum(r.decode_requests for r in group) / n,
                               mean_decode_kv_tokens=sum(kv) / len(kv) if kv else None,
                               mean_step_ms=sum(r.span_ms for r in group) / n,
                               per_class_ms={k: round(v, 5) for k, v in per_class.items()})
    return result


def breakdown_of_file(path: Path, source: str) -> OperatorBreakdown:
    return breakdown(read_trace(path), source)

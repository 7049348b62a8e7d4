"""Module-level breakdown of a training step from a torch.profiler trace.

While a few steps are profiled, forward hooks open a profiler range per module category
(embedding, attention core, projections, MLP, norms, LM head + loss) and the step loop opens
one range per phase (forward, backward, optimizer). Each piece of work is then assigned:

- on a GPU, every kernel/copy by the CPU op that launched it; on a CPU, every op's self time;
- communication and host<->device copies by the op or kernel name (they can run anywhere);
- forward work by the innermost module range around it; backward work through the autograd
  sequence number that ties a backward function to the forward op it differentiates.

Time no work covers is reported as its own row (GPU idle / host overhead), and time two GPU
streams ran at once as a negative "overlap" row, so the rows add up to the profiled step's
timeline. `check` compares that total with the step timer's reading for the same steps, and
reports the profiler's overhead against the unprofiled steps.
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.autograd.profiler import record_function

SCOPE_PREFIX = "tokenrig.module:"
PHASE_PREFIX = "tokenrig.phase:"
STEP_RANGE = "tokenrig.step"
PHASES = ("forward", "backward", "optimizer")

EMBEDDING, ATTENTION, PROJECTIONS, MLP, NORMS, HEAD = (
    "embedding", "attention core", "QKV/O projections", "MLP", "norms", "LM head + loss")
OPTIMIZER, ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE, OTHER_COMM, COPIES, OTHER = (
    "optimizer step", "all-gather", "reduce-scatter", "all-reduce", "other communication",
    "host<->device copies", "other work")
IDLE_GPU, IDLE_HOST, OVERLAP = "GPU idle (waiting on host)", "host overhead (no op running)", "overlap between streams"
COMMUNICATION = (ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE, OTHER_COMM)
CATEGORIES = (EMBEDDING, ATTENTION, PROJECTIONS, MLP, NORMS, HEAD, OPTIMIZER, ALL_GATHER, REDUCE_SCATTER,
              ALL_REDUCE, OTHER_COMM, COPIES, OTHER)

# the rows (read off the profiler's timeline) and the step timer agree within this fraction
DEFAULT_TOLERANCE = 0.05


def module_category(name: str, module: nn.Module) -> str | None:
    """The category a module's own forward work belongs to (None: no range of its own)."""
    leaf = name.rsplit(".", 1)[-1]
    cls = type(module).__name__
    if leaf == "embed_tokens":
        return EMBEDDING
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return PROJECTIONS
    if leaf in ("self_attn", "rotary_emb"):
        return ATTENTION
    if leaf == "mlp":
        return MLP
    if leaf.endswith("norm") or leaf.endswith("layernorm"):
        return NORMS
    if leaf == "lm_head" or cls.endswith("ForCausalLM"):
        return HEAD  # the causal-LM wrapper's own work after the LM head is the loss
    if cls.endswith("DecoderLayer") or (cls.endswith("Model") and hasattr(module, "layers")):
        return OTHER  # residual adds, masks: glue between the modules above
    return None


@contextmanager
def module_scopes(model: nn.Module):
    """Open a profiler range named after the module's category around each categorised module's forward."""
    open_ranges: list[record_function] = []
    handles = []

    def enter(category):
        def hook(_module, _args):
            scope = record_function(SCOPE_PREFIX + category)
            scope.__enter__()
            open_ranges.append(scope)
        return hook

    def leave(_module, _args, _output):
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        category = module_category(name, module)
        if category is None:
            continue
        handles.append(module.register_forward_pre_hook(enter(category)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def comm_category(name: str) -> str | None:
    lowered = name.lower().replace("_", "")
    if "nccl" not in lowered and "c10d" not in lowered and "gloo" not in lowered and "comm" not in lowered:
        return None
    if "allgather" in lowered:
        return ALL_GATHER
    if "reducescatter" in lowered:
        return REDUCE_SCATTER
    if "allreduce" in lowered:
        return ALL_REDUCE
    if any(word in lowered for word in ("broadcast", "barrier", "send", "recv", "alltoall", "reduce")):
        return OTHER_COMM
    return None


def copy_category(name: str) -> str | None:
    lowered = name.lower()
    if "memcpy" in lowered and ("htod" in lowered or "dtoh" in lowered):
        return COPIES
    return None


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


class _Trace:
    """Index over one profile's events: scopes by parent chain, backward-to-forward by sequence number."""

    def __init__(self, events):
        self.cpu_ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        # device-side events, when this torch version lists them, give the true busy timeline
        self.device_events = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU
                              and not getattr(e, "is_user_annotation", False) and not e.name.startswith("tokenrig.")]
        self.steps = sorted((e for e in self.cpu_ops if e.name == STEP_RANGE), key=lambda e: e.time_range.start)
        self.phases = sorted(((e.time_range.start, e.time_range.end, e.name[len(PHASE_PREFIX):])
                              for e in self.cpu_ops if e.name.startswith(PHASE_PREFIX)))
        self.forward_category: dict[int, str] = {}
        for event in self.cpu_ops:
            if event.sequence_nr >= 0 and not event.name.startswith("autograd::engine"):
                scope = self._scope(event)
                if scope is not None:
                    self.forward_category.setdefault(event.sequence_nr, scope)

    @staticmethod
    def _scope(event) -> str | None:
        node = event
        while node is not None:
            if node.name.startswith(SCOPE_PREFIX):
                return node.name[len(SCOPE_PREFIX):]
            node = node.cpu_parent
        return None

    def phase_at(self, time_us: float) -> str | None:
        for start, end, phase in self.phases:
            if start <= time_us <= end:
                return phase
        return None

    def category(self, op) -> str:
        """The category of the work an op does (or launches)."""
        node = op
        while node is not None:
            by_name = comm_category(node.name) or copy_category(node.name)
            if by_name:
                return by_name
            if node.name.startswith(SCOPE_PREFIX):
                return node.name[len(SCOPE_PREFIX):]
            if (node.name.startswith("autograd::engine::evaluate_function")
                    and node.sequence_nr in self.forward_category):
                return self.forward_category[node.sequence_nr]
            node = node.cpu_parent
        return OPTIMIZER if self.phase_at(op.time_range.start) == "optimizer" else OTHER


def analyse(events, device: str) -> dict:
    """Per-step time (ms) by category and phase, averaged over the profiled steps, plus the step window."""
    trace = _Trace(events)
    if not trace.steps:
        raise ValueError(f"no '{STEP_RANGE}' range in the profile: nothing to break down")
    times: dict[tuple[str, str], float] = defaultdict(float)
    window_total = idle_total = overlap_total = 0.0
    for step in trace.steps:
        start, end = step.time_range.start, step.time_range.end
        window_total += end - start
        if device == "cuda":
            # each kernel/copy is listed on the CPU op that launched it (op.kernels, durations in us)
            kernel_total = 0.0
            for op in trace.cpu_ops:
                if not (start <= op.time_range.start <= end) or not op.kernels:
                    continue
                phase = trace.phase_at(op.time_range.start) or "optimizer"
                for kernel in op.kernels:
                    category = copy_category(kernel.name) or comm_category(kernel.name) or trace.category(op)
                    times[(category, phase)] += kernel.duration
                    kernel_total += kernel.duration
            busy = [(max(e.time_range.start, start), min(e.time_range.end, end)) for e in trace.device_events
                    if e.time_range.end > start and e.time_range.start < end]
            union = _union_length(busy) if busy else kernel_total  # no device timeline: assume one stream
            idle_total += (end - start) - union
            overlap_total += kernel_total - union
        else:
            covered = 0.0
            for op in trace.cpu_ops:
                if not (start <= op.time_range.start and op.time_range.end <= end) or op is step:
                    continue
                if op.name.startswith((PHASE_PREFIX, SCOPE_PREFIX)):
                    continue  # ranges, not work: their self time is host overhead
                own = op.self_cpu_time_total
                category = trace.category(op)
                times[(category, trace.phase_at(op.time_range.start) or "optimizer")] += own
                covered += own
            idle_total += (end - start) - covered
    steps = len(trace.steps)
    rows: list[dict[str, str | float | None]] = []
    for category in CATEGORIES:
        by_phase = {phase: times.get((category, phase), 0.0) / steps / 1e3 for phase in PHASES}
        rows.append({"category": category, **{f"{p}_ms": v for p, v in by_phase.items()},
                     "total_ms": sum(by_phase.values())})
    idle_name = IDLE_GPU if device == "cuda" else IDLE_HOST
    rows.append({"category": idle_name, "forward_ms": None, "backward_ms": None, "optimizer_ms": None,
                 "total_ms": idle_total / steps / 1e3})
    if device == "cuda":
        rows.append({"category": OVERLAP, "forward_ms": None, "backward_ms": None, "optimizer_ms": None,
                     "total_ms": -overlap_total / steps / 1e3})
    return {"device": device, "profiled_steps": steps, "window_ms": window_total / steps / 1e3, "rows": rows}


def check(breakdown: dict, profiled_step_ms: float, unprofiled_step_ms: float,
          tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Do the rows add up to the step time the step timer measured for the profiled steps, within `tolerance`?

    Also reports how much slower the profiled steps ran than the unprofiled median (the profiler's
    own overhead, which lands in the idle/host-overhead row; kernel times are unaffected by it).
    """
    total = sum(row["total_ms"] for row in breakdown["rows"])
    deviation = abs(total - profiled_step_ms) / profiled_step_ms
    work = sum(row["total_ms"] for row in breakdown["rows"] if row["category"] in CATEGORIES)
    return {"rows_total_ms": total, "profiled_step_ms": profiled_step_ms, "deviation": deviation,
            "tolerance": tolerance, "ok": deviation <= tolerance, "attributed_work_ms": work,
            "attributed_fraction": work / profiled_step_ms, "unprofiled_step_ms": unprofiled_step_ms,
            "profiler_overhead": profiled_step_ms / unprofiled_step_ms - 1}


def overhead_text(overhead: float) -> str:
    """The profiled steps against the unprofiled median, in words: an overhead, or, when they ran faster, the
    step times' own spread (a profiler has no negative overhead)."""
    if overhead >= 0:
        return f"profiler overhead {overhead:+.0%} (profiled steps against the unprofiled median)"
    return (f"profiler overhead not measurable: the profiled steps ran {-overhead:.0%} faster than the unprofiled "
            "median (step-time noise)")


def table(breakdown: dict, verdict: dict) -> str:
    lines = ["| category | forward ms | backward ms | optimizer ms | total ms | share |",
             "|---|---:|---:|---:|---:|---:|"]
    step = verdict["profiled_step_ms"]

    def cell(value):
        return "" if value is None else f"{value:.2f}"

    for row in breakdown["rows"]:
        if row["total_ms"] == 0:
            continue
        lines.append(f"| {row['category']} | {cell(row['forward_ms'])} | {cell(row['backward_ms'])} | "
                     f"{cell(row['optimizer_ms'])} | {row['total_ms']:.2f} | {row['total_ms'] / step:.1%} |")
    lines.append(f"| **sum of rows** | | | | {verdict['rows_total_ms']:.2f} | {verdict['rows_total_ms'] / step:.1%} |")
    lines.append(f"| profiled step, step timer (mean) | | | | {step:.2f} | 100% |")
    lines.append(f"| unprofiled step, step timer (median) | | | | {verdict['unprofiled_step_ms']:.2f} | |")
    status = "within" if verdict["ok"] else "OUTSIDE"
    lines.append("")
    lines.append(f"Rows sum to {verdict['rows_total_ms']:.2f} ms against {step:.2f} ms timed: "
                 f"{verdict['deviation']:.1%} apart, {status} the {verdict['tolerance']:.0%} tolerance. "
                 f"Work attributed to a category: {verdict['attributed_fraction']:.1%} of the step. "
                 f"{overhead_text(verdict['profiler_overhead']).capitalize()}; the profiler's overhead lands in "
                 "the idle row (kernel times are unaffected). "
                 f"Averaged over {breakdown['profiled_steps']} profiled step(s) on rank 0.")
    return "\n".join(lines)


def chart(breakdown: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in breakdown["rows"] if r["category"] in CATEGORIES and r["total_ms"] > 0]
    colors = {"forward": "#4C72B0", "backward": "#DD8452", "optimizer": "#55A868"}
    figure, axis = plt.subplots(figsize=(9, 0.45 * len(rows) + 2))
    names = [r["category"] for r in rows]
    left = [0.0] * len(rows)
    for phase in PHASES:
        values = [r[f"{phase}_ms"] or 0.0 for r in rows]
        axis.barh(names, values, left=left, color=colors[phase], label=phase)
        left = [a + b for a, b in zip(left, values)]
    extra = [r for r in breakdown["rows"] if r["category"] not in CATEGORIES and r["total_ms"] != 0]
    for r in extra:
        axis.barh([r["category"]], [r["total_ms"]], color="#999999")
    axis.invert_yaxis()
    axis.set_xlabel("ms per step")
    axis.set_title(title, fontsize=10)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(breakdown: dict, verdict: dict, run_dir: Path, title: str) -> None:
    (run_dir / "breakdown.json").write_text(json.dumps({**breakdown, "check": verdict}, indent=2))
    (run_dir / "breakdown.md").write_text(f"# Step breakdown: {title}\n\n{table(breakdown, verdict)}\n")
    chart(breakdown, run_dir / "breakdown.png", title)

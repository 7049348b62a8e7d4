"""Training matrices: a YAML grid of TrainSpecs, run one after another, into one comparison table.

A matrix file has `base` (TrainSpec fields every run shares), and `runs` (a list of overrides)
and/or `grid` (fields -> lists of values, expanded as a cartesian product). Each run gets its
own run directory under the matrix's; comparison.md/.json are rewritten after every run, so a
stopped matrix keeps its finished rows. A run that does not fit is a row marked `oom`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from tokenrig.jsonfile import write_json
from tokenrig.paths import TRAINING_MATRICES
from tokenrig.report.rundir import environment_facts, new_run_dir
from tokenrig.train.session import run_training
from tokenrig.train.spec import TrainSpec, TrainSpecError, make_spec
from tokenrig.train.summary import training_cost


class MatrixFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    base: dict = {}
    runs: list[dict] = []
    grid: dict[str, list] = {}


def find_matrix(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    for directory in TRAINING_MATRICES:
        candidate = directory / f"{name_or_path}.yaml"
        if candidate.exists():
            return candidate
    known = sorted(p.stem for d in TRAINING_MATRICES if d.exists() for p in d.glob("*.yaml"))
    raise TrainSpecError(f"no training matrix {name_or_path!r}; known: {', '.join(known) or 'none'} "
                         f"(or give a path to a .yaml file)")


def expand(matrix: MatrixFile, overrides: dict | None = None) -> list[TrainSpec]:
    """The matrix's TrainSpecs; `overrides` (e.g. from the command line) apply to every run."""
    specs = []
    for spec in expand_each(matrix, overrides):
        if isinstance(spec, TrainSpecError):
            raise spec
        specs.append(spec)
    return specs


def expand_each(matrix: MatrixFile, overrides: dict | None = None) -> list[TrainSpec | TrainSpecError]:
    """Each run's TrainSpec, or the error that says why its settings cannot run (e.g. QLoRA on CPU)."""
    entries = [dict(run) for run in matrix.runs]
    if matrix.grid:
        keys = list(matrix.grid)
        entries += [dict(zip(keys, values)) for values in itertools.product(*(matrix.grid[k] for k in keys))]
    if not entries:
        entries = [{}]
    specs: list[TrainSpec | TrainSpecError] = []
    for index, entry in enumerate(entries, start=1):
        try:
            specs.append(make_spec(**{**matrix.base, **entry, **(overrides or {})}))
        except TrainSpecError as error:
            specs.append(TrainSpecError(f"matrix {matrix.name!r}, run {index} ({entry}): {error}"))
    return specs


def choose(specs: list[TrainSpec | TrainSpecError], only: list[int] | None) -> list[tuple[int, TrainSpec]]:
    """(number, spec) of the runs numbered in `only` (1-based; all if None). Only those must be able to run
    here: `--runs 3` of a matrix whose run 2 is QLoRA still runs on CPU."""
    chosen = []
    for number, spec in enumerate(specs, start=1):
        if only and number not in only:
            continue
        if isinstance(spec, TrainSpecError):
            raise spec
        chosen.append((number, spec))
    return chosen


def load_matrix(name_or_path: str) -> MatrixFile:
    path = find_matrix(name_or_path)
    try:
        return MatrixFile.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise TrainSpecError(f"{path}: {problems}") from None


def _group_key(spec: TrainSpec) -> str:
    """Everything but the number of GPUs: runs with the same key form a scaling series."""
    return spec.model_copy(update={"gpus": 1, "nodes": 1, "hostfile": None}).label()


def _usd_per_billion_tokens(spec: TrainSpec, summary: dict, prices: dict[str, float]) -> float | None:
    """At the --price given here, else at the price the run was costed at, else the GPU profile's."""
    if not summary.get("tokens_per_s"):
        return None
    price = prices.get(spec.gpu_profile.key, (summary.get("cost") or {}).get("usd_per_gpu_hour"))
    return training_cost(spec, summary["tokens_per_s"], price)["usd_per_billion_tokens"]


def comparison_rows(results: list[tuple[TrainSpec, dict]], prices: dict[str, float] | None = None) -> list[dict]:
    smallest: dict[str, tuple[int, float]] = {}
    for spec, summary in results:
        if summary.get("status") == "ok" and summary.get("tokens_per_s_per_gpu"):
            key = _group_key(spec)
            if key not in smallest or spec.world_size < smallest[key][0]:
                smallest[key] = (spec.world_size, summary["tokens_per_s_per_gpu"])
    rows = []
    for spec, summary in results:
        memory = summary.get("memory") or {}
        base = smallest.get(_group_key(spec))
        per_gpu = summary.get("tokens_per_s_per_gpu")
        check = summary.get("breakdown_check") or {}
        rows.append({
            "label": spec.label(), "status": summary.get("status"), "mode": spec.mode, "zero": spec.zero,
            "offload": spec.offload, "recompute": spec.recompute, "attention": spec.attention,
            "gpus": spec.world_size, "micro_batch": spec.micro_batch, "seq_len": spec.seq_len,
            "step_ms": summary["step_time_s"]["median"] * 1e3 if "step_time_s" in summary else None,
            "tokens_per_s": summary.get("tokens_per_s"), "tokens_per_s_per_gpu": per_gpu,
            "tflops_per_gpu": summary.get("achieved_tflops_per_gpu"), "mfu": summary.get("mfu"),
            "hfu": summary.get("hfu"), "mfu_6n": summary.get("mfu_6n"),
            "usd_per_billion_tokens": _usd_per_billion_tokens(spec, summary, prices or {}),
            "gpu_allocated_gib": (memory.get("gpu_allocated_peak_bytes") or 0) / 2**30 or None,
            "gpu_reserved_gib": (memory.get("gpu_reserved_peak_bytes") or 0) / 2**30 or None,
            "host_rss_gib": (memory.get("host_rss_peak_bytes") or 0) / 2**30 or None,
            "loss": (summary.get("loss") or {}).get("last"),
            "scaling_efficiency": (per_gpu / base[1] if per_gpu and base and spec.world_size > base[0] else None),
            "comm_share": summary.get("comm_share"),
            "breakdown_ok": check.get("ok"),
            "run_id": summary.get("run_id"), "message": summary.get("message"),
        })
    return rows


def markdown(rows: list[dict], title: str) -> str:
    def number(value, fmt):
        return "" if value is None else format(value, fmt)

    lines = [f"# {title}", "",
             "| run | status | step ms | tok/s | tok/s/GPU | TFLOP/s/GPU | MFU | HFU | 6N-MFU | $/B tok | "
             "GPU alloc GiB | GPU resv GiB | host GiB | loss | scaling | comm share |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['status']} | {number(r['step_ms'], '.0f')} | {number(r['tokens_per_s'], ',.0f')} | "
            f"{number(r['tokens_per_s_per_gpu'], ',.0f')} | {number(r['tflops_per_gpu'], '.1f')} | "
            f"{number(r['mfu'], '.1%')} | {number(r['hfu'], '.1%')} | {number(r['mfu_6n'], '.1%')} | "
            f"{number(r['usd_per_billion_tokens'], ',.2f')} | "
            f"{number(r['gpu_allocated_gib'], '.1f')} | {number(r['gpu_reserved_gib'], '.1f')} | "
            f"{number(r['host_rss_gib'], '.1f')} | {number(r['loss'], '.3f')} | "
            f"{number(r['scaling_efficiency'], '.1%')} | {number(r['comm_share'], '.1%')} |")
    failed = [r for r in rows if r["status"] not in ("ok",) and r["message"]]
    if failed:
        lines += ["", "Runs that did not finish:", ""]
        lines += [f"- {r['label']}: {r['status']}: {r['message'].splitlines()[-1][:300]}" for r in failed]
    lines += ["", "MFU counts the FLOPs the mode needs (docs/metrics.md); HFU adds recomputation; 6N-MFU is "
              "6 x all parameters per token, the figure most public numbers quote. Scaling = tokens/s per GPU "
              "against the same configuration on the fewest GPUs in this table. Comm share = kernel time of "
              "all-gather, reduce-scatter, all-reduce and other collectives in the profiled step, over the "
              "unprofiled median step time. $/B tok = the GPUs' price per hour (tokenrig/profiles/gpus.yaml, or "
              "--price) over the billions of tokens trained in an hour."]
    return "\n".join(lines) + "\n"


def available_gpus() -> int | None:
    """GPUs this host can give one run (None: no CUDA, so no limit to apply)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else None


def compare_dirs(directories: list[Path], out: Path | None = None, prices: dict[str, float] | None = None) -> str:
    """One comparison table over every run (summary.json + spec.json) found under `directories`."""
    found = []
    for directory in directories:
        for summary_path in sorted(Path(directory).rglob("summary.json")):
            spec_path = summary_path.with_name("spec.json")
            if spec_path.exists():
                found.append((TrainSpec.model_validate_json(spec_path.read_text()),
                              json.loads(summary_path.read_text())))
    if not found:
        raise TrainSpecError(f"no training runs (summary.json + spec.json) under {', '.join(map(str, directories))}")
    rows = comparison_rows(found, prices)
    text = markdown(rows, "Training runs compared")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.json").write_text(json.dumps(rows, indent=2))
        (out / "comparison.md").write_text(text)
    return text


def run_matrix(matrix: MatrixFile, results: Path, overrides: dict | None = None, only: list[int] | None = None,
               max_gpus: int | None = None, say=print, prices: dict[str, float] | None = None) -> Path:
    """Run the matrix (or the runs numbered in `only`, 1-based); runs needing more than `max_gpus` are skipped,
    and so are runs whose kernel choices this host cannot run (a row saying why)."""
    specs = expand_each(matrix, overrides)
    chosen = choose(specs, only)
    matrix_dir = new_run_dir(results, "matrix", matrix.name)
    write_json(matrix_dir / "metadata.json", {"matrix": matrix.model_dump(), "overrides": overrides or {},
                                              "runs": only, "max_gpus": max_gpus,
                                              "specs": [s.model_dump() for _, s in chosen], **environment_facts()})
    finished: list[tuple[TrainSpec, dict]] = []
    say(f"matrix {matrix.name}: {len(chosen)} of {len(specs)} runs -> {matrix_dir}")
    for index, spec in chosen:
        say(f"[{index}/{len(specs)}] {spec.label()}")
        run_dir = matrix_dir / f"{index:02d}-{spec.label()}"
        if max_gpus is not None and spec.world_size > max_gpus:
            summary = {"status": "skipped", "label": spec.label(),
                       "message": f"needs {spec.world_size} GPUs, this host has {max_gpus}"}
            say(f"  skipped: {summary['message']}")
        else:
            try:
                summary = run_training(spec, results, run_dir=run_dir, prices=prices)
            except TrainSpecError as error:
                summary = {"status": "skipped", "label": spec.label(), "message": str(error)}
                say(f"  skipped: {error}")
        finished.append((spec, summary))
        rows = comparison_rows(finished, prices)
        (matrix_dir / "comparison.json").write_text(json.dumps(rows, indent=2))
        (matrix_dir / "comparison.md").write_text(markdown(rows, f"Training matrix {matrix.name}"))
        if summary["status"] == "interrupted":
            say("matrix stopped by Ctrl-C; finished rows are in the comparison")
            break
    say((matrix_dir / "comparison.md").read_text())
    return matrix_dir

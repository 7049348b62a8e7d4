"""`tokenrig train --compare DIR...`: one table over finished training runs found under the directories."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tokenrig.train.matrix import compare_dirs
from tokenrig.train.spec import TrainSpecError, make_spec


def finished_run(directory: Path, summary: dict, **spec) -> None:
    directory.mkdir(parents=True)
    (directory / "spec.json").write_text(make_spec(**spec).model_dump_json())
    (directory / "summary.json").write_text(json.dumps(summary))


def ok_summary(tokens_per_s_per_gpu: float, gpus: int) -> dict:
    return {"status": "ok", "tokens_per_s": tokens_per_s_per_gpu * gpus, "tokens_per_s_per_gpu": tokens_per_s_per_gpu,
            "step_time_s": {"median": 0.512}, "mfu": 0.4, "memory": {"gpu_allocated_peak_bytes": 3 * 2**30}}


def test_compare_tables_every_run_found_with_scaling_against_the_fewest_gpus(tmp_path):
    """The same 7B ZeRO-3 configuration on 1, 2 and 4 H200s at 1000, 900 and 850 tokens/s per GPU: scaling is
    900 / 1000 = 90.0 % and 850 / 1000 = 85.0 %; the 1-GPU row is the base and gets none. A ZeRO-2 run is
    a series of its own; an OOM run is a row with its last message line."""
    config = {"gpu": "h200", "model": "7b", "zero": 3, "seq_len": 2048}
    finished_run(tmp_path / "a" / "one", ok_summary(1000, 1), gpus=1, **config)
    finished_run(tmp_path / "a" / "nested" / "two", ok_summary(900, 2), gpus=2, **config)
    finished_run(tmp_path / "b" / "four", ok_summary(850, 4), gpus=4, **config)
    finished_run(tmp_path / "b" / "zero2", ok_summary(700, 2), gpus=2, **{**config, "zero": 2})
    finished_run(tmp_path / "b" / "oom", {"status": "oom", "message": "Traceback\nCUDA out of memory: 80 GiB"},
                 gpus=1, micro_batch=8, **config)
    (tmp_path / "b" / "no-spec").mkdir()
    (tmp_path / "b" / "no-spec" / "summary.json").write_text("{}")  # a load test's summary: not a training run

    table = compare_dirs([tmp_path / "a", tmp_path / "b"], out=tmp_path / "out")

    rows = {row["label"]: row for row in json.loads((tmp_path / "out" / "comparison.json").read_text())}
    assert (tmp_path / "out" / "comparison.md").read_text() == table
    assert len(rows) == 5
    one, two, four = (rows[f"llama2-7b-pretrain-z3-{n}xh200-b1x2048-sdpa"] for n in (1, 2, 4))
    assert one["scaling_efficiency"] is None
    assert two["scaling_efficiency"] == pytest.approx(0.9) and four["scaling_efficiency"] == pytest.approx(0.85)
    assert rows["llama2-7b-pretrain-z2-2xh200-b1x2048-sdpa"]["scaling_efficiency"] is None  # no smaller run of it
    assert two["step_ms"] == pytest.approx(512) and two["gpu_allocated_gib"] == pytest.approx(3)
    assert "| llama2-7b-pretrain-z3-2xh200-b1x2048-sdpa | ok | 512 | 1,800 | 900 |" in table
    assert "| 90.0% |" in table and "| 85.0% |" in table
    assert "- llama2-7b-pretrain-z3-1xh200-b8x2048-sdpa: oom: CUDA out of memory: 80 GiB" in table


def test_compare_without_training_runs_says_where_it_looked(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainSpecError, match=f"no training runs .* under {re.escape(str(tmp_path / 'empty'))}"):
        compare_dirs([tmp_path / "empty"])

"""docs/results/serve-h200-vllm.md's tables regenerate from the committed H200 data: `loadtest --compare`
over sweep steps, and the cross-check against `vllm bench serve` (docs/results/vllm_crosscheck.py)."""

import json
import subprocess
import sys

from tests.conftest import REPO, run_cli

DATA = REPO / "docs" / "results" / "serve-h200-vllm-2026-11-30"
PAGE = (REPO / "docs" / "results" / "serve-h200-vllm.md").read_text()


def test_compare_tables_each_step_of_a_sweep_with_its_runs_server():
    table = run_cli("loadtest", "--compare", str(DATA / "quant-gptq"))
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| vllm ")]
    assert [row.split("|")[2].strip() for row in rows] == ["1 concurrent users", "32 concurrent users"]
    step = json.loads(next((DATA / "quant-gptq").rglob("02-users-32/summary.json")).read_text())
    assert f"| {step['throughput']['output_tokens_per_s']:.1f} |" in rows[1]
    assert rows[1].startswith("| vllm llama2-7b h200, gptq |")


def test_the_cross_check_table_is_what_the_page_shows():
    result = subprocess.run([sys.executable, "docs/results/vllm_crosscheck.py", str(DATA / "xcheck"),
                             str(DATA / "bench-bf16")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = result.stdout.strip().splitlines()
    assert len(rows) == 2 + 3 * 4  # header, rule, 4 metrics at 1, 32, 128 streams
    assert all(row in PAGE for row in rows)
    throughput_32 = next(row for row in rows if row.startswith("| 32 | output tok/s"))
    step = json.loads(next((DATA / "xcheck").rglob("02-users-32/summary.json")).read_text())
    assert f"| {step['throughput']['output_tokens_per_s']:.2f} |" in throughput_32

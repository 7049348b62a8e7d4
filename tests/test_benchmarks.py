"""The benchmarks run as `make bench-*` runs them, on the tiny model on CPU."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_hf_decode_times_each_configuration_in_its_own_process(tmp_path):
    out = tmp_path / "decode"
    result = subprocess.run(
        [sys.executable, "benchmarks/hf_decode.py", "--configs", "eager", "sdpa+kv=2048", "sdpa+graphs+kvpad=1024",
         "--prompt-tokens", "64", "--output-tokens", "9", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(out.with_suffix(".json").read_text())
    eager, small_cache, graphs = document["results"]
    assert not any("error" in entry for entry in document["results"]), document
    assert graphs["cuda_graphs"] is True and graphs["kv_padding_tokens"] == 1024  # on CPU transformers runs it without
    assert small_cache["kv_tokens"] == 2048 and eager["kv_tokens"] > 2048  # the server's own CPU bound
    for entry in document["results"]:
        assert entry["requests"][0]["tokens"] == 9 and entry["tpot_ms"] > 0
    assert document["roofline_ms"] > 0
    assert "| sdpa+kv=2048 | 2048 |" in result.stdout and "1.00x" in result.stdout


def test_hf_decode_refuses_an_unknown_option_before_loading_anything():
    result = subprocess.run([sys.executable, "benchmarks/hf_decode.py", "--configs", "sdpa+turbo"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode != 0 and "unknown option 'turbo'" in result.stderr


@pytest.mark.timing
@pytest.mark.e2e  # RefServer runs benchmarks/refserver.py in its own process, out of conftest's sight
def test_reference_server_holds_its_schedule_at_512_streams(tmp_path):
    """The load-generator benchmark's truth is the reference server's send log: that server must keep its
    schedule (lateness p99 under 1 ms) at the heaviest row's 512 streams, here driven by the baseline client."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import loadgen

    client_core, server_core = loadgen.cores()
    with loadgen.RefServer(server_core, tmp_path / "log.npz") as server:
        row = loadgen.comparison_level("baseline", server.url, 512, 4.0, client_core)
        truth = server.truth((loadgen.WARMUP_S, 4.0))
    assert row["tokens_per_s"] > 0 and truth["requests"] >= 512
    assert truth["late_p99_s"] < 0.001, truth
    assert abs(truth["ttft_p50_s"] - loadgen.TTFT_S) < 0.001 and truth["itl_p99_s"] < loadgen.ITL_S + 0.001, truth


@pytest.mark.timing
def test_loadgen_benchmark_reports_errors_against_the_server_log(tmp_path):
    out = tmp_path / "capacity.md"
    result = subprocess.run([sys.executable, "benchmarks/loadgen.py", "--streams", "4", "--duration", "5",
                             "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    table = out.read_text()
    rows = [line.split("|") for line in table.splitlines() if line.startswith(("| tokenrig |", "| baseline |",
                                                                              "| locust |"))]
    assert len(rows) == 3
    for row in rows:
        tokens_per_s, true_figures, lateness = float(row[3]), row[6], row[7]
        assert tokens_per_s > 0 and true_figures.count("/") == 1 and lateness.count("/") == 2
    ratios = next(line for line in table.splitlines() if line.startswith("| 4 |")).split("|")[2:-1]
    assert len(ratios) == 4 and all(0.2 < float(ratio) < 5 for ratio in ratios), ratios  # against both clients
    assert "CPU per 1k tok/s, tokenrig / locust" in table and "byte-level fast path" in table
    assert "record line, orjson (kept)" in table and "parsed whole (was)" in table


def test_the_ceiling_is_the_heaviest_row_within_goal_and_load_tests_here_use_it(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import loadgen
    from tokenrig.loadgen.ceiling import CEILING_FILE_ENV, per_core_ceiling

    def row(streams, ttft_err_ms, itl_err_ms, late_p99_ms=0.2, tool="tokenrig"):
        return {"tool": tool, "streams": streams, "tokens_per_s": streams * 93.4, "ttft_err_s": ttft_err_ms / 1000,
                "itl_err_s": itl_err_ms / 1000, "truth": {"late_p99_s": late_p99_ms / 1000}}

    rows = [row(1, 3.1, 0.3),  # an idle core's wake-up: neither passes nor fails
            row(16, 0.8, 0.9), row(64, 0.7, 1.2), row(128, 0.5, 1.4), row(128, 0.1, 0.1, tool="baseline"),
            row(256, 0.6, 2.9),  # ITL p99 past 2.5 ms: the ceiling is the row below
            row(384, 0.4, 2.0), row(512, 9.0, 20.0)]
    assert loadgen.measured_ceiling(rows)["streams"] == 128
    assert loadgen.measured_ceiling([r for r in rows if r["streams"] != 256])["streams"] == 384
    late = [row(16, 0.8, 0.9), row(64, 0.7, 1.2, late_p99_ms=1.5), row(128, 0.5, 1.4)]  # the server slipped at 64
    assert loadgen.measured_ceiling(late)["streams"] == 16
    assert loadgen.measured_ceiling([row(1, 3.1, 0.3), row(16, 1.5, 0.9)]) is None

    monkeypatch.setenv(CEILING_FILE_ENV, str(tmp_path / "ceiling.json"))
    loadgen.report_ceiling(rows, save=True, measured="2026-11-30 23:00 UTC by benchmarks/loadgen.py")
    assert "this machine's ceiling: 11,955 chunks/s per load-generator process (the 128-stream row); saved" \
        in capsys.readouterr().out
    assert per_core_ceiling().chunks_per_s == 11_955


@pytest.mark.slow
def test_capacity_holdout_leaves_each_configuration_out(tmp_path):
    """On the H100 data (two chat searches, bf16 and FP8, and the operator profiles of both): one case per
    configuration, its measured goodput the search's best step's, each projected without its own search or its
    own profile (bf16 from the FP8 kernels' profile and vice versa), written to --json."""
    results = REPO / "docs" / "results"
    inputs = tmp_path / "inputs"
    for source in [*(results / "capacity-h100-2026-12-07").glob("findmax-7b-*"),
                   *(results / "serve-breakdown-h100-2026-12-07").glob("vllm-[bf]*")]:
        shutil.copytree(source, inputs / source.name)
    out = tmp_path / "holdout.json"
    result = subprocess.run([sys.executable, "benchmarks/capacity_holdout.py", "--from", str(inputs),
                             "--json", str(out), "--max-step", "15", "--precision", "0.2", "--quiet"],
                            capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    cases = {case["quant"]: case for case in json.loads(out.read_text())["cases"]}
    assert set(cases) == {"bf16", "fp8"}
    for quant, other in (("bf16", "fp8"), ("fp8", "bf16")):
        case = cases[quant]
        search = next((inputs / f"findmax-7b-{quant}").glob("*/search.json"))
        steps = json.loads(search.read_text())["steps"]
        best = max((s for s in steps if s["slo_met"]), key=lambda s: s["load"])
        assert case["measured_goodput"] == pytest.approx(best["goodput_rps"])
        assert case["projected_goodput"] > 0 and case["band"] is not None
        assert f"h100-sxm (llama2-7b, {other}" in case["basis"]  # its own profile was left out
        assert case["error"] == pytest.approx(case["projected_goodput"] / case["measured_goodput"] - 1)
    assert "cases projected" in result.stdout


@pytest.mark.slow
@pytest.mark.timing
def test_search_benchmark_reports_the_error_against_the_queues_computed_knee(tmp_path):
    """A quick search only (no sweep), the knee from two short queueing simulations: the table is written."""
    out = tmp_path / "slo-search.md"
    result = subprocess.run([sys.executable, "benchmarks/search.py", "--seeds", "", "--quick-seeds", "1", "--no-sweep",
                             "--replications", "2", "--arrivals", "200000", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    table = out.read_text()
    assert "True knee (queueing simulation): **8" in table  # 87.9 req/s for the 16-slot queue
    row = next(line for line in table.splitlines() if line.startswith("| find-max --quick | 1 |")).split("|")
    answer, error = float(row[3]), float(row[4].strip().rstrip("%"))
    assert 40 < answer < 130 and abs(error) < 50, row  # a real answer; its accuracy is the benchmark's to state
    assert "| 95% of the knee |" in table and "Command: `python benchmarks/search.py --seeds" in table

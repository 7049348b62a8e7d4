"""The training speed paths, each a flag: SDPA backend, per-block torch.compile, Liger, fused AdamW, host syncs,
ZeRO buckets; the $ per billion tokens trained; the training memory planner. On the tiny model, on CPU."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from tests.conftest import run_cli
from tokenrig.train.dsconfig import deepspeed_config
from tokenrig.train.fit import fit_report, plan_training_fit
from tokenrig.train.kernels import sdpa_backend
from tokenrig.train.matrix import compare_dirs
from tokenrig.train.model import build_model
from tokenrig.train.spec import TrainSpecError, add_train_options, make_spec, train_options_given
from tokenrig.train.summary import training_cost
from tokenrig.train.worker import make_optimizer

TINY = {"gpu": "cpu", "model": "tiny", "seq_len": 64, "micro_batch": 2}
N_7B = 6_738_415_616  # Llama-2 7B's parameters


def test_the_new_flags_reach_the_spec_and_the_deepspeed_config():
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_train_options(parser)
    given = train_options_given(parser.parse_args(
        ["--sdpa-backend", "math", "--compile", "--optimizer", "adamw", "--sync-every", "4",
         "--bucket-size", "2e8", "--overlap-comm", "--no-contiguous-gradients"]))
    assert given == {"sdpa_backend": "math", "compile": True, "optimizer": "adamw", "sync_every": 4,
                     "bucket_size": 200_000_000, "overlap_comm": True, "contiguous_gradients": False}
    spec = make_spec(**TINY, **given)
    assert spec.label() == ("tiny-pretrain-z2-1xcpu-b2x64-sdpa-math-compiled-adamw-sync4-bucket2e8-overlap-"
                            "no-contiguous")
    zero = deepspeed_config(spec)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 200_000_000
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is False
    # defaults: on one GPU no overlap (nothing to overlap, twice the bucket memory); 5e8-element buckets
    one_gpu = deepspeed_config(make_spec(**TINY))
    assert one_gpu["zero_optimization"] == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                            "reduce_scatter": True, "allgather_bucket_size": 500_000_000,
                                            "reduce_bucket_size": 500_000_000}
    assert deepspeed_config(make_spec(**TINY, gpus=2))["zero_optimization"]["overlap_comm"] is True
    assert deepspeed_config(make_spec(**TINY, zero=3, bucket_size=10**6))["zero_optimization"][
        "stage3_prefetch_bucket_size"] == 900_000
    # torch's AdamW is the client optimizer; DeepSpeed's FusedAdam is named in the config (DeepSpeed builds it)
    assert "optimizer" not in one_gpu
    assert deepspeed_config(make_spec(gpu="h200", model="tiny", optimizer="deepspeed-fused"))["optimizer"][
        "type"] == "AdamW"
    with pytest.raises(argparse.ArgumentError, match="--bucket-size: not a whole number"):
        parser.parse_args(["--bucket-size", "2.5"])


def test_a_matrix_yaml_switches_the_paths_one_run_at_a_time(tmp_path):
    from tokenrig.train.matrix import expand, load_matrix

    path = tmp_path / "ladder.yaml"
    path.write_text("name: ladder\nbase: {gpu: cpu, model: tiny, seq_len: 64}\nruns:\n  - {}\n"
                    "  - {sdpa_backend: flash}\n  - {sdpa_backend: flash, compile: true}\n"
                    "  - {optimizer: adamw, sync_every: 5, bucket_size: 100000000}\n")
    assert [spec.label() for spec in expand(load_matrix(str(path)))] == [
        "tiny-pretrain-z2-1xcpu-b1x64-sdpa", "tiny-pretrain-z2-1xcpu-b1x64-sdpa-flash",
        "tiny-pretrain-z2-1xcpu-b1x64-sdpa-flash-compiled", "tiny-pretrain-z2-1xcpu-b1x64-sdpa-adamw-sync5-bucket1e8"]


def test_only_the_chosen_matrix_runs_must_be_able_to_run_here():
    from tokenrig.train.matrix import choose, expand_each, load_matrix

    specs = expand_each(load_matrix("study-7b"), {"gpu": "cpu", "model": "tiny", "seq_len": 128})
    assert [(number, spec.mode) for number, spec in choose(specs, [1, 3])] == [(1, "lora"), (3, "pretrain")]
    with pytest.raises(TrainSpecError, match="run 2 .*mode=qlora needs a CUDA GPU"):
        choose(specs, None)


@pytest.mark.parametrize("fields, says", [
    ({"liger": True}, "liger=true needs a CUDA GPU"),
    ({"optimizer": "deepspeed-fused"}, "optimizer=deepspeed-fused needs a CUDA GPU"),
    ({"attention": "eager", "sdpa_backend": "flash"}, "sdpa_backend=flash needs --attention sdpa"),
    ({"zero": 2, "offload": "optimizer", "optimizer": "adamw"}, "does not apply with offload=optimizer"),
])
def test_choices_that_cannot_run_are_refused_by_the_spec(fields, says):
    with pytest.raises(TrainSpecError, match=says):
        make_spec(**{**TINY, **fields})


def test_the_cli_refuses_in_one_line_what_this_device_cannot_run(tmp_path):
    """CPU has SDPA's math and flash kernels but no cuDNN or memory-efficient one: the probe finds out, before
    any rank starts; Liger's triton kernels need CUDA."""
    for flags, says in ((["--sdpa-backend", "cudnn"], "tokenrig: error: sdpa_backend=cudnn cannot run on this CPU "
                                                       "device (PyTorch has no cudnn kernel for it); use "
                                                       "--sdpa-backend flash or math, or leave it out (auto)"),
                        (["--liger"], "tokenrig: error: liger=true needs a CUDA GPU: Liger-Kernel's fused kernels "
                                      "are triton kernels; leave out --liger on CPU")):
        done = run_cli("train", "--gpu", "cpu", *flags, "--results", str(tmp_path))
        assert done.returncode == 2 and done.stderr.strip() == says
    assert not any(tmp_path.iterdir())


def losses(spec, steps: int = 2, fp32: bool = False) -> list[float]:
    """Train a freshly seeded tiny model `steps` steps on fixed tokens with the spec's optimizer, no DeepSpeed."""
    torch.manual_seed(0)
    model = build_model(spec, torch.device("cpu"), {})
    if fp32:  # as DeepSpeed's FP32 master weights are what the optimizer updates
        model = model.float()
    optimizer = make_optimizer(spec, [p for p in model.parameters() if p.requires_grad])
    tokens = torch.randint(0, spec.model_profile.vocab_size, (spec.micro_batch, spec.seq_len),
                           generator=torch.Generator().manual_seed(1))
    seen = []
    with sdpa_backend(spec):
        for _ in range(steps):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            seen.append(loss.item())
    return seen


def test_compiled_blocks_train_like_eager_and_really_compile():
    import torch._dynamo

    torch._dynamo.reset()
    eager = losses(make_spec(**TINY, recompute=True))
    compiled = losses(make_spec(**TINY, recompute=True, compile=True))
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] >= 1, f"nothing was compiled: {dict(frames)}"
    torch._dynamo.reset()
    assert compiled == pytest.approx(eager, abs=0.02)
    assert compiled[1] < compiled[0]  # it trains


def sdpa_ops(spec) -> set[str]:
    from torch.profiler import profile

    torch.manual_seed(0)
    model = build_model(spec, torch.device("cpu"), {})
    tokens = torch.randint(0, 100, (1, 32))
    with sdpa_backend(spec), profile() as profiler:
        model(input_ids=tokens, labels=tokens).loss.backward()
    return {event.name for event in profiler.events() if "scaled_dot_product" in event.name}


def test_a_chosen_sdpa_backend_runs_that_kernel_and_the_same_loss():
    math, flash = make_spec(**TINY, sdpa_backend="math"), make_spec(**TINY, sdpa_backend="flash")
    assert "aten::_scaled_dot_product_attention_math" in sdpa_ops(math)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in sdpa_ops(flash)
    assert losses(math) == pytest.approx(losses(flash), abs=0.02)


def test_fused_adamw_matches_the_multi_tensor_one():
    fused_spec, foreach_spec = make_spec(**TINY, optimizer="adamw-fused"), make_spec(**TINY, optimizer="adamw")
    parameter = [torch.nn.Parameter(torch.zeros(2))]
    assert make_optimizer(fused_spec, parameter).defaults["fused"] is True
    assert make_optimizer(foreach_spec, parameter).defaults["foreach"] is True
    fused, foreach = losses(fused_spec, steps=4, fp32=True), losses(foreach_spec, steps=4, fp32=True)
    assert fused == pytest.approx(foreach, rel=1e-4)
    assert fused[-1] < fused[0]


def test_dollars_per_billion_tokens_trained():
    """H200 at $6.35/h (the profile's price), one GPU at 7,831 tokens/s: 28,191,600 tokens an hour, so
    $6.35 / 28,191,600 x 1e9 = $225.24 per billion tokens. Two GPUs at 12,121 tokens/s together: $12.70 over
    43,635,600 tokens = $291.05. With --price h200=3.00: $3.00 / 28,191,600 x 1e9 = $106.41."""
    one = make_spec(gpu="h200", model="7b", seq_len=2048)
    assert training_cost(one, 7831)["usd_per_billion_tokens"] == pytest.approx(225.24, abs=0.005)
    two = training_cost(one.model_copy(update={"gpus": 2}), 12121)
    assert two["usd_per_billion_tokens"] == pytest.approx(291.05, abs=0.005) and two["gpus"] == 2
    priced = training_cost(one, 7831, 3.00)
    assert priced["usd_per_billion_tokens"] == pytest.approx(106.41, abs=0.005)
    assert priced["price_source"] == "--price"
    assert training_cost(one, 7831)["price_source"] == "h200 profile, 2026-03-10"


def test_the_comparison_table_costs_each_run_at_its_price_or_the_one_given(tmp_path):
    for name, tokens_per_s in (("a", 7831), ("b", 3560)):
        run = tmp_path / name
        run.mkdir()
        spec = make_spec(gpu="h200", model="7b", seq_len=2048, attention="sdpa" if name == "a" else "eager")
        (run / "spec.json").write_text(spec.model_dump_json())
        (run / "summary.json").write_text(json.dumps({"status": "ok", "tokens_per_s": tokens_per_s,
                                                      "tokens_per_s_per_gpu": tokens_per_s,
                                                      "cost": training_cost(spec, tokens_per_s, 5.0)}))
    table = compare_dirs([tmp_path], out=tmp_path / "out")
    assert "| $/B tok |" in table
    rows = {r["attention"]: r for r in json.loads((tmp_path / "out" / "comparison.json").read_text())}
    # at the $5.00/h the runs were costed at: 5 / (7831 x 3600) x 1e9 = 177.36; 5 / (3560 x 3600) x 1e9 = 390.14
    assert rows["sdpa"]["usd_per_billion_tokens"] == pytest.approx(177.36, abs=0.005)
    assert rows["eager"]["usd_per_billion_tokens"] == pytest.approx(390.14, abs=0.005)
    assert "| 177.36 |" in table
    repriced = compare_dirs([tmp_path], prices={"h200": 2.0})  # 2 / (7831 x 3600) x 1e9 = 70.94
    assert "| 70.94 |" in repriced


def test_the_fit_planner_on_7b_pretraining_by_hand():
    """N = 6,738,415,616. ZeRO-2 on one GPU: 2N weights + 4N BF16 gradients (and their copy) + 12N FP32 master
    weights and moments = 18N = 121,291,481,088 B held, + 4N = 26,953,662,464 B of FP32 gradients at the step
    (more than the 9,520,021,504 B of activations: 34 x 2048 x 4096 x 32 + 6 x 2048 x 32,000), + the 2e9 B
    runtime = 150,245,143,552 B: within an H200's 143,771 MiB (150,755,917,824 B; 138.1 GiB allocated was
    measured), not an H100's 81,559 MiB (85,521,760,256 B)."""
    h200 = plan_training_fit(make_spec(gpu="h200", model="7b", seq_len=2048, zero=2))
    assert h200.gpu_state_bytes == 18 * N_7B and h200.step_bytes == 4 * N_7B
    assert h200.activation_bytes == 9_520_021_504
    assert h200.peak_bytes == 150_245_143_552 and h200.fits
    h100 = make_spec(gpu="h100-sxm", model="7b", seq_len=2048, zero=2)
    assert not plan_training_fit(h100).fits
    # optimizer offload: the GPU keeps 2N weights + two 5e8-element BF16 buckets + activations + runtime:
    # 13,476,831,232 + 2e9 + 9,520,021,504 + 2e9 = 26,996,852,736 B; the host 16N = 107,814,649,856 B
    offloaded = plan_training_fit(h100.model_copy(update={"offload": "optimizer"}))
    assert offloaded.peak_bytes == 26_996_852_736 and offloaded.host_bytes == 16 * N_7B and offloaded.fits
    # 8-bit moments (2N instead of 8N) save 6N: 150,245,143,552 - 6N = 109,814,649,856 B, still too big;
    # with ZeRO-3 (no step copy, one gradient copy): 2e9 + (2 + 2 + 4 + 2)N + activations = 78,904,177,664 B fits
    assert plan_training_fit(h100, moment_bytes=2).peak_bytes == 150_245_143_552 - 6 * N_7B
    assert plan_training_fit(h100.model_copy(update={"zero": 3}), moment_bytes=2).peak_bytes == 78_904_177_664
    report = fit_report(h100)
    assert report[0].endswith("does NOT fit (state 113.0, step 25.1, activations 8.9, runtime 1.9)")
    assert "  with --offload optimizer: 25.1 GiB: fits (host 100.4 GiB)" in report
    assert "  with 8-bit AdamW states and ZeRO-3: 73.5 GiB: fits" in report


def test_a_cpu_run_with_every_new_path_trains_and_is_costed(tmp_path):
    """Compiled blocks with recomputation, SDPA's flash kernel, the foreach AdamW, records every 2 steps, under
    DeepSpeed ZeRO-2: every step recorded, a finite loss, and the cost at the --price given."""
    done = run_cli("train", "--gpu", "cpu", "--model", "tiny", "--seq-len", "64", "--micro-batch", "1",
                   "--warmup-steps", "1", "--steps", "2", "--profile-steps", "0", "--compile", "--recompute",
                   "--sdpa-backend", "flash", "--optimizer", "adamw", "--sync-every", "2", "--price", "cpu=0.36",
                   "--results", str(tmp_path), timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["measured_steps"] == 2 and summary["loss"]["finite"]
    assert [json.loads(line)["step"] for line in (run_dir / "steps.jsonl").read_text().splitlines()] == [1, 2, 3]
    # $0.36/h over tokens/s x 3600 tokens an hour: 1e5 / tokens/s dollars per billion tokens
    assert summary["cost"]["usd_per_billion_tokens"] == pytest.approx(1e5 / summary["tokens_per_s"])
    assert "per billion tokens trained (1 GPU(s) at $0.36/h, --price)" in done.stdout
    assert "compiled" in summary["label"] and "sdpa-flash" in summary["label"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_kernels_give_the_eager_loss_on_gpu():
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers import LigerRMSNorm

    from tokenrig.train.kernels import apply_liger

    spec = make_spec(gpu="h200", model="tiny", seq_len=256, micro_batch=2)
    torch.manual_seed(0)
    model = build_model(spec, torch.device("cuda"), {})
    tokens = torch.randint(0, spec.model_profile.vocab_size, (2, 256), device="cuda")
    eager = model(input_ids=tokens, labels=tokens).loss.item()
    apply_liger(model, spec.model_copy(update={"liger": True}))  # patches this model and the module's RoPE
    fused = model(input_ids=tokens, labels=tokens)
    fused.loss.backward()
    assert fused.loss.item() == pytest.approx(eager, abs=0.02)
    assert model.model.norm.forward.__func__ is LigerRMSNorm.forward


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_each_sdpa_backend_that_runs_on_this_gpu_gives_the_math_loss():
    from tokenrig.train.kernels import probe_sdpa

    spec = make_spec(gpu="h200", model="tiny", seq_len=256, micro_batch=2)
    tokens = torch.randint(0, spec.model_profile.vocab_size, (2, 256), device="cuda")

    def loss(backend: str) -> float:
        torch.manual_seed(0)
        model = build_model(spec, torch.device("cuda"), {})
        with sdpa_backend(spec.model_copy(update={"sdpa_backend": backend})):
            return model(input_ids=tokens, labels=tokens).loss.item()

    reference = loss("math")
    head_dim = spec.model_profile.head_dim
    runnable = [b for b in ("cudnn", "flash", "efficient") if probe_sdpa(b, "cuda", head_dim) is None]
    assert "flash" in runnable
    for backend in runnable:
        assert loss(backend) == pytest.approx(reference, abs=0.02), backend


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deferred_step_timing_reads_cuda_events():
    from tokenrig.train.worker import StepTimer

    timer = StepTimer(torch.device("cuda"), sync_every=4)
    matrix = torch.randn(4096, 4096, device="cuda")
    started = timer.start()
    for _ in range(20):
        matrix = matrix @ matrix / 64
    seconds = timer.stop(started)
    assert timer.events and 0 < seconds() < 10

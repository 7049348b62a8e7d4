"""One rank of a training run, as DeepSpeed's launcher starts it: `python -m tokenrig.train.worker RUN_DIR`.

Reads RUN_DIR/spec.json and ds_config.json, builds the model and the DeepSpeed engine, trains on
random token batches (speed does not depend on the data) and, on rank 0, appends one StepRecord
per step to steps.jsonl, every `sync_every` steps: the only time the host waits for the GPU (the loss is
read then too). After the measured steps it profiles a few more for the module breakdown. Out-of-memory
and Ctrl-C end the run with an outcome file, never a traceback, and keep every step already written.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import typing
from contextlib import nullcontext
from pathlib import Path

import psutil
import torch

from tokenrig.train.kernels import sdpa_backend
from tokenrig.train.records import Outcome, StepRecord, StepSink, write_outcome
from tokenrig.train.spec import TrainSpec


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes the step in progress, then stops."""

    def __init__(self):
        self.set = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, _signum, _frame):
        self.set = True


def make_optimizer(spec: TrainSpec, parameters: list):
    """The client optimizer: torch's AdamW, fused (one kernel over each tensor list) or foreach (a few
    multi-tensor kernels); None where the config names DeepSpeed's own, CPU Adam under ZeRO-Offload or
    FusedAdam (see dsconfig). torch's needs no DeepSpeed op build, so a run starts in seconds.
    """
    if spec.offload != "none" or spec.optimizer == "deepspeed-fused":
        return None
    fused = spec.optimizer == "adamw-fused"
    return torch.optim.AdamW(parameters, lr=spec.learning_rate, weight_decay=0.0, fused=fused, foreach=not fused)


def parameter_count(parameters: list) -> int:
    """Elements in `parameters`, whole: a ZeRO-3 partitioned parameter keeps its full size in ds_numel."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in parameters)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Each step's time: the host clock between two waits for the device, or, when the records are written only
    every few steps on CUDA, the time between two CUDA events, read then, so the host queues the next step's
    kernels while the GPU still runs this one."""

    def __init__(self, device: torch.device, sync_every: int):
        self.device = device
        self.events = sync_every > 1 and device.type == "cuda"

    def start(self):
        if self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        synchronize(self.device)
        return time.perf_counter()

    def stop(self, started):
        """A function that returns the step's seconds once the device has caught up."""
        if self.events:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()

            def seconds() -> float:
                ended.synchronize()
                return started.elapsed_time(ended) / 1e3
            return seconds
        synchronize(self.device)
        elapsed = time.perf_counter() - started
        return lambda: elapsed


def memory_fields(device: torch.device) -> dict:
    fields = {"host_rss_bytes": psutil.Process().memory_info().rss}
    if device.type == "cuda":
        fields.update(gpu_allocated_peak_bytes=torch.cuda.max_memory_allocated(device),
                      gpu_reserved_peak_bytes=torch.cuda.max_memory_reserved(device))
    return fields


def all_ranks_agree_to_stop(stop_here: bool, device: torch.device) -> bool:
    """True on every rank once any rank was asked to stop, so all leave after the same step.

    A Ctrl-C reaches the ranks at slightly different times; a rank that left alone would leave
    the others waiting in the next collective.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return stop_here
    flag = torch.tensor([1.0 if stop_here else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def release_shm_allreduce_buffer(rank: int) -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU allreduce, which DeepSpeed never does.

    Each CPU rank creates a 66-MB tmpfs file in init_distributed and maps its peers' there; left alone,
    every CPU run keeps that RAM until reboot (seen: 284 files, 19 GB, on one machine after a day of
    test runs). Once every rank has mapped its peers (the barrier), unlinking only drops the name: the
    mapping lives until the ranks exit, however they exit.
    """
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{rank}"
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def train_step(engine, spec: TrainSpec, device: torch.device, phase_ranges: bool) -> torch.Tensor:
    """One optimizer step (grad_accum micro-batches); returns the last micro-batch's loss, still on the device
    (reading it waits for the GPU)."""
    from torch.autograd.profiler import record_function

    from tokenrig.train.breakdown import PHASE_PREFIX

    vocab = spec.model_profile.vocab_size
    loss_value = 0.0
    for _ in range(spec.grad_accum):
        tokens = torch.randint(0, vocab, (spec.micro_batch, spec.seq_len), device=device)
        with record_function(PHASE_PREFIX + "forward") if phase_ranges else nullcontext():
            loss = engine(input_ids=tokens, labels=tokens).loss
        with record_function(PHASE_PREFIX + "backward") if phase_ranges else nullcontext():
            engine.backward(loss)
        with record_function(PHASE_PREFIX + "optimizer") if phase_ranges else nullcontext():
            engine.step()
        loss_value = loss.detach().float()
    return loss_value


def run(run_dir: Path) -> int:
    import deepspeed

    spec = TrainSpec.model_validate_json((run_dir / "spec.json").read_text())
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    stop = StopFlag()
    cuda = spec.device == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if not cuda:
        release_shm_allreduce_buffer(rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(spec.seed + rank)
    sink = StepSink(run_dir / "steps.jsonl") if rank == 0 else None

    from tokenrig.train.model import build_model, trainable_parameters

    try:
        with sdpa_backend(spec):
            model = build_model(spec, device, ds_config)
            parameters = trainable_parameters(model)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=parameters,
                                              optimizer=make_optimizer(spec, parameters), config=ds_config)
            if rank == 0:
                write_outcome(run_dir, Outcome(status="running", rank=rank,
                                               trainable_params=parameter_count(parameters)))
            stopped, step = measure_steps(engine, spec, device, sink, stop)
            if spec.profile_steps and not stopped:
                profile_steps(engine, spec, device, run_dir, rank, sink, step)
        status = "interrupted" if stopped or stop.set else "ok"
    except torch.OutOfMemoryError as error:
        write_outcome(run_dir, Outcome(status="oom", rank=rank, message=str(error).splitlines()[0][:400]))
        return 3
    except Exception as error:  # the summary names the cause; the traceback stays in launcher.log
        write_outcome(run_dir, Outcome(status="error", rank=rank, message=f"{type(error).__name__}: {error}"[:400]))
        raise
    if rank == 0:
        write_outcome(run_dir, Outcome(status=status, rank=rank, trainable_params=parameter_count(parameters)))
    return 0


def measure_steps(engine, spec: TrainSpec, device: torch.device, sink, stop: StopFlag) -> tuple[bool, int]:
    """The warm-up and measured steps; records are written, and a stop honoured, every `sync_every` steps.
    Returns (stopped, steps run)."""
    timer = StepTimer(device, spec.sync_every)
    total = spec.warmup_steps + spec.steps
    pending: list[tuple[int, torch.Tensor, typing.Callable[[], float], float]] = []
    step, stopped = 0, False
    while step < total and not stopped:
        started = timer.start()
        loss = train_step(engine, spec, device, phase_ranges=False)
        step += 1
        pending.append((step, loss, timer.stop(started), time.time()))  # wall clock once the step is queued
        if len(pending) < spec.sync_every and step < total:
            continue
        for done, loss, elapsed, ended in pending:
            if sink:
                sink.write(StepRecord(step=done, phase="warmup" if done <= spec.warmup_steps else "measured",
                                      step_time_s=elapsed(), loss=float(loss), tokens=spec.tokens_per_step,
                                      time=ended, **memory_fields(device)))
        pending.clear()
        stopped = all_ranks_agree_to_stop(stop.set, device)
    return stopped, step


def profile_steps(engine, spec: TrainSpec, device: torch.device, run_dir: Path, rank: int, sink, step: int) -> None:
    """Profile `spec.profile_steps` more steps with module ranges; rank 0 writes the breakdown."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    from tokenrig.train.breakdown import STEP_RANGE, analyse, module_scopes

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with module_scopes(engine.module), profile(activities=activities) as profiler:
        for _ in range(spec.profile_steps):
            synchronize(device)
            started = time.perf_counter()
            with record_function(STEP_RANGE):
                loss = train_step(engine, spec, device, phase_ranges=True)
                synchronize(device)
            step += 1
            if sink:
                sink.write(StepRecord(step=step, phase="profiled", step_time_s=time.perf_counter() - started,
                                      loss=float(loss), tokens=spec.tokens_per_step, time=time.time(),
                                      **memory_fields(device)))
    if rank == 0:
        try:
            result = analyse(profiler.events(), device.type)
        except Exception as error:  # the measured steps stand even if this torch's trace cannot be read
            (run_dir / "breakdown-error.txt").write_text(f"{type(error).__name__}: {error}\n")
            return
        (run_dir / "breakdown-raw.json").write_text(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tokenrig.train.worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--local_rank", type=int, help="added by DeepSpeed's launcher (LOCAL_RANK is used)")
    try:
        return run(parser.parse_args(argv).run_dir)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

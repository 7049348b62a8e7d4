"""The DeepSpeed config a TrainSpec asks for: ZeRO stage, buckets, offload, BF16, batch, accumulation, optimizer.

Written into the run directory as ds_config.json, so a run can be repeated with plain DeepSpeed.
"""

from __future__ import annotations

from tokenrig.train.spec import TrainSpec

# ZeRO-3 bucket sizes scale with the hidden size, as the HF/DeepSpeed integration's "auto" values do
STAGE3_PARAM_PERSISTENCE_FACTOR = 10
STAGE3_PREFETCH_FACTOR = 0.9
ZERO12_BUCKET_SIZE = int(5e8)  # elements, DeepSpeed's own default for ZeRO-1/2


def deepspeed_config(spec: TrainSpec) -> dict:
    zero: dict = {"stage": spec.zero}
    if spec.zero >= 1:
        # on one GPU there is no reduction to hide behind backward, and overlap doubles the bucket buffers
        overlap = spec.overlap_comm if spec.overlap_comm is not None else spec.world_size > 1
        zero.update(overlap_comm=overlap, contiguous_gradients=spec.contiguous_gradients)
    if spec.zero in (1, 2):
        bucket = spec.bucket_size or ZERO12_BUCKET_SIZE
        zero.update(reduce_scatter=True, allgather_bucket_size=bucket, reduce_bucket_size=bucket)
    if spec.zero == 3:
        h = spec.model_profile.hidden_size
        bucket = spec.bucket_size or h * h
        zero.update(reduce_bucket_size=bucket, stage3_prefetch_bucket_size=int(STAGE3_PREFETCH_FACTOR * bucket),
                    stage3_param_persistence_threshold=STAGE3_PARAM_PERSISTENCE_FACTOR * h,
                    stage3_gather_16bit_weights_on_model_save=False)
    if spec.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if spec.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": spec.micro_batch,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if spec.offload != "none" or spec.optimizer == "deepspeed-fused":
        # an optimizer in the config is DeepSpeed's own: CPU Adam under ZeRO-Offload, else FusedAdam (both ops
        # built on first use). torch's AdamW is passed as the client optimizer instead (worker.make_optimizer):
        # named here, DeepSpeed would build it without `fused` (its `torch_adam` option passes only `foreach`)
        config["optimizer"] = {"type": "AdamW", "params": {"lr": spec.learning_rate, "weight_decay": 0.0}}
    return config

"""The DeepSpeed config a TrainSpec asks for: ZeRO stage, offload, BF16, batch and accumulation.

Written into the run directory as ds_config.json, so a run can be repeated with plain DeepSpeed.
"""

from __future__ import annotations

from tokenrig.train.spec import TrainSpec

# ZeRO-3 bucket sizes scale with the hidden size, as the HF/DeepSpeed integration's "auto" values do
STAGE3_PARAM_PERSISTENCE_FACTOR = 10
STAGE3_PREFETCH_FACTOR = 0.9


def deepspeed_config(spec: TrainSpec) -> dict:
    zero: dict = {"stage": spec.zero}
    if spec.zero >= 1:
        zero.update(overlap_comm=spec.world_size > 1, contiguous_gradients=True)
    if spec.zero in (1, 2):
        zero.update(reduce_scatter=True, allgather_bucket_size=int(5e8), reduce_bucket_size=int(5e8))
    if spec.zero == 3:
        h = spec.model_profile.hidden_size
        zero.update(reduce_bucket_size=h * h, stage3_prefetch_bucket_size=int(STAGE3_PREFETCH_FACTOR * h * h),
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
        # the client optimizer (torch AdamW, fused on CUDA) needs no op build; see worker.make_optimizer
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if spec.offload != "none":
        # ZeRO-Offload runs the update on the host with DeepSpeed's CPU Adam (built on first use)
        config["optimizer"] = {"type": "AdamW", "params": {"lr": spec.learning_rate, "weight_decay": 0.0}}
    return config

"""The hf engine: a transformers model behind transformers' own continuous-batching manager.

`model.init_continuous_batching()` gives a paged-KV, iteration-level scheduler running in a
background thread; results come back on the event loop through `register_result_handler`.
Works with transformers 5.17 and 5.24 (the GPU image and the CPU venv): the attention asked for
is the one used, since continuous batching would otherwise swap sdpa/eager for flash-attn.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, AsyncGenerator

from tokenrig.serve.engines import EngineLoad, GenerationRequest
from tokenrig.serve.engines.step_profiler import StepProfiler
from tokenrig.serve.spec import HfOptions

if TYPE_CHECKING:
    from transformers.generation.continuous_batching import ContinuousBatchingManager

NO_EOS = -1  # the API layer decides when to stop; the engine generates max_tokens


class HFEngine:
    def __init__(
        self,
        model_dir: str,
        device: str = "cpu",
        dtype: str = "bfloat16",
        attn_implementation: str = "sdpa",
        max_num_seqs: int | None = None,
        max_batch_tokens: int | None = None,
        kv_cache_tokens: int | None = None,
        options: HfOptions = HfOptions(),
        profiler: StepProfiler | None = None,
    ):
        self.model_dir = model_dir
        self.device = device
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.kv_cache_tokens = kv_cache_tokens
        self.options = options
        self.profiler = profiler  # /start_profile and /stop_profile record its steps
        self._manager: ContinuousBatchingManager | None = None
        self._waiting: set[str] = set()
        self._running: set[str] = set()

    async def start(self) -> None:
        await asyncio.to_thread(self._start_manager)

    def _start_manager(self) -> None:
        import dataclasses
        import logging

        import torch
        from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

        # "paged|sdpa" / "paged|eager" keep transformers 5.17 from switching to flash-attn when it is installed
        implementation = self.attn_implementation
        if implementation in ("eager", "sdpa"):
            implementation = f"paged|{implementation}"
        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=getattr(torch, self.dtype), attn_implementation=implementation,
            device_map=self.device, **self._quantization_override(),
        )
        model.eval()
        if self.profiler:
            self.profiler.wrap(model)
        generation_config = GenerationConfig(do_sample=False, eos_token_id=NO_EOS,
                                             pad_token_id=model.config.pad_token_id)
        batching: dict[str, Any] = {
            "max_requests_per_batch": self.max_num_seqs, "max_batch_tokens": self.max_batch_tokens,
            "default_compile_level": self.options.compile_level, "use_cuda_graph": self.options.cuda_graphs}
        if self.options.kv_padding_tokens:
            # CUDA graphs need static shapes, so each step's KV read is padded up to a multiple of this;
            # transformers' default (16384) makes a short request attend over 16k masked slots every layer
            batching["kv_padding_interval_size"] = self.options.kv_padding_tokens
        known = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        if "auto_switch_to_flash" in known:  # transformers >= 5.2x: the same guarantee as the "paged|" prefix
            batching["auto_switch_to_flash"] = False
        cb_config = ContinuousBatchingConfig(**batching)
        if self.kv_cache_tokens:
            # Left to itself the paged cache takes a share of *free* memory: on CPU that is host RAM.
            # named page_size since transformers 5.2x, block_size before
            tokens_per_block = getattr(cb_config, "page_size", None) or getattr(cb_config, "block_size")
            cb_config.num_blocks = -(-self.kv_cache_tokens // tokens_per_block)
        manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config
        )
        manager.start()
        self._manager = manager
        quantizer = getattr(model, "hf_quantizer", None)
        logging.getLogger(__name__).warning(
            "hf engine ready: attention %s, dtype %s, device %s, quantization %s",
            model.config._attn_implementation, model.dtype, self.device,
            quantizer.quantization_config.quant_method if quantizer else "none")

    def _quantization_override(self) -> dict:
        """The checkpoint's own GPTQ/AWQ config with the kernel asked for (transformers merges `backend` in)."""
        kernel = self.options.quant_kernel
        if not kernel:
            return {}
        from transformers import AutoConfig
        from transformers.quantizers.auto import AutoQuantizationConfig

        stored = getattr(AutoConfig.from_pretrained(self.model_dir), "quantization_config", None)
        if stored is None:
            raise ValueError(f"--quant-kernel {kernel}: {self.model_dir} is not a quantized checkpoint")
        return {"quantization_config": AutoQuantizationConfig.from_dict({**stored, "backend": kernel})}

    async def stop(self) -> None:
        if self._manager is not None:
            await asyncio.to_thread(self._manager.stop, True, 30)

    def load(self) -> EngineLoad:
        return EngineLoad(running=len(self._running), waiting=len(self._waiting), kv_cache_usage=None)

    def failure(self) -> str | None:
        # A request queued after transformers' generation thread has died would wait forever
        if self._manager is None or self._manager.is_running():
            return None
        fatal = getattr(getattr(self._manager, "background_thread_status", None), "fatal_error", None)
        return f"transformers' generation thread stopped{f': {fatal}' if fatal else ''}"

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[list[int], None]:
        problem = self.failure()
        if problem:
            raise RuntimeError(f"engine error: {problem}")
        manager = self._manager
        if manager is None:
            raise RuntimeError("engine error: the engine has not started")
        outputs: asyncio.Queue = asyncio.Queue()
        rid = request.request_id
        manager.register_result_handler(rid, outputs.put_nowait)
        manager.add_request(
            input_ids=request.prompt_ids, request_id=rid, max_new_tokens=request.max_tokens,
            streaming=True, eos_token_id=NO_EOS,
        )
        self._waiting.add(rid)
        sent, finished = 0, False
        try:
            while True:
                output = await outputs.get()
                if output.error:
                    raise RuntimeError(f"engine error: {output.error}")
                new = output.generated_tokens[sent:]
                if new:
                    self._waiting.discard(rid)
                    self._running.add(rid)
                    sent += len(new)
                    yield new
                if output.is_finished():
                    finished = True
                    return
        finally:
            self._waiting.discard(rid)
            self._running.discard(rid)
            if not finished:
                manager.cancel_request(rid)

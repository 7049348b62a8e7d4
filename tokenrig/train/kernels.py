"""The faster kernels a TrainSpec can ask for: one SDPA backend, torch.compile per decoder block, Liger-Kernel.

Each is applied to the model the worker builds (or, for the SDPA backend, held for the rank's whole
life), and `unavailable` says before any rank starts, in one line, why a choice cannot run here.
The SDPA probe runs in its own process, so the `tokenrig train` process never holds a CUDA context
next to the ranks: `python -m tokenrig.train.kernels BACKEND DEVICE HEAD_DIM` exits 0 if the
backend runs a causal BF16 attention of that head size on that device, else prints why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys

from tokenrig.train.spec import TrainSpec

LIGER_MISSING = ("liger=true needs the liger-kernel package (and triton, which CUDA builds of torch bring): "
                 "pip install 'tokenrig[liger]'")
PROBE_TIMEOUT_S = 300


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def sdpa_backend(spec: TrainSpec) -> contextlib.AbstractContextManager:
    """Only the chosen SDPA kernel while this is entered: it sets the process's backend flags, so it also holds
    in recomputed forwards (run inside backward) and in compiled blocks."""
    if spec.sdpa_backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(_sdpa_backend(spec.sdpa_backend))


def probe_sdpa(backend: str, device: str, head_dim: int) -> str | None:
    """None if `backend` runs a causal BF16 attention (forward and backward) on `device`, else the reason."""
    import torch
    from torch.nn.attention import sdpa_kernel

    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    query = torch.randn(1, 4, 128, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    try:
        with sdpa_kernel(_sdpa_backend(backend)):
            torch.nn.functional.scaled_dot_product_attention(query, query, query, is_causal=True).sum().backward()
    except RuntimeError as error:
        message = str(error).strip().splitlines()[0]
        # torch says "No viable backend ... turning off both the math kernel and the fused kernels" here
        return f"PyTorch has no {backend} kernel for it" if "No viable backend" in message else message
    return None


def unavailable(spec: TrainSpec) -> str | None:
    """Why this spec's kernel choices cannot run on this host (one line), or None."""
    if spec.liger and importlib.util.find_spec("liger_kernel") is None:
        return LIGER_MISSING
    if spec.sdpa_backend != "auto":
        device = "cpu" if spec.device == "cpu" else "cuda"
        probe = subprocess.run([sys.executable, "-m", "tokenrig.train.kernels", spec.sdpa_backend, device,
                                str(spec.model_profile.head_dim)], capture_output=True, text=True,
                               timeout=PROBE_TIMEOUT_S)
        if probe.returncode != 0:
            reason = (probe.stdout.strip() or probe.stderr.strip() or "the probe failed").splitlines()[-1]
            alternatives = "flash or math" if device == "cpu" else "another backend"
            return (f"sdpa_backend={spec.sdpa_backend} cannot run on this {device.upper()} device ({reason}); "
                    f"use --sdpa-backend {alternatives}, or leave it out (auto)")
    return None


def apply_liger(model, spec: TrainSpec) -> None:
    """Swap in Liger's fused RMSNorm, SwiGLU and RoPE, and its linear cross-entropy that never materialises
    the logits. Under ZeRO-3 the LM head's weight is partitioned and only gathered when the head module itself
    runs, which the fused linear cross-entropy skips: there Liger's plain fused cross-entropy is used."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as error:
        raise RuntimeError(LIGER_MISSING) from error
    fused_linear = spec.zero != 3
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=fused_linear,
                                cross_entropy=not fused_linear, model=model)


def compile_blocks(model) -> int:
    """torch.compile every decoder layer in place (nn.Module.compile); returns how many.

    Per block, not the whole model: recomputation checkpoints around each (compiled) block, DeepSpeed's hooks
    stay on the modules it wraps, and the blocks share one compiled graph (same code, parameters as inputs).
    """
    layers = model.get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)


def main(argv: list[str] | None = None) -> int:
    backend, device, head_dim = argv or sys.argv[1:]
    reason = probe_sdpa(backend, device, int(head_dim))
    if reason:
        print(reason)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

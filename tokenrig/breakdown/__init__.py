"""Where a serving engine's time goes: kernel-level traces taken under load, broken down by operator.

`trace` reads a torch-profiler trace (vLLM's own profiler, or the one tokenrig's engines run) into engine
steps with their batch composition and their GPU kernels; `operators` names each kernel's operator class
(GEMMs by layer role, attention, norms, sampling, communication, copies); `table` sums them into the
breakdown a run reports; `capture` asks a server to record a trace during a load step and finds it.
"""

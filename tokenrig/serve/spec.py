"""What a server is asked to be: `ServerSpec`, each backend's own options, and their command-line flags.

A flag is declared once, here: the common ones on `COMMON_FLAGS`, a backend's own as fields of its
options class (`HfOptions`, `SimOptions`, `VllmOptions`, `SglangOptions`, `TgiOptions`), which validate
themselves and say how tokenrig's server or the engine takes them (`to_args`). Which backends exist, and
which options class each takes, is the registry's (serve/backends): `add_server_arguments` puts
--backend with its choices and every backend's flags on a parser; `ServerSpec.from_args` builds the
spec and refuses a flag that the chosen backend would not use. `Endpoint` is where a started server
answers; `LaunchError` says why one cannot start.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from tokenrig.errors import UserError
from tokenrig.profiles import GpuProfile, ModelProfile, resolve_gpu, resolve_model
from tokenrig.serve.engines.sim import RooflineParams
from tokenrig.serve.fit import DEFAULT_GPU_MEMORY_UTILIZATION, normalise_quant

DEFAULT_CONCURRENCY = 16


class LaunchError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class Flag:
    """One command-line option; argparse leaves `default` (None: 'not given') when it is absent."""

    name: str
    help: str | None = None
    type: Any = None
    choices: tuple | None = None
    action: Any = None
    default: Any = None
    aliases: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kinds = {"type": self.type, "choices": self.choices, "action": self.action}
        parser.add_argument(self.name, *self.aliases, dest=self.dest, default=self.default, help=self.help,
                            **{key: value for key, value in kinds.items() if value is not None})


DEFAULT_BACKEND = "hf"
COMMON_FLAGS = (
    Flag("--gpu", "GPU profile: a800, a100-80g, h100-sxm, h200, rtx4090, rtx3090, l40s, cpu (default)", default="cpu"),
    Flag("--model", "model profile: tiny (default), llama2-7b|7b, llama2-13b|13b, llama2-70b|70b, llama3-8b|8b, "
                    "or a Hugging Face config.json (llama, mistral, qwen2) or its directory", default="tiny"),
    Flag("--quant", "bf16 (default), fp16, int8, fp8 (vllm, sglang: online FP8), gptq, awq (4-bit, group 128)",
         default="bf16"),
    Flag("--attention", "flash | noflash, or the backend's own name: hf eager/sdpa/flash_attention_2; "
                        "vllm FLASH_ATTN/FLASHINFER/TRITON_ATTN/FLEX_ATTENTION; sglang fa3/flashinfer/triton; "
                        "tgi flashinfer/flashdecoding/paged",
         aliases=("--attn-implementation",)),
    Flag("--tp", "tensor-parallel GPUs (default: the smallest that fits)", type=int),
    Flag("--max-model-len", "context per request (default: the model's)", type=int),
    Flag("--concurrency", "requests the KV cache must hold at once (default: the scenario's users, else 16)", type=int),
    Flag("--gpu-memory-utilization", "fraction of GPU memory to use", type=float),
    Flag("--max-num-seqs", "engine batch limit (requests)", type=int),
)


def option(help: str, default: Any = None, **flag: Any) -> Any:
    """A backend option: a field of its options class whose flag is the field's name (sim_ttft_ms: --sim-ttft-ms)."""
    return field(default=default, metadata={"flag": {"help": help, **flag}})


@dataclass(frozen=True)
class BackendOptions:
    """The options only one backend takes (a field at its default = not asked for)."""

    backend: ClassVar[str]

    @classmethod
    def flags(cls) -> list[Flag]:
        return [Flag("--" + f.name.replace("_", "-"), **f.metadata["flag"]) for f in dataclasses.fields(cls)]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for flag in cls.flags():
            flag.add_to(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """The options given on a parsed command line; the rest keep their defaults."""
        given = {flag.dest: getattr(args, flag.dest) for flag in cls.flags() if getattr(args, flag.dest) is not None}
        return cls(**given)

    def validate(self) -> None:
        """Raise LaunchError when the options contradict each other."""

    def ignored(self) -> dict[str, str]:
        """Flags (common or its own) that this backend, so configured, would not use: flag -> why."""
        return {}

    def to_args(self) -> list[str]:
        """Command-line arguments for tokenrig's own server, which takes these options under the same flags."""
        args: list[str] = []
        for f, flag in zip(dataclasses.fields(self), self.flags()):
            value = getattr(self, f.name)
            if value is None or value == f.default:
                continue
            if flag.action is argparse.BooleanOptionalAction:
                args.append(flag.name if value else "--no-" + flag.name.removeprefix("--"))
            else:
                args += [flag.name, str(value)]
        return args

    def env(self) -> dict[str, str]:
        """Environment variables the engine reads these options from."""
        return {}


OptionsT = TypeVar("OptionsT", bound=BackendOptions)


@dataclass(frozen=True)
class HfOptions(BackendOptions):
    backend: ClassVar[str] = "hf"

    compile_level: int = option("hf backend: torch.compile level 0-3", default=0, type=int)
    cuda_graphs: bool | None = option("hf backend: CUDA graphs over the static paged cache",
                                      action=argparse.BooleanOptionalAction)
    kv_padding_tokens: int | None = option(
        "hf backend with CUDA graphs: pad each step's KV read to a multiple of this (transformers' default 16384 "
        "makes short requests attend over 16k masked slots)", type=int)
    quant_kernel: str | None = option(
        "hf backend: gptqmodel kernel for GPTQ/AWQ, e.g. gptq_triton, gptq_torch, gptq_marlin (default: gptqmodel's "
        "choice, which on Hopper JIT-builds Machete and downloads CUTLASS)")


@dataclass(frozen=True)
class PrefixCachingOptions(BackendOptions):
    """The option vLLM, SGLang and TGI share: automatic prefix caching (SGLang's radix cache)."""

    prefix_caching: bool | None = option("vllm/sglang/tgi: automatic prefix caching, SGLang's radix cache "
                                         "(default: the engine's, on in all three)",
                                         action=argparse.BooleanOptionalAction)


@dataclass(frozen=True)
class MulticastOptions(PrefixCachingOptions):
    """The option vLLM and SGLang share: NVLink multicast at TP > 1, off unless asked for."""

    nvls: bool = option("vllm/sglang at TP > 1: allow NVLink multicast (FlashInfer all-reduce fusion, symmetric "
                        "memory, NCCL NVLS), which tokenrig turns off unless asked; only on NVSwitch hosts you own",
                        default=False, action="store_true")


@dataclass(frozen=True)
class VllmOptions(MulticastOptions):
    backend: ClassVar[str] = "vllm"

    def to_args(self) -> list[str]:
        """`vllm serve` arguments (--nvls is no flag of vLLM's: the backend turns multicast off without it)."""
        if self.prefix_caching is None:
            return []
        return ["--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching"]


@dataclass(frozen=True)
class SglangOptions(MulticastOptions):
    backend: ClassVar[str] = "sglang"

    def to_args(self) -> list[str]:
        """`sglang.launch_server` arguments: its radix cache is on unless --disable-radix-cache (there is no
        flag to enable it); --nvls is no flag of SGLang's: the backend turns multicast off without it."""
        return ["--disable-radix-cache"] if self.prefix_caching is False else []


@dataclass(frozen=True)
class TgiOptions(PrefixCachingOptions):
    backend: ClassVar[str] = "tgi"

    def to_args(self) -> list[str]:
        return []

    def env(self) -> dict[str, str]:
        if self.prefix_caching is None:
            return {}
        return {"PREFIX_CACHING": "1" if self.prefix_caching else "0"}


_ROOFLINE_DEFAULTS = RooflineParams()
# SimOptions field -> (RooflineParams field, the flag's unit in the field's: seconds or a ratio)
ROOFLINE_FIELDS = {"sim_compute_efficiency": ("compute_efficiency", 1.0),
                   "sim_bandwidth_efficiency": ("bandwidth_efficiency", 1.0),
                   "sim_step_overhead_ms": ("step_overhead_s", 1e-3),
                   "sim_sequence_overhead_us": ("sequence_overhead_s", 1e-6)}


def _roofline_help(name: str, meaning: str) -> str:
    params_field, unit = ROOFLINE_FIELDS[name]
    return f"sim roofline: {meaning} (default {getattr(_ROOFLINE_DEFAULTS, params_field) / unit:g})"


@dataclass(frozen=True)
class SimOptions(BackendOptions):
    """A fixed schedule (both --sim-ttft-ms and --sim-tpot-ms), or the roofline model and its parameters."""

    backend: ClassVar[str] = "sim"

    sim_ttft_ms: float | None = option("sim backend: fixed time to first token instead of the roofline model",
                                       type=float)
    sim_tpot_ms: float | None = option("sim backend: fixed time per output token", type=float)
    sim_compute_efficiency: float | None = option(
        _roofline_help("sim_compute_efficiency", "achieved / peak BF16 FLOP/s"), type=float)
    sim_bandwidth_efficiency: float | None = option(
        _roofline_help("sim_bandwidth_efficiency", "achieved / peak memory bandwidth"), type=float)
    sim_step_overhead_ms: float | None = option(
        _roofline_help("sim_step_overhead_ms", "fixed cost of each engine step, ms"), type=float)
    sim_sequence_overhead_us: float | None = option(
        _roofline_help("sim_sequence_overhead_us", "host cost per sequence in a step, us"), type=float)

    @property
    def fixed_schedule(self) -> bool:
        return self.sim_ttft_ms is not None or self.sim_tpot_ms is not None

    def validate(self) -> None:
        if self.fixed_schedule and (self.sim_ttft_ms is None or self.sim_tpot_ms is None):
            raise LaunchError("--sim-ttft-ms and --sim-tpot-ms go together: the fixed schedule needs both "
                              "(leave both out for the roofline model)")

    def ignored(self) -> dict[str, str]:
        unused = {"--concurrency": "its batch limit is --max-num-seqs"}
        if self.fixed_schedule:
            roofline = ["--" + name.replace("_", "-") for name in ROOFLINE_FIELDS]
            for flag in ["--tp", "--gpu-memory-utilization", *roofline]:  # --max-num-seqs: its slots
                unused[flag] = "a fixed schedule (--sim-ttft-ms, --sim-tpot-ms) is the same at any load"
        return unused

    def roofline(self, params: RooflineParams) -> RooflineParams:
        """`params` with the roofline options given put in."""
        given = {params_field: getattr(self, name) * unit for name, (params_field, unit) in ROOFLINE_FIELDS.items()
                 if getattr(self, name) is not None}
        return dataclasses.replace(params, **given)


def backend_options() -> dict[str, type[BackendOptions]]:
    """Each registered backend's options class (backends import this module: the registry is read on use)."""
    from tokenrig.serve.backends import BACKENDS

    return {name: backend.options for name, backend in BACKENDS.items()}


def backend_flag() -> Flag:
    """--backend, its choices and help from the registry."""
    from tokenrig.serve.backends import BACKENDS

    return Flag("--backend", ", ".join(f"{name} ({backend.summary}{', default' if name == DEFAULT_BACKEND else ''})"
                                       for name, backend in BACKENDS.items()),
                choices=tuple(BACKENDS), default=DEFAULT_BACKEND)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Every server flag, each once (backends share --prefix-caching, --nvls), in the order --help lists them."""
    added = set()
    for flag in [backend_flag(), *COMMON_FLAGS,
                 *(flag for options in backend_options().values() for flag in options.flags())]:
        if flag.name not in added:
            flag.add_to(parser)
            added.add(flag.name)


@dataclass
class ServerSpec:
    """Everything that decides how a server is launched; backends turn it into a command."""

    backend: str
    model: ModelProfile
    gpu: GpuProfile
    device: str = "cpu"
    quant: str = "bf16"  # bf16, fp16, int8, fp8, gptq, awq (4-bit, group 128)
    attention: str | None = None  # backend's own name or the portable 'flash' / 'noflash'; None = its default
    tp: int | None = None  # None: the fit planner picks the smallest that fits
    max_model_len: int | None = None  # None: the model's context
    concurrency: int = DEFAULT_CONCURRENCY  # requests the KV cache must hold at once (fit planning, batch limits)
    max_num_seqs: int | None = None  # engine batch limit; None: the plan's concurrency
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    options: BackendOptions | None = None  # the backend's own options; None: all at their defaults
    host: str = "127.0.0.1"
    port: int | None = None
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        known = backend_options()
        if self.backend not in known:
            raise LaunchError(f"unknown backend {self.backend!r}; known backends: {', '.join(known)}")
        expected = known[self.backend]
        if self.options is None:
            self.options = expected()
        if type(self.options) is not expected:
            raise LaunchError(f"the {self.backend} backend takes {expected.__name__}, not "
                              f"{type(self.options).__name__}")
        self.options.validate()

    def options_as(self, kind: type[OptionsT]) -> OptionsT:
        """The backend's own options as `kind`, its options class (or BackendOptions for what every one has)."""
        if not isinstance(self.options, kind):  # __post_init__ set them to the backend's class
            raise TypeError(f"the {self.backend} backend's options are {type(self.options).__name__}, "
                            f"not {kind.__name__}")
        return self.options

    @classmethod
    def from_args(cls, args: argparse.Namespace, concurrency: int | None = None) -> ServerSpec:
        """The spec a parsed command line asks for (`concurrency`: the load's, when --concurrency is not given).

        A flag given that the backend would not use is refused: a run that ignores a setting would be
        recorded as if it had applied it."""
        options = backend_options()[args.backend].from_args(args)
        _refuse_unused(options, args)
        gpu = resolve_gpu(args.gpu)
        utilization = args.gpu_memory_utilization
        return cls(backend=args.backend, model=resolve_model(args.model), gpu=gpu,
                   device="cpu" if gpu.key == "cpu" else "cuda", quant=normalise_quant(args.quant),
                   attention=args.attention, tp=args.tp, max_model_len=args.max_model_len,
                   concurrency=args.concurrency or concurrency or DEFAULT_CONCURRENCY,
                   max_num_seqs=args.max_num_seqs,
                   gpu_memory_utilization=DEFAULT_GPU_MEMORY_UTILIZATION if utilization is None else utilization,
                   options=options, host=getattr(args, "host", "127.0.0.1"), port=getattr(args, "port", None))

    def describe(self) -> dict:
        """The settings as run metadata records them: every backend's options, this one's as asked."""
        options: dict = {}
        for defaults in backend_options().values():
            options.update(dataclasses.asdict(defaults()))
        options.update(dataclasses.asdict(self.options_as(BackendOptions)))
        return {"backend": self.backend, "model": self.model.key, "gpu": self.gpu.key, "device": self.device,
                "quant": self.quant, "attention": self.attention, "tp": self.tp, "max_model_len": self.max_model_len,
                "concurrency": self.concurrency, "max_num_seqs": self.max_num_seqs,
                "gpu_memory_utilization": self.gpu_memory_utilization, **options}


def _refuse_unused(options: BackendOptions, args: argparse.Namespace) -> None:
    owners: dict[str, list[str]] = {}
    for other in backend_options().values():
        for flag in other.flags():
            owners.setdefault(flag.name, []).append(other.backend)
    own = {flag.name for flag in options.flags()}
    ignored = options.ignored()
    for flag in [*COMMON_FLAGS, *(Flag(name) for name in owners)]:
        if getattr(args, flag.dest, None) is None:
            continue
        if flag.name in ignored:
            raise LaunchError(f"the {options.backend} backend does not use {flag.name} "
                              f"({ignored[flag.name]}); drop it")
        if flag.name in owners and flag.name not in own:
            raise LaunchError(f"{flag.name} is an option of the {'/'.join(owners[flag.name])} backend, not of the "
                              f"{options.backend} backend; drop it")


@dataclass
class Endpoint:
    base_url: str
    metrics_url: str
    model_name: str
    tokenizer_dir: Path
    max_context: int

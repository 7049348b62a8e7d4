"""Reference parsers for the engines tokenrig launches but cannot install here (no GPU): vLLM, SGLang and TGI.

Built independently of tokenrig's backends, so a wrong or renamed flag or environment variable in
a generated command fails to parse:

* vLLM — a strict argparse parser built from tests/data/vllm-<version>-cli.json, which
  scripts/gen_vllm_cli.py generates from the vLLM wheel's own source (the version is in the file):
  `vllm serve` and `vllm bench serve` with their types, choices and BooleanOptionalAction flags, the
  names vLLM checks after parsing (quantization methods, load formats, attention backends, the
  fields of --compilation-config's JSON) and the VLLM_* environment variables vllm/envs.py reads.
* SGLang — a strict argparse parser built from tests/data/sglang-<version>-cli.json, which
  scripts/gen_sglang_cli.py generates from the SGLang wheel's own source: `python -m sglang.launch_server`
  with its types (human-readable ints), choices (quantization methods, attention backends, load
  formats), store_true flags and nargs, and the SGLANG_* environment variables sglang/srt/environ.py
  declares with the values each one's parser accepts.
* TGI 3.0.1 — by hand from docs/source/reference/launcher.md (the launcher's clap arguments and
  possible values) and the launcher's checks between them; ATTENTION values from the server's globals.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from functools import cache
from pathlib import Path

DATA = Path(__file__).parent / "data"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
# `vllm ...` or `<python> -m vllm.entrypoints.cli.main ...`
VLLM_PROGRAMS = (["vllm"], ["-m", "vllm.entrypoints.cli.main"])
TGI_QUANTIZE = ["awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin", "bitsandbytes", "bitsandbytes-nf4",
                "bitsandbytes-fp4", "fp8"]
TGI_ATTENTION = {"paged", "flashdecoding", "flashinfer"}


def generator(name: str):
    """scripts/<name>.py (gen_vllm_cli, gen_sglang_cli) as a module: the generator of a committed flag list."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def regenerate(engine: str, version: str) -> tuple[dict, dict] | str:
    """(what scripts/gen_<engine>_cli.py generates from the <engine>-<version> wheel, the committed
    tests/data/<engine>-*-cli.json), or why the wheel is not here to generate from."""
    script = generator(f"gen_{engine}_cli")
    wheel = script.find_wheel(version)
    if wheel is None:
        return (f"no {engine}-{version} wheel in {script.wheels_dir()} (set TOKENRIG_WHEELS, or run "
                f"scripts/gen_{engine}_cli.py once online)")
    (committed,) = DATA.glob(f"{engine}-*-cli.json")
    return script.generate(wheel), json.loads(committed.read_text())


class _Strict(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


@cache
def vllm_cli() -> dict:
    """The generated vLLM command-line description (one committed file, named by its version)."""
    (path,) = DATA.glob("vllm-*-cli.json")
    return json.loads(path.read_text())


def human_readable_int(value: str) -> int:
    """vllm/utils/argparse_utils.py human_readable_int: 1k = 1000, 1K = 1024, 25.6k; no decimals with K/M/G/T."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value.strip())
    if not match:
        return int(value)
    number, suffix = match.groups()
    if suffix.islower():
        return int(float(number) * 10 ** (3 * ("kmgt".index(suffix) + 1)))
    return int(number) * 2 ** (10 * ("KMGT".index(suffix) + 1))


def human_readable_int_or_auto(value: str) -> int:
    return -1 if value.strip() in ("-1", "auto", "AUTO", "Auto") else human_readable_int(value)


def json_or_str(value: str):
    """arg_utils.union_dict_and_str: JSON when it looks like an object, else the string."""
    return json.loads(value) if re.match(r"(?s)^\s*{.*}\s*$", value) else value


def check_config_fields(value: dict, schema: str, where: str) -> None:
    """vLLM's config dataclasses forbid unknown keys (config/utils.py: extra="forbid"); bools must be bools."""
    fields = vllm_cli()["json_config_fields"][schema]
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{where} must be a JSON object")
    for key, item in value.items():
        if key not in fields:
            raise argparse.ArgumentTypeError(f"{where}: {schema} has no field {key!r}")
        kind = fields[key]
        if isinstance(kind, str):
            check_config_fields(item, kind, f"{where}.{key}")
        elif kind == ["bool"] and not isinstance(item, bool):
            raise argparse.ArgumentTypeError(f"{where}.{key} must be true or false, got {item!r}")


TYPES = {"str": str, "int": int, "float": float, "custom": str, "human_int": human_readable_int,
         "human_int_or_auto": human_readable_int_or_auto, "json": json.loads, "json_or_str": json_or_str,
         "lower_underscore": lambda s: s.lower().replace("-", "_")}


def _argument_type(spec: dict):
    convert = TYPES[spec.get("type", "str")]
    if spec.get("schema"):
        def convert(value: str, schema=spec["schema"], flag=spec["flags"][0]):
            parsed = json.loads(value)
            check_config_fields(parsed, schema, flag)
            return parsed
    if spec.get("none_ok"):  # arg_utils.optional_type: "" and "None" mean None
        return lambda value, inner=convert: None if value in ("", "None") else inner(value)
    return convert


def build_parser(section: str) -> argparse.ArgumentParser:
    """A strict parser (no abbreviations, errors raise) for the generated `serve` or `bench_serve` section."""
    description = vllm_cli()[section]
    parser = _Strict(prog=description["prog"], allow_abbrev=False)
    for positional in description["positionals"]:
        parser.add_argument(positional["dest"], nargs=positional.get("nargs"))
    for spec in description["options"]:
        action = spec.get("action", "store")
        if action == "boolean_optional":
            parser.add_argument(*spec["flags"], dest=spec["dest"], action=argparse.BooleanOptionalAction)
        elif action == "store_true":
            parser.add_argument(*spec["flags"], dest=spec["dest"], action="store_true")
        else:
            kwargs = {key: spec[key] for key in ("nargs", "const") if key in spec}
            if "choices" in spec:
                kwargs["choices"] = spec["choices"]
            parser.add_argument(*spec["flags"], dest=spec["dest"], action=action, type=_argument_type(spec), **kwargs)
    return parser


def _expand_shorthands(arguments: list[str]) -> list[str]:
    """FlexibleArgumentParser's -O3 / -O=3 / -O 3 for --optimization-level."""
    out = []
    for index, arg in enumerate(arguments):
        if arg.startswith("-O") and arg != "-O":
            out += ["--optimization-level", arg[3:] if arg[2:3] == "=" else arg[2:]]
        elif arg == "-O" and index + 1 < len(arguments) and arguments[index + 1] in {"0", "1", "2", "3"}:
            out.append("--optimization-level")
        else:
            out.append(arg)
    return out


def _subcommand(command: list[str], words: list[str]) -> list[str]:
    """The arguments after `vllm <words>` or `<python> -m vllm.entrypoints.cli.main <words>`."""
    for program in VLLM_PROGRAMS:
        start = 0 if program == ["vllm"] else 1
        head = command[start:start + len(program) + len(words)]
        if head == program + words:
            return command[start + len(program) + len(words):]
    raise ValueError(f"not a `vllm {' '.join(words)}` command: {command[:5]}")


def check_vllm_env(env: dict[str, str]) -> None:
    """Every VLLM_* variable must be one vllm/envs.py reads, with a value it accepts."""
    known = vllm_cli()["env_vars"]
    for name, value in env.items():
        if not name.startswith("VLLM_"):
            continue
        if name not in known:
            raise ValueError(f"{name} is not an environment variable of vLLM {vllm_cli()['vllm_version']}")
        choices = known[name].get("choices")
        folded = value if known[name].get("case_sensitive", True) else value.lower()
        if choices and folded not in choices:
            raise ValueError(f"{name}={value} is not one of {choices}")
        if known[name].get("type") == "int" and not re.fullmatch(r"-?\d+", value):
            raise ValueError(f"{name}={value}: vLLM reads it with int()")


def parse_vllm(command: list[str], env: dict[str, str]) -> argparse.Namespace:
    """A `vllm serve` command line and its environment, with the checks vLLM makes right after parsing."""
    cli = vllm_cli()
    args = build_parser("serve").parse_args(_expand_shorthands(_subcommand(command, ["serve"])))
    if args.quantization is not None and args.quantization not in cli["quantization_methods"]:
        raise ValueError(f"--quantization {args.quantization} is not a vLLM quantization method")
    if args.load_format not in (None, *cli["load_formats"]):
        raise ValueError(f"--load-format {args.load_format} is not a vLLM load format")
    for spec in cli["serve"]["options"]:  # enum-valued flags, e.g. --attention-backend, --optimization-level
        value = getattr(args, spec["dest"])
        if "values" in spec and value is not None:
            folded = value.upper() if spec.get("values_case") == "upper" and value.lower() != "auto" else value
            if folded not in spec["values"]:
                raise ValueError(f"{spec['flags'][0]} {value} is not one of {spec['values']}")
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        raise ValueError("--gpu-memory-utilization must be in (0, 1]")  # config/cache.py: Field(gt=0, le=1)
    check_vllm_env(env)
    return args


def parse_vllm_bench_serve(command: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    """A `vllm bench serve` command line."""
    args = build_parser("bench_serve").parse_args(_subcommand(command, ["bench", "serve"]))
    check_vllm_env(env or {})
    return args


@cache
def sglang_cli() -> dict:
    """The generated SGLang command-line description (one committed file, named by its version)."""
    (path,) = DATA.glob("sglang-*-cli.json")
    return json.loads(path.read_text())


def sglang_human_readable_int(value: str) -> int:
    """sglang/srt/utils/common.py human_readable_int: 1k = 1000, 25.6k, 1Ki = 1024 (no decimals with Ki/Mi/Gi/Ti)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)", value.strip())
    if not match:
        return int(value)
    number, suffix = match.groups()
    if suffix.endswith("i"):
        if "." in number:
            raise argparse.ArgumentTypeError(f"no decimals with {suffix}")
        return int(number) * 2 ** (10 * ("KMGT".index(suffix[0]) + 1))
    return int(float(number) * 10 ** (3 * ("kMGT".index(suffix) + 1)))


SGLANG_TYPES = {"str": str, "int": int, "float": float, "human_int": sglang_human_readable_int,
                "nullable_str": lambda value: None if value.lower() == "none" else value}
SGLANG_PROGRAM = ["-m", "sglang.launch_server"]  # `<python> -m sglang.launch_server ...`
SGLANG_BOOLS = {"true", "1", "yes", "y", "false", "0", "no", "n"}  # environ.py EnvBool.parse, lower-cased


def sglang_parser() -> argparse.ArgumentParser:
    """A strict parser (no abbreviations, errors raise) for the generated `sglang.launch_server` options."""
    parser = _Strict(prog=sglang_cli()["launch_server"]["prog"], allow_abbrev=False)
    for spec in sglang_cli()["launch_server"]["options"]:
        action = spec.get("action")
        if action == "store_true":
            parser.add_argument(*spec["flags"], dest=spec["dest"], action="store_true")
        elif action == "custom":  # an argparse.Action class of SGLang's own (LoRA paths and the like)
            parser.add_argument(*spec["flags"], dest=spec["dest"], nargs="*")
        else:
            kwargs = {"nargs": spec["nargs"]} if spec.get("nargs") else {}
            if "choices" in spec:
                kwargs["choices"] = spec["choices"]
            parser.add_argument(*spec["flags"], dest=spec["dest"], type=SGLANG_TYPES[spec["type"]], **kwargs)
    return parser


def check_sglang_env(env: dict[str, str]) -> None:
    """Every SGLANG_* variable must be one environ.py declares, with a value its parser accepts."""
    known = sglang_cli()["env_vars"]
    for name, value in env.items():
        if not name.startswith("SGLANG_"):
            continue
        if name not in known:
            raise ValueError(f"{name} is not an environment variable of SGLang {sglang_cli()['sglang_version']}")
        kind = known[name]["type"]
        if kind == "bool" and value.lower() not in SGLANG_BOOLS:
            raise ValueError(f"{name}={value} is not a boolean SGLang reads")
        if kind == "int" and not re.fullmatch(r"-?\d+", value):
            raise ValueError(f"{name}={value}: SGLang reads it with int()")


def parse_sglang(command: list[str], env: dict[str, str]) -> argparse.Namespace:
    """A `python -m sglang.launch_server` command line and its environment."""
    if command[1:3] != SGLANG_PROGRAM:
        raise ValueError(f"not a `python -m sglang.launch_server` command: {command[:3]}")
    args = sglang_parser().parse_args(command[3:])
    check_sglang_env(env)
    return args


def tgi_launcher_parser() -> argparse.ArgumentParser:
    parser = _Strict(prog="text-generation-launcher", allow_abbrev=False)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--num-shard", type=int)
    parser.add_argument("--quantize", choices=TGI_QUANTIZE)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"])
    parser.add_argument("--max-input-tokens", type=int)
    parser.add_argument("--max-total-tokens", type=int)
    parser.add_argument("--max-batch-prefill-tokens", type=int)
    parser.add_argument("--max-batch-total-tokens", type=int)
    parser.add_argument("--max-concurrent-requests", type=int)
    parser.add_argument("--cuda-memory-fraction", type=float)
    parser.add_argument("--hostname")
    parser.add_argument("--port", "-p", type=int)
    return parser


def parse_tgi(arguments: list[str], env: dict[str, str]) -> argparse.Namespace:
    """TGI's launcher arguments (without the program name) plus the checks its launcher makes between them."""
    args = tgi_launcher_parser().parse_args(arguments)
    if args.dtype and args.quantize:
        raise ValueError("--dtype cannot be used with --quantize")
    if not args.max_input_tokens < args.max_total_tokens:
        raise ValueError("max_input_tokens must be < max_total_tokens")
    if args.max_batch_prefill_tokens < args.max_input_tokens:
        raise ValueError("max_batch_prefill_tokens must be >= max_input_tokens")
    if args.max_batch_total_tokens < max(args.max_total_tokens, args.max_batch_prefill_tokens):
        raise ValueError("max_batch_total_tokens must be >= max_total_tokens and max_batch_prefill_tokens")
    if env.get("ATTENTION", "paged") not in TGI_ATTENTION:
        raise ValueError(f"ATTENTION={env['ATTENTION']} is not one of {TGI_ATTENTION}")
    return args

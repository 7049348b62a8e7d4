"""Generate tests/data/sglang-<version>-cli.json: SGLang's server command line, environment variables and
Prometheus metrics, read from the SGLang wheel's source without importing it.

Targets SGLang 0.5.17 (tokenrig's pinned SGLANG_VERSION). Regenerate with

    python scripts/gen_sglang_cli.py [--wheel PATH] [--version 0.5.17]

which reads `sglang-<version>-*.whl` from --wheel, or from $TOKENRIG_WHEELS (default
~/.cache/tokenrig/wheels), downloading it there with `pip download --no-deps sglang==<version>` (a
manylinux_2_34 wheel: the platform is named) when absent. Its Python files are parsed with `ast`
(SGLang needs a CUDA build of torch to import) and SGLang's own argparse semantics are reproduced:

* `python -m sglang.launch_server`: sglang/srt/server_args.py ServerArgs.add_cli_args, which derives
  one flag per annotated field (`A[T, "help" | Arg(...)]`, sglang/srt/arg_groups/arg_utils.py
  add_cli_args_from_dataclass: the field name as --x-y unless Arg.cli_name, Arg.aliases, bool ->
  store_true, Literal -> choices, List -> nargs "+", Arg.choices, Arg.type_parser such as
  human_readable_int, Arg.no_cli skipped), then adds the flags it registers by hand (dynamic choices,
  --config, deprecated aliases).
* the environment variables sglang/srt/environ.py's `Envs` declares, with how each is parsed.
* the Prometheus metrics a unified (non-disaggregated) server always registers: the metrics created
  unconditionally in SchedulerMetricsCollector and TokenizerMetricsCollector
  (sglang/srt/observability/metrics_collector.py) with their type, help, label names, buckets and
  multiprocess mode; SGLang serves them in prometheus_client's multiprocess mode.

The output is deterministic and committed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

VERSION = "0.5.17"
ROOT = Path(__file__).resolve().parents[1]
SERVER_ARGS = "sglang/srt/server_args.py"
ENVIRON = "sglang/srt/environ.py"
COLLECTOR = "sglang/srt/observability/metrics_collector.py"
# the labels each collector is created with on a unified server without priorities or extra labels
# (SchedulerMetricsCollector.init_new, TokenizerManager.init_metric_collector_watchdog)
COLLECTOR_LABELS = {"SchedulerMetricsCollector": ["model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank"],
                    "TokenizerMetricsCollector": ["model_name", "engine_type"]}
PROMETHEUS_TYPES = {"Gauge": "gauge", "Counter": "counter", "Histogram": "histogram", "Summary": "summary"}
# arg_utils._infer_type_func and the type parsers server_args.py passes: name -> the reference parser's type
TYPE_PARSERS = {"int": "int", "float": "float", "str": "str", "human_readable_int": "human_int",
                "nullable_str": "nullable_str"}


def wheels_dir() -> Path:
    return Path(os.environ.get("TOKENRIG_WHEELS", Path.home() / ".cache" / "tokenrig" / "wheels"))


def find_wheel(version: str = VERSION, directory: Path | None = None) -> Path | None:
    return next(iter(sorted((directory or wheels_dir()).glob(f"sglang-{version}-*.whl"))), None)


def download_wheel(version: str, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_34_x86_64",
                    f"sglang=={version}", "-d", str(directory)], check=True)
    wheel = find_wheel(version, directory)
    if wheel is None:
        raise SystemExit(f"pip download left no sglang-{version} wheel in {directory}")
    return wheel


def _constants(module: ast.Module) -> dict[str, ast.expr]:
    """Module-level `NAME = <expr>` assignments."""
    return {target.id: node.value for node in module.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def _literal(node: ast.expr | None, names: dict[str, ast.expr]):
    """The value of a literal, of a name bound to one, of `[...] + NAME`, `sorted(set(...))` and
    `exponential_buckets(start, width, length)`; None where it is computed at run time."""
    if node is None:
        return None
    if isinstance(node, ast.Name) and node.id in names:
        return _literal(names[node.id], names)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left, names), _literal(node.right, names)
        return left + right if isinstance(left, list) and isinstance(right, list) else None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        args = [_literal(arg, names) for arg in node.args]
        keywords = {k.arg: _literal(k.value, names) for k in node.keywords}
        if node.func.id == "exponential_buckets":
            start, width, length = args or [keywords[k] for k in ("start", "width", "length")]
            return [start * width ** i for i in range(length)]
        if node.func.id == "generate_buckets" and len(args) == 2:  # server_args' rule is None: the default
            return sorted(set(args[1]))
        if node.func.id in ("sorted", "set", "list", "tuple") and len(args) == 1 and args[0] is not None:
            return sorted(set(args[0])) if node.func.id == "sorted" else list(args[0])
        return None
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return None
    if isinstance(value, set):
        return sorted(value)  # a set of choices: argparse checks membership, the order is not SGLang's
    return list(value) if isinstance(value, tuple) else value


class ServerArgsParser:
    """server_args.py's flags, as add_cli_args_from_dataclass and add_cli_args register them."""

    def __init__(self, module: ast.Module):
        self.module = module
        self.names = _constants(module)
        self.server_args = next(node for node in module.body
                                if isinstance(node, ast.ClassDef) and node.name == "ServerArgs")

    def options(self) -> list[dict]:
        options = [option for node in self.server_args.body if isinstance(node, ast.AnnAssign)
                   for option in self._field(node)]
        add_cli_args = next(node for node in self.server_args.body
                            if isinstance(node, ast.FunctionDef) and node.name == "add_cli_args")
        for call in ast.walk(add_cli_args):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument":
                options.append(self._manual(call))
        return options

    def _field(self, node: ast.AnnAssign) -> list[dict]:
        annotation = node.annotation
        if not (isinstance(annotation, ast.Subscript) and isinstance(annotation.value, ast.Name)
                and annotation.value.id == "A"):
            return []
        inner, *metadata = annotation.slice.elts
        arg = next((m for m in metadata if isinstance(m, ast.Call) and isinstance(m.func, ast.Name)
                    and m.func.id == "Arg"), None)
        if arg is None and not any(isinstance(m, ast.Constant) and isinstance(m.value, str) for m in metadata):
            return []  # no CLI metadata: skipped by add_cli_args_from_dataclass
        meta = {k.arg: k.value for k in (arg.keywords if arg else [])}
        if _literal(meta.get("no_cli"), self.names):
            return []
        name = node.target.id
        cli_name = _literal(meta.get("cli_name"), self.names) or "--" + name.replace("_", "-")
        entry: dict = {"flags": [cli_name, *(_literal(meta.get("aliases"), self.names) or [])], "dest": name}
        if "action" in meta:
            entry["action"] = "custom"
            return [entry]
        inner = self._unwrap_optional(inner)
        literal = self._literal_values(inner)
        type_parser = meta.get("type_parser")
        type_name = TYPE_PARSERS.get(type_parser.id, "str") if isinstance(type_parser, ast.Name) else None
        choices = _literal(meta.get("choices"), self.names)
        if literal is not None:
            entry["type"] = type_name or TYPE_PARSERS.get(type(literal[0]).__name__, "str")
            entry["choices"] = choices or literal
        elif self._is_list(inner) and type_parser is None:
            entry["type"] = TYPE_PARSERS.get(self._element_type(inner), "str")
            entry["nargs"] = _literal(meta.get("nargs"), self.names) or "+"
            if choices:
                entry["choices"] = choices
        elif isinstance(inner, ast.Name) and inner.id == "bool":
            entry["action"] = "store_true"
        else:
            entry["type"] = type_name or TYPE_PARSERS.get(ast.unparse(inner), "str")
            if choices:
                entry["choices"] = choices
            if "nargs" in meta:
                entry["nargs"] = _literal(meta["nargs"], self.names)
        return [entry]

    @staticmethod
    def _unwrap_optional(node: ast.expr) -> ast.expr:
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "Optional":
            return node.slice
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # X | None
            sides = [side for side in (node.left, node.right) if ast.unparse(side) != "None"]
            return sides[0] if len(sides) == 1 else node
        return node

    @staticmethod
    def _literal_values(node: ast.expr) -> list | None:
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "Literal":
            values = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            return [ast.literal_eval(value) for value in values]
        return None

    @staticmethod
    def _is_list(node: ast.expr) -> bool:
        return isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("List", "list")

    @staticmethod
    def _element_type(node: ast.Subscript) -> str:
        return ast.unparse(node.slice)

    def _manual(self, call: ast.Call) -> dict:
        keywords = {k.arg: k.value for k in call.keywords}
        flags = [arg.value for arg in call.args]
        entry: dict = {"flags": flags, "dest": _literal(keywords.get("dest"), self.names)
                       or flags[0].removeprefix("--").replace("-", "_")}
        action = keywords.get("action")
        if action is not None:
            action_name = _literal(action, self.names) if isinstance(action, ast.Constant) else ast.unparse(action)
            if action_name in ("store_true", "DeprecatedStoreTrueAction", "DeprecatedAction",
                               "DeprecatedStoreConstAction"):
                entry["action"] = "store_true"  # takes no value
                return entry
        type_node = keywords.get("type")
        entry["type"] = TYPE_PARSERS.get(type_node.id, "str") if isinstance(type_node, ast.Name) else "str"
        choices = _literal(keywords.get("choices"), self.names)
        if choices is not None:
            entry["choices"] = choices
        elif "choices" in keywords:
            entry["free_choices"] = True  # computed from a plug-in registry at run time: not checked here
        if "nargs" in keywords:
            entry["nargs"] = _literal(keywords["nargs"], self.names)
        return entry


def env_vars(module: ast.Module) -> dict[str, dict]:
    """environ.py's `Envs` fields: name -> how SGLang parses its value (EnvBool: true/1/yes/y or false/0/no/n)."""
    envs = next(node for node in module.body if isinstance(node, ast.ClassDef) and node.name == "Envs")
    out = {}
    for node in envs.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name):
            kind = node.value.func.id.removeprefix("Env").removesuffix("WithAlias").lower()
            for target in node.targets:
                out[target.id] = {"type": kind}
    return dict(sorted(out.items()))


def collector_metrics(module: ast.Module) -> list[dict]:
    """The metrics each of the two collectors creates unconditionally in its __init__ (`self.x = Gauge(...)`)."""
    metrics = []
    for cls_name, labels in COLLECTOR_LABELS.items():
        cls = next(node for node in module.body if isinstance(node, ast.ClassDef) and node.name == cls_name)
        init = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
        # names bound anywhere in __init__ (bucket lists, their `if bucket is None:` defaults)
        local = {target.id: node.value for node in ast.walk(init) if isinstance(node, ast.Assign)
                 for target in node.targets if isinstance(target, ast.Name)}
        for node in init.body:
            call = node.value if isinstance(node, ast.Assign) else None
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                    and call.func.id in PROMETHEUS_TYPES):
                continue
            keywords = {k.arg: k.value for k in call.keywords}
            entry = {"name": _literal(keywords["name"], local), "type": PROMETHEUS_TYPES[call.func.id],
                     "help": _literal(keywords["documentation"], local), "collector": cls_name,
                     "labels": labels + _extra_labels(keywords["labelnames"])}
            if "multiprocess_mode" in keywords:
                entry["multiprocess_mode"] = _literal(keywords["multiprocess_mode"], local)
            if entry["type"] == "histogram":
                entry["buckets"] = _literal(keywords.get("buckets"), local)
            metrics.append(entry)
    return metrics


def _extra_labels(node: ast.expr) -> list[str]:
    """The label names added to `labels.keys()`: `[*labels.keys(), "x"]` or `list(labels.keys()) + ["x"]`."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def generate(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as archive:
        def parse(path: str) -> ast.Module:
            return ast.parse(archive.read(path).decode())

        version = _constants(parse("sglang/_version.py"))["__version__"].value
        server_args = ServerArgsParser(parse(SERVER_ARGS))
        return {
            "sglang_version": version,
            "generated_by": "scripts/gen_sglang_cli.py",
            "wheel": wheel.name,
            "launch_server": {"prog": "python -m sglang.launch_server", "options": server_args.options()},
            "quantization_methods": _literal(server_args.names["QUANTIZATION_CHOICES"], server_args.names),
            "attention_backends": _literal(server_args.names["ATTENTION_BACKEND_CHOICES"], server_args.names),
            "load_formats": _literal(server_args.names["LOAD_FORMAT_CHOICES"], server_args.names),
            "env_vars": env_vars(parse(ENVIRON)),
            "metrics": collector_metrics(parse(COLLECTOR)),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", default=VERSION)
    parser.add_argument("--wheel", type=Path,
                        help="the sglang wheel (default: found or downloaded in $TOKENRIG_WHEELS)")
    parser.add_argument("--out", type=Path, help="default: tests/data/sglang-<version>-cli.json")
    args = parser.parse_args(argv)
    wheel = args.wheel or find_wheel(args.version) or download_wheel(args.version, wheels_dir())
    data = generate(wheel)
    if data["sglang_version"] != args.version:
        raise SystemExit(f"{wheel} is SGLang {data['sglang_version']}, not {args.version}")
    out = args.out or ROOT / "tests" / "data" / f"sglang-{args.version}-cli.json"
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}: {len(data['launch_server']['options'])} launch_server flags, {len(data['env_vars'])} env "
          f"vars, {len(data['metrics'])} metrics")


if __name__ == "__main__":
    main()

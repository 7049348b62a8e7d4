"""Generate tests/data/vllm-<version>-cli.json: the vLLM command line, read from vLLM's source without importing it.

Targets vLLM 0.26.0 (tokenrig's pinned VLLM_VERSION). Regenerate with

    python scripts/gen_vllm_cli.py [--wheel PATH] [--version 0.26.0]

which reads `vllm-<version>-*.whl` from --wheel, or from $TOKENRIG_WHEELS (default
~/.cache/tokenrig/wheels), downloading it there with `pip download --no-deps vllm==<version>` when
absent. The wheel's Python files are parsed with `ast` (vLLM needs a GPU build of torch to import),
and the argparse semantics of vLLM's own code are reproduced:

* `vllm serve`: vllm/entrypoints/openai/cli_args.py make_arg_parser (model_tag, --headless, ...,
  FrontendArgs' fields as --host/--port/... with its _customize_cli_kwargs), AsyncEngineArgs and
  vllm/engine/arg_utils.py EngineArgs.add_cli_args, whose `**x_kwargs["field"]` come from the config
  dataclasses through get_kwargs/_compute_kwargs: dataclass -> JSON, bool -> --x/--no-x
  (BooleanOptionalAction), Literal -> choices (a free string when str is also allowed), list/tuple/set
  -> nargs, max_model_len and a few token counts -> human-readable ints (1k, 2M), None -> "None" accepted.
  FlexibleArgumentParser's -O<n> shorthand is recorded as an alias of --optimization-level.
* `vllm bench serve`: vllm/benchmarks/serve.py add_cli_args and the dataset flags it adds
  (vllm/benchmarks/datasets/datasets.py add_dataset_parser).
* names vLLM checks after parsing: quantization methods (QuantizationMethods), load formats
  (LoadFormats), attention backends (AttentionBackendEnum, the --attention-backend values), the
  fields of the JSON configs (--compilation-config and its pass_config: unknown keys are refused).
* the environment variables vllm/envs.py defines, and the Prometheus metrics vLLM's V1 engine
  exports (vllm/v1/metrics/loggers.py, perf.py; counters are scraped with a `_total` suffix).

The output is deterministic (sorted where vLLM's order does not matter) and committed.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

VERSION = "0.26.0"
ROOT = Path(__file__).resolve().parents[1]
HUMAN_READABLE_INTS = {"max_num_batched_tokens", "max_num_scheduled_tokens", "kv_cache_memory_bytes",
                       "safetensors_prefetch_block_size"}  # arg_utils._compute_kwargs
DATACLASS_DECORATORS = {"config", "dataclass"}
ENUM_BASES = {"Enum", "IntEnum", "StrEnum"}
BUILTIN_TYPES = {"bool", "int", "float", "str", "dict", "list", "tuple", "set", "type", "bytes", "object"}


def wheels_dir() -> Path:
    return Path(os.environ.get("TOKENRIG_WHEELS", Path.home() / ".cache" / "tokenrig" / "wheels"))


def find_wheel(version: str = VERSION, directory: Path | None = None) -> Path | None:
    return next(iter(sorted((directory or wheels_dir()).glob(f"vllm-{version}-*.whl"))), None)


def download_wheel(version: str, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"vllm=={version}", "-d", str(directory)],
                   check=True)
    wheel = find_wheel(version, directory)
    if wheel is None:
        raise SystemExit(f"pip download left no vllm-{version} wheel in {directory}")
    return wheel


class Source:
    """vLLM's modules, parsed on demand from the wheel, and the names each one defines at runtime."""

    def __init__(self, wheel: Path):
        self.zip = zipfile.ZipFile(wheel)
        self.names = set(self.zip.namelist())
        self._modules: dict[str, ast.Module | None] = {}

    def module(self, name: str) -> ast.Module | None:
        if name not in self._modules:
            base = name.replace(".", "/")
            path = next((p for p in (f"{base}.py", f"{base}/__init__.py") if p in self.names), None)
            self._modules[name] = ast.parse(self.zip.read(path)) if path else None
        return self._modules[name]

    def path(self, name: str) -> str:
        base = name.replace(".", "/")
        return f"{base}.py" if f"{base}.py" in self.names else f"{base}/__init__.py"

    def symbols(self, name: str) -> dict[str, tuple]:
        """name -> ("import", module, name) | ("class", ClassDef) | ("def", FunctionDef) | ("value", expr);
        for `if TYPE_CHECKING:` the runtime branch wins, the type-checking one only fills gaps."""
        tree = self.module(name)
        table: dict[str, tuple] = {}
        fallback: dict[str, tuple] = {}
        package = name if self.path(name).endswith("__init__.py") else name.rsplit(".", 1)[0]

        def visit(statements, into):
            for node in statements:
                if isinstance(node, ast.ImportFrom):
                    source = node.module or ""
                    if node.level:
                        parts = package.split(".")
                        source = ".".join(parts[:len(parts) - node.level + 1] + ([source] if source else []))
                    for alias in node.names:
                        into[alias.asname or alias.name] = ("import", source, alias.name)
                elif isinstance(node, ast.ClassDef):
                    into[node.name] = ("class", node, name)
                elif isinstance(node, ast.FunctionDef):
                    into[node.name] = ("def", node, name)
                elif isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            into[target.id] = ("value", node.value, name)
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                    into[node.target.id] = ("value", node.value, name)
                elif isinstance(node, ast.If):
                    if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                        visit(node.body, fallback)
                        visit(node.orelse, into)
                    else:
                        visit(node.body, into)
                        visit(node.orelse, into)
                elif isinstance(node, ast.Try):
                    visit(node.body, into)

        if tree is not None:
            visit(tree.body, table)
        return {**fallback, **table}

    def resolve(self, module: str, name: str, depth: int = 0) -> tuple | None:
        """Follow imports to where `name` is defined; builtins and unknown modules give None."""
        entry = self.symbols(module).get(name)
        if entry is None and depth < 8 and self.module(f"{module}.{name}") is not None:
            return ("module", f"{module}.{name}")
        if entry is None or depth > 8:
            return None
        if entry[0] == "import":
            if not entry[1].startswith("vllm"):
                return ("external", entry[1], entry[2])
            return self.resolve(entry[1], entry[2], depth + 1)
        return entry


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return _dotted(node.func)
    return ""


class Types:
    """Config dataclasses' fields and what get_kwargs makes of their annotations."""

    def __init__(self, source: Source):
        self.source = source

    def class_kind(self, cls: ast.ClassDef, module: str) -> str:
        decorators = {_dotted(d).rsplit(".", 1)[-1] for d in cls.decorator_list}
        if decorators & DATACLASS_DECORATORS:
            return "dataclass"
        for base in cls.bases:
            name = _dotted(base).rsplit(".", 1)[-1]
            if name in ENUM_BASES:
                return "enum"
            found = self.source.resolve(module, _dotted(base)) if isinstance(base, ast.Name) else None
            if found and found[0] == "class" and self.class_kind(found[1], found[2]) in ("dataclass", "enum"):
                return self.class_kind(found[1], found[2])
        return "class"

    def fields(self, cls: ast.ClassDef, module: str) -> dict[str, tuple[ast.expr, str]]:
        """Dataclass fields in definition order, base classes first: name -> (annotation, module)."""
        out: dict[str, tuple[ast.expr, str]] = {}
        for base in cls.bases:
            found = self.source.resolve(module, _dotted(base)) if isinstance(base, ast.Name) else None
            if found and found[0] == "class":
                out.update(self.fields(found[1], found[2]))
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if "ClassVar" not in ast.unparse(node.annotation) and "InitVar" not in ast.unparse(node.annotation):
                    out[node.target.id] = (node.annotation, module)
        return out

    def enum_members(self, cls: ast.ClassDef) -> dict[str, object]:
        members = {}
        for node in cls.body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper():
                members[node.targets[0].id] = node.value.value if isinstance(node.value, ast.Constant) else None
        return members

    def hints(self, expr: ast.expr, module: str, depth: int = 0) -> list[tuple]:
        """typing's get_type_hints of arg_utils: Union/Optional/Annotated flattened into a list of hints."""
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return self.hints(ast.parse(expr.value, mode="eval").body, module, depth)
        if isinstance(expr, ast.Constant) and expr.value is None:
            return [("None",)]
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.BitOr):
            return self.hints(expr.left, module, depth) + self.hints(expr.right, module, depth)
        if isinstance(expr, ast.Subscript):
            origin = _dotted(expr.value).rsplit(".", 1)[-1]
            args = expr.slice.elts if isinstance(expr.slice, ast.Tuple) else [expr.slice]
            if origin == "Literal":
                return [("literal", tuple(v for a in args for v in self.literal_values(a, module)))]
            if origin in ("Union",):
                return [h for a in args for h in self.hints(a, module, depth)]
            if origin == "Optional":
                return self.hints(args[0], module, depth) + [("None",)]
            if origin == "Annotated":
                return self.hints(args[0], module, depth)
            if origin in ("list", "List", "Sequence"):
                return [("list", self.hints(args[0], module, depth))]
            if origin in ("set", "Set"):
                return [("set", self.hints(args[0], module, depth))]
            if origin in ("tuple", "Tuple"):
                ellipsis = any(isinstance(a, ast.Constant) and a.value is Ellipsis for a in args)
                return [("tuple", self.hints(args[0], module, depth), None if ellipsis else len(args))]
            if origin in ("dict", "Dict", "Mapping"):
                return [("dict",)]
            return [("other", origin)]
        name = _dotted(expr)
        if name in ("None",):
            return [("None",)]
        if name in BUILTIN_TYPES:
            return [(name,)]
        if isinstance(expr, ast.Name) and depth < 10:
            found = self.source.resolve(module, name)
            if found and found[0] == "value":
                return self.hints(found[1], found[2], depth + 1)
            if found and found[0] == "class":
                kind = self.class_kind(found[1], found[2])
                if kind == "enum":
                    members = self.enum_members(found[1])
                    ints = all(isinstance(v, int) for v in members.values())
                    values = tuple(str(v) for v in members.values()) if ints else tuple(members)
                    return [("enum", found[1].name, values)]
                return [(kind, found[1].name, found[2])]
        return [("other", name)]

    def literal_values(self, node: ast.expr, module: str) -> tuple:
        """Values of one Literal argument: a constant, or a Literal alias nested in it."""
        if isinstance(node, ast.Name):
            found = self.source.resolve(module, node.id)
            if found and found[0] == "value" and isinstance(found[1], ast.Subscript):
                return self.hints(found[1], found[2])[0][1]
        return (self.constant(node, module),)

    def constant(self, node: ast.expr, module: str):
        if isinstance(node, ast.Constant):
            return node.value
        found = self.source.resolve(module, _dotted(node)) if isinstance(node, ast.Name) else None
        if found and found[0] == "value":
            return self.constant(found[1], found[2])
        raise ValueError(f"not a constant in {module}: {ast.unparse(node)}")

    def kwargs(self, name: str, annotation: ast.expr, module: str) -> dict:
        """The argparse kwargs _compute_kwargs gives one field, in this file's vocabulary."""
        hints = self.hints(annotation, module)
        kinds = {h[0] for h in hints}
        none_ok = "None" in kinds
        out: dict = {}
        dataclass = next((h for h in hints if h[0] == "dataclass"), None)
        if dataclass:
            out = {"type": "json", "schema": dataclass[1]}
        elif kinds == {"bool", "str", "None"}:
            out = {"type": "str", "nargs": "?", "const": True}
        elif "bool" in kinds:
            out = {"action": "boolean_optional"}
        elif "literal" in kinds:
            options = next(h for h in hints if h[0] == "literal")[1]
            out = {"type": type(options[0]).__name__}
            out["metavar" if "str" in kinds else "choices"] = sorted(options)
        elif kinds & {"tuple", "list", "set"}:
            collection = next(h for h in hints if h[0] in ("tuple", "list", "set"))
            elements = collection[1]
            element_kinds = {h[0] for h in elements}
            if len(elements) > 1 or element_kinds & {"None"}:
                out = {"type": "str"}
            elif "literal" in element_kinds:
                options = elements[0][1]
                out = {"type": type(options[0]).__name__, "choices": sorted(options)}
            else:
                out = {"type": elements[0][0] if elements[0][0] in ("int", "float", "str", "bool") else "str"}
            out["nargs"] = "+" if collection[0] != "tuple" or collection[2] is None else collection[2]
        elif "int" in kinds:
            out = {"type": "human_int_or_auto" if name == "max_model_len"
                   else "human_int" if name in HUMAN_READABLE_INTS else "int"}
        elif "float" in kinds:
            out = {"type": "float"}
        elif "dict" in kinds and (kinds & {"str", "other", "enum", "class", "literal"}):
            out = {"type": "json_or_str"}
        elif "dict" in kinds:
            out = {"type": "json"}
        elif kinds & {"str", "other", "enum", "class"}:
            out = {"type": "str"}
            enum = next((h for h in hints if h[0] == "enum"), None)
            if enum:
                out["values"] = sorted(enum[2])
                out["values_from"] = enum[1]
        else:
            raise ValueError(f"unsupported type {hints} for {name}")
        if none_ok and "bool" not in kinds:
            out["none_ok"] = True
            if "choices" in out:
                out["choices"] = out["choices"] + ["None"]
        return out

    def get_kwargs(self, cls_name: str, module: str) -> dict[str, dict]:
        found = self.source.resolve(module, cls_name)
        if not found or found[0] != "class":
            raise ValueError(f"{cls_name} not found from {module}")
        return {name: {**self.kwargs(name, annotation, mod), "source": f"{found[1].name}.{name}"}
                for name, (annotation, mod) in self.fields(found[1], found[2]).items()}

    def schema(self, cls_name: str, module: str, seen: dict) -> None:
        """Fields of a JSON-valued config (and of the dataclasses nested in it) with the type each accepts."""
        found = self.source.resolve(module, cls_name)
        if found is None or found[0] != "class" or found[1].name in seen:
            return
        seen[found[1].name] = {}
        for name, (annotation, mod) in self.fields(found[1], found[2]).items():
            hints = self.hints(annotation, mod)
            nested = next((h for h in hints if h[0] == "dataclass"), None)
            if nested:
                seen[found[1].name][name] = nested[1]
                self.schema(nested[1], nested[2], seen)
            else:
                seen[found[1].name][name] = sorted({h[0] for h in hints})


class ParserReader:
    """Replays the argparse calls of a function's body (and the functions it calls) symbolically."""

    def __init__(self, source: Source, types: Types, module: str):
        self.source, self.types, self.module = source, types, module
        self.options: list[dict] = []
        self.positionals: list[dict] = []
        self.env: dict[str, object] = {}

    def value(self, node: ast.expr, module: str):
        """A constant (or list/dict keys) built from literals and module-level names."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            return [self.value(e, module) for e in node.elts]
        if isinstance(node, ast.Dict):
            return [self.value(k, module) for k in node.keys]
        if isinstance(node, ast.Call) and _dotted(node.func) == "list" and len(node.args) == 1:
            inner = node.args[0]
            if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) and inner.func.attr == "keys":
                return self.value(inner.func.value, module)
            return self.value(inner, module)
        if isinstance(node, ast.Name):
            found = self.source.resolve(module, node.id)
            if found and found[0] == "value":
                return self.value(found[1], found[2])
        if isinstance(node, ast.Call) and _dotted(node.func) == "float":
            return float(self.value(node.args[0], module))
        raise ValueError(f"cannot evaluate {ast.unparse(node)} in {module}")

    def type_name(self, node: ast.expr, module: str) -> str:
        name = _dotted(node)
        if name in ("int", "float", "str"):
            return name
        if name == "json.loads":
            return "json"
        if isinstance(node, ast.Call) and name == "optional_type":
            return self.type_name(node.args[0], module)
        if isinstance(node, ast.Lambda) and "lower()" in ast.unparse(node) and "replace" in ast.unparse(node):
            return "lower_underscore"
        return "custom"

    def entry(self, node: ast.expr, module: str) -> dict:
        """The kwargs dict a `**expr` stands for."""
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            return self.env[node.value.id][node.slice.value]
        if isinstance(node, ast.Name):
            return self.env[node.id]
        if isinstance(node, ast.Dict):
            merged: dict = {}
            for key, val in zip(node.keys, node.values):
                if key is None:
                    merged.update(self.entry(val, module))
            return merged
        raise ValueError(f"cannot read kwargs {ast.unparse(node)}")

    def add_argument(self, call: ast.Call, module: str) -> None:
        flags = [self.value(a, module) for a in call.args]
        spec: dict = {}
        for keyword in call.keywords:
            if keyword.arg is None:
                spec.update({k: v for k, v in self.entry(keyword.value, module).items() if k != "default"})
            elif keyword.arg == "action":
                action = _dotted(keyword.value) if not isinstance(keyword.value, ast.Constant) else keyword.value.value
                spec["action"] = {"argparse.BooleanOptionalAction": "boolean_optional"}.get(action, action)
            elif keyword.arg == "type":
                spec["type"] = self.type_name(keyword.value, module)
            elif keyword.arg in ("choices", "nargs", "const"):
                spec[keyword.arg] = self.value(keyword.value, module)
                if keyword.arg == "choices":
                    spec["choices"] = sorted(spec["choices"]) if isinstance(keyword.value, ast.Set) else spec["choices"]
        if flags and not flags[0].startswith("-"):
            self.positionals.append({"dest": flags[0], **{k: v for k, v in spec.items() if k != "source"}})
        else:
            self.options.append({"flags": flags, "dest": flags_dest(flags), **spec})

    def run(self, function: ast.FunctionDef, module: str) -> None:
        for node in function.body:
            self.statement(node, module)

    def statement(self, node: ast.stmt, module: str) -> None:
        if isinstance(node, ast.If):
            for inner in node.body:
                self.statement(inner, module)
            return
        if isinstance(node, ast.Assign):
            target, value = node.targets[0], node.value
            if isinstance(target, ast.Name) and isinstance(value, ast.Call) and _dotted(value.func) == "get_kwargs":
                self.env[target.id] = self.types.get_kwargs(_dotted(value.args[0]), module)
            elif isinstance(target, ast.Name) and isinstance(value, ast.Subscript) and \
                    isinstance(value.value, ast.Name) and value.value.id in self.env:
                self.env[target.id] = self.entry(value, module)
            elif isinstance(target, ast.Subscript):
                self.set_key(target, value, module)
            return
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Subscript):
            entry = self.subscript_owner(node.target)
            entry[node.target.slice.value] = entry[node.target.slice.value] + self.choices_expansion(node.value)
            return
        if isinstance(node, ast.Delete):
            for target in node.targets:
                self.subscript_owner(target).pop(target.slice.value, None)
            return
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            call = node.value
            if isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument":
                self.add_argument(call, module)
            elif isinstance(call.func, ast.Name):
                found = self.source.resolve(module, call.func.id)
                if found and found[0] == "def":
                    self.run(found[1], found[2])
            return
        if isinstance(node, ast.For):
            return  # the frontend's generic loop: handled by frontend_options

    def subscript_owner(self, target: ast.Subscript) -> dict:
        inner = target.value
        if isinstance(inner, ast.Subscript):
            return self.env[inner.value.id][inner.slice.value]
        return self.env[inner.id]

    def set_key(self, target: ast.Subscript, value: ast.expr, module: str) -> None:
        owner, key = self.subscript_owner(target), target.slice.value
        if key == "type":
            owner["type"] = self.type_name(value, module)
            owner.pop("schema", None)
        elif key == "action":
            owner["action"] = "append" if isinstance(value, ast.Constant) and value.value == "append" else "custom"
        elif key in ("metavar", "default", "help"):
            return
        else:
            owner[key] = self.value(value, module)

    def choices_expansion(self, node: ast.expr) -> list:
        """`[",".join(p) for p in permutations(get_args(Literal alias), r=2)]` (--collect-detailed-traces)."""
        text = ast.unparse(node)
        comprehension = node.generators[0] if isinstance(node, ast.ListComp) else None
        if comprehension is None or "permutations" not in text:
            raise ValueError(f"cannot expand {text}")
        alias = comprehension.iter.args[0].args[0].id
        options = self.types.hints(ast.Name(alias), self.module)[0][1]
        return [",".join(p) for p in itertools.permutations(options, r=2)]


def flags_dest(flags: list[str]) -> str:
    long = next((f for f in flags if f.startswith("--")), flags[0])
    return long.lstrip("-").replace("-", "_")


def frontend_options(source: Source, types: Types) -> list[dict]:
    """FrontendArgs.add_cli_args: every field as --field-name, after _customize_cli_kwargs (base class first)."""
    module = "vllm.entrypoints.openai.cli_args"
    kwargs = types.get_kwargs("FrontendArgs", module)
    reader = ParserReader(source, types, module)
    reader.env["frontend_kwargs"] = kwargs
    for class_name in ("BaseFrontendArgs", "FrontendArgs"):
        cls = source.symbols(module)[class_name][1]
        method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_customize_cli_kwargs")
        for node in method.body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript):
                target = node.targets[0]
                if isinstance(target.value, ast.Subscript) and target.value.slice.value in kwargs:
                    reader.set_key(target, node.value, module)
            elif isinstance(node, (ast.Delete, ast.If)):
                for inner in (node.body if isinstance(node, ast.If) else [node]):
                    if isinstance(inner, ast.Delete):
                        reader.statement(inner, module)
    options = []
    for name, spec in kwargs.items():
        if spec.get("action") == "custom":  # --lora-modules: LoRAParserAction, one or more name=path / JSON
            spec = {"type": "str", "nargs": "+", "source": spec["source"]}
        flags = spec.pop("flags", [])
        options.append({"flags": [*flags, f"--{name.replace('_', '-')}"], "dest": name, **spec})
    return options


def serve_parser(source: Source, types: Types) -> dict:
    module = "vllm.entrypoints.openai.cli_args"
    reader = ParserReader(source, types, module)
    make = source.symbols(module)["make_arg_parser"][1]
    for node in make.body:
        if isinstance(node, ast.Expr):
            reader.statement(node, module)
    frontend = frontend_options(source, types)
    arg_utils = "vllm.engine.arg_utils"
    classes = source.symbols(arg_utils)
    for class_name in ("EngineArgs", "AsyncEngineArgs"):
        method = next(n for n in classes[class_name][1].body
                      if isinstance(n, ast.FunctionDef) and n.name == "add_cli_args")
        engine = ParserReader(source, types, arg_utils)
        engine.run(method, arg_utils)
        reader.options += engine.options
    options = reader.options[:4] + frontend + reader.options[4:]
    validator = source.zip.read(source.path("vllm.config.attention")).decode()
    if 'value.lower() == "auto"' not in validator or "AttentionBackendEnum[value.upper()]" not in validator:
        raise SystemExit("AttentionConfig.validate_backend_before changed: re-check --attention-backend values")
    for option in options:
        if option["dest"] == "attention_backend":  # config/attention.py validate_backend_before
            option["values"] = ["auto", *option["values"]]
            option["values_case"] = "upper"
        if option["dest"] == "optimization_level":
            option["shorthand"] = "-O"  # FlexibleArgumentParser: -O3, -O=3, -O 3 -> --optimization-level 3
    return {"prog": "vllm serve", "positionals": reader.positionals, "options": options}


def bench_serve_parser(source: Source, types: Types) -> dict:
    module = "vllm.benchmarks.serve"
    reader = ParserReader(source, types, module)
    reader.run(source.symbols(module)["add_cli_args"][1], module)
    return {"prog": "vllm bench serve", "positionals": reader.positionals, "options": reader.options}


def literal_alias(source: Source, types: Types, module: str, name: str) -> list:
    return list(types.hints(ast.Name(name), module)[0][1])


def env_vars(source: Source) -> dict[str, dict]:
    """vllm/envs.py's environment_variables: name -> how its value is read ("choices", "int" or "str")."""
    table = source.symbols("vllm.envs")["environment_variables"][1]
    out = {}
    for key, reader in sorted(zip(table.keys, table.values), key=lambda kv: kv[0].value):
        text = ast.unparse(reader)
        if isinstance(reader, ast.Call) and _dotted(reader.func) == "env_with_choices":
            choices = reader.args[2]
            out[key.value] = {"choices": [c.value for c in choices.elts]} if isinstance(choices, ast.List) else {}
            case = next((k.value.value for k in reader.keywords if k.arg == "case_sensitive"), True)
            if not case and out[key.value]:
                out[key.value]["case_sensitive"] = False
        elif text.startswith("lambda: bool(int(os.getenv(") or text.startswith("lambda: int(os.getenv("):
            out[key.value] = {"type": "int"}
        else:
            out[key.value] = {"type": "str"}
    return out


def metrics(source: Source) -> dict[str, list[str]]:
    """Prometheus metrics the V1 engine registers: vllm:* names by type (self._gauge_cls(name=...) etc.)."""
    found: dict[str, set[str]] = {"gauge": set(), "counter": set(), "histogram": set()}
    for module in ("vllm.v1.metrics.loggers", "vllm.v1.metrics.perf", "vllm.v1.spec_decode.metrics"):
        for node in ast.walk(source.module(module)):
            if not isinstance(node, ast.Call):
                continue
            name = next((k.value.value for k in node.keywords if k.arg == "name" and isinstance(k.value, ast.Constant)),
                        None)
            kind = next((t for t in found if t in _dotted(node.func).lower()), None)
            if name and kind and name.startswith("vllm:"):
                found[kind].add(name)
            # name=<variable>: `name = "vllm:..."` (cache_config_info) or the ("vllm:...", doc) pairs a
            # comprehension loops over (spec decode)
            variable = next((k.value.id for k in node.keywords if k.arg == "name" and isinstance(k.value, ast.Name)),
                            None)
            if kind and variable:
                assigned = [n.value.value for n in ast.walk(source.module(module)) if isinstance(n, ast.Assign)
                            and any(isinstance(t, ast.Name) and t.id == variable for t in n.targets)
                            and isinstance(n.value, ast.Constant) and str(n.value.value).startswith("vllm:")]
                pairs = [n.elts[0].value for n in ast.walk(source.module(module)) if isinstance(n, ast.Tuple)
                         and len(n.elts) == 2 and isinstance(n.elts[0], ast.Constant)
                         and str(n.elts[0].value).startswith("vllm:")]
                found[kind].update(assigned or pairs)
    return {f"{kind}s": sorted(names) for kind, names in found.items()}


def generate(wheel: Path) -> dict:
    source = Source(wheel)
    version = source.symbols("vllm._version")["__version__"][1].value if source.module("vllm._version") else None
    types = Types(source)
    schemas: dict = {}
    for name in ("CompilationConfig", "AttentionConfig"):
        types.schema(name, "vllm.config", schemas)
    quant = "vllm.model_executor.layers.quantization"
    registry = source.symbols("vllm.v1.attention.backends.registry")["AttentionBackendEnum"][1]
    return {
        "vllm_version": version,
        "generated_by": "scripts/gen_vllm_cli.py",
        "wheel": wheel.name,
        "serve": serve_parser(source, types),
        "bench_serve": bench_serve_parser(source, types),
        "quantization_methods": literal_alias(source, types, quant, "QuantizationMethods"),
        "load_formats": literal_alias(source, types, "vllm.model_executor.model_loader", "LoadFormats"),
        "attention_backends": list(types.enum_members(registry)),
        "json_config_fields": schemas,
        "env_vars": env_vars(source),
        "metrics": metrics(source),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", default=VERSION)
    parser.add_argument("--wheel", type=Path, help="the vllm wheel (default: found or downloaded in $TOKENRIG_WHEELS)")
    parser.add_argument("--out", type=Path, help="default: tests/data/vllm-<version>-cli.json")
    args = parser.parse_args(argv)
    wheel = args.wheel or find_wheel(args.version) or download_wheel(args.version, wheels_dir())
    data = generate(wheel)
    if data["vllm_version"] != args.version:
        raise SystemExit(f"{wheel} is vLLM {data['vllm_version']}, not {args.version}")
    out = args.out or ROOT / "tests" / "data" / f"vllm-{args.version}-cli.json"
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}: {len(data['serve']['options'])} serve flags, {len(data['bench_serve']['options'])} bench "
          f"serve flags, {len(data['env_vars'])} env vars")


if __name__ == "__main__":
    main()

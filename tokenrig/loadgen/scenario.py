"""Serving scenarios: YAML files validated into typed objects, with errors that name the line.

A scenario is a weighted mix of request classes (API, input/output length distributions,
prompt source: synthetic, a prompt file or a ShareGPT-format conversation file; optional
multi-turn conversations and shared prefixes) and a load plan (closed-loop concurrency, an
open-loop arrival process with optional stages, or a trace to replay; duration,
warm-up/cool-down). Data files named in a scenario (traces, prompt files) resolve relative to
the shipped scenarios directory (tokenrig/scenarios/).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import random
import secrets
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tokenrig.errors import UserError
from tokenrig.paths import SCENARIOS, SERVING_SCENARIOS


def resolve_data_path(path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else SCENARIOS / candidate


@functools.lru_cache(maxsize=32)
def column_values(path: str, column: str) -> tuple[float, ...]:
    """One numeric column of a CSV (by header) or a JSONL file (by field), read once per process."""
    file = resolve_data_path(path)
    if not file.exists():
        raise ValueError(f"file {file} does not exist")
    with file.open(newline="") as handle:
        rows: Iterable[dict]
        if file.suffix == ".jsonl":
            rows = (json.loads(line) for line in handle if line.strip())
        else:
            rows = csv.DictReader(handle)
        try:
            values = tuple(float(row[column]) for row in rows)
        except KeyError:
            raise ValueError(f"{file.name} has no column {column!r}") from None
    if not values:
        raise ValueError(f"{file.name} has no rows")
    return values


class ScenarioError(UserError, ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Fixed(_Strict):
    dist: Literal["fixed"]
    value: int = Field(ge=1)

    def sample(self, rng: random.Random) -> int:
        return self.value


class Uniform(_Strict):
    dist: Literal["uniform"]
    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min > self.max:
            raise ValueError("min must be <= max")
        return self

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.min, self.max)


class Normal(_Strict):
    dist: Literal["normal"]
    mean: float = Field(gt=0)
    std: float = Field(ge=0)
    min: int = Field(default=1, ge=1)
    max: int | None = None

    def sample(self, rng: random.Random) -> int:
        return _clamp(round(rng.gauss(self.mean, self.std)), self.min, self.max)


class LogNormal(_Strict):
    """Parameterised by its median and the sigma of log(length), the way traces are summarised."""

    dist: Literal["lognormal"]
    median: float = Field(gt=0)
    sigma: float = Field(ge=0)
    min: int = Field(default=1, ge=1)
    max: int | None = None

    def sample(self, rng: random.Random) -> int:
        return _clamp(round(rng.lognormvariate(math.log(self.median), self.sigma)), self.min, self.max)


class Empirical(_Strict):
    """Lengths drawn from a column of a trace (CSV header or JSONL field), e.g. a public trace."""

    dist: Literal["empirical"]
    file: str
    column: str
    scale: float = Field(default=1.0, gt=0, description="multiply every drawn length (to shrink a trace)")
    min: int = Field(default=1, ge=1)
    max: int | None = None

    @model_validator(mode="after")
    def _readable(self):
        column_values(self.file, self.column)  # fail at load time, naming the field
        return self

    def sample(self, rng: random.Random) -> int:
        return _clamp(round(rng.choice(column_values(self.file, self.column)) * self.scale), self.min, self.max)


def _clamp(value: int, low: int, high: int | None) -> int:
    value = max(value, low)
    return min(value, high) if high is not None else value


LengthDist = Annotated[Union[Fixed, Uniform, Normal, LogNormal, Empirical], Field(discriminator="dist")]


class SyntheticPrompt(_Strict):
    """Random words of the served model's own vocabulary: exactly `input_tokens` tokens."""

    source: Literal["synthetic"] = "synthetic"


class FilePrompt(_Strict):
    """Prompts read from a file: one per line (.txt) or a field of each JSON line (.jsonl)."""

    source: Literal["file"]
    path: str
    field: str = "prompt"

    @model_validator(mode="after")
    def _readable(self):
        if not self.prompts():
            raise ValueError(f"no prompts in {resolve_data_path(self.path)}")
        return self

    def prompts(self) -> tuple[str, ...]:
        return _prompt_lines(self.path, self.field)


@functools.lru_cache(maxsize=8)
def _prompt_lines(path: str, field: str) -> tuple[str, ...]:
    file = resolve_data_path(path)
    if not file.exists():
        raise ValueError(f"prompt file {file} does not exist")
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if file.suffix == ".jsonl":
        try:
            return tuple(str(json.loads(line)[field]) for line in lines)
        except KeyError:
            raise ValueError(f"{file.name}: a line has no field {field!r}") from None
    return tuple(lines)


SHAREGPT_USER, SHAREGPT_ASSISTANT = ("human", "user"), ("gpt", "assistant", "chatgpt")


class ShareGptPrompt(_Strict):
    """Conversations of a ShareGPT-format JSON file (a list of {"conversations": [{"from": ..., "value": ...}]}),
    read as vllm bench serve's sharegpt dataset reads them: the first human turn is the prompt, and the gpt turn
    after it sets the output length (its tokens, counted with the run's tokenizer) unless output_tokens is given.
    Conversations without such a pair are skipped."""

    source: Literal["sharegpt"]
    path: str

    @model_validator(mode="after")
    def _readable(self):
        self.pairs()  # fail at load time, naming the file
        return self

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """(prompt, reply) of every usable conversation, in file order."""
        return _sharegpt_pairs(self.path)


@functools.lru_cache(maxsize=4)
def _sharegpt_pairs(path: str) -> tuple[tuple[str, str], ...]:
    file = resolve_data_path(path)
    if not file.is_file():
        raise ValueError(f"ShareGPT file {file} does not exist")
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file.name} is not JSON ({error})") from None
    if not isinstance(data, list):
        raise ValueError(f"{file.name}: a ShareGPT file is a JSON list of {{\"conversations\": [...]}} entries")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        turns = [turn for turn in turns or []
                 if isinstance(turn, dict) and isinstance(turn.get("value"), str) and turn["value"].strip()]
        asked = next((n for n, t in enumerate(turns) if t.get("from") in SHAREGPT_USER), None)
        if asked is None:
            continue
        reply = next((t for t in turns[asked + 1:] if t.get("from") in SHAREGPT_ASSISTANT), None)
        if reply is not None:
            pairs.append((turns[asked]["value"], reply["value"]))
    if not pairs:
        raise ValueError(f"{file.name}: no conversation has a human turn followed by a gpt turn (entries: "
                         '{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]})')
    return tuple(pairs)


PromptSource = Annotated[Union[SyntheticPrompt, FilePrompt, ShareGptPrompt], Field(discriminator="source")]


class Conversation(_Strict):
    """Multi-turn: each turn sends the whole history (earlier prompts and the replies received)
    plus a new user message of `input_tokens`; the next turn goes out after the previous reply."""

    turns: LengthDist
    think_time_s: float = Field(default=0.0, ge=0, description="pause between a reply and the next turn")


class SharedPrefix(_Strict):
    """A pool of shared prompt prefixes (system prompts, retrieved documents). Each request, with
    probability `hit_ratio`, reuses a prefix already sent (a prefix-cache hit on the server);
    otherwise it sends a new prefix, which joins the pool (the oldest leaves once it is full)."""

    tokens: int = Field(ge=1, description="prefix length; the prompt is prefix + input_tokens")
    pool_size: int = Field(default=16, ge=1)
    hit_ratio: float = Field(ge=0, le=1)


class RequestClass(_Strict):
    name: str
    weight: float = Field(default=1.0, gt=0)
    api: Literal["chat", "completions"] = "chat"
    prompt: PromptSource = Field(default_factory=SyntheticPrompt)
    input_tokens: LengthDist | None = None
    output_tokens: LengthDist | None = None
    temperature: float = 0.0
    conversation: Conversation | None = None
    shared_prefix: SharedPrefix | None = None


class Stage(_Strict):
    """An open-loop stage: `rate` req/s for `duration_s`; with `ramp`, the rate climbs linearly
    from the previous stage's rate (0 for the first) to `rate`."""

    duration_s: float = Field(gt=0)
    rate: float = Field(ge=0)
    ramp: bool = False


class TraceReplay(_Strict):
    """Arrival times and token lengths from a trace: Azure LLM inference CSV or Mooncake JSONL."""

    path: str
    format: Literal["azure", "mooncake"] | None = Field(default=None, description="default: from the file suffix")
    speedup: float = Field(default=1.0, gt=0, description="replay k times faster (inter-arrival times / k)")
    start_s: float = Field(default=0.0, ge=0, description="skip this many trace seconds")
    length_scale: float = Field(default=1.0, gt=0, description="multiply token lengths (and Mooncake's block size)")
    spread_buckets: bool = Field(default=True, description="Mooncake: spread each ~3-s timestamp bucket's requests "
                                                           "uniformly over the bucket instead of sending them at once")

    @model_validator(mode="after")
    def _exists(self):
        if not resolve_data_path(self.path).exists():
            raise ValueError(f"trace file {resolve_data_path(self.path)} does not exist")
        if self.format is None:
            self.format = "mooncake" if self.path.endswith(".jsonl") else "azure"
        return self


OPEN_LOOP_TYPES = ("poisson", "constant", "gamma")
CLOSED_LOOP_TYPES = ("concurrency", "throughput")  # each user sends its next request when its last one ends
# what shapes a load besides its type: reset when a load becomes another kind (as_open_loop, as_closed_loop, ...)
LOAD_SHAPE_RESET = {"rate": None, "stages": None, "trace": None, "ramp_s": 0}


class LoadPlanSpec(_Strict):
    """concurrency: `users` loop back-to-back, their first requests due evenly over `ramp_s`.
    poisson/constant/gamma: open loop at `rate` req/s (or through `stages`); gamma's `burstiness` is the
    coefficient of variation of inter-arrival times (1 = Poisson, >1 burstier, <1 more regular).
    trace: arrivals and lengths from `trace`. throughput (--rate inf): saturate the server, `users`
    (default `max_in_flight`) requests sent at once and each replaced the moment it ends; its figures are
    throughput, its latencies include the server's queue."""

    type: Literal["concurrency", "poisson", "constant", "gamma", "trace", "throughput"] = "concurrency"
    users: int | None = Field(default=None, ge=1)
    ramp_s: float = Field(default=0, ge=0, description="concurrency: spread the users' first requests evenly over "
                                                       "this many seconds (0: all at once, in lockstep)")
    rate: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # as fast as possible: type throughput
    burstiness: float = Field(default=1.0, gt=0)
    stages: list[Stage] | None = None
    trace: TraceReplay | None = None
    duration_s: float = Field(default=60, gt=0)
    warmup_s: float = Field(default=0, ge=0)
    cooldown_s: float = Field(default=0, ge=0)
    max_in_flight: int = Field(default=512, ge=1, description="open-loop safety cap on concurrent requests; "
                                                              "a throughput plan's requests in flight")
    seed: int = Field(default=0, description="arrivals and prompts; a run draws a fresh one unless the scenario "
                                             "or --seed gives it")

    @model_validator(mode="after")
    def _consistent(self):
        if self.type == "concurrency" and not self.users:
            raise ValueError("a concurrency plan needs users")
        if self.type == "throughput" and not self.users:
            self.users = self.max_in_flight
        if self.ramp_s and self.type != "concurrency":
            raise ValueError("ramp_s spreads a concurrency plan's users; an open-loop plan ramps through stages")
        if self.type in OPEN_LOOP_TYPES and not self.rate and not self.stages:
            raise ValueError(f"a {self.type} plan needs rate (requests/s) or stages")
        if self.stages is not None:
            if self.type not in OPEN_LOOP_TYPES:
                raise ValueError("stages go with an open-loop plan (poisson, constant or gamma)")
            if not self.stages or not any(stage.rate for stage in self.stages):
                raise ValueError("stages need at least one stage with a rate > 0")
            self.duration_s = sum(stage.duration_s for stage in self.stages)
        if self.type == "trace" and self.trace is None:
            raise ValueError("a trace plan needs trace: {path: ...}")
        if self.warmup_s + self.cooldown_s >= self.duration_s:
            raise ValueError("warmup_s + cooldown_s must be shorter than duration_s")
        return self

    # The reshaping copies are not validated: the caller validates the load it ends with, once every field is set.
    def as_open_loop(self, rate: float, arrival: str | None = None, **fields) -> LoadPlanSpec:
        """This load as an open loop at `rate` requests/s with `arrival`'s process (by default its own when it is
        one, else Poisson); its stages, trace and closed-loop ramp dropped, `fields` set."""
        arrival = arrival or (self.type if self.type in OPEN_LOOP_TYPES else "poisson")
        return self.model_copy(update={**LOAD_SHAPE_RESET, "type": arrival, "rate": rate, **fields})

    def as_closed_loop(self, users: int, **fields) -> LoadPlanSpec:
        """This load as `users` users in a closed loop (its ramp kept); its rate, stages and trace dropped."""
        return self.model_copy(update={**LOAD_SHAPE_RESET, "type": "concurrency", "users": users,
                                       "ramp_s": self.ramp_s, **fields})

    def as_throughput(self) -> LoadPlanSpec:
        """This load as the throughput mode (--rate inf): its streams are its max_in_flight once validated."""
        return self.model_copy(update={**LOAD_SHAPE_RESET, "type": "throughput", "users": None})


class Scenario(_Strict):
    name: str
    description: str = ""
    source: str = Field(default="", description="where the lengths come from (citation)")
    requests: list[RequestClass] = Field(min_length=1)
    load: LoadPlanSpec

    @model_validator(mode="after")
    def _lengths_given(self):
        trace = self.load.type == "trace"
        for request_class in self.requests:
            needs_input = isinstance(request_class.prompt, SyntheticPrompt)
            if trace and (request_class.input_tokens or request_class.output_tokens):
                raise ValueError(f"request class {request_class.name!r}: a trace plan takes token lengths from "
                                 "the trace; remove input_tokens/output_tokens")
            from_data = isinstance(request_class.prompt, ShareGptPrompt)  # the gpt turn gives the output length
            if not trace and request_class.output_tokens is None and not from_data:
                raise ValueError(f"request class {request_class.name!r} needs output_tokens")
            if not trace and needs_input and request_class.input_tokens is None:
                raise ValueError(f"request class {request_class.name!r} needs input_tokens (synthetic prompts)")
            if trace and (request_class.conversation or request_class.shared_prefix or not needs_input):
                raise ValueError(f"request class {request_class.name!r}: a trace plan sends single synthetic "
                                 "prompts built from the trace (its prefix hashes give the prefix reuse)")
        return self

    def mean_tokens(self, lengths: Literal["input_tokens", "output_tokens"], samples: int = 2000) -> float | None:
        """Mean prompt or output tokens of a request over the classes' weights, sampled from their length
        distributions; None where a class has none (prompts from files, lengths from a trace)."""
        classes = [(c.weight, getattr(c, lengths)) for c in self.requests]
        if any(dist is None for _, dist in classes):
            return None
        rng, total = random.Random(0), sum(weight for weight, _ in classes)
        return sum(weight / total * statistics.fmean(dist.sample(rng) for _ in range(samples))
                   for weight, dist in classes)


def with_run_seed(load: LoadPlanSpec, seed: int | None) -> tuple[LoadPlanSpec, str]:
    """The load plan with the seed this run uses, and where it came from: --seed, the scenario file, or a
    fresh random one. Repeating a seed repeats the prompts, and a server's prefix cache then serves them
    from cache, so runs draw fresh prompts unless asked to repeat."""
    if seed is not None:
        return load.model_copy(update={"seed": seed}), "--seed"
    if "seed" in load.model_fields_set:
        return load, "scenario"
    return load.model_copy(update={"seed": secrets.randbelow(2**31)}), "random"


def _line_of(node: yaml.Node, location: tuple) -> int | None:
    line = node.start_mark.line + 1
    for key in location:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            match = node.value[key]
        else:
            match = None
        if match is None:
            break
        node, line = match, match.start_mark.line + 1
    return line


def parse_scenario(text: str, origin: str = "<scenario>") -> Scenario:
    try:
        data = yaml.safe_load(text)
        tree = yaml.compose(text)
    except yaml.YAMLError as error:
        raise ScenarioError(f"{origin}: not valid YAML: {error}") from None
    try:
        return Scenario.model_validate(data)
    except ValidationError as error:
        lines = []
        for issue in error.errors():
            location = tuple(issue["loc"])
            field = ".".join(str(part) for part in location) or "(top level)"
            lines.append(f"{origin}:{_line_of(tree, location) if tree else '?'}: {field}: {issue['msg']}")
        raise ScenarioError("invalid scenario\n" + "\n".join(lines)) from None


def known_scenarios() -> list[str]:
    return sorted(path.stem for path in SERVING_SCENARIOS.glob("*.yaml"))


def load_scenario(name_or_path: str) -> Scenario:
    path = Path(name_or_path)
    if not path.suffix:
        path = SERVING_SCENARIOS / f"{name_or_path}.yaml"
    if not path.exists():
        raise ScenarioError(f"no scenario {name_or_path!r}; shipped scenarios: {', '.join(known_scenarios())} "
                            "(or give a path to a .yaml file)")
    return parse_scenario(path.read_text(), str(path))

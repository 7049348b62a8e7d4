"""Serving scenarios: YAML files validated into typed objects, with errors that name the line.

A scenario is a weighted mix of request classes (API, input/output length distributions) and
a load plan (closed-loop concurrency or an open-loop arrival rate, duration, warm-up/cool-down).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "scenarios" / "serving"


class ScenarioError(ValueError):
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


def _clamp(value: int, low: int, high: int | None) -> int:
    value = max(value, low)
    return min(value, high) if high is not None else value


LengthDist = Annotated[Union[Fixed, Uniform, Normal, LogNormal], Field(discriminator="dist")]


class RequestClass(_Strict):
    name: str
    weight: float = Field(default=1.0, gt=0)
    api: Literal["chat", "completions"] = "chat"
    input_tokens: LengthDist
    output_tokens: LengthDist
    temperature: float = 0.0


class LoadPlanSpec(_Strict):
    """closed: `users` loop back-to-back; poisson/constant: open loop at `rate` req/s."""

    type: Literal["concurrency", "poisson", "constant"] = "concurrency"
    users: int | None = Field(default=None, ge=1)
    rate: float | None = Field(default=None, gt=0)
    duration_s: float = Field(default=60, gt=0)
    warmup_s: float = Field(default=0, ge=0)
    cooldown_s: float = Field(default=0, ge=0)
    max_in_flight: int = Field(default=512, ge=1, description="open-loop safety cap on concurrent requests")
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self):
        if self.type == "concurrency" and not self.users:
            raise ValueError("a concurrency plan needs users")
        if self.type != "concurrency" and not self.rate:
            raise ValueError(f"a {self.type} plan needs rate (requests/s)")
        if self.warmup_s + self.cooldown_s >= self.duration_s:
            raise ValueError("warmup_s + cooldown_s must be shorter than duration_s")
        return self


class Scenario(_Strict):
    name: str
    description: str = ""
    source: str = Field(default="", description="where the lengths come from (citation)")
    requests: list[RequestClass] = Field(min_length=1)
    load: LoadPlanSpec


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
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str) -> Scenario:
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ScenarioError(f"no scenario {name_or_path!r}; shipped scenarios: {', '.join(known_scenarios())} "
                            "(or give a path to a .yaml file)")
    return parse_scenario(path.read_text(), str(path))

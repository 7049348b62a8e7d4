"""`loadtest --data`: a scenario's requests from data its user already has, in place of the scenario's own.

Either a ShareGPT-format JSON file (the conversations `vllm bench serve --dataset-name sharegpt` reads) or
inline synthetic lengths in GuideLLM's words: `prompt_tokens=512,output_tokens=128`, each optionally with
`_stdev` (a normal distribution around it) and `_min`/`_max` (its bounds). The load stays the scenario's
(and the command line's). Every refusal is one UsageError line naming --data.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from tokenrig.errors import UsageError
from tokenrig.loadgen.scenario import RequestClass, Scenario

LENGTHS = ("prompt_tokens", "output_tokens")
BOUNDS = ("_stdev", "_min", "_max")
SYNTHETIC_KEYS = tuple(f"{length}{suffix}" for length in LENGTHS for suffix in ("", *BOUNDS))
# GuideLLM's names -> the scenario's
SCENARIO_FIELDS = {"prompt_tokens": "input_tokens", "output_tokens": "output_tokens"}


def with_data(scenario: Scenario, data: str) -> Scenario:
    """`scenario` sending the requests `data` describes (one request class, chat API), under the data's name."""
    if "=" in data:
        name, request = "synthetic", {"name": "synthetic", **_synthetic_lengths(data)}
    else:
        path = Path(data).expanduser().resolve()  # scenario files resolve relative paths elsewhere
        name, request = "sharegpt", {"name": "sharegpt", "prompt": {"source": "sharegpt", "path": str(path)}}
    try:
        request_class = RequestClass.model_validate(request)
    except ValidationError as error:
        problems = "; ".join(issue["msg"].removeprefix("Value error, ") for issue in error.errors())
        raise UsageError(f"--data {data}: {problems}") from None
    description = f"requests from --data {data}; load from scenario {scenario.name}"
    return scenario.model_copy(update={"name": name, "description": description, "source": data,
                                       "requests": [request_class]})


def _synthetic_lengths(data: str) -> dict:
    """prompt_tokens=512,output_tokens=128[,prompt_tokens_stdev=..,_min=..,_max=..] -> the class's length fields."""
    given: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in data.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in SYNTHETIC_KEYS:
            raise UsageError(f"--data: unknown key {key!r}; give {', '.join(SYNTHETIC_KEYS)}")
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--data: {key} takes a number, not {value.strip()!r}") from None
        if number < 0 or (not key.endswith("_stdev") and (number < 1 or number != int(number))):
            raise UsageError(f"--data: {key} must be a whole number of tokens, 1 or more (a stdev: 0 or more), "
                             f"not {value.strip()}")
        given[key] = number
    fields = {}
    for length in LENGTHS:
        if length not in given:
            raise UsageError(f"--data: give {length}=N (e.g. --data prompt_tokens=512,output_tokens=128)")
        stdev, low, high = (given.get(length + suffix) for suffix in BOUNDS)
        if not stdev and (low is not None or high is not None):
            raise UsageError(f"--data: {length}_min and _max bound a distribution: give {length}_stdev too")
        if low is not None and high is not None and low > high:
            raise UsageError(f"--data: {length}_min is above {length}_max")
        if stdev:
            fields[SCENARIO_FIELDS[length]] = {"dist": "normal", "mean": given[length], "std": stdev,
                                               "min": int(low or 1), "max": None if high is None else int(high)}
        else:
            fields[SCENARIO_FIELDS[length]] = {"dist": "fixed", "value": int(given[length])}
    return fields

"""Requests from data users already have: a ShareGPT-format JSON file (as vllm bench serve reads it) and inline
synthetic lengths (as GuideLLM takes them), through `loadtest --data` and as a scenario's prompt source."""

import json

import pytest
from tokenizers import Tokenizer

from tests.conftest import DATA, run_cli, run_dir_of
from tokenrig.errors import UsageError
from tokenrig.loadgen.data import with_data
from tokenrig.loadgen.scenario import load_scenario, parse_scenario
from tokenrig.loadgen.workload import Workload
from tokenrig.metrics.records import read_records
from tokenrig.profiles import resolve_model
from tokenrig.serve.checkpoint import tokenizer_dir

SHAREGPT = DATA / "sharegpt.json"
# the fixture's usable conversations: (first human turn, the gpt turn after it); the rest have no such pair
PAIRS = [(entry["conversations"][i]["value"], entry["conversations"][i + 1]["value"])
         for entry, i in zip(json.loads(SHAREGPT.read_text()), (0, 1, 1, None, 2, None)) if i is not None]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(tokenizer_dir(resolve_model("tiny")) / "tokenizer.json"))


def requests_of(scenario, tokenizer, count=60):
    workload = Workload(scenario, tokenizer, "tiny", 2048, seed=7)
    return [workload.dialogue(index).next_request() for index in range(count)]


def tokens(tokenizer, text):
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def test_sharegpt_prompts_are_first_human_turns_and_output_lengths_their_replies(tokenizer):
    scenario = with_data(load_scenario("chat"), str(SHAREGPT))
    assert scenario.name == "sharegpt" and scenario.load == load_scenario("chat").load
    expected = {prompt: (tokens(tokenizer, prompt), tokens(tokenizer, reply)) for prompt, reply in PAIRS}
    seen = set()
    for request in requests_of(scenario, tokenizer):
        prompt = json.loads(request.body)["messages"][0]["content"]
        assert (request.prompt_tokens, request.max_tokens) == expected[prompt]
        seen.add(prompt)
    assert seen == set(expected)  # every usable conversation is drawn, the skipped ones never


def test_sharegpt_is_a_scenario_prompt_source_with_its_own_or_the_scenarios_output_lengths(tokenizer):
    text = f"""
name: from-sharegpt
requests:
  - name: replies
    prompt: {{source: sharegpt, path: {SHAREGPT}}}
  - name: fixed-answers
    prompt: {{source: sharegpt, path: {SHAREGPT}}}
    output_tokens: {{dist: fixed, value: 5}}
load: {{type: concurrency, users: 1}}
"""
    scenario = parse_scenario(text)
    by_class = {}
    for request in requests_of(scenario, tokenizer):
        by_class.setdefault(request.request_class, set()).add(request.max_tokens)
    assert by_class["fixed-answers"] == {5} and len(by_class["replies"]) > 1


def test_inline_synthetic_lengths_fixed_and_distributed(tokenizer):
    fixed = with_data(load_scenario("chat"), "prompt_tokens=64,output_tokens=16")
    assert fixed.name == "synthetic"
    assert {(r.prompt_tokens, r.max_tokens) for r in requests_of(fixed, tokenizer)} == {(64, 16)}
    spread = with_data(load_scenario("chat"), "prompt_tokens=100,prompt_tokens_stdev=30,prompt_tokens_min=80,"
                                              "prompt_tokens_max=120,output_tokens=20,output_tokens_stdev=5")
    drawn = requests_of(spread, tokenizer, count=200)
    prompts = [r.prompt_tokens for r in drawn]
    assert min(prompts) == 80 and max(prompts) == 120 and len(set(prompts)) > 10
    assert 17 < sum(r.max_tokens for r in drawn) / len(drawn) < 23


@pytest.mark.parametrize("data, message", [
    ("prompt_tokens=512", "give output_tokens=N"),
    ("prompt_tokens=512,output_tokens=12x", "output_tokens takes a number, not '12x'"),
    ("prompt_tokens=0,output_tokens=8", "prompt_tokens must be a whole number of tokens, 1 or more"),
    ("prompt_tokens=64,output_tokens=8,prompt_tokens_max=90", "give prompt_tokens_stdev too"),
    ("prompt_tokens=64,output_tokens=8,prompt_tokens_stdev=9,prompt_tokens_min=90,prompt_tokens_max=80",
     "prompt_tokens_min is above prompt_tokens_max"),
    ("prompt_len=64,output_tokens=8", "unknown key 'prompt_len'"),
    ("missing.json", "missing.json does not exist"),
    (str(DATA / "timing.yaml"), "timing.yaml is not JSON"),
    (str(DATA / "vllm-0.26.0-cli.json"), "a ShareGPT file is a JSON list"),
])
def test_bad_data_is_one_line_naming_the_flag(data, message):
    with pytest.raises(UsageError, match="--data") as error:
        with_data(load_scenario("chat"), data)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_loadtest_with_sharegpt_data_and_a_bad_data_flag(tmp_path, tokenizer):
    sim = ["--backend", "sim", "--sim-ttft-ms", "5", "--sim-tpot-ms", "2", "--results", str(tmp_path)]
    result = run_cli("loadtest", *sim, "--data", str(SHAREGPT), "--users", "2", "--duration", "3", "--warmup", "0",
                     timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sharegpt | sim | tiny" in result.stdout
    records = read_records(run_dir_of(result) / "requests.jsonl")
    replies = {tokens(tokenizer, reply) for _, reply in PAIRS}
    assert records and all(r.ok and r.max_tokens in replies and r.output_tokens == r.max_tokens for r in records)
    bad = run_cli("loadtest", *sim, "--data", "prompt_tokens=64", "--dry-run")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "tokenrig: error: --data: give output_tokens=N (e.g. --data prompt_tokens=512,output_tokens=128)"]

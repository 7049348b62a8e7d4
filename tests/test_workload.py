"""Request sampling: empirical lengths, prompt files, shared prefixes, Mooncake blocks, conversations."""

import json

import numpy as np
import pytest

from tokenrig.loadgen.plan import LoadPlan
from tokenrig.loadgen.scenario import ScenarioError, column_values, known_scenarios, load_scenario, parse_scenario
from tokenrig.loadgen.workload import Workload
from tokenrig.serve.tokenizer import build_tokenizer

TOKENIZER = build_tokenizer(32000)


def workload_for(text: str, max_context: int = 4096) -> Workload:
    return Workload(parse_scenario(text), TOKENIZER, "m", max_context, seed=0)


def prompt_words(prepared) -> list[str]:
    body = json.loads(prepared.body)
    return (body["messages"][-1]["content"] if "messages" in body else body["prompt"]).split()


def test_every_shipped_scenario_validates():
    names = known_scenarios()
    for expected in ("chat", "code_completion", "summarization", "long_context", "rag", "multi_turn_chat",
                     "mixed", "azure_conv_replay", "mooncake_replay"):
        assert expected in names
    for name in names:
        scenario = load_scenario(name)
        assert scenario.source.strip(), f"{name}: lengths need a cited source"


def test_empirical_lengths_come_from_the_trace_column():
    workload = workload_for("""name: e
requests:
  - name: code
    api: completions
    input_tokens: {dist: empirical, file: traces/AzureLLMInferenceTrace_code.csv, column: ContextTokens}
    output_tokens: {dist: empirical, file: traces/AzureLLMInferenceTrace_code.csv, column: GeneratedTokens}
load: {users: 1}
""", max_context=100_000)
    column = np.asarray(column_values("traces/AzureLLMInferenceTrace_code.csv", "ContextTokens"))
    sent = np.asarray([workload.dialogue(i).next_request().prompt_tokens for i in range(3000)])
    assert set(sent) <= set(column.astype(int))
    assert np.median(sent) == pytest.approx(np.median(column), rel=0.08)


def test_bad_trace_column_names_the_field_and_line():
    with pytest.raises(ScenarioError, match=r"<scenario>:4: requests.0.input_tokens.empirical"):
        parse_scenario("""name: e
requests:
  - name: c
    input_tokens: {dist: empirical, file: traces/AzureLLMInferenceTrace_code.csv, column: Nope}
    output_tokens: {dist: fixed, value: 3}
load: {users: 1}
""")


def test_prompt_file_prompts_are_sent_verbatim(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "one two three"}\n{"prompt": "four five"}\n')
    workload = workload_for(f"""name: f
requests:
  - name: f
    prompt: {{source: file, path: {prompts}}}
    output_tokens: {{dist: fixed, value: 4}}
load: {{users: 1}}
""")
    sent = {" ".join(prompt_words(workload.dialogue(i).next_request())) for i in range(20)}
    assert sent == {"one two three", "four five"}


def test_shared_prefix_pool_hits_its_target_ratio_with_identical_text():
    workload = workload_for("""name: rag
requests:
  - name: rag
    input_tokens: {dist: fixed, value: 20}
    output_tokens: {dist: fixed, value: 4}
    shared_prefix: {tokens: 64, pool_size: 8, hit_ratio: 0.7}
load: {users: 1}
""")
    requests = [workload.dialogue(i).next_request() for i in range(2000)]
    assert np.mean([r.prefix_reused for r in requests]) == pytest.approx(0.7, abs=0.03)
    by_prefix = {}
    for r in requests:
        words = prompt_words(r)
        assert len(words) == r.prompt_tokens == 84
        by_prefix.setdefault(r.prefix_id, set()).add(" ".join(words[:64]))
    assert all(len(texts) == 1 for texts in by_prefix.values())  # same id, same text
    assert len({next(iter(t)) for t in by_prefix.values()}) == len(by_prefix)  # different ids, different text
    # the same arrival gets the same request whichever process builds it
    again = workload_for(workload.scenario.model_dump_json())
    assert again.dialogue(1234).next_request().body == workload.dialogue(1234).next_request().body


def test_mooncake_rows_share_text_exactly_where_hash_ids_match():
    scenario = load_scenario("mooncake_replay")
    scenario = scenario.model_copy(update={"load": scenario.load.model_copy(update={"duration_s": 5})})
    workload = Workload(scenario, TOKENIZER, "m", 1_000_000)
    plan = LoadPlan(scenario.load, start=0.0)
    slots = [plan.next_slot(0.0) for _ in range(3)]
    scale = scenario.load.trace.length_scale
    block = round(512 * scale)
    words = [prompt_words(workload.dialogue(s.index, s.trace_row).next_request()) for s in slots]
    for slot, sent in zip(slots, words):
        assert len(sent) == slot.trace_row.input_tokens
    ids = [s.trace_row.hash_ids for s in slots]
    assert ids[0][0] == ids[1][0] and ids[0][1] != ids[1][1]  # first block shared, second not (trace rows 0, 1)
    assert words[0][:block] == words[1][:block]
    assert words[0][block:2 * block] != words[1][block:2 * block]


def test_multi_turn_history_grows_with_each_reply():
    workload = workload_for("""name: mt
requests:
  - name: mt
    input_tokens: {dist: fixed, value: 10}
    output_tokens: {dist: fixed, value: 5}
    conversation: {turns: {dist: fixed, value: 3}}
load: {users: 1}
""")
    dialogue = workload.dialogue(0)
    first = dialogue.next_request()
    dialogue.add_reply("alpha beta gamma delta epsilon", 5)
    second = dialogue.next_request()
    dialogue.add_reply("zeta eta theta iota kappa", 5)
    third = dialogue.next_request()
    assert dialogue.next_request() is None
    assert [r.prompt_tokens for r in (first, second, third)] == [10, 25, 40]
    messages = json.loads(third.body)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == "alpha beta gamma delta epsilon"
    assert messages[0] == json.loads(first.body)["messages"][0]
    # as data, each turn is the conversation as it was sent: later replies do not reach an earlier turn
    assert third.messages == messages and first.messages == json.loads(first.body)["messages"]
    assert len(first.messages) == 1 and first.prompt is None
    assert third.text == "\n".join(m["content"] for m in messages)  # what TGI is sent


def test_a_prepared_request_is_its_body_as_data():
    workload = workload_for("""
name: t
requests:
  - name: c
    api: completions
    input_tokens: {dist: fixed, value: 6}
    output_tokens: {dist: fixed, value: 3}
    temperature: 0.5
load: {users: 1}
""")
    prepared = workload.dialogue(0).next_request()
    body = json.loads(prepared.body)
    assert prepared.messages is None and prepared.prompt == body["prompt"] == prepared.text
    assert len(prepared.prompt.split()) == prepared.prompt_tokens == 6
    assert body == {"model": "m", "max_tokens": 3, "min_tokens": 3, "ignore_eos": True, "temperature": 0.5,
                    "stream": True, "stream_options": {"include_usage": True}, "prompt": prepared.prompt}

"""The OpenAI and TGI APIs of tokenrig's servers, over real HTTP on loopback."""

import json

import pytest
import requests


def sse_events(response):
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data:"):
            data = line[5:].strip()
            events.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return events


@pytest.fixture(params=["hf", "sim"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


def test_health_and_models(server):
    base = server.endpoint.base_url
    assert requests.get(f"{base}/health", timeout=5).status_code == 200
    models = requests.get(f"{base}/v1/models", timeout=5).json()
    assert models["data"][0]["id"] == server.spec.model.key


def test_chat_streaming_with_usage_and_forced_length(server):
    base = server.endpoint.base_url
    body = {"messages": [{"role": "user", "content": "fana gele lozo"}], "max_tokens": 17, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] == 17 and usage["prompt_tokens"] >= 3
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2] if e["choices"])
    assert len(content.split()) == 17  # one word per token with tokenrig's tokenizer
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_completions_non_streaming_min_tokens(server):
    body = {"prompt": "fana gele", "max_tokens": 9, "min_tokens": 9}
    reply = requests.post(f"{server.endpoint.base_url}/v1/completions", json=body, timeout=60).json()
    assert reply["usage"]["completion_tokens"] == 9
    assert len(reply["choices"][0]["text"].split()) == 9


def test_streaming_without_include_usage_sends_no_usage_chunk(server):
    body = {"prompt": "fana", "max_tokens": 4, "stream": True, "ignore_eos": True}
    with requests.post(f"{server.endpoint.base_url}/v1/completions", json=body, stream=True, timeout=60) as response:
        events = sse_events(response)
    assert all("usage" not in e for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]).split().__len__() == 4


@pytest.mark.parametrize("body,message", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens must be a positive integer"),
    ({"prompt": "x", "max_tokens": 5, "min_tokens": 6}, "min_tokens"),
    ({"prompt": 5}, "prompt must be"),
    ({"prompt": "x", "max_tokens": 100000}, "exceed the model's context"),
])
def test_bad_requests_get_400_with_reason(server, body, message):
    reply = requests.post(f"{server.endpoint.base_url}/v1/completions", json=body, timeout=30)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"]


def test_metrics_use_vllm_names(server):
    base = server.endpoint.base_url
    requests.post(f"{base}/v1/completions", json={"prompt": "fana", "max_tokens": 3}, timeout=60)
    text = requests.get(f"{base}/metrics", timeout=5).text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket"):
        assert name in text, name


def test_tgi_generate_stream_on_sim(sim_server):
    body = {"inputs": "fana gele", "parameters": {"max_new_tokens": 6, "details": True}}
    with requests.post(f"{sim_server.endpoint.base_url}/generate_stream", json=body, stream=True,
                       timeout=60) as response:
        events = sse_events(response)
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[-1]["details"]["generated_tokens"] == 6
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
    reply = requests.post(f"{sim_server.endpoint.base_url}/generate", json=body, timeout=60).json()
    assert reply["details"]["generated_tokens"] == 6 and len(reply["generated_text"].split()) == 6


def test_sim_kv_usage_is_reported(sim_server):
    text = requests.get(f"{sim_server.endpoint.base_url}/metrics", timeout=5).text
    assert "vllm:kv_cache_usage_perc" in text


def test_hf_server_stops_taking_requests_when_its_generation_thread_is_gone(tmp_path):
    """A request queued behind a dead transformers generation thread would wait forever: refuse it, say why."""
    import asyncio
    import time

    from aiohttp.test_utils import TestClient, TestServer
    from transformers import AutoTokenizer

    from tokenrig.profiles import resolve_model
    from tokenrig.serve.api import OpenAIServer
    from tokenrig.serve.checkpoint import make_checkpoint
    from tokenrig.serve.engines.hf import HFEngine

    model = resolve_model("tiny")
    checkpoint = make_checkpoint(model, root=tmp_path, progress=lambda *_: None)
    engine = HFEngine(str(checkpoint), kv_cache_tokens=4096, max_batch_tokens=512)
    server = OpenAIServer(engine, AutoTokenizer.from_pretrained(checkpoint), model.key, model.max_context)

    async def scenario():
        async with TestClient(TestServer(server.app())) as client:
            assert (await client.get("/health")).status == 200
            reply = await client.post("/v1/completions", json={"prompt": "fana", "max_tokens": 3, "ignore_eos": True})
            assert (await reply.json())["usage"]["completion_tokens"] == 3
            await engine.stop()  # the generation thread ends, as when it dies
            health = await client.get("/health")
            assert health.status == 503 and "generation thread stopped" in await health.text()
            started = time.monotonic()
            reply = await client.post("/v1/completions", json={"prompt": "fana", "max_tokens": 3})
            assert reply.status >= 500 and time.monotonic() - started < 10

    asyncio.run(scenario())


def test_streams_send_their_headers_before_the_first_token(tmp_path_factory):
    """Headers and the chat role chunk go out on arrival; sent with the first token, their cost at a burst of
    first tokens would be measured as TTFT by every client."""
    import time

    from tests.conftest import start_server
    from tokenrig.serve.spec import SimOptions

    with start_server(tmp_path_factory, "sim", options=SimOptions(sim_ttft_ms=600, sim_tpot_ms=1)) as server:
        body = {"messages": [{"role": "user", "content": "fana"}], "max_tokens": 3, "stream": True, "ignore_eos": True}
        started = time.monotonic()
        with requests.post(f"{server.endpoint.base_url}/v1/chat/completions", json=body, stream=True,
                           timeout=30) as response:
            headers_after = time.monotonic() - started
            lines = response.iter_lines()
            role = next(line for line in lines if line.startswith(b"data:"))
            role_after = time.monotonic() - started
            events = [role] + [line for line in lines if line.startswith(b"data:")]
            first_token_after = time.monotonic() - started
    assert response.status_code == 200 and headers_after < 0.3 and role_after < 0.3
    assert json.loads(role[5:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first_token_after >= 0.6 and events[-1].strip() == b"data: [DONE]"


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "fana", "max_tokens": 200, "stream": True, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "fana"}], "max_tokens": 200, "stream": True,
                              "ignore_eos": True}),
    ("/generate_stream", {"inputs": "fana", "parameters": {"max_new_tokens": 200}}),
])
def test_a_client_that_leaves_mid_stream_takes_its_request_out_of_the_engine(tmp_path_factory, path, body):
    """A load test stops early by dropping its streams, then waits for the server to drain before the next step.
    The dropped request must leave the engine at once: left to the garbage collector, it stayed counted as
    running for minutes (a find-max test hung 300 s in CI waiting for 2 such requests)."""
    import time

    from tests.conftest import start_server
    from tokenrig.serve.scrape import fetch_metrics
    from tokenrig.serve.spec import SimOptions

    with start_server(tmp_path_factory, "sim", options=SimOptions(sim_ttft_ms=10, sim_tpot_ms=100)) as server:
        base = server.endpoint.base_url
        with requests.post(f"{base}{path}", json=body, stream=True, timeout=30) as response:
            lines = (line for line in response.iter_lines() if line.startswith(b"data:"))
            next(lines), next(lines)  # streaming: 200 tokens at 100 ms would take 20 s
            assert fetch_metrics(f"{base}/metrics", timeout_s=5)["running"] == 1
        deadline = time.monotonic() + 3
        while fetch_metrics(f"{base}/metrics", timeout_s=5)["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fetch_metrics(f"{base}/metrics", timeout_s=5)["running"] == 0

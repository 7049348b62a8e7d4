"""Token counts stay exact whatever shape the server's chunks have.

A scripted streaming server on loopback answers each request with the chunks of the script its
`max_tokens` names: several tokens in one chunk, chunks with no content, escaped and non-ASCII
text, usage only at the end or no usage at all, chat and completions. `tokenrig loadtest` runs
against it and every record must say how many tokens each content chunk carried, and each user
must keep its connection though the body's end comes after [DONE]. The client
tokenizes each distinct chunk text once per run (loadgen/tokens.py): a unit test checks its
counts against the tokenizer's, cache full or not.
"""

import json
import random
import socket
import threading
import time

from tests.conftest import instant_server_env, load_summary, run_cli, run_dir_of
from tokenrig.loadgen.tokens import TokenCounter
from tokenrig.metrics.records import read_records
from tokenrig.serve.tokenizer import build_tokenizer, content_words

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "tiny"}


def chat(delta: dict, finish=None) -> dict:
    return {**BASE, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def completion(text: str, finish=None) -> dict:
    return {**BASE, "object": "text_completion", "choices": [{"index": 0, "text": text, "logprobs": None,
                                                               "finish_reason": finish}]}


def usage(tokens: int) -> dict:
    return {**BASE, "choices": [],
            "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}}


# max_tokens -> (chunks, tokens per content chunk, the server's count or None)
SCRIPTS = {
    # several tokens per chunk, chunks without content in between, usage only at the end
    6: ([chat({"role": "assistant", "content": ""}), chat({"content": " ba ke ti"}), chat({"content": ""}), chat({}),
         chat({"content": " mo"}), chat({"content": " su na"}), chat({}, "length"), usage(6)], [3, 1, 2], 6),
    # one token per chunk, some of them escaped (quotes, non-ASCII): usage confirms one each
    4: ([chat({"role": "assistant", "content": ""}), chat({"content": " ba"}), chat({"content": ' "ke"'}),
         chat({"content": " tĩ"}), chat({"content": " mo\\"}), chat({}, "length"), usage(4)], [1, 1, 1, 1], 4),
    # no usage at all: the tokenizer counts each chunk
    3: ([chat({"role": "assistant", "content": ""}), chat({"content": " ba ke"}), chat({"content": " ti"}),
         chat({}, "stop")], [2, 1], None),
    # completions, one chunk carrying two tokens, usage only at the end
    5: ([completion(" ba"), completion(" ke ti"), completion(""), completion(" mo"), completion(" su", "length"),
         usage(5)], [1, 2, 1, 1], 5),
    # usage equal to the number of content chunks, though each carries two tokens: the stream is counted
    7: ([chat({"role": "assistant", "content": ""}), chat({"content": " ba ke"}), chat({"content": " ti mo"}),
         chat({}, "length"), usage(2)], [2, 2], 2),
    # a word streamed in two pieces, as a subword tokenizer's server streams it, and a usage that counts both:
    # the reply tokenized whole is one word, but the chunks and the server agree on two
    8: ([chat({"role": "assistant", "content": ""}), chat({"content": " ba"}), chat({"content": "ke"}),
         chat({}, "length"), usage(2)], [1, 1], 2),
}
PREFLIGHT = ([chat({"content": " ba"}), chat({"content": " ke"}, "length")], [1, 1], None)


def sse(payload) -> bytes:
    data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


def serve_connection(conn: socket.socket) -> None:
    buffer = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buffer:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            lines = head.decode().split("\r\n")
            length = next((int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length")), 0)
            while len(buffer) < length:
                buffer += conn.recv(65536)
            body, buffer = buffer[:length], buffer[length:]
            if lines[0].startswith("GET"):
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                continue
            # tokenrig's pre-flight check (a two-token request) gets a plain two-chunk answer
            chunks, _, _ = SCRIPTS.get(json.loads(body)["max_tokens"], PREFLIGHT)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for chunk in chunks:  # one send each, so chunks arrive as a server streams them
                conn.sendall(sse(chunk))
            conn.sendall(sse("[DONE]"))
            time.sleep(0.002)  # the body's last, empty chunk on its own, a moment later, as uvicorn writes it
            conn.sendall(b"0\r\n\r\n")


def scripted_server(accepted: list) -> tuple[socket.socket, int]:
    """The server on a loopback port; each connection it accepts is appended to `accepted`."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, listener.getsockname()[1]


def test_token_counts_are_exact_for_every_chunk_shape(tmp_path):
    classes = "\n".join(
        f"  - {{name: s{tokens}, api: {'completions' if tokens == 5 else 'chat'},"
        f" input_tokens: {{dist: fixed, value: 8}}, output_tokens: {{dist: fixed, value: {tokens}}}}}"
        for tokens in SCRIPTS)
    scenario = tmp_path / "shapes.yaml"
    scenario.write_text(f"name: shapes\nrequests:\n{classes}\nload: {{type: concurrency, users: 4, duration_s: 2}}\n")
    accepted = []
    listener, port = scripted_server(accepted)
    try:
        # the scripted server has no /v1/models (404): the model it serves is named, as such a server needs
        result = run_cli("loadtest", "--url", f"http://127.0.0.1:{port}", "--backend", "sim", "--model", "tiny",
                         "--served-model", "tiny", "--scenario", str(scenario), "--results", str(tmp_path / "runs"),
                         timeout=120, env=instant_server_env())
    finally:
        listener.close()
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = run_dir_of(result)
    records = read_records(run_dir / "requests.jsonl")
    assert {r.max_tokens for r in records} == set(SCRIPTS), "every script was exercised"
    for record in records:
        _, per_chunk, server_count = SCRIPTS[record.max_tokens]
        assert record.ok, record.error
        assert record.chunk_tokens == per_chunk, record
        assert len(record.chunk_offsets_s) == len(per_chunk) and record.ttft_s == record.chunk_offsets_s[0]
        assert record.output_tokens_usage == server_count
        assert record.output_tokens_tokenizer == sum(per_chunk)
        assert record.output_tokens == sum(per_chunk)  # the tokens streamed, whatever the usage says
    # Each user keeps its connection from request to request, though the body ends after [DONE]: a new one per
    # request would put a TCP (and over https a TLS) handshake inside every TTFT. Besides the 4 users', the
    # pre-flight request, the model list and the /metrics scrapes open theirs.
    assert len(records) > 100 and len(accepted) <= 4 + 8, (len(records), len(accepted))
    # only the script whose usage miscounts its stream is a mismatch
    assert load_summary(run_dir)["tokens"]["usage_vs_tokenizer_mismatches"] == sum(r.max_tokens == 7 for r in records)


def test_chunk_counts_are_the_tokenizers_whether_the_text_was_seen_or_not():
    tokenizer = build_tokenizer(500)
    words = content_words(tokenizer)
    rng = random.Random(3)
    # one word a chunk, several, none (whitespace only), unknown text, escapes' decoded characters
    texts = [" " + " ".join(rng.choices(words, k=rng.choice([1, 1, 1, 2, 3]))) for _ in range(400)]
    texts += [" ", "", ' "ke"', " tĩ mo", " \n"]
    expected = [len(tokenizer.encode(text, add_special_tokens=False).ids) for text in texts]
    assert len(set(expected)) > 2, "the texts cover several token counts"
    for capacity in (1 << 16, 7):  # every text kept, and a cache that starts over every 7 texts
        counter = TokenCounter(tokenizer, capacity=capacity)
        assert counter.chunk_counts(texts) == expected  # first sight: tokenized
        # seen: looked up (or tokenized again after the cache started over)
        assert counter.chunk_counts(texts) == expected
        assert len(counter) <= capacity

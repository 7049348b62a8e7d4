"""How much load one core of tokenrig's load generator drives before its timing goes wrong.

The server is benchmarks/refserver.py: a fixed schedule (first token 100 ms after the request
arrives, then one token every 10 ms, 128 tokens) kept by an epoll loop on its own core, which
logs when it handed each chunk to the kernel. That log is the truth: TTFT = request received →
first content chunk sent, ITL = gaps between sends. Its lateness against the schedule is in the
table, so a row where the server, not the client, slipped is visible.

Per stream count, closed loop, each client alone on the same core against a fresh server:
tokenrig (`tokenrig loadtest --url`, which also scrapes the server's /metrics, a real vLLM 0.26
page, every second), the minimal baseline client (gevent greenlets on geventhttpclient, readline
and a timestamp per chunk: the least a Python client can do) and a plain Locust user doing the
same per chunk through Locust's own machinery (benchmarks/comparison_clients.py). Reported:
streamed tokens/s, TTFT p50 and chunk-gap ITL p99 minus the server's truth, client CPU and CPU
per 1k tok/s, with tokenrig's ratios to both. Last, micro-profiles of tokenrig's per-chunk and
per-request work against what each replaced.

    python benchmarks/loadgen.py [--streams 1,64,256,512] [--duration 10] [--out docs/results/...]

Ctrl-C stops after the level in progress and prints what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TTFT_S, ITL_S, TOKENS, WARMUP_S = 0.100, 0.010, 128, 2.0
# Streams start evenly over one request's length, so they run out of phase as under steady load. Started
# at once, a closed loop stays in lockstep: every stream's chunk is due at the same instant and every
# stream ends and sends again in the same few milliseconds, and the row measures those waves.
RAMP_S = TTFT_S + TOKENS * ITL_S
GOAL_TTFT_P50_ERR_S, GOAL_ITL_P99_ERR_S = 0.001, 0.0025
IDLE_CHUNKS_PER_S = 1_000  # below this a row says how fast an idle core wakes, not what a busy one keeps up with
COMPARED = ("baseline", "locust")  # benchmarks/comparison_clients.py, the denominators of tokenrig's ratios
MAX_SERVER_LATENESS_P99_S = 0.001  # past this the row measures the server, not the client
# the server's /metrics is vLLM 0.26's page under load: tokenrig scrapes it every second, as against vLLM
METRICS_PAGE = REPO / "tests" / "fixtures" / "vllm-0.26.0-metrics-under-load.txt"
TABLE_START, TABLE_END = "<!-- benchmarks/loadgen.py writes from here -->", "<!-- to here -->"
SCENARIO = f"""name: loadgen-capacity
source: benchmark
requests:
  - name: fixed
    api: chat
    input_tokens: {{dist: fixed, value: 64}}
    output_tokens: {{dist: fixed, value: {TOKENS}}}
load: {{type: concurrency, users: 1, duration_s: 10, warmup_s: {WARMUP_S:g}, ramp_s: {RAMP_S:g}}}
"""


def raised_priority() -> None:
    """preexec_fn of every client (started in a session of its own): nice -20 where allowed (root), for the
    process and for its session's scheduling group, so that other processes of a shared machine scheduled
    on the client's core take as little of it as possible (both clients alike). With autogroups on, a
    process's nice alone counts only against its own session."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -20)
        with open("/proc/self/autogroup", "w") as autogroup:
            autogroup.write("-20")
    except OSError:
        pass


def cores() -> tuple[int, int]:
    """(client core, server core): the last two CPUs this process may use."""
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[-1], allowed[-2]) if len(allowed) > 1 else (allowed[0], allowed[0])


class RefServer:
    """benchmarks/refserver.py in a subprocess pinned to `core`; `truth()` stops it and reads its log."""

    def __init__(self, core: int, log: Path, ttft_s: float = TTFT_S, itl_s: float = ITL_S, tokens: int = TOKENS):
        self.log = log
        self.process = subprocess.Popen(
            ["taskset", "-c", str(core), sys.executable, str(REPO / "benchmarks" / "refserver.py"), "--port", "0",
             "--ttft-ms", str(ttft_s * 1000), "--itl-ms", str(itl_s * 1000), "--tokens", str(tokens),
             "--metrics-page", str(METRICS_PAGE), "--log", str(log)], stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.process.kill()
            raise RuntimeError(f"reference server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[-1])}"

    def truth(self, window_s: tuple[float, float] | None = None) -> dict:
        """Stop the server; its TTFT, ITL and lateness over requests received inside `window_s`
        (seconds after the first request arrived; None: all requests)."""
        self.stop()
        from refserver import load_log

        log = load_log(self.log)
        received = log["received"]
        keep = np.ones(received.size, dtype=bool)
        if window_s is not None and received.size:
            since = received - received.min()
            keep = (since >= window_s[0]) & (since < window_s[1])
        sent = log["sent"][keep]
        done = ~np.isnan(sent).any(axis=1)  # requests the server finished before it was stopped
        ttft, gaps, late = log["ttft_s"][keep][done], log["gaps_s"][keep][done].ravel(), log["lateness_s"][keep]
        late = late[~np.isnan(late)]
        if not done.any():
            raise RuntimeError(f"no request received inside {window_s} s after the first one was finished "
                               "by the server: lengthen --duration")
        return {"requests": int(done.sum()), "ttft_p50_s": float(np.percentile(ttft, 50)),
                "itl_p99_s": float(np.percentile(gaps, 99)), "late_p50_s": float(np.percentile(late, 50)),
                "late_p99_s": float(np.percentile(late, 99)), "late_max_s": float(late.max())}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def __enter__(self) -> RefServer:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def tokenrig_level(url: str, streams: int, duration: float, core: int, workdir: Path) -> dict:
    from tokenrig import exit_status  # as the other tokenrig imports: once REPO is on the path

    scenario = workdir / "scenario.yaml"
    scenario.write_text(SCENARIO)
    command = ["taskset", "-c", str(core), sys.executable, "-m", "tokenrig.cli", "loadtest", "--url", url,
               "--backend", "sim", "--model", "tiny", "--served-model", "tiny", "--scenario", str(scenario),
               "--users", str(streams), "--duration", str(duration), "--warmup", str(WARMUP_S),
               "--results", str(workdir / "runs")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=duration + 300,
                            preexec_fn=raised_priority,
                            start_new_session=True)
    # the reference server has no /v1/models: the model is named; a level past the ceiling is INVALID (exit 4),
    # which is what this benchmark measures and reports as `valid`
    if result.returncode not in (exit_status.OK, exit_status.INVALID):
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    run_dir = Path(next(line for line in result.stdout.splitlines() if line.startswith("results: ")).split(": ", 1)[1])
    from tokenrig.metrics.run_summary import RunSummary  # as the other tokenrig imports: once REPO is on the path

    summary = RunSummary.read(run_dir / "summary.json")
    latency, health = summary.latency_s, summary.load_generator
    if not (summary.server or {}).get("scrapes_in_window"):
        raise RuntimeError(f"tokenrig did not scrape the server's /metrics: {summary.server}")
    return {"tool": "tokenrig", "streams": streams, "tokens_per_s": summary.throughput.output_tokens_per_s,
            "ttft_p50_s": latency.get("ttft").p50, "itl_p99_s": latency.get("itl").p99,
            "client_cpu": health.client_cpu_fraction, "valid": health.valid}


def comparison_level(tool: str, url: str, streams: int, duration: float, core: int) -> dict:
    """benchmarks/comparison_clients.py's `tool` (baseline, locust) on `core`: its JSON row."""
    command = ["taskset", "-c", str(core), sys.executable, str(REPO / "benchmarks" / "comparison_clients.py"), tool,
               url, "--streams", str(streams), "--duration", str(duration)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=duration + 300, preexec_fn=raised_priority,
                            start_new_session=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_level(tool: str, streams: int, duration: float, client_core: int, server_core: int, workdir: Path) -> dict:
    """One client against a fresh reference server; the row carries the server's truth and lateness."""
    with RefServer(server_core, workdir / f"{tool}-{streams}.npz") as server:
        if tool == "tokenrig":
            row = tokenrig_level(server.url, streams, duration, client_core, workdir)
        else:
            row = comparison_level(tool, server.url, streams, duration, client_core)
        # tokenrig's window starts WARMUP_S after its plan starts, a little before the first request arrives
        row["truth"] = server.truth((WARMUP_S, duration))
    row["ttft_err_s"] = row["ttft_p50_s"] - row["truth"]["ttft_p50_s"]
    row["itl_err_s"] = row["itl_p99_s"] - row["truth"]["itl_p99_s"]
    row["cpu_per_1k"] = row["client_cpu"] / (row["tokens_per_s"] / 1000) if row["tokens_per_s"] else None
    return row


# -- where a chunk's microseconds go ------------------------------------------------------------

def best_us(statement, calls: int, per_call: int = 1) -> float:
    """Microseconds per unit of work, best of 3 × `calls` calls of `statement`, each doing `per_call` units."""
    return min(timeit.repeat(statement, number=calls, repeat=3)) / (calls * per_call) * 1e6


def per_chunk_profile() -> dict[str, float]:
    """Microseconds per streamed chunk of each step of tokenrig's per-chunk path, and of what it replaced."""
    import orjson

    from refserver import render_stream
    from tokenrig.loadgen.clients.openai import content_fast, parse_openai_chunk
    from tokenrig.loadgen.tokens import TokenCounter
    from tokenrig.serve.tokenizer import build_tokenizer

    _, body = render_stream(2)
    line = body[0].split(b"\r\n")[1].rstrip(b"\n") + b"\n"  # one SSE line as the client reads it
    tokenizer = build_tokenizer(32000)
    text = content_fast(line)
    count = TokenCounter(tokenizer).chunk_counts
    reply = [text] * TOKENS
    count(reply)
    calls = 100_000

    def us(statement, per_call=1) -> float:
        return best_us(statement, calls // per_call, per_call)

    return {
        "timestamp (perf_counter)": us(time.perf_counter),
        "content, byte-level fast path (kept)": us(lambda: content_fast(line)),
        "content, orjson.loads + extraction (the fallback)": us(
            lambda: parse_openai_chunk(orjson.loads(line[5:].strip()))),
        "content, json.loads + extraction (was every chunk)": us(
            lambda: parse_openai_chunk(json.loads(line[5:].strip()))),
        "token count, looked up once the request has ended (kept)": us(lambda: count(reply), per_call=TOKENS),
        "token count, tokenizer.encode of the chunk text (was every chunk; now once per distinct text)": us(
            lambda: tokenizer.encode(text, add_special_tokens=False)),
    }


def per_request_profile() -> dict[str, float]:
    """Microseconds per request (per scrape for /metrics) of tokenrig's work between streams, kept and replaced:
    a 128-token record written, its tokens counted, fed to the live exporter; the server's page parsed."""
    import orjson
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.parser import text_string_to_metric_families

    from tokenrig.loadgen.tokens import TokenCounter
    from tokenrig.metrics.records import RequestRecord
    from tokenrig.metrics.registry import METRICS
    from tokenrig.monitor.exporter import LATENCY_BUCKETS, RUN_LABELS, LoadgenMetrics
    from tokenrig.serve.scrape import parse_metrics
    from tokenrig.serve.tokenizer import build_tokenizer, content_words

    tokenizer = build_tokenizer(32000)
    texts = [" " + word for word in content_words(tokenizer)[:TOKENS]]
    offsets = [TTFT_S + k * ITL_S + (k % 7) * 1e-5 for k in range(TOKENS)]
    record = RequestRecord(request_id=1, request_class="fixed", api="chat", scheduled_at=time.time(), send_lag_s=1e-4,
                           slot_late=False, in_window=True, prompt_tokens_sent=64, max_tokens=TOKENS, status=200,
                           ttft_s=offsets[0], e2e_s=offsets[-1], chunk_offsets_s=offsets, chunk_tokens=[1] * TOKENS,
                           output_tokens_usage=TOKENS, output_tokens_tokenizer=TOKENS)
    counter = TokenCounter(tokenizer)
    counter(record, texts)
    itl_histogram = LoadgenMetrics({name: "x" for name in RUN_LABELS}).latency[METRICS["itl"]]
    per_gap = Histogram("itl", "ITL", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    page = METRICS_PAGE.read_text()

    def us(statement, calls=2_000) -> float:
        return best_us(statement, calls)

    def observe_each_gap():
        for gap in record.itl_gaps():
            per_gap.observe(gap)

    return {
        "record line, orjson (kept)": us(lambda: orjson.dumps(vars(record), option=orjson.OPT_APPEND_NEWLINE)),
        "record line, json (was)": us(lambda: json.dumps(vars(record), separators=(",", ":")) + "\n"),
        "tokens, each chunk's count looked up, usage agreeing (kept)": us(lambda: counter(record, texts)),
        "tokens, the reply tokenized whole (was every request)": us(
            lambda: tokenizer.encode("".join(texts), add_special_tokens=False)),
        "live exporter, ITL gaps in bulk (kept)": us(lambda: itl_histogram.observe_many(record.itl_gaps())),
        "live exporter, one observe per gap (was)": us(observe_each_gap),
        "server /metrics page (vLLM 0.26, 50 KB), wanted lines parsed (kept; once a second)": us(
            lambda: parse_metrics(page), 50),
        "server /metrics page, parsed whole (was)": us(lambda: list(text_string_to_metric_families(page)), 20),
    }


def environment(load_before: float) -> str:
    """Machine, versions and load, for the record of a measurement."""
    from importlib.metadata import version

    from tokenrig.loadgen.ceiling import cpu_model

    cpu = cpu_model()
    packages = ", ".join(f"{name} {version(name)}" for name in (
        "gevent", "geventhttpclient", "locust", "tokenizers", "orjson", "prometheus-client"))
    return (f"Host {os.uname().nodename}: {os.cpu_count()} × {cpu}, Linux {os.uname().release}; Python "
            f"{sys.version.split()[0]}, {packages}. Load average (1 min) {load_before:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after (the benchmark's own two busy processes included).")


def goal_verdict(row: dict) -> str:
    """yes / no: the row's TTFT p50 and ITL p99 within the goal of the truth; invalid: the server slipped."""
    if row["truth"]["late_p99_s"] > MAX_SERVER_LATENESS_P99_S:
        return "invalid (server late)"
    ok = abs(row["ttft_err_s"]) <= GOAL_TTFT_P50_ERR_S and row["itl_err_s"] <= GOAL_ITL_P99_ERR_S
    return "yes" if ok else "no"


def measured_ceiling(rows: list[dict]) -> dict | None:
    """tokenrig's heaviest row within goal with every heavier-than-idle row below it within goal too (one token a
    chunk, so its tokens/s is chunks/s); None if none is. Rows under IDLE_CHUNKS_PER_S do not count either way:
    there the client's core sleeps between chunks, and its wake-up, not its load, sets the error."""
    passed = None
    for row in sorted((r for r in rows if r["tool"] == "tokenrig"), key=lambda r: r["streams"]):
        if row["tokens_per_s"] < IDLE_CHUNKS_PER_S:
            continue
        if goal_verdict(row) != "yes":
            break
        passed = row
    return passed


def render(rows: list[dict], profile: dict, request_profile: dict, server_core: int, client_core: int) -> str:
    def ms(value, sign=""):
        return f"{value * 1000:{sign}.2f}" if value is not None else "-"

    lines = [f"Reference server (benchmarks/refserver.py: TTFT {TTFT_S * 1000:.0f} ms, {ITL_S * 1000:.0f} ms/token, "
             f"{TOKENS} tokens, one token per chunk, usage at the end) pinned to CPU {server_core}, client to CPU "
             f"{client_core}; closed loop, streams started evenly over one request's length; a fresh server per row. "
             "The server runs SCHED_FIFO, each client nice -20 in a session of its own, where allowed.", "",
             "err = the client's figure − the server's own (its send log, same requests window). "
             f"A row whose server lateness p99 exceeds {MAX_SERVER_LATENESS_P99_S * 1000:.0f} ms is marked invalid.",
             "",
             "| tool | streams | tokens/s | TTFT p50 err ms | ITL p99 err ms | true TTFT p50 / ITL p99 ms "
             "| server late p50 / p99 / max ms | client CPU | CPU per 1k tok/s | within goal |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        truth, verdict = row["truth"], goal_verdict(row)
        lines.append(f"| {row['tool']} | {row['streams']} | {row['tokens_per_s']:.0f} | {ms(row['ttft_err_s'], '+')} | "
                     f"{ms(row['itl_err_s'], '+')} | {ms(truth['ttft_p50_s'])} / {ms(truth['itl_p99_s'])} | "
                     f"{ms(truth['late_p50_s'])} / {ms(truth['late_p99_s'])} / {ms(truth['late_max_s'])} | "
                     f"{row['client_cpu']:.0%} | {row['cpu_per_1k'] * 100:.2f} % | {verdict} |")
    pairs = {(r["streams"], r["tool"]): r for r in rows}
    others = [tool for tool in COMPARED if any(r["tool"] == tool for r in rows)]
    lines += ["", "| streams | " + " | ".join(f"tokens/s, tokenrig / {tool} | CPU per 1k tok/s, tokenrig / {tool}"
                                            for tool in others) + " |", "|---:|" + "---:|---:|" * len(others)]
    for streams in sorted({r["streams"] for r in rows}):
        ours = pairs.get((streams, "tokenrig"))
        cells = []
        for tool in others:
            theirs = pairs.get((streams, tool))
            if ours and theirs and theirs["cpu_per_1k"]:
                cells += [f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}",
                          f"{ours['cpu_per_1k'] / theirs['cpu_per_1k']:.2f}"]
            else:
                cells += ["-", "-"]
        lines.append(f"| {streams} | " + " | ".join(cells) + " |")
    lines += ["", "Per-chunk work of tokenrig's stream reader (µs per chunk, best of 3 × 100k):", ""]
    lines += [f"- {step}: {value:.2f}" for step, value in profile.items()]
    lines += ["", "Per-request work between streams, one core of the event loop (µs, best of 3):", ""]
    lines += [f"- {step}: {value:.1f}" for step, value in request_profile.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,16,64,128,256,384,512")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--tools", default="tokenrig,baseline,locust")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("--save-ceiling", action="store_true",
                        help="keep tokenrig's measured per-core ceiling for this machine's load tests")
    args = parser.parse_args()

    client_core, server_core = cores()
    load_before = os.getloadavg()[0]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for streams in (int(s) for s in args.streams.split(",")):
                for tool in args.tools.split(","):
                    row = measure_level(tool, streams, args.duration, client_core, server_core, Path(tmp))
                    rows.append(row)
                    print(f"{tool:>9} {streams:4d} streams: {row['tokens_per_s']:8.0f} tok/s  "
                          f"TTFT p50 err {row['ttft_err_s'] * 1000:+6.2f} ms  "
                          f"ITL p99 err {row['itl_err_s'] * 1000:+6.2f} ms  "
                          f"server late p99 {row['truth']['late_p99_s'] * 1000:.3f} ms  CPU {row['client_cpu']:.0%}",
                          flush=True)
        except KeyboardInterrupt:
            print("interrupted: reporting the levels measured so far")
    table = render(rows, per_chunk_profile(), per_request_profile(), server_core, client_core)
    measured = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python benchmarks/loadgen.py "
                f"{' '.join(sys.argv[1:])}`. {environment(load_before)}\n\n{table}\n")
    print()
    print(measured)
    if args.out:
        write_between_markers(args.out, measured)
    report_ceiling(rows, args.save_ceiling, f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
                   f"benchmarks/loadgen.py --streams {args.streams}")
    return 0


def report_ceiling(rows: list[dict], save: bool, measured: str) -> None:
    from tokenrig.loadgen.ceiling import per_core_ceiling, save_ceiling

    row = measured_ceiling(rows)
    if row is None:
        shipped = per_core_ceiling()
        print(f"no tokenrig row within goal: this machine's ceiling is not measured ({shipped.chunks_per_s:,} "
              f"chunks/s a process stays in use, {shipped.source})")
        return
    line = (f"this machine's ceiling: {row['tokens_per_s']:,.0f} chunks/s per load-generator process "
            f"(the {row['streams']}-stream row)")
    if save:
        print(f"{line}; saved to {save_ceiling(row['tokens_per_s'], measured)}: tokenrig loadtest uses it here")
    else:
        print(f"{line}; not saved (--save-ceiling keeps it for tokenrig loadtest)")


def write_between_markers(path: Path, text: str) -> None:
    """Put `text` between the file's TABLE_START and TABLE_END markers, keeping the rest (the analysis
    written around the table); a file without them gets a title and the markers."""
    old = path.read_text() if path.exists() else f"# Load-generator capacity\n\n{TABLE_START}\n{TABLE_END}\n"
    if TABLE_START not in old or TABLE_END not in old:
        old = f"{old.rstrip()}\n\n{TABLE_START}\n{TABLE_END}\n"
    head, rest = old.split(TABLE_START, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{TABLE_START}\n{text}{TABLE_END}{rest.split(TABLE_END, 1)[1]}")


if __name__ == "__main__":
    sys.exit(main())

"""tokenrig against `vllm bench serve` on the same server: the cross-check table of serve-h200-vllm.md.

    python docs/results/vllm_crosscheck.py docs/results/serve-h200-vllm-2026-11-30/xcheck \
        docs/results/serve-h200-vllm-2026-11-30/bench-bf16

For each stream count it puts three columns side by side: tokenrig's summary (docs/metrics.md: from the
scheduled send, to the stream's end, steady-state window), tokenrig's own request records re-read with
vLLM's definitions (every request, from the actual send, to the last content chunk, throughput over first
send to last end), and vLLM's own result file (`--save-result --save-detailed`). Where the middle column
agrees with the first, the definitions do not explain a difference to the third; what remains is the server
running differently during the two runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np


def _read_json_lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as lines:
        return [json.loads(line) for line in lines]


def tokenrig_step(step_dir: Path) -> tuple[dict, dict]:
    """(tokenrig's summary figures, the same records under vLLM bench's definitions) of one sweep step."""
    summary = json.loads((step_dir / "summary.json").read_text())
    latency = summary["latency_s"]
    own = {"ttft_p50": latency["ttft"]["p50"] * 1e3, "ttft_p99": latency["ttft"]["p99"] * 1e3,
           "tpot_p50": latency["tpot"]["p50"] * 1e3, "output_tok_s": summary["throughput"]["output_tokens_per_s"]}
    records_path = next(step_dir.glob("requests.jsonl*"))
    ok = [r for r in _read_json_lines(records_path)
          if r["status"] == 200 and r["error"] is None and r["chunk_offsets_s"]]
    sent = np.array([r["scheduled_at"] + r["send_lag_s"] for r in ok])
    ttft = np.array([r["ttft_s"] - r["send_lag_s"] for r in ok])
    last_chunk = np.array([r["chunk_offsets_s"][-1] - r["send_lag_s"] for r in ok])
    tokens = np.array([sum(r["chunk_tokens"]) for r in ok])
    tpot = (last_chunk - ttft) / (tokens - 1)
    vllm_way = {"ttft_p50": np.percentile(ttft, 50) * 1e3, "ttft_p99": np.percentile(ttft, 99) * 1e3,
                "tpot_p50": np.percentile(tpot, 50) * 1e3,
                "output_tok_s": tokens.sum() / ((sent + last_chunk).max() - sent.min())}
    return own, vllm_way


def bench_result(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as result:
        data = json.load(result)
    return {"ttft_p50": data["median_ttft_ms"], "ttft_p99": data["p99_ttft_ms"], "tpot_p50": data["median_tpot_ms"],
            "output_tok_s": data["output_throughput"], "streams": data["max_concurrency"],
            "requests": data["completed"], "seconds": data["duration"]}


def table(sweep_run: Path, bench_dir: Path) -> str:
    steps = {int(step.name.split("-")[-1]): step for step in sorted(sweep_run.rglob("steps/*-users-*"))}
    benches = {result["streams"]: result for result in map(bench_result, sorted(bench_dir.glob("c*.json*")))}
    lines = ["| streams | metric | tokenrig | tokenrig records, vLLM's definitions | vllm bench serve "
             "| tokenrig vs bench |",
             "|---:|---|---:|---:|---:|---:|"]
    names = {"ttft_p50": "TTFT p50 ms", "ttft_p99": "TTFT p99 ms", "tpot_p50": "TPOT p50 ms",
             "output_tok_s": "output tok/s"}
    for streams in sorted(set(steps) & set(benches)):
        own, vllm_way = tokenrig_step(steps[streams])
        bench = benches[streams]
        for key, name in names.items():
            difference = own[key] / bench[key] - 1
            lines.append(f"| {streams} | {name} | {own[key]:.2f} | {vllm_way[key]:.2f} | {bench[key]:.2f} "
                         f"| {difference:+.1%} ({own[key] - bench[key]:+.2f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a tokenrig `--users sweep` run (or a folder holding one)")
    parser.add_argument("bench", type=Path, help="folder of vllm bench serve result files c<streams>.json[.gz]")
    args = parser.parse_args()
    print(table(args.sweep, args.bench), end="")


if __name__ == "__main__":
    main()

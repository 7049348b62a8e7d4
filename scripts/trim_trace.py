"""Cut a torch-profiler trace down to what tokenrig's operator breakdown reads, for a small test fixture.

    python scripts/trim_trace.py TRACE.pt.trace.json.gz OUT.json.gz --steps 6

Keeps the first N engine-step annotations and the device work, memcopies and launches between them (the
fields `tokenrig/breakdown/trace.py` reads: ph, cat, name, ts, dur, tid, args.correlation); drops the rest.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from tokenrig.breakdown.trace import DEVICE_CATEGORIES, load_events, parse_annotation

KEPT = ("user_annotation", "cuda_runtime", "cuda_driver", "cpu_op", *DEVICE_CATEGORIES)


def trim(events: list[dict], steps: int) -> list[dict]:
    marks = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
                    and parse_annotation(e.get("name", ""))), key=lambda e: e["ts"])
    if len(marks) <= steps:
        raise SystemExit(f"the trace has {len(marks)} steps; ask for fewer than that")
    begin, end = marks[0]["ts"], marks[steps]["ts"]  # launches up to the next step's start
    launches = {e["args"]["correlation"] for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and begin <= e["ts"] < end and "correlation" in e.get("args", {})}
    kept = []
    for event in events:
        cat = event.get("cat")
        if event.get("ph") != "X" or cat not in KEPT:
            continue
        if cat in DEVICE_CATEGORIES:
            if event.get("args", {}).get("correlation") not in launches:
                continue
        elif not begin <= event["ts"] < end or (cat == "user_annotation" and not parse_annotation(event["name"])):
            continue
        if cat in ("cuda_runtime", "cuda_driver") and event.get("args", {}).get("correlation") not in launches:
            continue
        slim = {key: event[key] for key in ("ph", "cat", "name", "ts", "dur", "tid") if key in event}
        if "correlation" in event.get("args", {}):
            slim["args"] = {"correlation": event["args"]["correlation"]}
        kept.append(slim)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    kept = trim(load_events(args.trace), args.steps)
    with gzip.open(args.out, "wt") as handle:
        json.dump({"traceEvents": kept}, handle, separators=(",", ":"))
    print(f"{args.out}: {len(kept)} events, {args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

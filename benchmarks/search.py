"""How close to the true knee `tokenrig loadtest --find-max` lands, and how fast, against a 10-rate sweep.

The server is tokenrig's sim engine as a queue: a fixed schedule with `--max-num-seqs` slots, so SLOTS
requests are served at once, each holding its slot for TTFT + (OUTPUT - 1) x TPOT, and the rest wait in
arrival order. A request's TTFT is its wait plus TTFT_S, so the highest Poisson rate whose TTFT p99 meets
the SLO (the knee) is a property of an N-server FIFO queue with deterministic service, computed here by
simulating that queue (independent replications give its 95 % interval). Against one such server:

* the search, `tokenrig loadtest --url ... --find-max --slo ttft_p99=...` with its defaults (start 1 req/s),
  once per seed: its answer's error against the knee, whether its stated 95 % interval holds the knee, wall
  time and steps;
* the baseline, measured in the same run: 10 rates evenly spaced up to the queue's capacity (SLOTS / service
  time), each run for the same number of samples as one full search step (1000 requests for a p99), its
  answer the highest rate that met the SLO below the lowest that missed it.

Also printed, from the queueing simulation: how often a full step at 90 % and 95 % of the knee misses the
SLO by chance, against what the binomial rule (independent samples) predicts.

    python benchmarks/search.py [--seeds 1,2,3] [--out docs/results/slo-search.md]

Ctrl-C stops after the run in progress and prints what was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import binom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SLOTS, TTFT_S, TPOT_S, OUTPUT_TOKENS = 16, 0.040, 0.008, 16
SERVICE_S = TTFT_S + (OUTPUT_TOKENS - 1) * TPOT_S  # 160 ms a request: capacity 100 req/s
CAPACITY_RPS = SLOTS / SERVICE_S
SLO_PERCENTILE, SLO_THRESHOLD_S = 99.0, 0.200
WARMUP_S = 1.0
SWEEP_RATES = 10
GOAL_ERROR, GOAL_TIME_RATIO = 0.05, 1 / 3
SCENARIO = f"""name: slo-search-bench
source: benchmark
requests:
  - {{name: fixed, api: completions, input_tokens: {{dist: fixed, value: 32}},
     output_tokens: {{dist: fixed, value: {OUTPUT_TOKENS}}}}}
load: {{type: poisson, rate: 1, duration_s: 60, warmup_s: {WARMUP_S:g}}}
"""


# ---------------------------------------------------------------------------------------------------------------
# the truth: the queue, simulated

def queue_ttft(gaps: np.ndarray, rate: float) -> np.ndarray:
    """TTFT of each arrival at an N-slot FIFO queue with deterministic service, starting empty. With equal
    service times requests finish in arrival order, so request i starts at max(arrival i, end of request
    i - N): within each residue class mod N that is s_k = max(a_k, s_(k-1) + S) = k S + max_(j<=k)(a_j - j S)."""
    arrivals = np.cumsum(gaps) / rate
    starts = np.empty_like(arrivals)
    for residue in range(SLOTS):
        own = arrivals[residue::SLOTS]
        k = np.arange(own.size) * SERVICE_S
        starts[residue::SLOTS] = k + np.maximum.accumulate(own - k)
    return starts - arrivals + TTFT_S


def knee_of(gaps: np.ndarray) -> float:
    """The highest rate whose steady-state TTFT percentile meets the threshold, for one stream of unit gaps (the
    same gaps at every rate: the percentile rises with the rate, so bisection is exact to its tolerance)."""
    low, high = 0.3 * CAPACITY_RPS, CAPACITY_RPS
    burn = gaps.size // 20
    while high - low > 1e-4 * CAPACITY_RPS:
        rate = (low + high) / 2
        if np.percentile(queue_ttft(gaps, rate)[burn:], SLO_PERCENTILE) <= SLO_THRESHOLD_S:
            low = rate
        else:
            high = rate
    return (low + high) / 2


def true_knee(replications: int = 8, arrivals: int = 1_000_000) -> tuple[float, float]:
    """The knee and the half-width of its 95 % interval over independent replications."""
    rng = np.random.default_rng(20261207)
    knees = [knee_of(rng.exponential(size=arrivals)) for _ in range(replications)]
    return float(np.mean(knees)), float(1.96 * np.std(knees, ddof=1) / np.sqrt(replications))


def chance_misses(knee: float, fraction: float, samples: int, trials: int = 400,
                  steady: int = 2_000_000) -> tuple[float, float]:
    """At `fraction` of the knee: the share of steps of `samples` requests (from an empty queue, after the
    warm-up) whose TTFT percentile misses the threshold, and the share the binomial rule predicts from the
    steady-state exceedance probability (independent samples)."""
    rng = np.random.default_rng(7)
    rate = fraction * knee
    skip = int(WARMUP_S * rate)
    misses = sum(np.percentile(queue_ttft(rng.exponential(size=skip + samples), rate)[skip:], SLO_PERCENTILE)
                 > SLO_THRESHOLD_S for _ in range(trials))
    exceed = float(np.mean(queue_ttft(rng.exponential(size=steady), rate)[steady // 20:] > SLO_THRESHOLD_S))
    beyond_allowed = int(samples * (100 - SLO_PERCENTILE) / 100)  # more than this beyond: the percentile misses
    return misses / trials, float(binom.sf(beyond_allowed, samples, exceed))


# ---------------------------------------------------------------------------------------------------------------
# the measurements: tokenrig against the sim queue

def loadtest(url: str, scenario: Path, results: Path, log: Path, *args: str) -> tuple[dict, float, int]:
    """One `tokenrig loadtest --url` in this process: its run directory's search.json or summary.json, its wall
    time and exit status; its console output goes to `log`."""
    from tokenrig.cli import main

    argv = ["loadtest", "--url", url, "--model", "tiny", "--scenario", str(scenario), "--results", str(results),
            "--slo", f"ttft_p{SLO_PERCENTILE:g}={SLO_THRESHOLD_S * 1000:g}ms", *args]
    before = set(results.glob("*")) if results.exists() else set()
    output = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        status = main(argv)
    wall = time.perf_counter() - start
    with log.open("a") as file:
        file.write(f"$ tokenrig {shlex.join(argv)}\n{output.getvalue()}\n")
    if status not in (0, 1):
        raise RuntimeError(f"tokenrig {shlex.join(argv)} exited {status}; see {log}")
    (run_dir,) = set(results.glob("*")) - before
    document = run_dir / ("search.json" if "--find-max" in args else "summary.json")
    return json.loads(document.read_text()), wall, status


def run_search(url: str, scenario: Path, work: Path, log: Path, seed: int, knee: float, quick: bool) -> dict:
    extra = ["--quick"] if quick else []
    search, wall, _ = loadtest(url, scenario, work / "search", log, "--find-max", "--seed", str(seed), *extra)
    answer = search.get("max_rate_meeting_slos")
    low, high = search.get("knee_ci95_rps") or (None, None)
    return {"seed": seed, "quick": quick, "answer": answer, "knee_estimate": search.get("knee_rps"),
            "interval": [low, high], "covers": None if low is None and high is None
            else (low is None or low <= knee) and (high is None or knee <= high),
            "error": None if answer is None else answer / knee - 1, "wall_s": wall, "steps": len(search["steps"]),
            "probes": sum(1 for step in search["steps"] if step.get("probe")), "stop_reason": search["stop_reason"]}


def run_sweep(url: str, scenario: Path, work: Path, log: Path, seed: int, knee: float) -> dict:
    from tokenrig.metrics.run_summary import RunSummary
    from tokenrig.metrics.slo import samples_for
    from tokenrig.metrics.verdict import StepResult

    samples = samples_for(SLO_PERCENTILE, 10)  # a full search step's (--tail-samples 10)
    rows, start = [], time.perf_counter()
    for index in range(1, SWEEP_RATES + 1):
        rate = CAPACITY_RPS * index / SWEEP_RATES
        summary, _, _ = loadtest(url, scenario, work / "sweep", log, "--rate", f"{rate:g}", "--seed",
                                 str(seed + index), "--duration", f"{WARMUP_S + samples / rate:.3f}")
        rows.append((rate, StepResult(rate, RunSummary.model_validate(summary)).slo_met))  # as a search step's
    wall = time.perf_counter() - start
    lowest_missed = min((rate for rate, met in rows if not met), default=None)
    met = [rate for rate, ok in rows if ok and (lowest_missed is None or rate < lowest_missed)]
    answer = max(met, default=None)
    return {"seed": seed, "answer": answer, "error": None if answer is None else answer / knee - 1, "wall_s": wall,
            "steps": len(rows), "samples_per_rate": samples}


# ---------------------------------------------------------------------------------------------------------------

def environment() -> str:
    from tokenrig.loadgen.ceiling import cpu_model

    load = os.getloadavg()
    return (f"{cpu_model()}, {os.cpu_count()} cores, load average {load[0]:.1f} at the start; Python "
            f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def table(knee: float, knee_half: float, searches: list[dict], sweep: dict | None, misses: list, command: str,
          env: str) -> str:
    lines = [f"Machine and date: {env}", f"Command: `{command}`", "",
             f"Queue: {SLOTS} slots, {SERVICE_S * 1000:g} ms a request (TTFT {TTFT_S * 1000:g} ms + "
             f"{OUTPUT_TOKENS - 1} x {TPOT_S * 1000:g} ms), capacity {CAPACITY_RPS:g} req/s; SLO TTFT "
             f"p{SLO_PERCENTILE:g} <= {SLO_THRESHOLD_S * 1000:g} ms. True knee (queueing simulation): "
             f"**{knee:.2f} req/s** (95 %: ±{knee_half:.2f})", "",
             "| run | seed | answer req/s | error | knee est. | stated 95 % interval | holds knee | steps (probes) "
             "| wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in searches:
        low, high = (f"{v:.1f}" if v is not None else "?" for v in row["interval"])
        estimate = f"{row['knee_estimate']:.2f}" if row["knee_estimate"] is not None else "-"
        answer = f"{row['answer']:.2f}" if row["answer"] is not None else "none"
        lines.append(f"| find-max{' --quick' if row['quick'] else ''} | {row['seed']} | {answer} | "
                     f"{percent(row['error'])} | {estimate} | {low}-{high} | "
                     f"{'-' if row['covers'] is None else 'yes' if row['covers'] else 'NO'} | "
                     f"{row['steps']} ({row['probes']}) | {row['wall_s']:.0f} |")
    if sweep:
        answer = f"{sweep['answer']:.2f}" if sweep["answer"] is not None else "none"
        lines.append(f"| sweep of {sweep['steps']} rates, {sweep['samples_per_rate']} requests each | "
                     f"{sweep['seed']} | {answer} | {percent(sweep['error'])} | - | - | - | {sweep['steps']} | "
                     f"{sweep['wall_s']:.0f} |")
    lines.append("")
    full = [row for row in searches if not row["quick"]]
    if sweep and full:
        ratio = np.mean([row["wall_s"] for row in full]) / sweep["wall_s"]
        within = sum(row["error"] is not None and abs(row["error"]) <= GOAL_ERROR for row in full)
        lines.append(f"find-max: {within} of {len(full)} seeds within ±{GOAL_ERROR:.0%} of the knee, mean wall time "
                     f"**{ratio:.2f}x the sweep's** (goal: all within ±{GOAL_ERROR:.0%}, <= {GOAL_TIME_RATIO:.2f}x)")
    quick = [row for row in searches if row["quick"]]
    if sweep and quick:
        ratio = np.mean([row["wall_s"] for row in quick]) / sweep["wall_s"]
        lines.append(f"find-max --quick: mean wall time {ratio:.2f}x the sweep's")
    lines += ["", "A full step of 1000 requests (after the warm-up, from an empty queue) missing the SLO by chance:",
              "",
              "| rate | steps missing (queue simulation) | binomial rule's prediction |", "|---|---|---|"]
    for fraction, observed, predicted in misses:
        lines.append(f"| {fraction:.0%} of the knee | {observed:.1%} | {predicted:.1%} |" if predicted >= 0.001
                     else f"| {fraction:.0%} of the knee | {observed:.1%} | {predicted * 100:.1g} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3", help="search seeds, comma-separated")
    parser.add_argument("--quick-seeds", default="1", help="seeds of --find-max --quick runs ('' for none)")
    parser.add_argument("--no-sweep", action="store_true", help="leave out the sweep baseline")
    parser.add_argument("--replications", type=int, default=8, help="queueing simulations of the knee (>= 2)")
    parser.add_argument("--arrivals", type=int, default=1_000_000, help="arrivals per queueing simulation")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file (between markers)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    quick_seeds = [int(s) for s in args.quick_seeds.split(",") if s.strip()]
    command = "python benchmarks/search.py " + shlex.join(sys.argv[1:])
    env = environment()
    print(f"{env}\ncomputing the true knee (queueing simulation)...", flush=True)
    knee, knee_half = true_knee(args.replications, args.arrivals)
    misses = [(fraction, *chance_misses(knee, fraction, 1000, steady=args.arrivals)) for fraction in (0.9, 0.95)]
    print(f"true knee {knee:.2f} req/s (95 %: ±{knee_half:.2f})", flush=True)

    from tokenrig.profiles import resolve_gpu, resolve_model
    from tokenrig.serve.launcher import LaunchedServer
    from tokenrig.serve.spec import ServerSpec, SimOptions

    searches, sweep = [], None
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))  # kept: the runs' directories and console.log
    print(f"runs and their console output: {work}", flush=True)
    scenario = work / "scenario.yaml"
    scenario.write_text(SCENARIO)
    log = work / "console.log"
    spec = ServerSpec(backend="sim", model=resolve_model("tiny"), gpu=resolve_gpu("cpu"), max_num_seqs=SLOTS,
                      options=SimOptions(sim_ttft_ms=TTFT_S * 1000, sim_tpot_ms=TPOT_S * 1000))
    try:
        with LaunchedServer(spec, work / "server.log", progress=lambda *_: None) as server:
            url = server.endpoint.base_url
            for seed in seeds:
                searches.append(run_search(url, scenario, work, log, seed, knee, quick=False))
                print(f"find-max seed {seed}: {searches[-1]}", flush=True)
            for seed in quick_seeds:
                searches.append(run_search(url, scenario, work, log, seed, knee, quick=True))
                print(f"find-max --quick seed {seed}: {searches[-1]}", flush=True)
            if not args.no_sweep:
                sweep = run_sweep(url, scenario, work, log, seeds[0] if seeds else 1, knee)
                print(f"sweep: {sweep}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: the table covers the runs finished so far")
    text = table(knee, knee_half, searches, sweep, misses, command, env)
    print("\n" + text)
    if args.out:
        start, end = "<!-- benchmarks/search.py writes from here -->", "<!-- to here -->"
        old = args.out.read_text() if args.out.exists() else f"{start}\n{end}\n"
        head, _, rest = old.partition(start)
        _, _, tail = rest.partition(end)
        args.out.write_text(f"{head}{start}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()

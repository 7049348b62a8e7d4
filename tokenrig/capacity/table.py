"""The capacity answer as people read it: the console table, and CSV rows for a spreadsheet.

Both read the answer's document (what capacity.json holds), so the HTML report and a saved JSON
file show the same figures as the console.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

CSV_COLUMNS = ("gpu", "quant", "engine", "tp", "source", "band", "goodput_rps", "goodput_output_tokens_per_s",
               "output_tokens_per_request", "input_tokens_per_request", "replicas", "gpus", "served_rps",
               "usd_per_hour", "usd_per_month", "usd_per_million_output_tokens", "usd_per_million_input_tokens",
               "kwh_per_million_output_tokens", "basis")


def band_text(band: float | None) -> str:
    if band is None:
        return "no held-out check"
    return "unbounded" if math.isinf(band) else f"±{band:.0%}"


def goodput_text(row: dict) -> str:
    value = f"{row['goodput_rps']:.2f}"
    return value if row["source"] == "measured" else f"{value} {band_text(row['band'])}"


def flat_rows(document: dict) -> list[dict]:
    return [{**{k: v for k, v in row.items() if k != "sizing"}, **row["sizing"]} for row in document["rows"]]


def render(document: dict) -> str:
    q = document["question"]
    slos = ", ".join(f"{name} <= {seconds * 1000:g} ms" for name, seconds in q["slos"].items())
    target = (f"{q['target_rps']:g} req/s with {q['headroom']:.0%} headroom" if q["target_rps"] is not None
              else "one replica at its goodput (no --target-rps)")
    lines = [f"capacity: {q['model']}, scenario {q['scenario']}, SLOs {slos}; sized for {target}", ""]
    header = (f"{'gpu':<9}{'weights':<8}{'engine':<40}{'TP':>3} {'source':<10}{'goodput req/s':>20}{'out tok/s':>10}"
              f"{'replicas':>9}{'GPUs':>6}{'$/hour':>10}{'$/month':>11}{'$/M out':>9}{'$/M in':>8}{'kWh/M out':>10}")
    lines.append(header)
    for row in flat_rows(document):
        lines.append(f"{row['gpu']:<9}{row['quant']:<8}{row['engine'][:39]:<40}{row['tp']:>3} {row['source']:<10}"
                     f"{goodput_text(row):>20}{row['goodput_output_tokens_per_s']:>10.0f}{row['replicas']:>9}"
                     f"{row['gpus']:>6}{row['usd_per_hour']:>10.2f}{row['usd_per_month']:>11,.0f}"
                     f"{row['usd_per_million_output_tokens']:>9.2f}{row['usd_per_million_input_tokens']:>8.3f}"
                     f"{row['kwh_per_million_output_tokens']:>10.2f}")
    if not document["rows"]:
        lines.append("(no configuration could be answered: see the notes)")
    lines += ["", "measured: a --find-max run of that configuration; projected: the SLO search replayed in virtual "
              "time, its steps timed by the engine's operator profile (else its calibrated roofline), ± its worst "
              "held-out error (docs/capacity.md)"]
    for calibration in document["calibrations"]:
        profile = calibration.get("operator_profile")
        if profile:
            lines.append(f"calibration {calibration['engine']} {calibration['quant']}: step times by operator, "
                         f"profiled on {profile['gpu']} ({profile['model']}, {profile['quant']}, {profile['steps']} "
                         f"steps), API {calibration['api_latency_s'] * 1e3:.1f} ms, checked on "
                         f"{len(calibration['steps'])} steps "
                         f"on {', '.join(calibration['gpus'])}, held-out {band_text(calibration['band'])}")
            continue
        lines.append(f"calibration {calibration['engine']} {calibration['quant']}: compute "
                     f"{calibration['compute_efficiency']:.3f}, bandwidth {calibration['bandwidth_efficiency']:.3f}, "
                     f"{calibration['step_overhead_s'] * 1e3:.2f} ms/step + "
                     f"{calibration['sequence_overhead_s'] * 1e6:.0f} us/sequence, API "
                     f"{calibration['api_latency_s'] * 1e3:.1f} ms, from {len(calibration['steps'])} "
                     f"steps on {', '.join(calibration['gpus'])}, held-out {band_text(calibration['band'])}")
    for row in flat_rows(document):  # every projected row's basis: each may rest on other steps and GPU types
        if row["source"] == "projected":
            elsewhere = " — the band was checked on other GPU types only" if "not among them" in row["basis"] else ""
            lines.append(f"note: {row['gpu']} {row['quant']} {row['engine']}: projected, {row['basis']}{elsewhere}")
    lines += [f"note: {note}" for note in document["notes"]]
    prices = "; ".join(f"{gpu} ${p['usd_per_hour']:.2f}/h ({'--price' if p['overridden'] else p['date']})"
                       for gpu, p in q["prices"].items())
    tdp = ", ".join(f"{g} {w:g} W" for g, w in q["tdp_w"].items())
    lines.append(f"prices: {prices}; sources in tokenrig/profiles/gpus.yaml. Energy at TDP ({tdp}).")
    return "\n".join(lines)


def write_csv(document: dict, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(flat_rows(document))

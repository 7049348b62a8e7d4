"""Capacity arithmetic: from one replica's goodput to replicas, GPUs, dollars and energy.

Pure functions of their inputs (no measurement here), checked against hand-computed cases:

- replicas = ceil(target req/s x (1 + headroom) / goodput per replica): each replica runs at most
  1 / (1 + headroom) of the load it was measured (or projected) to sustain within the SLOs;
- GPUs = replicas x GPUs per replica (the replica's tensor-parallel size);
- $/hour = GPUs x the GPU's price; $/month = $/hour x 730 (8760 hours / 12);
- $ per million output (input) tokens = $/hour over the output (input) tokens served in an hour at the
  target rate, each figure carrying the whole cost (they are two views of one bill, not two parts);
- training: $ per billion tokens trained = GPUs x the GPU's price over the tokens trained in an hour;
- energy per million output tokens = GPUs x TDP over the output tokens served: a bound, as GPUs
  rarely draw their TDP, without the host, cooling or idle replicas' share beyond the GPUs.

Without a target the figures are for one replica at its goodput.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

HOURS_PER_MONTH = 8760 / 12


@dataclass(frozen=True)
class ReplicaCapacity:
    """What one replica sustains within the SLOs, and the requests it serves."""

    goodput_rps: float
    output_tokens_per_request: float
    input_tokens_per_request: float
    gpus_per_replica: int


@dataclass(frozen=True)
class Sizing:
    replicas: int
    gpus: int
    served_rps: float
    usd_per_hour: float
    usd_per_month: float
    usd_per_million_output_tokens: float
    usd_per_million_input_tokens: float
    kwh_per_million_output_tokens: float

    def as_dict(self) -> dict:
        return asdict(self)


def size(capacity: ReplicaCapacity, price_usd_per_hour: float, tdp_w: float, target_rps: float | None,
         headroom: float) -> Sizing:
    if capacity.goodput_rps <= 0:
        raise ValueError("a replica that meets the SLOs at no load cannot be sized")
    if target_rps is None:
        replicas, served = 1, capacity.goodput_rps
    else:
        replicas, served = math.ceil(target_rps * (1 + headroom) / capacity.goodput_rps - 1e-9), target_rps
    gpus = replicas * capacity.gpus_per_replica
    per_hour = gpus * price_usd_per_hour
    output_per_hour = served * capacity.output_tokens_per_request * 3600
    input_per_hour = served * capacity.input_tokens_per_request * 3600
    kwh_per_hour = gpus * tdp_w / 1000
    return Sizing(replicas=replicas, gpus=gpus, served_rps=served, usd_per_hour=per_hour,
                  usd_per_month=per_hour * HOURS_PER_MONTH,
                  usd_per_million_output_tokens=per_hour / output_per_hour * 1e6,
                  usd_per_million_input_tokens=per_hour / input_per_hour * 1e6 if input_per_hour else math.inf,
                  kwh_per_million_output_tokens=kwh_per_hour / output_per_hour * 1e6)


def usd_per_billion_tokens_trained(gpus: int, price_usd_per_hour: float, tokens_per_s: float) -> float:
    """What training costs at a measured throughput: the GPUs' $/hour over the tokens trained in that hour."""
    return gpus * price_usd_per_hour / (tokens_per_s * 3600) * 1e9

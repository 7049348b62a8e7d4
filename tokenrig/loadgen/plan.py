"""Load plans: when each request is due.

A plan hands out send slots. Closed loop (`concurrency`): a user's next request is due the
moment its previous one ends. Open loop (`poisson`, `constant`): due times come from the
arrival process alone, whatever the server does, so latency is measured from the scheduled
time and a late client counts against the result (no coordinated omission).
"""

from __future__ import annotations

import random
import time

from tokenrig.loadgen.scenario import LoadPlanSpec


class LoadPlan:
    def __init__(self, spec: LoadPlanSpec, start: float | None = None):
        self.spec = spec
        self.start = time.perf_counter() if start is None else start
        self.end = self.start + spec.duration_s
        self._rng = random.Random(spec.seed)
        self._next_due = self.start
        self.issued = 0

    @property
    def open_loop(self) -> bool:
        return self.spec.type != "concurrency"

    @property
    def pool_size(self) -> int:
        """How many Locust users run the plan: the concurrency, or the open-loop safety cap."""
        return self.spec.users if not self.open_loop else self.spec.max_in_flight

    @property
    def target_rate(self) -> float | None:
        return self.spec.rate if self.open_loop else None

    def next_slot(self, now: float) -> float | None:
        """Due time (perf_counter seconds) of the next request, or None when the plan is over."""
        if not self.open_loop:
            if now >= self.end:
                return None
            self.issued += 1
            return max(now, self.start)
        due = self._next_due
        if due >= self.end:
            return None
        gap = self._rng.expovariate(self.spec.rate) if self.spec.type == "poisson" else 1.0 / self.spec.rate
        self._next_due = due + gap
        self.issued += 1
        return due

    def in_steady_window(self, due: float) -> bool:
        return self.start + self.spec.warmup_s <= due < self.end - self.spec.cooldown_s

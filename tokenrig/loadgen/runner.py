"""Run a load plan with Locust in this process and report progress until it ends or Ctrl-C.

Locust's `LocalRunner` drives a pool of users of the run's API client; the plan decides when each
request is due, and loadgen/driver.py's loop waits for the load. Whatever happens, every finished
request is already in the sink.
"""

from __future__ import annotations

import logging
import time

from tokenrig.loadgen.driver import LoadOutcome, cpu_seconds, drive, freeze_heap
from tokenrig.loadgen.users import USER_CLASSES, LoadContext, LoadEnvironment

SPAWN_LEAD_S = 0.5  # users are spawned before the plan's first due time


class _QuietSpawnRate(logging.Filter):
    """Locust warns that a spawn rate above 100 users/s 'sometimes causes issues': tokenrig spawns the whole pool
    (up to the open loop's cap) in the lead time before the plan starts, where no user sends yet, so the
    warning is noise on every open-loop run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "spawn rate is very high" not in record.getMessage()


logging.getLogger("locust.runners").addFilter(_QuietSpawnRate())


def run_load(ctx: LoadContext, progress=print, progress_every_s: float = 5.0, stop_when=None) -> LoadOutcome:
    """Run the plan to its end (and until in-flight requests finish), Ctrl-C, or `stop_when()`."""
    environment = LoadEnvironment(user_classes=[USER_CLASSES[ctx.client]])
    environment.tokenrig = ctx
    runner = environment.create_local_runner()
    plan = ctx.plan
    # before the start is fixed: the first collection of a heap with torch imported takes seconds on a slow
    # machine (3.6 s measured on a 2-core VM), and the plan's first requests were sent that much late
    freeze_heap()
    plan.start = time.perf_counter() + SPAWN_LEAD_S
    ctx.unix_offset = time.time() - time.perf_counter()
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    runner.start(plan.pool_size, spawn_rate=plan.pool_size / (SPAWN_LEAD_S / 2))

    def status(elapsed: float) -> str:
        return (f"done {ctx.completed:6d}  errors {ctx.failed:4d}  in flight {ctx.in_flight:4d}  "
                f"output {ctx.output_tokens / max(elapsed, 1e-9):8.1f} tok/s")

    try:
        stop = drive(plan, lambda: time.perf_counter() > plan.end and ctx.in_flight == 0,
                     plan.end + ctx.request_timeout_s, status, progress, progress_every_s, stop_when,
                     in_flight=lambda: ctx.in_flight)
        if stop.timed_out:
            ctx.gave_up = True  # the requests still in flight fail: the server never finished them
        if stop.interrupted:
            progress("  interrupted: stopping users, keeping every finished request")
    finally:
        runner.quit()
        ctx.finishers.join(timeout=10)  # records of streams that ended just before the stop
    wall = time.perf_counter() - wall_start
    return LoadOutcome(wall, cpu_seconds() - cpu_start, stop.interrupted, stop.timed_out, stop.stopped_early,
                       stop.stopped_at)

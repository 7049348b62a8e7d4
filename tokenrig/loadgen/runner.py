"""Run a load plan with Locust in this process and report progress until it ends or Ctrl-C.

Locust's `LocalRunner` drives a pool of `OpenAIStreamingUser` greenlets; the plan decides
when each request is due. Whatever happens, every finished request is already in the sink.
"""

from __future__ import annotations

import gc
import resource
import time
from dataclasses import dataclass

import gevent
from locust.env import Environment

from tokenrig.loadgen.users import LoadContext, OpenAIStreamingUser, TGIStreamingUser

SPAWN_LEAD_S = 0.5  # users are spawned before the plan's first due time


@dataclass
class LoadOutcome:
    wall_s: float
    client_cpu_s: float
    interrupted: bool
    timed_out: bool
    stopped_early: bool = False  # `stop_when` decided the outcome before the plan ended
    stopped_at: float | None = None  # perf_counter time the load was stopped (interrupted or stopped early)

    @property
    def client_cpu_fraction(self) -> float:
        return self.client_cpu_s / self.wall_s if self.wall_s else 0.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's reach. Everything imported before a run
    (torch alone is hundreds of thousands of objects) would be walked by each full collection: a pause of
    tens of milliseconds in the middle of every stream, seen as TTFT and ITL error."""
    gc.collect()
    gc.freeze()


def run_load(ctx: LoadContext, progress=print, progress_every_s: float = 5.0, stop_when=None) -> LoadOutcome:
    """Run the plan to its end (and until in-flight requests finish), Ctrl-C, or `stop_when()`."""
    environment = Environment(user_classes=[TGIStreamingUser if ctx.client == "tgi" else OpenAIStreamingUser])
    environment.tokenrig = ctx
    runner = environment.create_local_runner()
    plan = ctx.plan
    plan.start = time.perf_counter() + SPAWN_LEAD_S
    ctx.unix_offset = time.time() - time.perf_counter()
    freeze_heap()
    cpu_start, wall_start = _cpu_seconds(), time.perf_counter()
    interrupted = timed_out = stopped_early = False
    stopped_at = None
    runner.start(plan.pool_size, spawn_rate=plan.pool_size / (SPAWN_LEAD_S / 2))
    give_up_at = plan.end + ctx.request_timeout_s
    try:
        next_report = plan.start + progress_every_s
        while True:
            gevent.sleep(0.05)
            now = time.perf_counter()
            if now > plan.end and ctx.in_flight == 0:
                break
            if now > give_up_at:
                timed_out = ctx.gave_up = True
                break
            if stop_when is not None and stop_when():
                stopped_early, stopped_at = True, now
                break
            if now >= next_report:
                next_report += progress_every_s
                elapsed = now - plan.start
                progress(f"  [{min(elapsed, plan.spec.duration_s):5.0f}s/{plan.spec.duration_s:.0f}s] "
                         f"done {ctx.completed:6d}  errors {ctx.failed:4d}  in flight {ctx.in_flight:4d}  "
                         f"output {ctx.output_tokens / max(elapsed, 1e-9):8.1f} tok/s")
    except KeyboardInterrupt:
        interrupted, stopped_at = True, time.perf_counter()
        progress("  interrupted: stopping users, keeping every finished request")
    finally:
        runner.quit()
        ctx.finishers.join(timeout=10)  # records of streams that ended just before the stop
    wall = time.perf_counter() - wall_start
    return LoadOutcome(wall, _cpu_seconds() - cpu_start, interrupted, timed_out, stopped_early, stopped_at)

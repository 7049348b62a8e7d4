"""The wait every load step runs while its users send: one loop for a local run and a distributed one.

`drive` naps in 50-ms gevent sleeps until the load has finished, and stops it earlier for Ctrl-C,
a caller's `stop_when()` (an SLO already missed, records that cannot be written), a load generator
worker gone missing, or requests still in flight long after the plan's end; it prints progress every
few seconds. `LoadOutcome` is what a step's load reports back: wall and CPU time, and why it stopped.
"""

from __future__ import annotations

import gc
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent

from tokenrig.loadgen.plan import LoadPlan

POLL_S = 0.05


@dataclass
class LoadOutcome:
    wall_s: float
    client_cpu_s: float
    interrupted: bool
    timed_out: bool
    stopped_early: bool = False  # `stop_when` decided the outcome before the plan ended
    stopped_at: float | None = None  # perf_counter time the load was stopped (interrupted or stopped early)
    lost_worker: str | None = None  # a distributed run stopped because this worker went missing

    @property
    def client_cpu_fraction(self) -> float:
        return self.client_cpu_s / self.wall_s if self.wall_s else 0.0


@dataclass
class LoadStop:
    """Why `drive` returned: none of these is the load running to its end."""

    interrupted: bool = False
    timed_out: bool = False
    stopped_early: bool = False
    stopped_at: float | None = None
    lost_worker: str | None = None


class WorkerLostError(RuntimeError):
    """A load-generator worker went missing mid-step: the step's arrivals it owned were not all sent."""


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's reach. Everything imported before a run
    (torch alone is hundreds of thousands of objects) would be walked by each full collection: a pause of
    tens of milliseconds in the middle of every stream, seen as TTFT and ITL error."""
    gc.collect()
    gc.freeze()


def drive(plan: LoadPlan, finished: Callable[[], bool], give_up_at: float, status: Callable[[float], str],
          progress=print, progress_every_s: float = 5.0, stop_when: Callable[[], bool] | None = None,
          lost_worker: Callable[[], str | None] | None = None,
          in_flight: Callable[[], int] | None = None) -> LoadStop:
    """Wait until `finished()`; stop at `give_up_at` (perf_counter), on Ctrl-C, on `stop_when()`, or when
    `lost_worker()` names a worker gone missing. Every `progress_every_s` prints `[elapsed/duration] ` and
    `status(elapsed)`; once the plan is over, `[draining N in flight, Ts past the end]` instead (N when
    `in_flight` tells it)."""
    stop = LoadStop()
    next_report = plan.start + progress_every_s
    try:
        while True:
            gevent.sleep(POLL_S)
            now = time.perf_counter()
            if finished():
                break
            if now > give_up_at:
                stop.timed_out = True
                break
            if stop_when is not None and stop_when():
                stop.stopped_early, stop.stopped_at = True, now
                break
            lost = lost_worker() if lost_worker is not None else None
            if lost is not None:
                stop.lost_worker, stop.stopped_at = lost, now
                break
            if now >= next_report:
                next_report += progress_every_s
                elapsed = now - plan.start
                progress(f"  [{_where(elapsed, plan.spec.duration_s, in_flight)}] {status(elapsed)}")
    except KeyboardInterrupt:
        stop.interrupted, stop.stopped_at = True, time.perf_counter()
    return stop


def _where(elapsed: float, duration: float, in_flight: Callable[[], int] | None) -> str:
    """How far the load is: seconds of its duration, then how long it has been draining (not the duration
    repeated while the last requests finish)."""
    if elapsed <= duration:
        return f"{elapsed:5.0f}s/{duration:.0f}s"
    waiting = f" {in_flight()} in flight" if in_flight is not None else ""
    return f"draining{waiting}, {elapsed - duration:.0f}s past the {duration:.0f}s of load"

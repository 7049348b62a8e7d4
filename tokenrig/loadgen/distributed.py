"""Distributed load: a Locust master in the `tokenrig loadtest` process and N worker processes.

The schedule is split, not re-drawn: worker i of n sends arrivals i, i+n, i+2n, ... of the one
seeded plan (and closed-loop users are spread over the workers by Locust), so the workers
together send exactly what one process would, and each worker's share of a Poisson stream is
still scheduled at the stream's own times. Workers start the plan at one wall-clock time the
master chooses (their clocks must agree, e.g. NTP, when they run on other machines) and ship
every finished request's record to the master in batches; the master writes them all to one
requests.jsonl, so percentiles are computed over every record, never averaged across workers.

Workers: `--workers N` spawns N local worker processes; workers elsewhere run
`python -m tokenrig.loadgen.distributed --master-host HOST [--master-port PORT]`.
"""

from __future__ import annotations

# first: importing locust lets gevent patch the standard library before anything else imports it
import locust  # noqa: F401

# isort: split

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import gevent
from locust.env import Environment
from locust.runners import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, STATE_MISSING
from tokenizers import Tokenizer

from tokenrig.loadgen.driver import LoadOutcome, cpu_seconds, drive, freeze_heap
from tokenrig.loadgen.plan import LoadPlan
from tokenrig.loadgen.scenario import Scenario
from tokenrig.loadgen.users import USER_CLASSES, LoadContext, LoadEnvironment
from tokenrig.loadgen.workload import Workload
from tokenrig.metrics.records import RequestRecord, Sink

CONFIG, READY, RECORDS, DONE = "tokenrig_config", "tokenrig_ready", "tokenrig_records", "tokenrig_done"
SHIP_EVERY_S = 0.25
START_LEAD_S = 2.0  # between the master choosing the start time and the plan's first due time
DEFAULT_MASTER_PORT = 5557


@dataclass
class WorkerReport:
    index: int
    cpu_s: float
    wall_s: float
    clamped: int
    conversations_cut: int

    @property
    def cpu_fraction(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s else 0.0


@dataclass
class DistributedOutcome(LoadOutcome):
    workers: list[WorkerReport] = field(default_factory=list)


class Master:
    """A Locust master that stays up for every step of a run, with its local worker processes."""

    def __init__(self, workers: int, local_workers: int, bind_host: str, port: int, progress=print,
                 client: str = "openai", connect_timeout_s: float = 120):
        self.expected = workers
        self.progress = progress
        self.environment = Environment(user_classes=[USER_CLASSES[client]])
        self.runner = self.environment.create_master_runner(master_bind_host=bind_host, master_bind_port=port)
        self.runner.register_message(READY, self._on_ready)
        self.runner.register_message(RECORDS, self._on_records)
        self.runner.register_message(DONE, self._on_done)
        self.processes: list[subprocess.Popen] = []
        self._sink: Sink | None = None  # the step's, while run() collects records
        self._ready: set[str] = set()
        self._done: dict[str, WorkerReport] = {}
        self._arrivals_recorded: Counter[str] = Counter()  # first-turn records received, per worker node
        self.received = 0
        connect_host = "127.0.0.1" if bind_host in ("0.0.0.0", "*", "") else bind_host
        for _ in range(local_workers):
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "tokenrig.loadgen.distributed", "--master-host", connect_host,
                 "--master-port", str(port)], env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True))
        if workers > local_workers:
            progress(f"waiting for {workers - local_workers} remote workers: run on each "
                     f"`python -m tokenrig.loadgen.distributed --master-host <this host> --master-port {port}`")
        deadline = time.monotonic() + connect_timeout_s
        while len(self.runner.clients) < workers:
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"only {len(self.runner.clients)} of {workers} load-generator workers connected "
                                   f"within {connect_timeout_s:.0f} s")
            if any(p.poll() is not None for p in self.processes):
                self.close()
                raise RuntimeError("a local load-generator worker exited before connecting")
            gevent.sleep(0.1)
        progress(f"{workers} load-generator workers connected")

    def _on_ready(self, environment, msg, **_kwargs) -> None:
        self._ready.add(msg.node_id)

    def _on_records(self, environment, msg, **_kwargs) -> None:
        sink = self._sink
        assert sink is not None, "worker records arrived outside a step"
        for item in msg.data:
            sink.write(RequestRecord(**item))
        self._arrivals_recorded[msg.node_id] += sum(1 for item in msg.data if item["turn"] == 0)
        self.received += len(msg.data)

    def _on_done(self, environment, msg, **_kwargs) -> None:
        self._done[msg.node_id] = WorkerReport(**msg.data)

    def run(self, ctx, scenario, tokenizer_json: str, stop_when=None, progress_every_s: float = 5.0
            ) -> DistributedOutcome:
        """One step: configure every worker, start the plan at one wall-clock time, collect records."""
        plan = ctx.plan
        self._sink, self._ready, self._done = ctx.sink, set(), {}
        self._arrivals_recorded.clear()
        clients = sorted(self.runner.clients.keys())[: self.expected]
        start_unix = time.time() + START_LEAD_S
        for index, client_id in enumerate(clients):
            self.runner.send_message(CONFIG, {
                "index": index, "workers": len(clients), "start_unix": start_unix, "client": ctx.client,
                "base_url": ctx.base_url, "model_name": ctx.workload.model_name,
                "max_context": ctx.workload.max_context, "seed": ctx.workload.seed,
                "scenario": scenario.model_dump(mode="json"), "tokenizer": tokenizer_json,
                "request_timeout_s": ctx.request_timeout_s, "headers": ctx.headers}, client_id=client_id)
        deadline = time.monotonic() + 60
        while len(self._ready) < len(clients):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self._ready)} of {len(clients)} workers confirmed the plan")
            gevent.sleep(0.05)
        ctx.unix_offset = time.time() - time.perf_counter()
        plan.start = start_unix - ctx.unix_offset
        users = max(plan.pool_size, len(clients))
        self.runner.start(users, spawn_rate=users / (START_LEAD_S / 4))
        wall_start = time.perf_counter()

        def status(_elapsed: float) -> str:
            return f"records {self.received:6d}  workers done {len(self._done)}/{len(clients)}"

        try:
            stop = drive(plan, lambda: len(self._done) >= len(clients), plan.end + ctx.request_timeout_s + 30,
                         status, self.progress, progress_every_s, stop_when,
                         lost_worker=lambda: self._lost_worker(clients, plan))
            if stop.interrupted:
                self.progress("  interrupted: stopping workers, keeping every record received")
        finally:
            self.runner.stop()
            gevent.sleep(SHIP_EVERY_S * 2)  # last batches the workers flush on stop
        reports = sorted(self._done.values(), key=lambda r: r.index)
        ctx.workload.clamped = sum(r.clamped for r in reports)
        ctx.workload.conversations_cut = sum(r.conversations_cut for r in reports)
        wall = time.perf_counter() - wall_start
        # each worker is one process on (at most) one core: the busiest one judges the client
        busiest = max(reports, key=lambda r: r.cpu_fraction, default=None)
        return DistributedOutcome(wall, busiest.cpu_fraction * wall if busiest else 0.0, stop.interrupted,
                                  stop.timed_out, stop.stopped_early, stop.stopped_at, stop.lost_worker,
                                  workers=reports)

    def _lost_worker(self, clients: list[str], plan: LoadPlan) -> str | None:
        """What was lost with the first worker Locust marks missing (no heartbeat for a few seconds, as a
        killed or cut-off worker) or that left before reporting its step done; None while all are there."""
        for index, client_id in enumerate(clients):
            node = self.runner.clients.get(client_id)
            if client_id in self._done or (node is not None and node.state != STATE_MISSING):
                continue
            owned = len(range(index, plan.scheduled_total, len(clients)))
            recorded = self._arrivals_recorded[client_id]
            lost = (f"{owned - recorded} of the {owned} arrivals it owned were not sent (or their records were "
                    "lost with it)" if plan.open_loop else f"its users stopped after {recorded} arrivals")
            return (f"load-generator worker {index} of {len(clients)} ({client_id}) went missing (no heartbeat for "
                    f"{HEARTBEAT_INTERVAL * (HEARTBEAT_LIVENESS + 1)} s): {lost}; the step was stopped")
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.runner.quit()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.terminate()
                process.wait(timeout=10)


class _RecordShipper:
    """The worker's sink: batches finished records to the master."""

    def __init__(self, runner):
        self.runner = runner
        self.buffer: list[dict] = []

    def write(self, record) -> None:
        self.buffer.append(vars(record))  # shallow: the record is finished and never changed again

    def flush(self) -> None:
        if self.buffer:
            batch, self.buffer = self.buffer, []
            self.runner.send_message(RECORDS, batch)

    def close(self) -> None:
        self.flush()


def worker_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenrig.loadgen.distributed",
                                     description="A tokenrig load-generator worker: connects to the master of "
                                                 "`tokenrig loadtest --workers N` and sends its share of the plan.")
    parser.add_argument("--master-host", required=True)
    parser.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT)
    args = parser.parse_args(argv)
    # the first collection of the imported heap is the slow one: done now, not in the lead time of a step
    freeze_heap()

    # the master names the class its users are (the run's API client); a worker can be either
    environment = LoadEnvironment(user_classes=list(USER_CLASSES.values()))
    runner = environment.create_worker_runner(args.master_host, args.master_port)
    shipper = _RecordShipper(runner)

    def ship_forever():
        while True:
            gevent.sleep(SHIP_EVERY_S)
            shipper.flush()

    step: dict = {}  # the step in progress: its context, index, start CPU/wall time, report sent or not

    def send_report():
        """Ship what is left and this worker's CPU use, once per step: at the plan's end or on stop."""
        if not step or step["reported"]:
            return
        step["reported"] = True
        shipper.flush()
        ctx = step["ctx"]
        runner.send_message(DONE, asdict(WorkerReport(step["index"], cpu_seconds() - step["cpu"],
                                                      time.perf_counter() - step["wall"], ctx.workload.clamped,
                                                      ctx.workload.conversations_cut)))

    def report_when_done(ctx):
        while not (time.perf_counter() > ctx.plan.end and ctx.in_flight == 0):
            gevent.sleep(0.05)
        if step.get("ctx") is ctx:
            send_report()

    def on_config(environment, msg, **_kwargs):
        data = msg.data
        scenario = Scenario.model_validate(data["scenario"])
        tokenizer = Tokenizer.from_str(data["tokenizer"])
        unix_offset = time.time() - time.perf_counter()
        plan = LoadPlan(scenario.load, start=data["start_unix"] - unix_offset, share=(data["index"], data["workers"]))
        workload = Workload(scenario, tokenizer, data["model_name"], data["max_context"], seed=data["seed"])
        ctx = LoadContext(data["base_url"], plan, workload, tokenizer, shipper, unix_offset=unix_offset,
                          client=data["client"], request_timeout_s=data["request_timeout_s"], headers=data["headers"])
        environment.tokenrig = ctx
        step.update(ctx=ctx, index=data["index"], cpu=cpu_seconds(), wall=time.perf_counter(), reported=False)
        gevent.spawn(report_when_done, ctx)
        freeze_heap()
        runner.send_message(READY, None)

    runner.register_message(CONFIG, on_config)
    environment.events.test_stop.add_listener(lambda **_kwargs: send_report())
    gevent.spawn(ship_forever)
    runner.greenlet.join()


if __name__ == "__main__":
    worker_main()

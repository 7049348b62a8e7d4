"""A load test in virtual time: a scenario's load plan replayed through the sim engine's scheduler.

No server and no sleeping. The requests are the ones a real run sends (the scenario's Workload
with the plan's seed; prompt ids as tokenrig's API layer builds them), the engine is the sim
server's `RooflineScheduler` stepping a virtual clock, and each request becomes a RequestRecord
timed as a perfect client would time it (no network, no client lag). Summaries, SLO verdicts and
the SLO search are then the code a real run uses, and minutes of load replay in seconds.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from tokenrig.capacity.operators import OperatorModel, OperatorScheduler
from tokenrig.loadgen.load_profiles import FindMax, SearchResult, SearchStepPlan, walk
from tokenrig.loadgen.plan import LoadPlan, TraceRow
from tokenrig.loadgen.scenario import LoadPlanSpec, Scenario
from tokenrig.loadgen.workload import PreparedRequest, Workload
from tokenrig.metrics.records import CANCELLED, RequestRecord
from tokenrig.metrics.run_summary import RunSummary
from tokenrig.metrics.slo import Slo
from tokenrig.metrics.summary import RunFacts, summarize
from tokenrig.metrics.verdict import SloWatch, StepResult
from tokenrig.profiles import GpuProfile, ModelProfile
from tokenrig.serve.engines import GenerationRequest
from tokenrig.serve.engines.sim import RooflineParams, RooflineScheduler
from tokenrig.serve.tokenizer import SPECIAL_TOKENS, TEMPLATE_WORDS

# how long requests still in flight at the plan's end may run on (the load test's --request-timeout default)
DRAIN_S = 600.0
# a request the engine refuses (larger than the whole KV cache) comes back as an HTTP error after this long
REFUSAL_S = 0.001


@dataclass(frozen=True)
class EngineSetup:
    """One simulated serving replica: model, GPU type, weight format, TP size, roofline parameters (batch
    limits), the time a request takes to reach the engine once sent (HTTP, parsing, tokenization), and, where
    the engine was profiled, the per-operator model that times its steps instead of the roofline."""

    model: ModelProfile
    gpu: GpuProfile
    quant: str
    tp: int
    params: RooflineParams
    api_latency_s: float = 0.0
    operators: OperatorModel | None = None

    def scheduler(self) -> RooflineScheduler:
        args = (self.model, self.gpu, len(SPECIAL_TOKENS) + len(TEMPLATE_WORDS), self.params, self.quant, self.tp)
        return OperatorScheduler(self.operators, *args) if self.operators else RooflineScheduler(*args)


@dataclass
class Turn:
    prepared: PreparedRequest
    prompt_ids: list[int]


@dataclass
class Conversation:
    turns: list[Turn]
    think_time_s: float


class RequestBook:
    """The scenario's requests by seed and arrival index, prompt ids included, built once and reused by
    every replay.

    Later turns of a conversation carry the earlier replies: the sim engine streams random content
    words, so a reply is `max_tokens` random words, as the real client would have received."""

    def __init__(self, scenario: Scenario, model: ModelProfile):
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        from tokenrig.serve.checkpoint import tokenizer_dir

        directory = tokenizer_dir(model)
        self.scenario = scenario
        self.model = model
        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self._encoder = AutoTokenizer.from_pretrained(directory)
        self._workloads: dict[int, Workload] = {}
        self._conversations: dict[tuple[int, int], Conversation] = {}

    def conversation(self, seed: int, index: int, trace_row: TraceRow | None) -> Conversation:
        if (seed, index) not in self._conversations:
            self._conversations[seed, index] = self._build(seed, index, trace_row)
        return self._conversations[seed, index]

    def _build(self, seed: int, index: int, trace_row: TraceRow | None) -> Conversation:
        from tokenrig.serve.api import encode_chat, encode_prompt

        if seed not in self._workloads:
            self._workloads[seed] = Workload(self.scenario, self._tokenizer, self.model.key, self.model.max_context,
                                             seed=seed)
        workload = self._workloads[seed]
        dialogue = workload.dialogue(index, trace_row)
        replies = random.Random(f"replies:{seed}:{index}")
        turns = []
        while (prepared := dialogue.next_request()) is not None:
            ids = (encode_chat(self._encoder, prepared.messages) if prepared.messages is not None
                   else encode_prompt(self._encoder, prepared.prompt))
            turns.append(Turn(prepared, ids))
            if dialogue.turn < dialogue.turns:  # a reply is written only where a later turn carries it
                dialogue.add_reply(" ".join(workload.words(prepared.max_tokens, replies)), prepared.max_tokens)
        return Conversation(turns, dialogue.think_time_s)


@dataclass
class Replay:
    summary: RunSummary  # as summary.json of a real step, SLO verdicts included
    stopped_early: bool


@dataclass
class _Pending:
    """A turn scheduled at `due` on the virtual clock: which arrival, which turn."""

    due: float
    arrival: int
    trace_row: TraceRow | None
    turn: int


class VirtualClient:
    """A perfect client of a simulated replica, in virtual time: it sends the load plan's requests (and the later
    turns of their conversations) as they fall due, times each token the engine's steps emit, and keeps one
    RequestRecord per request, as the load test's users do, with no network and no client lag. With `stop_on`,
    an open loop stops as soon as those SLOs' verdict is certain (SloWatch), as a live step stopped early."""

    def __init__(self, setup: EngineSetup, book: RequestBook, load: LoadPlanSpec, stop_on: list[Slo] | None = None):
        self.setup, self.book, self.load = setup, book, load
        self.scheduler = setup.scheduler()
        self.plan = LoadPlan(load, start=0.0)
        self.watch = (SloWatch(stop_on, self.plan.due_in_window()) if stop_on and self.plan.open_loop
                      else None)
        self.records: list[RequestRecord] = []
        self.clock = 0.0
        self._queue: list[tuple[float, int, _Pending]] = []  # (reaches the engine at, order sent, turn)
        self._sent = itertools.count()
        self._active: dict[int, tuple[RequestRecord, _Pending]] = {}  # by id() of the engine's sequence
        for _ in range(self.plan.pool_size if not self.plan.open_loop else self.plan.scheduled_total):
            self._take_slot(0.0)

    def run(self) -> bool:
        """Step the engine until the load has drained (or the watch decided); True when the watch stopped it."""
        stopped_early, judged = False, 0
        while True:
            if self.watch and len(self.records) > judged:  # a verdict changes only with a new record: judge once
                judged = len(self.records)
                if self.watch.decided():
                    stopped_early = True
                    break
            if self.scheduler.busy:
                # the engine plans its next step the moment the last one ends, before a request sent in
                # reply to its tokens can arrive: what is due now waits for the step after
                self._start_due(lambda arrives: arrives < self.clock)
            else:
                if not self._queue:
                    break
                self.clock = max(self.clock, self._queue[0][0])  # an idle engine wakes for the next request
                self._start_due(lambda arrives: arrives <= self.clock)
                continue
            if self.clock > self.plan.end + DRAIN_S:
                break
            self._step()
        for record, _pending in self._active.values():  # still running when the replay stopped
            record.error = CANCELLED
            self.records.append(record)
        return stopped_early

    def _schedule(self, pending: _Pending) -> None:
        """Queue a request for the moment it reaches the engine."""
        heapq.heappush(self._queue, (pending.due + self.setup.api_latency_s, next(self._sent), pending))

    def _take_slot(self, now: float) -> None:
        slot = self.plan.next_slot(now)
        if slot is not None:
            self._schedule(_Pending(slot.due, slot.index, slot.trace_row, 0))

    def _start_due(self, due) -> None:
        while self._queue and due(self._queue[0][0]):
            self._start(heapq.heappop(self._queue)[2])

    def _start(self, pending: _Pending) -> None:
        turn = self.book.conversation(self.load.seed, pending.arrival, pending.trace_row).turns[pending.turn]
        record = RequestRecord(
            request_id=len(self.records) + len(self._active) + 1, request_class=turn.prepared.request_class,
            api=turn.prepared.api, scheduled_at=pending.due, send_lag_s=0.0, slot_late=False,
            in_window=self.plan.in_steady_window(pending.due), prompt_tokens_sent=turn.prepared.prompt_tokens,
            max_tokens=turn.prepared.max_tokens, status=200, prompt_tokens_usage=len(turn.prompt_ids),
            arrival_index=pending.arrival, turn=pending.turn, prefix_id=turn.prepared.prefix_id,
            prefix_reused=turn.prepared.prefix_reused)
        request = GenerationRequest(str(record.request_id), turn.prompt_ids, turn.prepared.max_tokens, pending.due)
        try:
            self.scheduler.check_fits(request)
        except ValueError as error:
            record.status, record.error, record.e2e_s = 400, f"HTTP 400: {error}", REFUSAL_S
            self._finish(record, pending, pending.due + REFUSAL_S)
            return
        sequence = self.scheduler.submit(request)
        self._active[id(sequence)] = (record, pending)

    def _step(self) -> None:
        """One engine step on the virtual clock, each token it emits timed as its request's next chunk."""
        work = self.scheduler.plan_step()
        self.clock += self.scheduler.step_time(work)
        for sequence, _token in self.scheduler.finish_step(work):
            record, pending = self._active[id(sequence)]
            offset = self.clock - pending.due
            if record.ttft_s is None:
                record.ttft_s = offset
            record.chunk_offsets_s.append(offset)
            record.chunk_tokens.append(1)
            if sequence.done:
                del self._active[id(sequence)]
                record.e2e_s = offset
                record.output_tokens_usage = record.output_tokens_tokenizer = sequence.generated
                self._finish(record, pending, self.clock)

    def _finish(self, record: RequestRecord, pending: _Pending, ended: float) -> None:
        self.records.append(record)
        if self.watch:
            self.watch.write(record)
        conversation = self.book.conversation(self.load.seed, pending.arrival, pending.trace_row)
        if record.ok and pending.turn + 1 < len(conversation.turns):
            due = ended + conversation.think_time_s
            if due < self.plan.end:
                self._schedule(_Pending(due, pending.arrival, pending.trace_row, pending.turn + 1))
                return
        if not self.plan.open_loop:
            self._take_slot(ended)  # a closed-loop user takes its next arrival the moment it is done


def replay(setup: EngineSetup, book: RequestBook, load: LoadPlanSpec, slos: list[Slo] | None = None,
           stop_early: bool = False) -> Replay:
    """Run `load` against the simulated replica; with `stop_early`, stop once an SLO can no longer be met."""
    client = VirtualClient(setup, book, load, slos if stop_early else None)
    stopped_early, plan = client.run(), client.plan
    facts = RunFacts(duration_s=load.duration_s, warmup_s=load.warmup_s, cooldown_s=load.cooldown_s,
                     plan_start_unix=0.0, target_rate=plan.target_rate, client_cpu_fraction=0.0,
                     scheduled_in_window=None if stopped_early else plan.scheduled_in_window(),
                     stopped_after_s=client.clock if stopped_early else None)  # as a real step stopped early
    return Replay(summarize(client.records, facts, slos), stopped_early)


@dataclass
class VirtualSearch:
    """--find-max against a simulated replica: the load test's search, each step replayed in virtual time."""

    setup: EngineSetup
    book: RequestBook
    base: LoadPlanSpec
    slos: list[Slo]
    options: FindMax
    progress: Callable[[str], None] = print

    @cached_property
    def result(self) -> SearchResult:
        def measure(plan: SearchStepPlan) -> StepResult:
            step = replay(self.setup, self.book, plan.load, self.slos, stop_early=plan.stop_early)
            return StepResult(plan.value, step.summary, stopped_early=step.stopped_early)

        steps = walk(self.options, self.base, self.slos, measure, progress=lambda line: self.progress(f"  {line}"))
        return self.options.conclude(steps)

    def best_step(self) -> StepResult | None:
        """The full step at the highest rate that met every SLO (a probe's short look is no answer: its goodput is
        a count over a second or two)."""
        met = [step for step in self.result.steps if step.slo_met and not step.probe]
        return max(met, key=lambda step: step.load) if met else None

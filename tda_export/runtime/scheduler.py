"""Request scheduling, independent of any web framework: one thread owns the engine and runs batches.

A `Job` is one client request: one or more sequences to generate (several prompts, `n` choices each) and,
for `echo`, prompts to score; each of those is a unit. Admission counts units, not requests: a job of more
than `max_request` units is refused (`RequestTooLarge`), and one that would take the waiting units past
`queue_size` gets `QueueFull` with a Retry-After computed from the measured drain rate (`DrainMeter`).
Each round takes up to `max_batch` units of the same kind, one unit per waiting job in turn (round robin,
in arrival order), and the job whose key started the round moves behind the others if it has units left:
so a large job shares the engine with the jobs behind it instead of holding the FIFO until it is done.
Two ways to run generation units (`batching`):
- continuous (the default where the backend has slots, runtime/backend.py SlotBackend): up to max_batch
  sequences in flight, each in its own slot with its own density and thresholds; before every decode step
  the newcomers that fit are prefilled together and join, and a sequence that ends releases its slot at
  once. One job holds at most max_batch - 1 slots, so a job behind any one large job joins at the next step.
- static: units with the same thresholds (one density, one prompt-length table) run as one batch to
  completion (every backend).
Scoring units run as batches of their own (under continuous batching, between two decode steps). A job may
span several rounds.

Results go back through `job.on_event(item)`, called on the scheduler thread, with in order:
`Scored(prompt, logprobs)` per scored prompt, generation `Event`s (index = the job's sequence), and finally
`Done()` (or a `Failed(message)` for sequences whose batch failed). `job.cancel()` (client gone) drops its
waiting units at once and stops its running sequences before the next decode step; a batch whose sequences
were all cancelled stops, so the slot is free within a step.

When a batch fails as a whole (the backend raised) before it produced anything, each of its units is rerun
alone, so a request that breaks the backend fails only itself.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .backend import has_slots
from .engine import Engine
from .generate import Event, Stats, advance, check_prompts, left_pad, new_sequence, prompt_logprobs, stream
from .sampling import SamplingParams, TokenLogprob


class QueueFull(Exception):
    def __init__(self, retry_after: int, waiting: int, size: int, queue_size: int):
        super().__init__(f"server busy: {waiting} sequences are waiting and this request adds {size}, more than "
                         f"the queue holds ({queue_size}); retry after {retry_after} s")
        self.retry_after = retry_after


class RequestTooLarge(ValueError):
    """A job of more units than one request may hold: retrying cannot help, the client must split it."""

    def __init__(self, size: int, cap: int):
        super().__init__(f"this request holds {size} sequences; a request may hold at most {cap}")
        self.size, self.cap = size, cap


@dataclass
class Scored:
    prompt: int                            # index into job.score
    logprobs: list[TokenLogprob | None]


@dataclass
class Failed:
    sequences: list[int]                   # the job's sequences (or, for scoring, prompts) that failed
    message: str
    scoring: bool = False


@dataclass
class Done:
    pass


@dataclass
class Job:
    prompts: list[list[int]]               # token ids of each sequence to generate (may be empty)
    params: list[SamplingParams]           # one per sequence
    density: float | None = None
    score: list[list[int]] = field(default_factory=list)  # prompts whose token logprobs to compute
    score_top: int = 0                     # alternatives per scored token
    on_event: Callable[[object], None] = lambda item: None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        if len(self.prompts) != len(self.params):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.params)} sampling params")
        self._todo = [("score", i) for i in range(len(self.score))] + [("gen", i) for i in range(len(self.prompts))]
        self._open = len(self._todo)       # units not finished yet
        self._cancel_counted = False

    def cancel(self):
        self.cancelled.set()


@dataclass
class _Unit:
    job: Job
    kind: str                               # "score" | "gen"
    index: int

    @property
    def key(self):
        return ("score",) if self.kind == "score" else self.job._gen_keys[self.index]


class DrainMeter:
    """How fast the queue drains: units finished per second of batch time over the last `window` batches.
    Batch time, not wall time, so idle periods do not lower the rate (the queue is only full when busy)."""

    def __init__(self, window: int = 16):
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def record(self, units: int, seconds: float) -> None:
        with self._lock:
            self._recent.append((units, seconds))

    def rate(self) -> float | None:
        """Units per second, None before any batch has finished."""
        with self._lock:
            seconds = sum(s for _, s in self._recent)
            return sum(u for u, _ in self._recent) / seconds if seconds > 0 else None


class Metrics:
    """Counters the scheduler keeps; the web layer renders them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.batches = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.scored_tokens = 0
        self.decode_seconds = 0.0
        self.batch_seconds = 0.0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.sequence_errors = 0
        self.cancelled = 0

    def snapshot(self) -> dict:
        with self.lock:
            return {k: v for k, v in vars(self).items() if k != "lock"}


class Scheduler:
    """queue_size: waiting units (sequences and scored prompts) before `submit` raises QueueFull; max_request:
    the most units one job may hold (at most queue_size, which is also the default)."""

    def __init__(self, engine: Engine, queue_size: int = 32, max_batch: int = 8, gather_seconds: float = 0.005,
                 max_request: int | None = None, batching: str = "auto"):
        self.engine, self.queue_size, self.max_batch, self.gather = engine, queue_size, max_batch, gather_seconds
        self.batching = batching_mode(engine, batching)
        if self.batching == "continuous":
            self.max_batch = min(max_batch, engine.backend.max_slots)
        self.max_request = min(max_request or queue_size, queue_size)
        self.metrics = Metrics()
        self.drain = DrainMeter()
        self._promised: list[tuple[float, int]] = []  # (when, units) of refused jobs told to come back
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        run = self._run_continuous if self.batching == "continuous" else self._run
        self._thread = threading.Thread(target=run, daemon=True, name="tda-scheduler")
        self.running: list[Job] = []         # jobs of the batch in progress (read for metrics and tests)

    # --- the client side (any thread) ---
    def submit(self, job: Job) -> None:
        if not job._todo:
            _deliver(job, Done())
            return
        if len(job._todo) > self.max_request:
            raise RequestTooLarge(len(job._todo), self.max_request)
        # Sequences batch together only when they would use the same thresholds alone (the density and, with
        # per-prompt-length calibration tables, the same table), so a batched result equals the unbatched one.
        job._gen_keys = [("gen", job.density, self.engine.thresholds(job.density, len(p)).tobytes())
                         for p in job.prompts]
        with self._cond:
            self._drop_cancelled()
            waiting = self._units_waiting()
            if waiting + len(job._todo) > self.queue_size:
                raise QueueFull(self._retry_after(waiting, len(job._todo)), waiting, len(job._todo), self.queue_size)
            self._waiting.append(job)
            self._cond.notify()

    def depth(self) -> int:
        """Waiting units (sequences to generate and prompts to score)."""
        with self._cond:
            self._drop_cancelled()
            return self._units_waiting()

    def _units_waiting(self) -> int:
        return sum(len(j._todo) for j in self._waiting)

    def _retry_after(self, waiting: int, size: int) -> int:
        """Seconds until this job would fit, at the measured drain rate (call with the lock held). Jobs refused
        earlier whose retry time has not come yet are counted ahead of it, so the refused clients of a burst
        are spread over the time the queue takes to drain instead of all retrying at once. Before any batch
        has finished the rate is unknown: one batch of max_batch units per second is assumed."""
        now = time.monotonic()
        self._promised = [(when, units) for when, units in self._promised if when > now]
        ahead = sum(units for _, units in self._promised)
        rate = self.drain.rate() or float(self.max_batch)
        seconds = max(1, min(3600, math.ceil((waiting + ahead + size - self.queue_size) / rate)))
        self._promised.append((now + seconds, size))
        return seconds

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 10.0):
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the scheduler thread ---
    def _drop_cancelled(self):
        """Waiting jobs whose clients went away free their place at once (call with the lock held)."""
        gone = [j for j in self._waiting if j.cancelled.is_set()]
        for j in gone:
            self._waiting.remove(j)
            self._count_cancelled(j)

    def _count_cancelled(self, job: Job) -> None:
        """Count a job cancelled before it finished, once (waiting or running)."""
        with self.metrics.lock:
            if not job._cancel_counted:
                job._cancel_counted = True
                self.metrics.cancelled += 1

    def _stop_if_cancelled(self, job: Job) -> bool:
        if job.cancelled.is_set():
            self._count_cancelled(job)
            return True
        return False

    def _next_batch(self) -> list[_Unit] | None:
        with self._cond:
            while not self._stopping:
                self._drop_cancelled()
                if self._waiting:
                    break
                self._cond.wait(0.1)
            if self._stopping:
                return None
        time.sleep(self.gather)  # let concurrent arrivals join the batch
        with self._cond:
            self._drop_cancelled()
            if not self._waiting:
                return []
            head = self._waiting[0]
            key = _Unit(head, *head._todo[0]).key
            units: list[_Unit] = []
            took = True
            while took and len(units) < self.max_batch:  # round robin: one unit of each job per pass
                took = False
                for job in self._waiting:
                    if len(units) == self.max_batch:
                        break
                    if job._todo and _Unit(job, *job._todo[0]).key == key:
                        units.append(_Unit(job, *job._todo.pop(0)))
                        took = True
            for job in [j for j in self._waiting if not j._todo]:
                self._waiting.remove(job)
            if head._todo:  # its turn is over: the next round starts from the job behind it
                self._waiting.remove(head)
                self._waiting.append(head)
            return units

    def _run(self):
        while (units := self._next_batch()) is not None:
            if not units:
                continue
            self.running = list({id(u.job): u.job for u in units}.values())
            t0 = time.perf_counter()
            try:
                self._run_units(units, retry_alone=len(units) > 1)
            finally:
                self.drain.record(len(units), time.perf_counter() - t0)
                self.running = []
                for u in units:
                    self._finish_unit(u)

    def _run_units(self, units: list[_Unit], retry_alone: bool):
        t0 = time.perf_counter()
        produced = False
        try:
            if units[0].kind == "score":
                produced = self._score(units)
            else:
                for _ in self._generate(units):
                    produced = True
        except Exception as e:  # noqa: BLE001 - a failed batch must not take the scheduler down
            if retry_alone and not produced:
                for u in units:
                    self._run_units([u], retry_alone=False)
                return
            for job in {id(u.job): u.job for u in units}.values():
                mine = [u.index for u in units if u.job is job]
                _deliver(job, Failed(mine, f"{type(e).__name__}: {e}", scoring=units[0].kind == "score"))
        with self.metrics.lock:
            self.metrics.batches += 1
            self.metrics.batch_seconds += time.perf_counter() - t0

    def _score(self, units: list[_Unit]) -> bool:
        live = [u for u in units if not self._stop_if_cancelled(u.job)]
        if not live:
            return False
        top = max(u.job.score_top for u in live)
        results = prompt_logprobs(self.engine, [u.job.score[u.index] for u in live], top)
        for u, lps in zip(live, results):
            k = u.job.score_top
            trimmed = [lp if lp is None or k == top else TokenLogprob(lp.token, lp.logprob, lp.top[:k]) for lp in lps]
            _deliver(u.job, Scored(u.index, trimmed))
        with self.metrics.lock:
            self.metrics.scored_tokens += sum(len(u.job.score[u.index]) for u in live)
        return True

    def _generate(self, units: list[_Unit]):
        stats = Stats()
        jobs = [u.job for u in units]
        events = stream(self.engine, [u.job.prompts[u.index] for u in units], [u.job.params[u.index] for u in units],
                        jobs[0].density, stats, cancelled=lambda b: self._stop_if_cancelled(jobs[b]))
        try:
            for ev in events:
                u = units[ev.index]
                _deliver(u.job, Event(u.index, ev.text, ev.finish_reason, ev.tokens, ev.logprobs, ev.error))
                if ev.finish_reason == "error":
                    with self.metrics.lock:
                        self.metrics.sequence_errors += 1
                yield ev
        finally:
            events.close()
        with self.metrics.lock:
            m = self.metrics
            m.generated_tokens += sum(stats.completion_tokens)
            m.prompt_tokens += sum(stats.prompt_tokens)
            m.decode_seconds += stats.decode_seconds
            m.ttft_sum += stats.time_to_first_token
            m.ttft_count += 1

    # --- continuous batching (the scheduler thread) ---
    def _take(self, free: int, held: dict[int, int]) -> list[_Unit]:
        """Up to `free` generation units and up to max_batch scoring units, one unit per waiting job in turn
        (round robin, in arrival order; the head job moves behind the others after its turn). A job holds at
        most max_batch - 1 slots (when max_batch > 1), so a request sent behind any one large request joins
        at the next step. held: slots each job (by id) holds now."""
        cap = max(1, self.max_batch - 1)
        with self._cond:
            self._drop_cancelled()
            if not self._waiting:
                return []
            head, units, took, gen, score = self._waiting[0], [], True, 0, 0
            while took:
                took = False
                for job in self._waiting:
                    if not job._todo:
                        continue
                    kind = job._todo[0][0]
                    if kind == "gen" and (gen == free or held.get(id(job), 0) >= cap):
                        continue
                    if kind == "score" and score == self.max_batch:
                        continue
                    units.append(_Unit(job, *job._todo.pop(0)))
                    took = True
                    if kind == "gen":
                        gen += 1
                        held[id(job)] = held.get(id(job), 0) + 1
                    else:
                        score += 1
            for job in [j for j in self._waiting if not j._todo]:
                self._waiting.remove(job)
            if head._todo and head in self._waiting and units:
                self._waiting.remove(head)
                self._waiting.append(head)
            return units

    def _run_continuous(self):
        """Each step: newcomers are prefilled into free slots (together), then every running sequence takes
        its next token and the backend decodes them all in one step; a sequence that ends (finished,
        cancelled, failed) releases its slot at once, so the next newcomer joins at the next step."""
        backend = self.engine.backend
        state = backend.open_slots()
        live: dict[int, _Live] = {}
        busy, finished = 0.0, 0

        def finish(slot: int):
            nonlocal finished
            backend.release(state, slot)
            lv = live.pop(slot)
            with self.metrics.lock:
                self.metrics.generated_tokens += lv.seq.generated
            self._finish_unit(lv.unit)
            finished += 1

        while True:
            with self._cond:
                while not self._stopping and not live:
                    self._drop_cancelled()
                    if self._waiting:
                        break
                    self._cond.wait(0.1)
                if self._stopping:
                    break
            if not live:
                time.sleep(self.gather)  # let concurrent arrivals share one prefill
            t0 = time.perf_counter()
            held: dict[int, int] = {}
            for lv in live.values():
                held[id(lv.unit.job)] = held.get(id(lv.unit.job), 0) + 1
            units = self._take(self.max_batch - len(live), held)
            scoring = [u for u in units if u.kind == "score"]
            if scoring:
                self._run_units(scoring, retry_alone=len(scoring) > 1)
                for u in scoring:
                    self._finish_unit(u)
                finished += len(scoring)
            newcomers = [u for u in units if u.kind == "gen"]
            if newcomers:
                free = [x for x in range(self.max_batch) if x not in live]
                self._join(state, newcomers, free[:len(newcomers)], live, retry_alone=len(newcomers) > 1)
            self.running = list({id(lv.unit.job): lv.unit.job for lv in live.values()}.values())
            if live:
                state = self._step(state, live, finish)
                self.running = list({id(lv.unit.job): lv.unit.job for lv in live.values()}.values())
            busy += time.perf_counter() - t0
            if finished:
                self.drain.record(finished, busy)
                busy, finished = 0.0, 0
        for slot in list(live):
            live[slot].unit.job.cancel()
            finish(slot)
        self.running = []

    def _join(self, state, units: list[_Unit], slots: list[int], live: dict[int, _Live], retry_alone: bool):
        """Prefill newcomers into `slots`; each with its own thresholds (its density and prompt length)."""
        ok: list[tuple] = []  # (unit, prompt ids, slot, thresholds [L], density bounds [L, 2] | None)
        for u, slot in zip(units, slots):
            if self._stop_if_cancelled(u.job):
                self._finish_unit(u)
                continue
            try:
                params = u.job.params[u.index].check()
                ids = check_prompts(self.engine, [u.job.prompts[u.index]], [params])[0]
                ok.append((u, ids, slot, self.engine.thresholds(u.job.density, len(ids)),
                           self.engine.density_bounds(u.job.density)))
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                self._fail([u], e)
        if not ok:
            return
        t0 = time.perf_counter()
        try:
            input_ids, mask = left_pad(self.engine, [o[1] for o in ok])
            bounds = None if ok[0][4] is None else np.stack([o[4] for o in ok])
            logits = self.engine.backend.join(state, [o[2] for o in ok], input_ids, mask,
                                              np.stack([o[3] for o in ok]), bounds)
        except Exception as e:  # noqa: BLE001 - a failed prefill must not take the scheduler down
            for o in ok:
                self.engine.backend.release(state, o[2])
            if retry_alone:
                for u, _, slot, _, _ in ok:
                    self._join(state, [u], [slot], live, retry_alone=False)
            else:
                self._fail([o[0] for o in ok], e)
            return
        seconds = time.perf_counter() - t0
        for (u, ids, slot, _, _), row in zip(ok, logits):
            live[slot] = _Live(u, new_sequence(self.engine, u.job.params[u.index]), row)
        with self.metrics.lock:
            m = self.metrics
            m.batches += 1
            m.batch_seconds += seconds
            m.prompt_tokens += sum(len(o[1]) for o in ok)
            m.ttft_sum += seconds
            m.ttft_count += 1

    def _fail(self, units: list[_Unit], e: Exception):
        for job in {id(u.job): u.job for u in units}.values():
            mine = [u.index for u in units if u.job is job]
            _deliver(job, Failed(mine, f"{type(e).__name__}: {e}"))
        for u in units:
            self._finish_unit(u)

    def _step(self, state, live: dict[int, _Live], finish):
        """Every running sequence takes its next token (events go out); those that end release their slots;
        the rest decode one step together. Returns the state (a fresh one if the step failed: then every
        sequence in it has failed)."""
        slots, tokens = [], []
        for slot, lv in list(live.items()):
            u = lv.unit
            if self._stop_if_cancelled(u.job):
                finish(slot)
                continue
            tok, events = advance(self.engine, u.index, lv.seq, lv.logits)
            for ev in events:
                _deliver(u.job, ev)
                if ev.finish_reason == "error":
                    with self.metrics.lock:
                        self.metrics.sequence_errors += 1
            if lv.seq.finish:
                finish(slot)
            else:
                slots.append(slot)
                tokens.append(tok)
        if not slots:
            return state
        t0 = time.perf_counter()
        try:
            logits = self.engine.backend.step(state, slots, np.asarray(tokens, np.int64))
        except Exception as e:  # noqa: BLE001
            for slot in slots:
                _deliver(live[slot].unit.job, Failed([live[slot].unit.index], f"{type(e).__name__}: {e}"))
                finish(slot)
            return self.engine.backend.open_slots()
        for slot, row in zip(slots, logits):
            live[slot].logits = row
        with self.metrics.lock:
            self.metrics.decode_seconds += time.perf_counter() - t0
        return state

    def _finish_unit(self, unit: _Unit):
        job = unit.job
        with self._cond:
            job._open -= 1
            done = job._open == 0
        if done:
            _deliver(job, Done())


BATCHING = ("auto", "continuous", "static")


def batching_mode(engine: Engine, batching: str) -> str:
    """"continuous" or "static": auto is continuous where the backend has slots (native, ONNX Runtime)."""
    if batching not in BATCHING:
        raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
    if batching == "auto":
        return "continuous" if has_slots(engine.backend) else "static"
    if batching == "continuous" and not has_slots(engine.backend):
        raise ValueError(f"the {engine.backend.name} backend has no continuous batching (only the native and "
                         f"onnxruntime backends have); use static batching")
    return batching


@dataclass
class _Live:
    """A sequence in a slot of the continuous batch."""
    unit: _Unit
    seq: object                               # generate._Sequence
    logits: np.ndarray                        # [V] of its last position: the next token comes from it


def _deliver(job: Job, item) -> None:
    try:
        job.on_event(item)
    except Exception:  # noqa: BLE001 - a client whose loop is gone must not stop the scheduler
        job.cancel()

"""Continuous (in-flight) batching: sequences join a running batch and leave it at any step, each in its own
slot with its own length, positions, thresholds and mask, on the native C++ backend and on ONNX Runtime.
A sequence's greedy tokens equal the same request alone, whichever others share its steps; a released slot
takes the next newcomer; misuse of slots is a clear error. Real tiny Llama engine (density 0.5 built in)."""
import time

import numpy as np
import pytest

from tda_export.native.binding import NativeError
from tda_export.runtime.engine import Engine
from tda_export.runtime.generate import generate, left_pad
from tda_export.runtime.sampling import SamplingParams
from tda_export.runtime.scheduler import Job, RequestTooLarge, Scheduler
from test_scheduler import Collect

BACKENDS = ["native", "onnxruntime"]


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, served_engine_dir):
    return Engine.load(served_engine_dir, backend=request.param, threads=1)


def alone(engine, ids, n, density=None):
    """Greedy tokens of one request run by itself (a static batch of one)."""
    logits, state = engine.backend.prefill(*left_pad(engine, [ids]), engine.thresholds(density, len(ids)),
                                           engine.density_bounds(density))
    out = []
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        logits = engine.backend.decode(state, np.array(out[-1:], np.int64))
    return out


def join(engine, state, slots, prompts, densities):
    ids, mask = left_pad(engine, prompts)
    ths = np.stack([engine.thresholds(d, len(p)) for p, d in zip(prompts, densities)])
    bounds = [engine.density_bounds(d) for d in densities]
    return engine.backend.join(state, slots, ids, mask, ths, None if bounds[0] is None else np.stack(bounds))


@pytest.mark.parametrize("seed", [0, 1])
def test_joins_and_leaves_equal_each_request_alone(engine, seed):
    """A random schedule: newcomers of random lengths and densities join (one or several at once) while others
    decode, and leave after their own number of tokens; every sequence's tokens equal it alone."""
    rng = np.random.default_rng(seed)
    vocab = engine.manifest["vocab_size"]
    densities = [None, 0.5, 1.0]
    requests = [(list(map(int, rng.integers(3, vocab, int(rng.integers(1, 14))))), int(rng.integers(1, 12)),
                 densities[int(rng.integers(0, 3))]) for _ in range(10)]
    backend, state = engine.backend, engine.backend.open_slots()
    pending, live, got = list(range(len(requests))), {}, {}
    slots_free = list(range(4))
    while pending or live:
        if pending and slots_free and rng.random() < 0.6:  # some newcomers join at this step
            k = min(len(pending), len(slots_free), int(rng.integers(1, 3)))
            new, pending = pending[:k], pending[k:]
            slots, slots_free = slots_free[:k], slots_free[k:]
            logits = join(engine, state, slots, [requests[r][0] for r in new], [requests[r][2] for r in new])
            for r, slot, row in zip(new, slots, logits):
                live[slot] = [r, row]
                got[r] = []
        if not live:
            continue
        steps, tokens = [], []
        for slot, (r, row) in list(live.items()):
            got[r].append(int(row.argmax()))
            if len(got[r]) == requests[r][1]:  # done: its slot is free for the next newcomer at once
                backend.release(state, slot)
                del live[slot]
                slots_free.append(slot)
            else:
                steps.append(slot)
                tokens.append(got[r][-1])
        if steps:
            for slot, row in zip(steps, backend.step(state, steps, np.array(tokens, np.int64))):
                live[slot][1] = row
    for r, (ids, n, density) in enumerate(requests):
        assert got[r] == alone(engine, ids, n, density), (r, density)


def test_different_densities_in_one_step_equal_each_alone(engine):
    """Per-sequence thresholds and mask: one join of three densities; the active counts differ per slot."""
    ids = engine.tokenizer("the quick brown fox jumps").input_ids
    state = engine.backend.open_slots()
    logits = join(engine, state, [0, 1, 2], [ids] * 3, [0.5, 1.0, None])
    got = [[] for _ in range(3)]
    for _ in range(6):
        for b in range(3):
            got[b].append(int(logits[b].argmax()))
        logits = engine.backend.step(state, [0, 1, 2], np.array([g[-1] for g in got], np.int64))
    assert got == [alone(engine, ids, 6, d) for d in (0.5, 1.0, None)]
    counts = [engine.backend.slot_active_counts(state, s) for s in range(3)]
    intermediate = engine.manifest["intermediate_size"]
    assert (counts[1] == intermediate).all() and (counts[0] < intermediate).any()


def test_slot_misuse_is_a_clear_error(engine):
    state = engine.backend.open_slots()
    ids = engine.tokenizer("a b c").input_ids
    join(engine, state, [1], [ids], [None])
    errors = (NativeError, ValueError)
    with pytest.raises(errors, match="in use|1"):
        join(engine, state, [1], [ids], [None])      # a slot in use
    if engine.backend.name == "native":
        with pytest.raises(NativeError, match="slot 3 holds no sequence"):
            engine.backend.step(state, [1, 3], np.array([5, 5], np.int64))
        with pytest.raises(NativeError, match="n must be in 1..64"):
            engine.backend.step(state, [], np.array([], np.int64))  # batch 0
        with pytest.raises(NativeError, match="outside 0..63"):
            join(engine, state, [64], [ids], [None])
        with pytest.raises(NativeError, match="named twice"):
            join(engine, state, [2, 2], [ids, ids], [None, None])
    else:
        with pytest.raises(ValueError, match="steps all its joined slots"):
            engine.backend.step(state, [1, 3], np.array([5, 5], np.int64))
    engine.backend.release(state, 1)
    engine.backend.release(state, 1)  # a free slot: nothing happens
    join(engine, state, [1], [ids], [None])  # the released slot takes a newcomer


def test_full_slots(engine):
    """Every slot a backend offers in use at once (64 for native; ORT has no bound, 16 here)."""
    n = min(engine.backend.max_slots, 64 if engine.backend.name == "native" else 16)
    ids = engine.tokenizer("to be or not").input_ids
    state = engine.backend.open_slots()
    logits = join(engine, state, list(range(n)), [ids] * n, [None] * n)
    tokens = logits.argmax(-1)
    assert len(set(tokens.tolist())) == 1
    logits = engine.backend.step(state, list(range(n)), tokens)
    assert np.allclose(logits, logits[0], atol=1e-5)
    assert tokens[0] == alone(engine, ids, 1)[0]


# --- the scheduler in continuous mode ---
def submit(scheduler, engine, prompt, n, density=None, count=1):
    c = Collect()
    ids = engine.tokenizer(prompt).input_ids
    scheduler.submit(Job([ids] * count, [SamplingParams(max_new_tokens=n)] * count, density, on_event=c))
    return c


@pytest.fixture
def scheduler(engine):
    s = Scheduler(engine, queue_size=64, max_batch=3, gather_seconds=0.01, batching="continuous")
    s.start()
    yield s
    s.stop()


def test_scheduler_mixed_lengths_and_densities_equal_alone(engine, scheduler):
    """Requests of different lengths and densities arriving while others run share steps (continuous: they
    join when a slot frees, they need not wait for a batch to end) and each equals itself alone."""
    cases = [("the quick brown", 12, None), ("to be", 3, 1.0), ("once upon a time there", 7, 0.5),
             ("a", 10, None), ("lazy dog sleeps", 2, 0.5), ("hello world", 5, 1.0)]
    collects = []
    for i, (p, n, d) in enumerate(cases):
        collects.append(submit(scheduler, engine, p, n, d))
        time.sleep(0.01 * i)
    for c in collects:
        assert c.done.wait(60)
    for c, (p, n, d) in zip(collects, cases):
        assert c.text() == generate(engine, [p], SamplingParams(max_new_tokens=n), d)[0], (p, d)
    assert scheduler.batching == "continuous" and scheduler.depth() == 0


def test_a_small_request_behind_a_large_body_is_answered_within_a_few_steps(engine, served_engine_dir,
                                                                            slow_decode):
    """The issue's starvation case: a 2000-prompt x n=16 body is refused at once (sequence-counted admission,
    per-request cap), and behind the largest body a request may hold, a 4-token request joins at the next
    step (one request holds at most max_batch - 1 slots) and finishes within a few steps, long before the body."""
    s = Scheduler(engine, queue_size=256, max_batch=4, gather_seconds=0.01, max_request=64, batching="continuous")
    s.start()
    try:
        huge = Job([[5, 6]] * 2000 * 16, [SamplingParams(max_new_tokens=4)] * 32000)
        with pytest.raises(RequestTooLarge):
            s.submit(huge)
        steps = slow_decode(engine, 0.05)  # a step long enough that thread switches on a busy box do not count
        big = submit(s, engine, "the quick brown", 40, count=16)
        big.started()
        at = steps[0]
        small = submit(s, engine, "the quick brown", 4)
        assert small.done.wait(60)
        assert steps[0] - at <= 8, f"the small request took {steps[0] - at} decode steps"
        assert not big.done.is_set()
        assert small.text() == generate(engine, ["the quick brown"], SamplingParams(max_new_tokens=4))[0]
        for job in s.running:  # the body's client leaves: its waiting sequences go, its running ones stop
            job.cancel()
        deadline = time.monotonic() + 30
        while s.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not s.running and s.depth() == 0
    finally:
        s.stop()


def test_cancelled_sequence_frees_its_slot_at_once(engine, slow_decode):
    s = Scheduler(engine, queue_size=8, max_batch=1, gather_seconds=0.01, batching="continuous")
    s.start()
    try:
        steps = slow_decode(engine, 0.05)
        long = submit(s, engine, "a", 300)
        long.started()
        waiting = submit(s, engine, "b", 2)
        time.sleep(0.05)
        assert not waiting.done.is_set()  # the one slot is taken
        at = steps[0]
        for job in [j for j in s.running]:
            job.cancel()
        assert waiting.done.wait(60) and long.done.wait(60)
        assert steps[0] - at <= 3, "the waiting request should start within a step of the cancel"
        assert s.metrics.cancelled == 1
    finally:
        s.stop()


def test_batching_mode_follows_the_backend():
    """auto is continuous where the backend has slots; continuous on a backend without them is refused, naming
    it; an unknown mode is refused."""
    from types import SimpleNamespace

    from tda_export.runtime.scheduler import batching_mode

    torch_like = SimpleNamespace(backend=SimpleNamespace(name="torch", prefill=None, decode=None))
    slots = SimpleNamespace(backend=SimpleNamespace(name="native", open_slots=None, join=None, step=None,
                                                    release=None))
    assert batching_mode(torch_like, "auto") == "static" and batching_mode(slots, "auto") == "continuous"
    assert batching_mode(slots, "static") == "static"
    with pytest.raises(ValueError, match="the torch backend has no continuous batching"):
        batching_mode(torch_like, "continuous")
    with pytest.raises(ValueError, match="batching must be one of"):
        batching_mode(slots, "inflight")


def test_serve_cli_refuses_continuous_batching_on_a_backend_without_it(served_engine_dir):
    from click.testing import CliRunner

    from tda_export.cli import main

    r = CliRunner().invoke(main, ["serve", "-e", str(served_engine_dir), "--port", "0", "--backend", "torch",
                                  "--threads", "1", "--batching", "continuous"])
    assert r.exit_code == 2 and "--batching continuous" in r.output and "torch backend" in r.output, r.output
    assert "Traceback" not in r.output

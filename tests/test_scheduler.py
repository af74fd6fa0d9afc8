"""The scheduler alone, without HTTP: batching, per-request density, the bounded queue, cancellation within a
step, and failures that stay with their own request. Real engine (tiny Llama on ONNX Runtime); continuous
batching (the default on this backend) unless a test says static. tests/test_continuous.py has joins and
leaves in detail, on the native backend too."""
import threading
import time

import pytest

from tda_export.runtime.engine import Engine
from tda_export.runtime.generate import Event, generate
from tda_export.runtime.sampling import SamplingParams
from tda_export.runtime.scheduler import Done, Failed, Job, QueueFull, RequestTooLarge, Scheduler, Scored


@pytest.fixture(scope="module")
def engine(served_engine_dir):
    return Engine.load(served_engine_dir, backend="onnxruntime", threads=1)


@pytest.fixture
def scheduler(engine, request):
    queue_size, max_batch, *batching = getattr(request, "param", (16, 4))
    s = Scheduler(engine, queue_size, max_batch, gather_seconds=0.05, batching=(batching or ["auto"])[0])
    s.start()
    yield s
    s.stop()


class Collect:
    def __init__(self):
        self.items, self.done = [], threading.Event()

    def __call__(self, item):
        self.items.append(item)
        if isinstance(item, Done):
            self.done.set()

    def started(self, timeout=60):
        """Wait for the first generated text: the job is running."""
        end = time.monotonic() + timeout
        while not any(isinstance(i, Event) for i in self.items):
            assert time.monotonic() < end, "the job never started"
            time.sleep(0.005)

    def text(self, index=0):
        return "".join(i.text for i in self.items if isinstance(i, Event) and i.index == index)


def job(engine, prompt, n=8, density=None, **params):
    c = Collect()
    ids = engine.tokenizer(prompt).input_ids
    return Job([ids], [SamplingParams(max_new_tokens=n, **params)], density, on_event=c), c


def test_concurrent_jobs_are_batched_and_equal_to_alone(engine, scheduler):
    prompts = [f"to be or not {i}" for i in range(8)]
    jobs = [job(engine, p) for p in prompts]
    for j, _ in jobs:
        scheduler.submit(j)
    for _, c in jobs:
        assert c.done.wait(60)
    assert [c.text() for _, c in jobs] == [generate(engine, [p], SamplingParams(max_new_tokens=8))[0] for p in prompts]
    assert scheduler.metrics.batches <= 4, "8 jobs with max_batch 4 should need about 2 batches"


@pytest.mark.parametrize("scheduler", [(16, 4, "static")], indirect=True)
def test_static_batching_runs_densities_in_separate_batches(engine, scheduler):
    a, ca = job(engine, "the quick brown", density=0.5)
    b, cb = job(engine, "the quick brown", density=1.0)
    scheduler.submit(a)
    scheduler.submit(b)
    assert ca.done.wait(60) and cb.done.wait(60)
    assert ca.text() == generate(engine, ["the quick brown"], SamplingParams(max_new_tokens=8), 0.5)[0]
    assert cb.text() == generate(engine, ["the quick brown"], SamplingParams(max_new_tokens=8), 1.0)[0]
    assert scheduler.metrics.batches == 2


def test_scoring_and_generation_of_one_job(engine, scheduler):
    c = Collect()
    ids = engine.tokenizer("the lazy dog").input_ids
    scheduler.submit(Job([ids], [SamplingParams(max_new_tokens=3)], score=[ids], score_top=2, on_event=c))
    assert c.done.wait(60)
    scored = [i for i in c.items if isinstance(i, Scored)]
    assert len(scored) == 1 and scored[0].logprobs[0] is None and len(scored[0].logprobs) == len(ids)
    assert all(len(lp.top) == 2 for lp in scored[0].logprobs[1:])
    assert c.items.index(scored[0]) < next(k for k, i in enumerate(c.items) if isinstance(i, Event))


@pytest.mark.parametrize("scheduler", [(2, 1)], indirect=True)
def test_full_queue_raises_with_retry_after(engine, scheduler):
    jobs = [job(engine, f"word {i}", n=200) for i in range(6)]
    refused = []
    for j, _ in jobs:
        try:
            scheduler.submit(j)
        except QueueFull as e:
            refused.append(e.retry_after)
    assert refused and all(r >= 1 for r in refused)
    for j, _ in jobs:
        j.cancel()


@pytest.mark.parametrize("scheduler", [(1, 1)], indirect=True)
def test_cancelled_job_frees_its_slot_within_a_step(engine, scheduler):
    long, c = job(engine, "a", n=400)
    scheduler.submit(long)
    c.started()
    long.cancel()
    waiting, cw = job(engine, "b", n=2)
    scheduler.submit(waiting)  # the queue (size 1) is free: the cancelled job is running, not waiting
    assert cw.done.wait(60) and c.done.wait(60)
    events = [i for i in c.items if isinstance(i, Event)]
    tokens = sum(len(e.tokens) for e in events)
    assert tokens < 400 and scheduler.metrics.generated_tokens - 2 - tokens <= 1, \
        "the cancelled sequence should stop within a step of cancel()"
    # a cancelled job that is still waiting leaves the queue at once
    blocker, cb = job(engine, "c", n=300)
    scheduler.submit(blocker)
    time.sleep(0.3)
    queued, _ = job(engine, "d", n=4)
    scheduler.submit(queued)
    queued.cancel()
    again, ca = job(engine, "e", n=2)
    scheduler.submit(again)  # would be QueueFull if the cancelled one still held the place
    blocker.cancel()
    assert ca.done.wait(60) and cb.done.wait(60)


def many(engine, prompt, count, n, density=None):
    """One job of `count` sequences of `prompt` (a body with several prompts, or n choices)."""
    c = Collect()
    ids = engine.tokenizer(prompt).input_ids
    return Job([ids] * count, [SamplingParams(max_new_tokens=n)] * count, density, on_event=c), c


@pytest.mark.parametrize("density", [None, 1.0], ids=["same-batch-key", "other-density"])
@pytest.mark.parametrize("scheduler", [(64, 2, "static")], indirect=True)
def test_static_batching_a_large_job_does_not_hold_the_queue(engine, scheduler, slow_decode, density):
    """12 sequences at max_batch 2 are 6 rounds; a small job sent behind them runs in the next round (round
    robin among waiting jobs) or, with other thresholds, the one after (the large job gives up the head after
    its turn), not after all 6."""
    slow_decode(engine, 0.03)  # a round takes 0.6 s: the small job arrives while the first one runs
    big, cb = many(engine, "the quick brown", 12, 20)
    scheduler.submit(big)
    cb.started()
    small, cs = job(engine, "the quick brown", n=4, density=density)
    scheduler.submit(small)
    assert cs.done.wait(60)
    assert not cb.done.is_set(), "the small job waited for the whole large job"
    assert scheduler.metrics.batches <= (2 if density is None else 3)  # another key: after the big job's turn
    assert cb.done.wait(60)
    assert cs.text() == generate(engine, ["the quick brown"], SamplingParams(max_new_tokens=4), density)[0]


def test_admission_counts_sequences_and_caps_a_request(engine):
    s = Scheduler(engine, queue_size=8, max_batch=2, max_request=4)  # not started: nothing drains
    with pytest.raises(RequestTooLarge, match="holds 5 sequences; a request may hold at most 4"):
        s.submit(many(engine, "x y", 5, 4)[0])
    s.submit(many(engine, "x y", 4, 4)[0])
    s.submit(many(engine, "x y", 3, 4)[0])
    assert s.depth() == 7
    with pytest.raises(QueueFull, match="7 sequences are waiting and this request adds 2"):
        s.submit(many(engine, "x y", 2, 4)[0])
    s.submit(job(engine, "x y")[0])  # one more sequence still fits
    assert Scheduler(engine, queue_size=8, max_request=100).max_request == 8


@pytest.mark.parametrize("scheduler", [(2, 1)], indirect=True)
def test_retry_after_follows_the_measured_drain_rate(engine, scheduler, slow_decode):
    """Each refusal is told to come back when the queue, drained at the rate measured so far, has room for it
    and for the clients refused before it: a burst's retries are spread, not all sent 1 s later."""
    slow_decode(engine, 0.05)
    first, c = job(engine, "warm up", n=10)  # one batch of one sequence: ~0.5 s measured
    scheduler.submit(first)
    assert c.done.wait(60)
    rate = scheduler.drain.rate()
    assert rate is not None and 0.2 < rate < 5
    blockers = [job(engine, f"block {i}", n=200) for i in range(3)]  # one runs, two fill the queue
    scheduler.submit(blockers[0][0])
    blockers[0][1].started()
    blockers = [b for b, _ in blockers]
    for b in blockers[1:]:
        scheduler.submit(b)
    refused = []
    for i in range(6):
        with pytest.raises(QueueFull) as e:
            scheduler.submit(job(engine, f"late {i}")[0])
        refused.append(e.value.retry_after)
    for b in blockers:
        b.cancel()
    assert refused == sorted(refused) and refused[-1] > refused[0], refused
    assert refused[-1] >= int(6 / rate), (refused, rate)


@pytest.mark.parametrize("scheduler", [(4, 1)], indirect=True)
def test_cancelled_metric_counts_running_and_waiting_jobs(engine, scheduler):
    running, c = job(engine, "a", n=400)
    scheduler.submit(running)
    c.started()
    waiting, _ = job(engine, "b", n=4)
    scheduler.submit(waiting)
    waiting.cancel()
    running.cancel()
    assert c.done.wait(60)
    finished, cf = job(engine, "c", n=2)
    scheduler.submit(finished)
    assert cf.done.wait(60)
    finished.cancel()  # after Done, as the server does for every request: not a cancellation
    assert scheduler.depth() == 0 and scheduler.metrics.cancelled == 2


def test_a_failing_request_fails_alone(engine, scheduler):
    vocab = engine.manifest["vocab_size"]
    good = [job(engine, f"good {i}") for i in range(3)]
    bad_params = Job([engine.tokenizer("x").input_ids], [SamplingParams(max_new_tokens=4, seed=-1)],
                     on_event=(cs := Collect()))
    bad_ids = Job([[5, vocab + 1000, 7]], [SamplingParams(max_new_tokens=4)], on_event=(ci := Collect()))
    for j in (good[0][0], bad_params, good[1][0], bad_ids, good[2][0]):
        scheduler.submit(j)
    for c in (cs, ci, *(c for _, c in good)):
        assert c.done.wait(60)
    assert any(isinstance(i, Failed) and "seed" in i.message for i in cs.items)
    assert any(isinstance(i, Failed) for i in ci.items)
    for j, c in good:
        assert not any(isinstance(i, Failed) for i in c.items)
        assert c.text() == generate(engine, [j.prompts[0]], SamplingParams(max_new_tokens=8))[0]


def test_a_sequence_failing_inside_the_loop_ends_alone(engine):
    """A failure while choosing or detokenizing one sequence's token (here a stop 'string' that is not one,
    which only parse-time validation would catch) ends that sequence; its batch-mates finish normally."""
    from tda_export.runtime.generate import stream

    prompts = [engine.tokenizer(p).input_ids for p in ("the quick brown", "to be or", "the lazy dog")]
    params = [SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, stop=(None,)),
              SamplingParams(max_new_tokens=6)]
    events = list(stream(engine, prompts, params))
    failed = [e for e in events if e.index == 1]
    assert failed[-1].finish_reason == "error" and "TypeError" in failed[-1].error
    for i in (0, 2):
        text = "".join(e.text for e in events if e.index == i)
        assert text == generate(engine, [prompts[i]], SamplingParams(max_new_tokens=6))[0]
        assert [e for e in events if e.index == i][-1].finish_reason in ("stop", "length")


def test_prompt_logprobs_agree_across_backends(engine, served_engine_dir):
    """Prompt scoring uses only prefill/decode and the logits they return, so the torch backend has it too."""
    from tda_export.runtime.generate import prompt_logprobs

    torch_engine = Engine.load(served_engine_dir, backend="torch", threads=1, device="cpu")
    prompts = [[17, 40, 99, 250, 7, 66, 12], [5, 300, 41], [9]]
    ort, tch = prompt_logprobs(engine, prompts, 2), prompt_logprobs(torch_engine, prompts, 2)
    assert [len(p) for p in ort] == [7, 3, 1] and all(p[0] is None for p in ort)
    for a, b in zip(ort, tch):
        for x, y in zip(a[1:], b[1:]):
            assert x.token == y.token and abs(x.logprob - y.logprob) < 1e-4
            assert [t for t, _ in x.top] == [t for t, _ in y.top]

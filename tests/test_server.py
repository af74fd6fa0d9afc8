"""The OpenAI-compatible server over real HTTP on loopback, with the real `openai` client (sync and async):
conformance (logprobs, echo, n, stream_options, chat content parts, models), exact usage, bad input answered
with 4xx JSON naming the field, and the HTTP details that come from uvicorn/Starlette."""
import asyncio
import itertools
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from tda_export.runtime.engine import Engine
from tda_export.runtime.generate import Stats, stream
from tda_export.runtime.sampling import SamplingParams, log_softmax
from tda_export.runtime.server import MAX_BODY, Server

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def engine(served_engine_dir):
    e = Engine.load(served_engine_dir, backend="onnxruntime", threads=1)
    e.tokenizer.chat_template = CHAT_TEMPLATE  # the tiny tokenizer has none; a real Jinja template
    return e


def start(engine, **options):
    srv = Server(engine, "127.0.0.1", 0, **options)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv, thread


@pytest.fixture(scope="module")
def server(engine):
    srv, thread = start(engine, queue_size=64, max_batch=8)
    yield srv
    srv.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=60) as c:
        yield c


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)


def sse(text: str):
    lines = [l[len("data: "):] for l in text.split("\n\n") if l.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(l) for l in lines[:-1]]


def direct(engine, prompt, n, density=None):
    """What the engine generates for `prompt`, with its token count."""
    stats = Stats()
    text = "".join(ev.text for ev in stream(engine, [prompt], SamplingParams(max_new_tokens=n), density, stats))
    return text, stats.completion_tokens[0]


def test_openai_client_completion_stream_and_exact_usage(engine, client):
    r = client.completions.create(model="llama", prompt="the quick brown", max_tokens=12, temperature=0)
    text, n = direct(engine, "the quick brown", 12)
    assert r.choices[0].text == text and r.usage.completion_tokens == n
    assert r.usage.prompt_tokens == len(engine.tokenizer("the quick brown").input_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + n
    chunks = list(client.completions.create(model="llama", prompt="the quick brown", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == r.choices[0].finish_reason


def test_openai_client_chat_content_parts_role_first_and_n(engine, client):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "the lazy "}, {"type": "text", "text": "dog"}]}]
    r = client.chat.completions.create(model="llama", messages=messages, max_tokens=6, n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy: equal choices
    assert r.usage.completion_tokens == 2 * direct(engine, _chat_ids(engine, messages), 6)[1]
    chunks = list(client.chat.completions.create(model="llama", messages=messages, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == r.choices[0].message.content and chunks[-1].usage.total_tokens > 0
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def _chat_ids(engine, messages):
    text = engine.tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
          "".join(p["text"] for p in m["content"])} for m in messages], add_generation_prompt=True, tokenize=False)
    return engine.tokenizer(text, add_special_tokens=False).input_ids


def test_async_openai_client_streams_concurrently(engine, server):
    openai = pytest.importorskip("openai")

    async def main():
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)

        async def one(i):
            s = await client.completions.create(model="llama", prompt=f"to be or not {i}", max_tokens=8, stream=True)
            return "".join([c.choices[0].text async for c in s])

        out = await asyncio.gather(*(one(i) for i in range(6)))
        await client.close()
        return out

    assert asyncio.run(main()) == [direct(engine, f"to be or not {i}", 8)[0] for i in range(6)]


def test_completion_logprobs_shape_and_values(engine, client):
    r = client.completions.create(model="llama", prompt="the quick brown", max_tokens=5, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) \
        == r.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(chosen)  # greedy: chosen is the top
    assert lp.text_offset == sorted(lp.text_offset)
    # the first generated token's logprob is the prefill's log-softmax, as the engine computes it
    ids = engine.tokenizer("the quick brown").input_ids
    logits, _ = engine.backend.prefill(np.array([ids]), np.ones((1, len(ids)), np.int64), engine.thresholds())
    assert lp.token_logprobs[0] == pytest.approx(float(log_softmax(logits[0]).max()), abs=1e-5)


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert isinstance(t.token, str) and t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert "\ufffd" in t.token or bytes(t.bytes).decode() == t.token  # partial characters: see below


def test_echo_loglikelihood_equals_engine(engine, http):
    """What lm-eval's loglikelihood reads: echo + logprobs, max_tokens 0 (older lm-eval) or 1 (0.4.x)."""
    rng = np.random.default_rng(3)
    context, continuation = rng.integers(5, 300, 9).tolist(), rng.integers(5, 300, 4).tolist()
    prompt = context + continuation
    expected = []
    for k in range(len(context), len(prompt)):  # dense prefill of each prefix: an independent path
        logits, _ = engine.backend.prefill(np.array([prompt[:k]]), np.ones((1, k), np.int64), engine.thresholds())
        expected.append(float(log_softmax(logits[0])[prompt[k]]))
    for max_tokens in (0, 1):
        r = http.post("/v1/completions", json={"model": "llama", "prompt": [prompt, context], "echo": True,
                                               "logprobs": 1, "max_tokens": max_tokens, "temperature": 0})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1]
        lp = choices[0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + max_tokens and lp["token_logprobs"][0] is None
        got = lp["token_logprobs"][len(context):len(prompt)]
        assert np.allclose(got, expected, atol=1e-4, rtol=0), (got, expected)
        assert choices[0]["finish_reason"] == "length"
        assert choices[1]["logprobs"]["token_logprobs"][1:len(context)] == lp["token_logprobs"][1:len(context)]


def test_echo_streams_the_prompt_first(http):
    with http.stream("POST", "/v1/completions", json={"prompt": "the lazy", "echo": True, "max_tokens": 3,
                                                      "stream": True}) as r:
        events = sse(r.read().decode())
    assert events[0]["choices"][0]["text"] == "the lazy"


def test_n_and_prompt_lists_give_one_choice_each(http):
    r = http.post("/v1/completions", json={"prompt": ["the quick", "to be"], "n": 3, "max_tokens": 5,
                                           "temperature": 1.0, "seed": 7})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(6)) and all(c["finish_reason"] for c in choices)
    assert len({c["text"] for c in choices[:3]}) > 1, "n sampled choices should differ"
    again = http.post("/v1/completions", json={"prompt": ["the quick", "to be"], "n": 3, "max_tokens": 5,
                                               "temperature": 1.0, "seed": 7}).json()["choices"]
    assert [c["text"] for c in again] == [c["text"] for c in choices], "a seed makes sampling reproducible"


def test_stop_string_finishes_with_stop(engine, http):
    text, _ = direct(engine, "the quick brown", 12)
    stop = text[3:5]
    assert stop
    r = http.post("/v1/completions", json={"prompt": "the quick brown", "max_tokens": 12, "stop": stop}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == text[:text.index(stop)]


@pytest.mark.parametrize("body,status,needle", [
    ({}, 400, "'prompt'"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": "x", "seed": -1}, 400, "'seed'"),
    ({"prompt": "x", "temperature": 3}, 400, "'temperature'"),
    ({"prompt": "x", "top_p": 0}, 400, "'top_p'"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "'max_tokens'"),
    ({"prompt": "x", "max_tokens": 0}, 400, "echo"),
    ({"prompt": "x", "n": 0}, 400, "'n'"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop'"),
    ({"prompt": "x", "logprobs": 21}, 400, "'logprobs'"),
    ({"prompt": "x", "presence_penalty": 1}, 400, "presence_penalty"),
    ({"prompt": "x", "density": 0.33}, 400, "density 0.33"),
    ({"prompt": "x " * 600, "max_tokens": 10}, 400, "context"),
    ({"prompt": [5, 100000]}, 400, "vocabulary"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ([1, 2], 400, "dictionary"),
])
def test_bad_requests_get_4xx_json_naming_the_field(http, body, status, needle):
    r = http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", [b"{not json", b'{"prompt": "\xff\xfe"}', b'{"prompt": "\\ud800"}',
                                 b"[" * 100_000 + b"]" * 100_000], ids=["not-json", "bad-utf8", "surrogate", "deep"])
def test_malformed_bodies_get_a_400_response(http, raw):
    r = http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400


def test_vanishing_temperature_is_served_greedily(engine, http):
    r = http.post("/v1/completions", json={"prompt": "the quick brown", "max_tokens": 6, "temperature": 1e-308})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == direct(engine, "the quick brown", 6)[0]


def test_http_details_from_the_stack(http, server):
    assert http.get("/health?x=1").json()["status"] == "ok"
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"] and r.json()["error"]["code"] == 405
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/models").json()["data"][0]["id"] == "llama"
    assert http.get("/v1/models/llama").json()["id"] == "llama"
    assert http.get("/v1/models/other").status_code == 404

    def chunked():
        yield b'{"prompt": "the quick", '
        yield b'"max_tokens": 3}'
    r = http.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    r = http.post("/v1/completions", content=b"x" * (MAX_BODY + 1), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
    r = http.post("/v1/completions", content=b'{"prompt": "x"}')  # no Content-Type, as `curl -d` sends
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
    metrics = http.get("/metrics").text
    assert "# TYPE tda_ttft_seconds summary" in metrics and "tda_ttft_seconds_count" in metrics
    assert 'tda_requests_total{code="200"}' in metrics


def test_chat_without_template_is_a_clear_400(engine, http, monkeypatch):
    monkeypatch.setattr(engine.tokenizer, "chat_template", None)
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


def test_chat_bad_parts_and_roles_are_400(http):
    for messages in ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                     [{"role": "wizard", "content": "hi"}], []):
        r = http.post("/v1/chat/completions", json={"messages": messages})
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_overload_gets_429_with_retry_after_and_server_survives(engine):
    srv, thread = start(engine, queue_size=1, max_batch=1)
    try:
        from concurrent.futures import ThreadPoolExecutor

        def one(i):
            r = httpx.post(f"http://127.0.0.1:{srv.port}/v1/completions",
                           json={"prompt": f"word {i}", "max_tokens": 60}, timeout=60)
            return r.status_code, r.headers.get("retry-after")
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(one, range(10)))
        codes = [c for c, _ in results]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert all(int(ra) >= 1 for c, ra in results if c == 429)
        r = httpx.post(f"http://127.0.0.1:{srv.port}/v1/completions", json={"prompt": "after", "max_tokens": 3})
        assert r.status_code == 200
    finally:
        srv.shutdown()
        thread.join(timeout=10)


def test_bad_requests_among_good_ones_do_not_fail_them(engine, server):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"prompt": f"to be {i}", "max_tokens": 6} for i in range(6)]
    bodies[2] = {"prompt": "x", "seed": -1, "max_tokens": 6}
    bodies[4] = {"prompt": "x", "temperature": float("1e-308"), "max_tokens": 6}
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda b: httpx.post(f"http://127.0.0.1:{server.port}/v1/completions", json=b,
                                                   timeout=60).status_code, bodies))
    assert codes == [200, 200, 400, 200, 200, 200]


def test_serve_cli_refuses_a_busy_port_before_loading(tmp_path):
    from click.testing import CliRunner

    from tda_export.cli import main

    not_an_engine = tmp_path / "not-an-engine"  # exists (click checks that first), but loading it would fail
    not_an_engine.mkdir()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        r = CliRunner().invoke(main, ["serve", "-e", str(not_an_engine), "--port", str(busy.getsockname()[1])])
    finally:
        busy.close()
    assert r.exit_code == 2 and "cannot listen" in r.output and "not-an-engine" not in r.output
    assert "Traceback" not in r.output


def wait_for(condition, timeout):
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def cancelled_total(http):
    line = next(l for l in http.get("/metrics").text.splitlines() if l.startswith("tda_cancelled_requests_total "))
    return float(line.split()[1])


def test_a_huge_body_is_refused_naming_the_cap_and_does_not_delay_others(engine):
    """2000 prompts x n=16 used to take one queue place and starve the FIFO: a 4-token request behind it got
    no answer. Admission counts sequences, so that body is a 400 naming the cap, and the request is served."""
    srv, thread = start(engine, queue_size=64, max_batch=8)
    try:
        url = f"http://127.0.0.1:{srv.port}/v1/completions"
        big = {}
        sender = threading.Thread(target=lambda: big.update(r=httpx.post(
            url, json={"prompt": [[17, 40, 99]] * 2000, "n": 16, "max_tokens": 16}, timeout=60)))
        sender.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        small = httpx.post(url, json={"prompt": "the quick", "max_tokens": 4}, timeout=20)
        assert small.status_code == 200 and time.monotonic() - t0 < 10
        sender.join(60)
        r = big["r"]
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "32000 sequences (2000 prompt(s) x n=16)" in message and "at most 64" in message
        assert "--max-request-sequences" in message and r.json()["error"]["param"] == "n"
    finally:
        srv.shutdown()
        thread.join(timeout=10)


def test_a_non_streaming_client_that_leaves_is_cancelled_within_a_step(engine, server, http, slow_decode):
    """Tokens arrive faster than the old 0.5 s idle poll, so a gone client's request used to run to the end."""
    steps = slow_decode(engine, 0.05)  # 400 tokens would take 20 s
    before = cancelled_total(http)
    body = json.dumps({"prompt": "the quick brown", "max_tokens": 400}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert wait_for(lambda: steps[0] >= 3, 30)
    sock.close()
    at_close = steps[0]
    assert wait_for(lambda: not server.scheduler.running, 5), "the request kept running after its client left"
    assert steps[0] - at_close <= 2, f"{steps[0] - at_close} decode steps after the client left"
    assert cancelled_total(http) == before + 1


def test_a_stream_cancelled_mid_generation_is_counted(engine, server, http, slow_decode):
    slow_decode(engine, 0.02)
    before = cancelled_total(http)
    with http.stream("POST", "/v1/completions", json={"prompt": "to be or", "max_tokens": 400, "stream": True}) as r:
        lines = r.iter_lines()
        assert sum(1 for l in itertools.islice(lines, 6) if l.startswith("data: ")) >= 2
    assert wait_for(lambda: not server.scheduler.running, 5)
    assert wait_for(lambda: cancelled_total(http) == before + 1, 5), cancelled_total(http)


def test_chat_logprob_bytes_are_the_tokens_own(client):
    """A token holding part of a UTF-8 character decodes alone to U+FFFD; its `bytes` must be its own bytes (the
    tiny byte-level vocabulary has all 128 continuation and lead bytes as tokens), so that joining the bytes of
    the chosen tokens gives the text."""
    r = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "héllo wörld ✓"}],
                                       max_tokens=16, logprobs=True, top_logprobs=20, temperature=0)
    content = r.choices[0].logprobs.content
    entries = [e for t in content for e in [t, *t.top_logprobs]]
    partial = [e for e in entries if "\ufffd" in e.token]
    assert partial, "no token holding part of a character among the top 20: the test checks nothing"
    replacement = list("\ufffd".encode())
    assert all(len(e.bytes) == 1 and e.bytes[0] >= 0x80 and e.bytes != replacement for e in partial)
    assert all(bytes(e.bytes).decode() == e.token for e in entries if e not in partial)
    chosen = content[:-1] if r.choices[0].finish_reason == "stop" else content  # EOS is not in the text
    joined = b"".join(bytes(t.bytes) for t in chosen)
    assert joined.decode("utf-8", "replace") == r.choices[0].message.content


def test_token_bytes_rebuild_the_text(engine):
    from tda_export.runtime.token_bytes import token_bytes

    tok = engine.tokenizer
    text = "héllo wörld ✓ 日本"
    ids = tok(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    assert b"".join(token_bytes(tok, i, tok.decode([i])) for i in ids) == text.encode()

    class ByteFallback:  # SentencePiece's byte pieces, as Llama/Mistral tokenizers write them
        def convert_ids_to_tokens(self, token):
            return "<0xE2>"
    assert token_bytes(ByteFallback(), 7, "\ufffd") == b"\xe2"

"""The OpenAI-compatible server over real HTTP on loopback: clients, streaming, bad input, overload."""
import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tda_export.runtime.engine import Engine
from tda_export.runtime.server import MAX_BODY, Server
from test_runtime import build_engine


@pytest.fixture(scope="module")
def engine(tiny_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    out, _ = build_engine(tiny_dirs["llama"], tmp / "engine", tmp)
    return Engine.load(out, backend="onnxruntime", threads=1)


@pytest.fixture
def server(engine, request):
    queue_size, max_batch = getattr(request, "param", (32, 8))
    srv = Server(engine, "127.0.0.1", 0, queue_size=queue_size, max_batch=max_batch)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    thread.join(timeout=10)


def post(port, path, body, raw=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, payload


def sse_events(payload: bytes):
    lines = [l[len("data: "):] for l in payload.decode().split("\n\n") if l.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(l) for l in lines[:-1]]


def test_openai_client_completion_and_chat(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model="tiny", prompt="the quick brown", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_without_template_is_a_clear_400(server):
    status, payload = post(server.port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "chat template" in json.loads(payload)["error"]["message"]


def test_concurrent_streaming_clients_match_non_streaming(server):
    prompts = [f"to be or not {i}" for i in range(6)]

    def one(prompt):
        s1, full = post(server.port, "/v1/completions", {"prompt": prompt, "max_tokens": 10})
        s2, streamed = post(server.port, "/v1/completions", {"prompt": prompt, "max_tokens": 10, "stream": True})
        assert s1 == 200 and s2 == 200
        events = sse_events(streamed)
        return json.loads(full)["choices"][0]["text"], "".join(e["choices"][0]["text"] for e in events)

    with ThreadPoolExecutor(6) as pool:
        for full, streamed in pool.map(one, prompts):
            assert full == streamed
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    assert 'tda_requests_total{code="200"}' in metrics and "tda_generated_tokens_total" in metrics
    batches = float(next(l.split()[1] for l in metrics.splitlines() if l.startswith("tda_batches_total")))
    assert batches < 12, "concurrent requests should have been batched together"


@pytest.mark.parametrize("body,raw,status,needle", [
    (None, b"{not json", 400, "not JSON"),
    ([1, 2], None, 400, "JSON object"),
    ({}, None, 400, "'prompt'"),
    ({"prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, None, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, None, 400, "temperature"),
    ({"prompt": "x", "density": 0.33}, None, 400, "density 0.33"),
    ({"prompt": "x", "n": 2}, None, 400, "'n'"),
    ({"prompt": "x", "stop": [""]}, None, 400, "stop"),
    ({"prompt": "x " * 600, "max_tokens": 10}, None, 400, "context"),
])
def test_bad_requests_get_4xx_json(server, body, raw, status, needle):
    got, payload = post(server.port, "/v1/completions", body, raw)
    assert got == status
    assert needle in json.loads(payload)["error"]["message"]


def test_oversize_unknown_route_and_health(server):
    got, payload = post(server.port, "/v1/completions", None, b"x" * (MAX_BODY + 1))
    assert got == 413 and "exceeds" in json.loads(payload)["error"]["message"]
    got, _ = post(server.port, "/v1/nothing", {})
    assert got == 404
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["status"] == "ok"


@pytest.mark.parametrize("server", [(1, 1)], indirect=True)
def test_overload_gets_429_and_server_survives(server):
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: post(server.port, "/v1/completions",
                                               {"prompt": f"word {i}", "max_tokens": 40})[0], range(12)))
    assert 429 in results and 200 in results and set(results) <= {200, 429}
    status, _ = post(server.port, "/v1/completions", {"prompt": "after the storm", "max_tokens": 4})
    assert status == 200


def test_disconnected_stream_stops_its_batch(server):
    import socket
    import time

    def generated():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        return {l.split()[0]: float(l.split()[1]) for l in text.splitlines() if l.startswith("tda_") and "{" not in l}

    before = generated()
    body = json.dumps({"prompt": "a", "max_tokens": 400, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.close()
    deadline = time.time() + 60
    while generated()["tda_batches_total"] == before["tda_batches_total"] and time.time() < deadline:
        time.sleep(0.1)
    after = generated()
    assert after["tda_batches_total"] == before["tda_batches_total"] + 1
    assert after["tda_generated_tokens_total"] - before["tda_generated_tokens_total"] < 400

"""Load and abuse on 127.0.0.1, bounded: 64 concurrent streams with the default settings, slow-body clients,
and a client that disconnects mid-stream. Outcomes only (none lost, equal outputs, freed slots); speed is
measured by bench/server_load.py, not asserted here."""
import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from tda_export.runtime.engine import Engine
from tda_export.runtime.generate import generate
from tda_export.runtime.sampling import SamplingParams
from tda_export.runtime.server import Server


@pytest.fixture(scope="module")
def engine(served_engine_dir):
    return Engine.load(served_engine_dir, backend="onnxruntime", threads=1)


def start(engine, **options):
    srv = Server(engine, "127.0.0.1", 0, **options)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv, thread


@pytest.fixture
def server(engine, request):
    srv, thread = start(engine, **getattr(request, "param", {}))
    yield srv
    srv.shutdown()
    thread.join(timeout=10)


def test_64_concurrent_streams_all_complete_and_equal_unbatched(engine, server):
    prompts = [f"{i} the quick brown fox {i % 7}" for i in range(64)]

    async def one(client, prompt):
        text, finish, done = "", None, False
        async with client.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 12,
                                                                  "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
        return text, finish, done

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts), return_exceptions=True)

    results = asyncio.run(main())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} of 64 streams failed: {failures[:3]}"
    assert all(done and finish in ("stop", "length") for _, finish, done in results)
    alone = [generate(engine, [p], SamplingParams(max_new_tokens=12))[0] for p in prompts]
    assert [text for text, _, _ in results] == alone
    assert server.scheduler.metrics.batches < 64, "concurrent streams should have been batched"


@pytest.mark.parametrize("server", [{"body_timeout": 3.0}], indirect=True)
def test_slow_body_clients_time_out_without_blocking_others(server):
    slow = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        slow.append(s)
    r = httpx.post(f"http://127.0.0.1:{server.port}/v1/completions", json={"prompt": "the", "max_tokens": 4},
                   timeout=30)
    assert r.status_code == 200
    for s in slow:  # the others were served while these were still waiting for their body
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(1)
        s.setblocking(True)
        s.settimeout(30)
    for s in slow:
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 408"), head[:80]
        s.close()


@pytest.mark.parametrize("server", [{"queue_size": 1, "max_batch": 1}], indirect=True)
def test_disconnected_stream_frees_its_slot(server):
    body = json.dumps({"prompt": "a", "max_tokens": 400, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    head = b""
    while b"data: " not in head:  # the stream has started generating
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 200")
    s.close()
    deadline = time.time() + 60
    while server.scheduler.running and time.time() < deadline:
        time.sleep(0.01)
    assert not server.scheduler.running, "the disconnected stream's batch should have stopped"
    assert server.scheduler.metrics.generated_tokens < 400
    # and the server goes on serving
    codes = [httpx.post(f"http://127.0.0.1:{server.port}/v1/completions", json={"prompt": "b", "max_tokens": 3},
                        timeout=30).status_code for _ in range(2)]
    assert codes == [200, 200]

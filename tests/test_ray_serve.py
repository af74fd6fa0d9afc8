"""`serve --ray` on a real two-node Ray cluster (ray.cluster_utils.Cluster: two raylets on this machine), one
replica per node, Ray Serve's own proxy in front: 64 concurrent streaming `openai` clients get exactly their own
greedy text; each replica's /metrics reach Ray's metrics agent on its node; lm-eval's local-completions scores
the same loglikelihoods through Ray as through `serve`; a replica killed with SIGKILL mid-load is replaced,
the surviving replica's requests complete and the dead one's fail at once with a transport error or a 500 that
the openai client retries; and the CLI deploys onto the running cluster and removes its app on SIGTERM.

One cluster for the whole module (starting Ray is most of the cost); the tests run in file order and the kill
test comes after the ones that need both replicas healthy."""
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from tda_export.runtime.engine import Engine
from tda_export.runtime.generate import generate
from tda_export.runtime.sampling import SamplingParams
from test_server_lm_eval import _direct_loglikelihood, loglikelihoods, run_lm_eval, served  # noqa: F401 (fixture)

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve")
pytest.importorskip("lm_eval")

pytestmark = pytest.mark.slow

REPLICA_OPTIONS = dict(max_batch=8, backend="onnxruntime", threads=1, metrics_seconds=0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replicas() -> dict[str, tuple[int, str]]:
    """Alive replicas of the app: replica id -> (pid, node id), from the GCS actor table (Ray's state API would
    need the dashboard, which this cluster does not start)."""
    from ray._private import state

    out = {}
    for a in state.actors().values():
        if a["State"] == "ALIVE" and a["Name"].startswith("SERVE_REPLICA::tda#TdaReplica#"):
            out[a["Name"].rsplit("#", 1)[1]] = (a["Pid"], a["Address"]["NodeID"])
    return out


def wait_for(check, timeout: float, what: str, seen=lambda: ""):
    deadline = time.time() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} {seen()}")
        time.sleep(0.25)


def deployment_config() -> dict:
    """The app's deployment config as the Serve controller holds it (what its REST API shows)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return details["applications"]["tda"]["deployments"]["TdaReplica"]["deployment_config"]


@pytest.fixture(scope="module")
def cluster(served_engine_dir):
    from ray import serve
    from ray.cluster_utils import Cluster

    from tda_export.runtime.ray_serve import APP_NAME, application
    from tda_export.runtime.replicas import ReplicaPlan

    metrics_ports = (free_port(), free_port())
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "metrics_export_port": metrics_ports[0],
        "_system_config": {"metrics_report_interval_ms": 500}})
    c.add_node(num_cpus=1, metrics_export_port=metrics_ports[1])
    try:
        ray.init(address=c.address, logging_level="warning", log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        app = application(str(served_engine_dir), ReplicaPlan(replicas=2, cpus=0.5, max_per_node=1),
                          **REPLICA_OPTIONS)
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, address=c.address,
                              metrics_ports=metrics_ports, head=c.head_node.unique_id)
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def engine(served_engine_dir):
    return Engine.load(served_engine_dir, backend="onnxruntime", threads=1)


def prompts_and_texts(engine, n: int, seed: int, max_tokens: int) -> tuple[list[list[int]], list[str]]:
    """n random token prompts whose greedy texts (each prompt alone, from the engine in this process: what the
    replicas' batching must reproduce) are non-empty and pairwise distinct, so a response carrying another's
    text cannot pass."""
    rng = np.random.default_rng(seed)
    vocab = engine.manifest["vocab_size"]
    ps, texts = [], []
    while len(ps) < n:
        p = rng.integers(5, vocab, size=int(rng.integers(4, 12))).tolist()
        t = generate(engine, [p], SamplingParams(max_new_tokens=max_tokens))[0]
        if t and t not in texts:
            ps.append(p)
            texts.append(t)
    return ps, texts


def ray_metric(port: int, name: str) -> dict[str, float]:
    """replica id -> value of a tda metric as the Ray metrics agent on one node exports it."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith(f"ray_{name}{{"):
            replica = re.search(r'replica="([^"]+)"', line).group(1)
            out[replica] = out.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_replica_health_check_follows_the_scheduler_thread(engine):
    """check_health as Ray Serve calls it, on a real scheduler: healthy while its thread runs, not before it
    starts or after it stops (and so a scheduler whose thread died gets its replica replaced)."""
    from tda_export.runtime.ray_serve import TdaReplica
    from tda_export.runtime.replicas import HealthWatch, ReplicaUnhealthy
    from tda_export.runtime.scheduler import Scheduler

    replica = SimpleNamespace(scheduler=Scheduler(engine), watch=HealthWatch())
    with pytest.raises(ReplicaUnhealthy, match="scheduler thread is not running"):
        TdaReplica.check_health(replica)
    replica.scheduler.start()
    TdaReplica.check_health(replica)
    replica.scheduler.stop()
    with pytest.raises(ReplicaUnhealthy, match="scheduler thread is not running"):
        TdaReplica.check_health(replica)


def test_two_nodes_64_concurrent_streams_each_get_their_own_text(cluster, engine):
    alive = replicas()
    assert len(alive) == 2 and len({node for _, node in alive.values()}) == 2, alive  # one replica per node
    me = httpx.get(f"{cluster.url}/replica", timeout=10).json()
    assert alive[me["replica"]] == (me["pid"], me["node"])

    ps, want = prompts_and_texts(engine, 64, seed=1, max_tokens=16)

    async def one(client, i):
        raw = await client.completions.with_raw_response.create(
            model=engine.manifest["model"], prompt=ps[i], max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in raw.parse():
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return raw.headers["x-tda-replica"], text, usage.completion_tokens

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0,
                                      timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    got = asyncio.run(all_of_them())
    assert [text for _, text, _ in got] == want
    served_by = {r for r, _, _ in got}
    assert served_by == set(alive), "Ray Serve's proxy sent the load to both replicas"

    # each replica's /metrics, mirrored into Ray, is exported by the metrics agent of the node it runs on
    tokens = sum(n for _, _, n in got)

    last = []

    def exported():
        per_node = [ray_metric(p, "tda_generated_tokens_total") for p in cluster.metrics_ports]
        last[:] = per_node
        merged = {k: v for node in per_node for k, v in node.items()}
        return per_node if set(merged) == set(alive) and sum(merged.values()) == tokens else None

    per_node = wait_for(exported, 60, f"both replicas' tda_generated_tokens_total to add up to {tokens}",
                        lambda: f"(exported per node: {last})")
    assert all(len(node) == 1 for node in per_node)  # one replica per node, each exported where it runs
    text = httpx.get(f"{cluster.url}/metrics", timeout=10)
    assert text.headers["x-tda-replica"] in alive and "tda_generated_tokens_total" in text.text


def test_lm_eval_through_ray_scores_as_through_serve(cluster, served, served_engine_dir, tmp_path_factory,
                                                      monkeypatch):
    engine_serve, port = served
    via_ray = loglikelihoods(run_lm_eval(f"{cluster.url}/v1/completions", served_engine_dir,
                                         tmp_path_factory.mktemp("ray"), monkeypatch, tasks=("tda_tiny_choice",)))
    via_serve = loglikelihoods(run_lm_eval(f"http://127.0.0.1:{port}/v1/completions", served_engine_dir,
                                           tmp_path_factory.mktemp("serve"), monkeypatch, tasks=("tda_tiny_choice",)))
    assert [(c, k) for c, k, _ in via_ray] == [(c, k) for c, k, _ in via_serve] and len(via_ray) == 11
    for (context, continuation, ll_ray), (_, _, ll_serve) in zip(via_ray, via_serve):
        assert abs(ll_ray - ll_serve) < 1e-5
        assert abs(ll_ray - _direct_loglikelihood(engine_serve, engine_serve.tokenizer, context, continuation)) < 1e-4


def test_killed_replica_is_replaced_and_no_request_hangs(cluster, engine):
    """16 streams (httpx, to see each one's replica as soon as its headers come) and 16 non-streaming requests
    (the openai client, which retries 5xx and connection errors) of 200 tokens; once every stream has started,
    SIGKILL the replica holding the most streams."""
    ps, want = prompts_and_texts(engine, 32, seed=2, max_tokens=200)
    before = replicas()
    heads, streams, plain = {}, {}, {}

    def stream(i):
        t0 = time.time()
        try:
            with httpx.stream("POST", f"{cluster.url}/v1/completions", timeout=60,
                              json={"prompt": ps[i], "max_tokens": 200, "temperature": 0, "stream": True}) as r:
                heads[i] = r.headers["x-tda-replica"]
                text, done = "", False
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
                streams[i] = ("done" if done else "truncated", text, time.time() - t0)
        except httpx.TransportError as e:
            streams[i] = ("error", f"{type(e).__name__}: {e}", time.time() - t0)

    def complete(client, i):
        t0 = time.time()
        try:
            r = client.completions.create(model=engine.manifest["model"], prompt=ps[i], max_tokens=200, temperature=0)
            plain[i] = ("done", r.choices[0].text, time.time() - t0)
        except openai.APIError as e:
            plain[i] = ("error", f"{type(e).__name__}: {e}", time.time() - t0)

    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=3, timeout=60)
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    threads += [threading.Thread(target=complete, args=(client, i)) for i in range(16, 32)]
    for t in threads:
        t.start()
    wait_for(lambda: len(heads) == 16 or len(streams) == 16, 60, "all 16 streams to start")
    victim = max(set(heads.values()), key=list(heads.values()).count)
    os.kill(before[victim][0], signal.SIGKILL)
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung after the replica died"

    on_victim = [i for i, r in heads.items() if r == victim]
    for i, (how, text, seconds) in streams.items():
        if heads[i] != victim:
            assert (how, text) == ("done", want[i]), f"stream {i} on the surviving replica: {how} {text[:80]!r}"
        elif how == "done":
            assert text == want[i]  # finished before the kill
        else:
            assert how == "error" and seconds < 60, (how, text)  # a transport error the client sees at once
    assert any(streams[i][0] == "error" for i in on_victim), "the kill landed mid-stream"
    for i, (how, text, _) in plain.items():  # the proxy's 500 for the dead replica was retried by the client
        assert (how, text) == ("done", want[i]), f"request {i}: {how} {text[:200]!r}"

    from ray import serve

    def replaced():
        now = replicas()
        status = serve.status().applications["tda"].deployments["TdaReplica"]
        return now if (len(now) == 2 and victim not in now and status.replica_states == {"RUNNING": 2}) else None

    now = wait_for(replaced, 120, "Ray Serve to replace the killed replica")
    new = (set(now) - set(before)).pop()
    ps2, want2 = prompts_and_texts(engine, 32, seed=3, max_tokens=16)
    with openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=60) as c2:
        def again(i):
            r = c2.completions.with_raw_response.create(model=engine.manifest["model"], prompt=ps2[i], max_tokens=16, temperature=0)
            return r.headers["x-tda-replica"], r.parse().choices[0].text
        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(again, range(32)))
    assert [t for _, t in got] == want2
    assert new in {r for r, _ in got}, "the new replica serves"


def test_cli_serve_ray_deploys_on_the_cluster_and_removes_its_app(cluster, served_engine_dir):
    """`tda-export serve --ray --address` onto the running cluster (redeploying the app, autoscaling between one
    and two replicas: the Serve controller holds that config; another --port, which the running proxies do not
    take: the CLI says where they are), a request through it, then SIGTERM: the CLI deletes the app and exits 0."""
    from ray import serve

    proc = subprocess.Popen([sys.executable, "-m", "tda_export", "serve", "--ray", "--address", cluster.address,
                             "-e", str(served_engine_dir), "--port", str(free_port()), "--min-replicas", "1",
                             "--max-replicas", "2", "--replica-cpus", "0.5", "--backend", "onnxruntime", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "serving on http://" in line:
                break
        assert proc.poll() is None, "".join(lines)
        # Serve already runs on this cluster: its proxies stay where they are, and the CLI says so
        assert "already running" in lines[-2] and f"127.0.0.1:{cluster.port}" in lines[-2]
        assert f"http://127.0.0.1:{cluster.port}" in lines[-1] and "1-2 replicas (autoscaling)" in lines[-1]
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        r = httpx.post(f"{cluster.url}/v1/completions", json={"prompt": "the quick", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        scaling = deployment_config()["autoscaling_config"]
        assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 2, 8)
        assert 1 <= len(replicas()) <= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "tda" not in serve.status().applications
    finally:
        if proc.poll() is None:
            proc.kill()


def test_app_builder_for_rays_own_cli(served_engine_dir):
    """`serve run tda_export.runtime.ray_serve:app_builder engine=DIR replicas=2 …`: Ray passes strings."""
    from ray.serve import Application

    from tda_export.runtime.ray_serve import app_builder

    assert isinstance(app_builder({"engine": str(served_engine_dir), "replicas": "2", "max_batch": "4",
                                   "backend": "onnxruntime", "replica_cpus": "0.5"}), Application)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['replica'\]"):
        app_builder({"engine": str(served_engine_dir), "replica": "2"})
    with pytest.raises(ValueError, match="needs engine=DIR"):
        app_builder({"replicas": "2"})
    with pytest.raises(ValueError, match="--min-replicas 3 and --max-replicas 2"):
        app_builder({"engine": str(served_engine_dir), "min_replicas": "3", "max_replicas": "2"})

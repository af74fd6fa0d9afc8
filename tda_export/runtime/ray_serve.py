"""The server's FastAPI app (server.create_app) as replicas of a Ray Serve deployment.

Ray Serve places the replicas on the cluster's nodes, routes HTTP to them through its proxies (one per node, on
the same port; streaming responses pass through), restarts a replica whose actor dies or whose `check_health`
raises, and autoscales between bounds on ongoing requests. Each replica loads the engine once, in its
constructor, from `engine_dir`: a path every node must be able to read (a shared filesystem, or the same copy
at the same path on each node). Each replica mirrors its /metrics into Ray's metrics, tagged with its replica
id, which every node's metrics agent exports to Prometheus (docs/server.md).

Needs the `ray` extra (`pip install 'tda-export[ray]'`). `tda-export serve --ray` uses `application()`;
`serve run tda_export.runtime.ray_serve:app_builder engine=/shared/engine` is the same through Ray's own CLI.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import ray
from ray import serve

from .engine import Engine
from .replicas import CounterDeltas, HealthWatch, ReplicaPlan, failure_reason, metric_samples
from .scheduler import Scheduler
from .server import BODY_TIMEOUT, MAX_BODY, MAX_REQUEST, QUEUE_SIZE, create_app, render_metrics

APP_NAME = "tda"
REPLICA_HEADER = "x-tda-replica"   # each response names the replica that served it


@serve.ingress()
class TdaReplica:
    """One replica: the engine, its scheduler thread, and the app; `__serve_build_asgi_app__` hands the app to
    Ray Serve once the constructor has loaded the engine."""

    def __init__(self, engine_dir: str, backend: str = "auto", threads: int | None = None, max_batch: int = 8,
                 queue_size: int = QUEUE_SIZE, max_request: int = MAX_REQUEST, model_name: str | None = None,
                 body_timeout: float = BODY_TIMEOUT, stall_seconds: float = 600.0, metrics_seconds: float = 5.0,
                 batching: str = "auto"):
        self.engine = Engine.load(engine_dir, backend=backend, threads=threads, max_batch=max_batch)
        self.scheduler = Scheduler(self.engine, queue_size, max_batch, max_request=max_request, batching=batching)
        self.scheduler.start()
        self.model_name = model_name or str(self.engine.manifest.get("model", "tda-model"))
        self.guard = create_app(self.engine, self.scheduler, self.model_name, MAX_BODY, body_timeout)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.watch = HealthWatch(stall_seconds)
        self.metrics_seconds = metrics_seconds
        self._ray_metrics: dict = {}
        self._deltas = CounterDeltas()

    async def __serve_build_asgi_app__(self):
        self._mirror_task = asyncio.get_running_loop().create_task(self._mirror_metrics())
        me = {"replica": self.replica_id, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}
        return _name_replica(self.guard, me)

    def check_health(self):
        """Ray Serve's health check (every health_check_period_s); raising gets the replica replaced."""
        s = self.scheduler
        m = s.metrics.snapshot()
        progress = tuple(m[k] for k in ("batches", "generated_tokens", "prompt_tokens", "scored_tokens", "cancelled",
                                        "sequence_errors"))
        self.watch.check(s._thread.is_alive(), bool(s.depth() or s.running), progress, time.monotonic())

    def __del__(self):
        self.scheduler.stop()

    async def _mirror_metrics(self):
        warned = False
        while True:
            try:
                self.mirror_metrics_once()
            except Exception as e:  # noqa: BLE001 - metrics must never take a replica down; said once in its log
                if not warned:
                    logging.getLogger("ray.serve").warning(f"tda metrics not exported to Ray: {type(e).__name__}: {e}")
                    warned = True
            await asyncio.sleep(self.metrics_seconds)

    def mirror_metrics_once(self):
        """This replica's /metrics samples into Ray Serve metrics (tagged deployment, replica, application)."""
        from ray.serve import metrics

        for s in metric_samples(render_metrics(self.scheduler, self.guard.counts)):
            keys = tuple(k for k, _ in s.labels)
            m = self._ray_metrics.get((s.name, keys))
            if m is None:
                make = metrics.Counter if s.kind == "counter" else metrics.Gauge
                m = self._ray_metrics[(s.name, keys)] = make(s.name, description=f"tda-export /metrics {s.name}",
                                                             tag_keys=keys)
            tags = dict(s.labels)
            if s.kind == "counter":
                step = self._deltas.delta((s.name, s.labels), s.value)
                if step > 0:  # Ray's Counter.inc refuses 0
                    m.inc(step, tags=tags or None)
            else:
                m.set(s.value, tags=tags or None)


def _name_replica(app, me: dict):
    """The app, with a response header naming the replica that served the request, and GET /replica answering
    which replica, process and Ray node this is (the proxy picks the replica; for operators and tests)."""
    replica, body = me["replica"].encode(), json.dumps(me).encode()

    async def named(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        if scope["path"] == "/replica" and scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (REPLICA_HEADER.encode(), replica)]})
            return await send({"type": "http.response.body", "body": body})

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), replica)]}
            await send(message)

        await app(scope, receive, send_named)
    return named


def application(engine_dir: str, plan: ReplicaPlan, max_batch: int = 8, **replica_kwargs):
    """The bound Ray Serve application: `TdaReplica` with the plan's deployment options. `engine_dir` should be
    absolute: it is opened on whichever node each replica lands."""
    options = plan.options(max_batch)
    deployment = serve.deployment(TdaReplica, name="TdaReplica", max_constructor_retry_count=3,
                                  health_check_period_s=10, health_check_timeout_s=30, **options)
    return deployment.bind(str(engine_dir), max_batch=max_batch, **replica_kwargs)


def app_builder(args: dict):
    """For Ray's CLI: `serve run tda_export.runtime.ray_serve:app_builder engine=/shared/engine replicas=2
    [min_replicas=1 max_replicas=4 target_ongoing_requests=8 replica_cpus=2 backend=native max_batch=8 ...]`."""
    args = dict(args)
    try:
        engine = args.pop("engine")
    except KeyError:
        raise ValueError("app_builder needs engine=DIR (a path every node can read)") from None
    num = {"replicas": int, "min_replicas": int, "max_replicas": int, "target_ongoing_requests": float,
           "max_ongoing_requests": int, "replica_cpus": float, "replica_gpus": float, "max_replicas_per_node": int}
    p = {k: conv(args.pop(k)) for k, conv in num.items() if k in args}
    plan = ReplicaPlan(p.get("replicas"), p.get("min_replicas"), p.get("max_replicas"),
                       p.get("target_ongoing_requests"), p.get("max_ongoing_requests"), p.get("replica_cpus", 1.0),
                       p.get("replica_gpus", 0.0), p.get("max_replicas_per_node"))
    kw = {"backend": str, "threads": int, "max_batch": int, "queue_size": int, "max_request": int,
          "model_name": str, "body_timeout": float, "stall_seconds": float, "batching": str}
    unknown = set(args) - set(kw)
    if unknown:
        raise ValueError(f"app_builder: unknown argument(s) {sorted(unknown)}; known: engine, "
                         f"{', '.join(sorted([*num, *kw]))}")
    kwargs = {k: kw[k](v) for k, v in args.items()}
    return application(os.path.abspath(engine), plan, **kwargs)


def run_on_ray(engine_dir: str, plan: ReplicaPlan, host: str, port: int, address: str | None, log,
               max_batch: int = 8, **replica_kwargs) -> None:
    """Deploy on the Ray cluster at `address` (None: start Ray on this machine for as long as this runs), serve
    until interrupted (Ctrl-C or SIGTERM), then delete the application. RuntimeError when the deployment fails
    (a replica could not load the engine, say), with Ray's reason."""
    import signal

    logging.getLogger("ray.serve").setLevel(logging.WARNING)

    def stop(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: stopping Ray must not be interrupted again
        raise KeyboardInterrupt

    app = application(os.path.abspath(engine_dir), plan, max_batch, **replica_kwargs)  # options checked first
    ray.init(address=address, logging_level="warning", log_to_driver=False)
    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        log(f"deploying {plan.describe()} of {engine_dir} on Ray "
            f"({'cluster ' + address if address else 'started on this machine'}); each replica loads the engine")
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            status = serve.status().applications.get(APP_NAME)
            details = [d.message for d in status.deployments.values()] if status else []
            raise RuntimeError(f"the Ray Serve deployment failed: {failure_reason([str(e), *details])}") from None
        where = _proxy_address(host, port)
        if where != (host, port):
            log(f"note: Ray Serve was already running on this cluster with its proxies on {where[0]}:{where[1]}; "
                f"--host/--port do not move them")
        log(f"serving on http://{where[0]}:{where[1]} through Ray Serve's proxy ({plan.describe()}; "
            f"{REPLICA_HEADER} names the replica of each response); Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        if address is not None:  # on a cluster that outlives us: remove our app; a local Ray goes with ray.shutdown
            log("stopping: deleting the application from the cluster")
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def _proxy_address(host: str, port: int) -> tuple[str, int]:
    """Where Ray Serve's proxies really listen: serve.start keeps the options of a Serve instance that was
    already running on the cluster. Read from the controller's details (what Ray's REST API shows); the
    requested address if Ray does not say."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().get_serve_details().get("http_options") or {}
        return http.get("host", host), int(http.get("port", port))
    except Exception:  # noqa: BLE001 - only for the message; Ray's internals may move
        return host, port

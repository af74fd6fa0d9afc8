"""The Ray-free decisions of `serve --ray` (tda_export/runtime/replicas.py): deployment options from the replica
flags, the replica health rule, and the /metrics samples a replica mirrors into Ray; and the CLI's answers to
flags that contradict each other, before anything starts."""
import pytest
from click.testing import CliRunner

from tda_export.cli import main
from tda_export.runtime.replicas import (CounterDeltas, HealthWatch, ReplicaPlan, ReplicaUnhealthy, failure_reason,
                                        metric_samples)
from tda_export.runtime.scheduler import Scheduler
from tda_export.runtime.server import render_metrics


def test_fixed_replicas_options():
    opts = ReplicaPlan(replicas=3, cpus=0.5, max_per_node=1).options(max_batch=4)
    assert opts == {"num_replicas": 3, "max_ongoing_requests": 8, "max_replicas_per_node": 1,
                    "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.0}}
    assert ReplicaPlan().options(8)["num_replicas"] == 1
    assert ReplicaPlan(replicas=2).describe() == "2 replica(s)"


def test_autoscaling_options_and_defaults():
    opts = ReplicaPlan(min_replicas=1, max_replicas=4).options(max_batch=8)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0}
    opts = ReplicaPlan(replicas=2, max_replicas=5, target_ongoing=3, max_ongoing=6).options(max_batch=8)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 3,
                                          "initial_replicas": 2}
    assert opts["max_ongoing_requests"] == 6
    assert ReplicaPlan(min_replicas=2).options(4)["autoscaling_config"]["max_replicas"] == 2
    assert ReplicaPlan(min_replicas=0, max_replicas=2).describe() == "0-2 replicas (autoscaling)"


@pytest.mark.parametrize("plan, words", [
    (ReplicaPlan(min_replicas=3, max_replicas=2), "--min-replicas 3 and --max-replicas 2"),
    (ReplicaPlan(replicas=5, min_replicas=1, max_replicas=2), "--replicas 5"),
    (ReplicaPlan(max_replicas=2, target_ongoing=40), "--target-ongoing-requests 40"),
    (ReplicaPlan(replicas=2, target_ongoing=4), "needs autoscaling"),
    (ReplicaPlan(replicas=0), "--replicas 0"),
])
def test_contradicting_flags_are_named(plan, words):
    with pytest.raises(ValueError, match=words.replace("-", r"\-")):
        plan.options(max_batch=8)


def test_health_watch_stall_rule():
    w = HealthWatch(stall_seconds=10)
    w.check(alive=True, busy=False, progress=(0, 0), now=0)
    w.check(alive=True, busy=False, progress=(0, 0), now=100)     # idle for long: healthy
    w.check(alive=True, busy=True, progress=(0, 0), now=105)      # work arrived: the clock starts now
    w.check(alive=True, busy=True, progress=(0, 0), now=114)
    w.check(alive=True, busy=True, progress=(0, 16), now=130)     # any counter moving resets it (tokens here)
    w.check(alive=True, busy=True, progress=(0, 16), now=139)
    with pytest.raises(ReplicaUnhealthy, match="no progress in 11 s"):
        w.check(alive=True, busy=True, progress=(0, 16), now=141)
    with pytest.raises(ReplicaUnhealthy, match="scheduler thread is not running"):
        HealthWatch().check(alive=False, busy=False, progress=(), now=0)


def test_metric_samples_of_the_servers_own_metrics(served_engine_dir):
    """What a replica mirrors is exactly what its /metrics renders: every sample, with its kind and labels."""
    from tda_export.runtime.engine import Engine

    sched = Scheduler(Engine.load(served_engine_dir, backend="onnxruntime", threads=1))
    sched.metrics.generated_tokens = 7
    text = render_metrics(sched, {200: 5, 429: 1})
    got = {(s.name, s.labels): (s.kind, s.value) for s in metric_samples(text)}
    assert got[("tda_requests_total", (("code", "200"),))] == ("counter", 5.0)
    assert got[("tda_requests_total", (("code", "429"),))] == ("counter", 1.0)
    assert got[("tda_generated_tokens_total", ())] == ("counter", 7.0)
    assert got[("tda_queue_depth", ())] == ("gauge", 0.0)
    assert got[("tda_ttft_seconds_count", ())][0] == "counter"
    lines = [l for l in text.splitlines() if l and not l.startswith("#")]
    assert len(got) == len(lines)


def test_counter_deltas():
    d = CounterDeltas()
    assert [d.delta("a", 3), d.delta("a", 3), d.delta("a", 10), d.delta("b", 1), d.delta("a", 4)] == [3, 0, 7, 1, 0]


@pytest.mark.parametrize("args, words", [
    (["--replicas", "2"], "--replicas only apply with --ray"),
    (["--address", "auto", "--replica-cpus", "2"], "--address, --replica-cpus only apply with --ray"),
    (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 and --max-replicas 2"),
])
def test_serve_cli_refuses_contradicting_replica_flags(served_engine_dir, args, words):
    r = CliRunner().invoke(main, ["serve", "-e", str(served_engine_dir), *args])
    assert r.exit_code != 0 and words in r.output and "Traceback" not in r.output


# A deployment failure as Ray Serve 2.60 reports it (serve.run's error, then the deployment's status message)
RAY_FAILURE = [
    "Deploying application tda failed: Failed to update the deployments ['TdaReplica'].",
    "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or initial "
    "health check failing. See controller logs for details. Error:\n"
    "ray::ServeReplica:tda:TdaReplica.initialize_and_get_metadata() (pid=18057, ip=192.0.2.2)\n"
    '  File "ray/serve/_private/replica.py", line 1928, in initialize\n'
    "    raise RuntimeError(traceback.format_exc()) from None\n"
    "RuntimeError: Traceback (most recent call last):\n"
    '  File "tda_export/runtime/engine.py", line 46, in load\n'
    "    raise EngineError(str(e)) from None\n"
    "tda_export.runtime.errors.EngineError: manifest /x/manifest.json: format None, expected 'tda-export-manifest/1'",
]


def test_failure_reason_is_the_replicas_own_error():
    assert failure_reason(RAY_FAILURE) == ("EngineError: manifest /x/manifest.json: format None, expected "
                                           "'tda-export-manifest/1'")
    assert failure_reason(RAY_FAILURE[:1]) == RAY_FAILURE[0]
    assert failure_reason(["", ""]) == "no reason given"


def test_serve_ray_without_ray_says_how_to_get_it(served_engine_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "tda_export.runtime.ray_serve", raising=False)
    r = CliRunner().invoke(main, ["serve", "--ray", "-e", str(served_engine_dir)])
    assert r.exit_code != 0 and "pip install 'tda-export[ray]'" in r.output and "Traceback" not in r.output

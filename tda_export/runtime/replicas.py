"""What a Ray Serve deployment of the server is made of, decided without Ray: the deployment options from the
CLI's replica flags, the replica health rule, and the /metrics samples a replica mirrors into Ray's metrics.

`ray_serve.py` is the thin adapter that hands these to Ray; keeping them here lets them be tested (and the CLI's
flags checked) where Ray is not installed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


class ReplicaUnhealthy(RuntimeError):
    """Raised by a replica's health check; Ray Serve then replaces the replica."""


@dataclass(frozen=True)
class ReplicaPlan:
    """How many replicas, and what each one takes. `replicas` alone: a fixed count. `min_replicas` or
    `max_replicas`: Ray Serve autoscales between them on ongoing requests per replica (`target_ongoing`,
    default `max_batch`: a full batch each), starting from `replicas` when given."""
    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing: float | None = None
    max_ongoing: int | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    max_per_node: int | None = None

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def describe(self) -> str:
        if not self.autoscaling:
            return f"{self.replicas if self.replicas is not None else 1} replica(s)"
        lo, hi = self._bounds()
        return f"{lo}-{hi} replicas (autoscaling)"

    def _bounds(self) -> tuple[int, int]:
        lo = self.min_replicas if self.min_replicas is not None else 1
        hi = self.max_replicas if self.max_replicas is not None else max(lo, self.replicas or 1)
        return lo, hi

    def options(self, max_batch: int) -> dict:
        """Keyword arguments for `serve.deployment(...)`/`.options(...)`; ValueError naming the flag if they
        contradict each other.

        max_ongoing_requests (Ray's cap on requests a replica holds at once; the proxies queue the rest and
        route each to the replica with fewer ongoing) defaults to two batches, so a replica has its next batch
        waiting while one runs, and requests are spread over replicas instead of piling into one scheduler."""
        if self.cpus < 0 or self.gpus < 0:
            raise ValueError("--replica-cpus and --replica-gpus must be >= 0")
        max_ongoing = self.max_ongoing or 2 * max_batch
        opts: dict = {"max_ongoing_requests": max_ongoing,
                      "ray_actor_options": {"num_cpus": self.cpus, "num_gpus": self.gpus}}
        if self.max_per_node is not None:
            opts["max_replicas_per_node"] = self.max_per_node
        if not self.autoscaling:
            if self.target_ongoing is not None:
                raise ValueError("--target-ongoing-requests needs autoscaling: give --min-replicas/--max-replicas")
            if self.replicas == 0:
                raise ValueError("--replicas 0 serves nothing: give at least 1, or --min-replicas 0 to autoscale "
                                 "down to zero")
            opts["num_replicas"] = self.replicas if self.replicas is not None else 1
            return opts
        lo, hi = self._bounds()
        if lo < 0 or hi < 1 or lo > hi:
            raise ValueError(f"--min-replicas {lo} and --max-replicas {hi}: need 0 <= min <= max and max >= 1")
        target = self.target_ongoing if self.target_ongoing is not None else float(max_batch)
        if not 0 < target <= max_ongoing:
            raise ValueError(f"--target-ongoing-requests {target:g} must be in (0, --max-ongoing-requests "
                             f"{max_ongoing}]")
        scaling = {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": target}
        if self.replicas is not None:
            if not lo <= self.replicas <= hi:
                raise ValueError(f"--replicas {self.replicas} (the initial count when autoscaling) must be within "
                                 f"--min-replicas {lo} and --max-replicas {hi}")
            scaling["initial_replicas"] = self.replicas
        opts["autoscaling_config"] = scaling
        return opts


class HealthWatch:
    """A replica is healthy while its scheduler thread lives and, whenever it has work, makes progress: some
    scheduler counter (batches, tokens generated, prompt tokens, scored tokens, cancellations, errors) moves at
    least every `stall_seconds`. A decode that hangs (a wedged accelerator, a deadlock) makes it unhealthy; an
    idle replica is not. The counters move when a batch (or, with continuous batching, a join or a sequence)
    ends, so the limit must exceed the longest batch an engine may run: 600 s by default. Ray Serve calls the
    check every health_check_period_s and replaces the replica after it raises."""

    def __init__(self, stall_seconds: float = 600.0):
        self.stall_seconds = stall_seconds
        self._progress = None              # the counters when the clock (re)started
        self._since: float | None = None   # when work was last seen waiting with no progress since

    def check(self, alive: bool, busy: bool, progress, now: float) -> None:
        if not alive:
            raise ReplicaUnhealthy("the scheduler thread is not running")
        if not busy:
            self._since = None
            return
        if self._since is None or progress != self._progress:
            self._progress, self._since = progress, now
            return
        if now - self._since > self.stall_seconds:
            raise ReplicaUnhealthy(f"work is waiting but the scheduler made no progress in {now - self._since:.0f} s "
                                   f"(stall limit {self.stall_seconds:g} s)")


@dataclass(frozen=True)
class Sample:
    name: str           # as /metrics names it, e.g. tda_generated_tokens_total
    kind: str           # "counter" or "gauge" (a summary's _sum and _count are counters)
    labels: tuple       # ((key, value), ...)
    value: float


def metric_samples(text: str) -> list[Sample]:
    """The samples of the server's /metrics text (Prometheus exposition format), parsed with prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        kind = "gauge" if family.type in ("gauge", "unknown") else "counter"
        for s in family.samples:
            out.append(Sample(s.name, kind, tuple(sorted(s.labels.items())), float(s.value)))
    return out


class CounterDeltas:
    """Our counters are totals; Ray's Counter takes increments. Remembers each counter's last total and
    returns how much to add (a total that went down, which ours never do, adds nothing)."""

    def __init__(self):
        self._last: dict = {}

    def delta(self, key, total: float) -> float:
        last = self._last.get(key, 0.0)
        self._last[key] = max(last, total)
        return max(0.0, total - last)


def failure_reason(messages: list[str]) -> str:
    """Why a deployment failed, in one line, from Ray's messages (its error, then each deployment's status
    message, which holds the replica constructor's traceback): the last exception line of the last message
    that has one, its class without the module path ("EngineError: manifest …"); else the first message."""
    for message in reversed(messages):
        for line in reversed(message.splitlines()):
            m = re.match(r"\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)", line)
            if m and not m.group(2).startswith("Traceback"):
                return f"{m.group(1)}: {m.group(2).strip()}"
    return next((m.strip() for m in messages if m.strip()), "no reason given")

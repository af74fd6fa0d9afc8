"""`tda-export run`, `serve` and `bench`: use a built engine directory."""
from __future__ import annotations

import json
import sys

import click

from .cli import UserError
from .cli_density import Densities, Density

ENGINE = click.option("--engine", "-e", "engine_dir", required=True, type=click.Path(exists=True, file_okay=False),
                      help="Directory written by `tda-export build`.")
THREADS = click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads [all cores].")
BACKEND = click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "native", "tensorrt"]),
                        default="auto", show_default=True,
                        help="auto: torch on a GPU; on a CPU the native C++ runtime (cpp/, built on first use) "
                             "for float32 engines, else whichever of torch and ONNX Runtime decodes faster "
                             "(measured once per machine and cached). tensorrt: the engine's model.plan "
                             "(--target tensorrt-rtx|tensorrt; a GPU its TensorRT supports).")
DENSITY = click.option("--density", "-d", type=Density(), default=None,
                       help="Density for this run (needs the engine's calibration); default: the built thresholds.")


def _engine(engine_dir, threads, backend, max_batch=None):
    from .runtime.engine import Engine, EngineError

    try:
        engine = Engine.load(engine_dir, backend=backend, threads=threads, max_batch=max_batch)
    except (EngineError, FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    return engine  # Engine.load said on stderr where auto passed over a faster backend, and why


@click.command()
@ENGINE
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option("--max-new-tokens", "-n", type=click.IntRange(1), default=64, show_default=True,
              help="Tokens to generate at most (EOS or --stop end sooner).")
@click.option("--temperature", type=click.FloatRange(0.0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--seed", type=int, default=None)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@DENSITY
@THREADS
@BACKEND
def run(engine_dir, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed, chat, density, threads, backend):
    """Generate from a prompt, streaming tokens to stdout.

    \b
    Example:
      tda-export run -e engine/ -p "The capital of France is" -n 32
    """
    from .runtime.engine import EngineError
    from .runtime.generate import ContextTooLong, Stats, stream
    from .runtime.sampling import SamplingParams

    engine = _engine(engine_dir, threads, backend)
    if chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True, tokenize=False)
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, tuple(stop), seed)
    stats = Stats()
    try:
        for ev in stream(engine, [prompt], params, density, stats):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    except (ContextTooLong, EngineError, ValueError) as e:
        raise UserError(str(e)) from None
    n = stats.completion_tokens[0]
    rate = stats.decode_steps / stats.decode_seconds if stats.decode_seconds else 0.0
    click.echo(f"\n[{n} tokens; first token {stats.time_to_first_token * 1e3:.0f} ms; decode {rate:.1f} tok/s; "
               f"MLP neurons active {stats.active_fraction:.1%}; backend {engine.backend.name}]", err=True)


@click.command()
@ENGINE
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--queue-size", type=click.IntRange(1), default=256, show_default=True,
              help="Waiting sequences (prompts x n, and prompts scored for echo) before new requests get 429 "
                   "(with Retry-After from the measured drain rate).")
@click.option("--max-request-sequences", "max_request", type=click.IntRange(1), default=64, show_default=True,
              help="Sequences one request may hold (at most --queue-size); a larger request gets 400.")
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True,
              help="Sequences run together: the slots in flight (continuous batching; at most 64 on the native "
                   "backend) or the size of a batch (static).")
@click.option("--batching", type=click.Choice(["auto", "continuous", "static"]), default="auto", show_default=True,
              help="continuous: a request joins the running batch at the next decode step and a finished one "
                   "frees its slot at once (native and onnxruntime backends); static: batches run to completion "
                   "(every backend); auto: continuous where the backend has it.")
@click.option("--model-name", default=None,
              help="Model id clients name in requests and see in /v1/models [the engine's model name].")
@click.option("--body-timeout", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Seconds a client may take to send a request body before it gets 408.")
@THREADS
@BACKEND
@click.option("--ray", "on_ray", is_flag=True,
              help="Run the same app as replicas of a Ray Serve deployment (needs the ray extra: pip install "
                   "'tda-export[ray]'); --host/--port are then those of Ray Serve's HTTP proxy, which routes to the "
                   "replicas. The engine directory is opened by each replica on its own node: it must be readable "
                   "at the same absolute path on every node (a shared filesystem, or the same copy everywhere).")
@click.option("--address", default=None,
              help="(--ray) Ray cluster to deploy on: the head's HOST:6379 that `ray start --head` prints, or "
                   "'auto' on a cluster node [none: start Ray on this machine, stopped on exit].")
@click.option("--replicas", type=click.IntRange(0), default=None,
              help="(--ray) Replicas, each one engine with its own scheduler [1]; with autoscaling, the initial count.")
@click.option("--min-replicas", type=click.IntRange(0), default=None,
              help="(--ray) Autoscale: fewest replicas [1 when --max-replicas is given].")
@click.option("--max-replicas", type=click.IntRange(1), default=None,
              help="(--ray) Autoscale: most replicas [--min-replicas or --replicas].")
@click.option("--target-ongoing-requests", type=click.FloatRange(0, min_open=True), default=None,
              help="(--ray) Autoscale: requests per replica Ray Serve scales to keep [--max-batch].")
@click.option("--max-ongoing-requests", type=click.IntRange(1), default=None,
              help="(--ray) Requests one replica holds at once; the proxies queue the rest and route them to the "
                   "least busy replica [2 x --max-batch].")
@click.option("--replica-cpus", type=click.FloatRange(0), default=1.0, show_default=True,
              help="(--ray) CPUs Ray reserves per replica (set --threads to match).")
@click.option("--replica-gpus", type=click.FloatRange(0), default=0.0, show_default=True,
              help="(--ray) GPUs Ray reserves per replica.")
@click.option("--max-replicas-per-node", type=click.IntRange(1), default=None,
              help="(--ray) At most this many replicas on one node (1 spreads them over the nodes).")
def serve(engine_dir, host, port, queue_size, max_request, max_batch, batching, model_name, body_timeout, threads,
          backend, on_ray, address, replicas, min_replicas, max_replicas, target_ongoing_requests, max_ongoing_requests,
          replica_cpus, replica_gpus, max_replicas_per_node):
    """Serve an OpenAI-compatible API: /v1/completions, /v1/chat/completions (SSE streaming), /v1/models,
    /health, /metrics.

    Requests may carry a "density" field (0-1] to change TDA sparsity per request. Completions support
    logprobs and echo (prompt-token logprobs, so lm-eval's local-completions can score loglikelihoods).

    With --ray the app runs as replicas on a Ray cluster: Ray Serve's proxy routes requests (streams
    included) to them, restarts a replica that dies or fails its health check, and autoscales between
    --min-replicas and --max-replicas; each replica's /metrics is exported, tagged with its replica id,
    by Ray's metrics agent on its node (docs/server.md).

    \b
    Example:
      tda-export serve -e engine/ --port 8000
      curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"prompt": "Once upon a time", "max_tokens": 16}'
      ray start --head   # then, on every other node: ray start --address HEAD:6379
      tda-export serve --ray --address auto -e /shared/engine --host 0.0.0.0 --replicas 2
    """
    from .runtime.replicas import ReplicaPlan

    plan = ReplicaPlan(replicas, min_replicas, max_replicas, target_ongoing_requests, max_ongoing_requests,
                       replica_cpus, replica_gpus, max_replicas_per_node)
    if on_ray:
        return _serve_on_ray(engine_dir, host, port, plan, address, backend=backend, threads=threads,
                             max_batch=max_batch, queue_size=queue_size, max_request=max_request,
                             model_name=model_name, body_timeout=body_timeout, batching=batching)
    given = [flag for flag, value in [("--address", address), ("--replicas", replicas), ("--min-replicas", min_replicas),
                                      ("--max-replicas", max_replicas),
                                      ("--target-ongoing-requests", target_ongoing_requests),
                                      ("--max-ongoing-requests", max_ongoing_requests),
                                      ("--max-replicas-per-node", max_replicas_per_node)] if value is not None]
    given += [f for f, v, d in [("--replica-cpus", replica_cpus, 1.0), ("--replica-gpus", replica_gpus, 0.0)] if v != d]
    if given:
        raise UserError(f"{', '.join(given)} only apply with --ray")
    from .runtime.server import Server, bind_socket

    try:
        sock = bind_socket(host, port)  # before the engine loads: a busy port fails in a second, not a minute
    except OSError as e:
        raise UserError(f"{e} (is another server running? pick another --port)") from None
    engine = _engine(engine_dir, threads, backend, max_batch)
    try:
        server = Server(engine, host, port, queue_size, max_batch, sock=sock, model_name=model_name,
                        body_timeout=body_timeout, max_request=max_request, batching=batching)
    except ValueError as e:  # --batching continuous on a backend without it
        raise UserError(f"--batching {batching}: {e}") from None
    click.echo(f"serving {server.model_name} on http://{host}:{server.port} (backend {engine.backend.name}, "
               f"{server.scheduler.batching} batching, max batch {server.scheduler.max_batch}, queue {queue_size} sequences, at most {server.scheduler.max_request} "
               f"per request)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def _serve_on_ray(engine_dir, host, port, plan, address, **replica_kwargs):
    import os

    from .runtime.server import bind_socket

    try:
        plan.options(replica_kwargs["max_batch"])
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        from .runtime.ray_serve import run_on_ray
    except ImportError as e:
        raise UserError(f"serve --ray needs Ray Serve ({e}): pip install 'tda-export[ray]'") from None
    if address is None:  # Ray's proxy will listen here: say now if the port is taken, not after Ray started
        try:
            bind_socket(host, port).close()
        except OSError as e:
            raise UserError(f"{e} (is another server running? pick another --port)") from None
    try:
        run_on_ray(os.path.abspath(engine_dir), plan, host, port, address, lambda m: click.echo(m, err=True),
                   **replica_kwargs)
    except (RuntimeError, ConnectionError, ValueError) as e:
        raise UserError(str(e)) from None


@click.command()
@ENGINE
@click.option("--densities", type=Densities(), default=None,
              help="Comma-separated densities to time besides 1.0 [every density the engine's calibration has, "
                   "else the built default].")
@click.option("--prompt-tokens", type=click.IntRange(2), default=128, show_default=True,
              help="Length of each timed prompt.")
@click.option("--new-tokens", type=click.IntRange(2), default=32, show_default=True, help="Decode steps timed.")
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True, help="Sequences decoded together.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Rounds, interleaved over the densities; the median (and min) is reported.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@THREADS
@BACKEND
def bench(engine_dir, densities, prompt_tokens, new_tokens, batch, repeats, as_json, threads, backend):
    """Time to first token and decode tokens/s at density 1.0 vs the engine's TDA densities, in one run.

    The densities are interleaved round by round, so a noisy neighbour slows them alike; the table
    gives the median and min over --repeats and the MLP neurons each density really kept.

    \b
    Example:
      tda-export bench -e engine/ --densities 0.5,0.9 --backend native
    """
    from .runtime.bench import run_bench

    engine = _engine(engine_dir, threads, backend, batch)
    try:
        rows = run_bench(engine, densities, prompt_tokens, new_tokens, batch, repeats)
    except ValueError as e:
        raise UserError(str(e)) from None
    if as_json:
        click.echo(json.dumps({"engine": str(engine_dir), "backend": engine.backend.name, "batch": batch,
                               "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rows": rows}, indent=1))
        return
    click.echo(f"backend {engine.backend.name}, batch {batch}, prompt {prompt_tokens} tokens, {new_tokens} new")
    click.echo("| density | active MLP neurons | first token ms | decode tok/s median | min | vs dense |")
    click.echo("|---|---|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r['density']} | {r['active_fraction']:.1%} | {r['ttft_ms']:.1f} | {r['decode_tok_s']:.1f} "
                   f"| {r['decode_tok_s_min']:.1f} | {r['speedup_vs_dense']:.2f}x |")

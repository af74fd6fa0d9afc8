"""OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /health, /metrics.

Threads: one per connection (stdlib ThreadingHTTPServer) parses and validates,
then puts the request on a bounded queue; one scheduler thread owns the engine,
takes up to `max_batch` queued requests of the same density at a time (request
batching) and runs them as one batch, pushing events back to each
connection. A full queue answers 429 at once; bad input answers 4xx with an
OpenAI-style JSON error; an engine failure fails only that batch's requests.
"""
from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .engine import Engine, EngineError
from .generate import ContextTooLong, Stats, stream
from .sampling import SamplingParams

MAX_BODY = 1 << 20
MAX_TOKENS_CAP = 4096
_DONE = object()


class BadRequest(ValueError):
    status = HTTPStatus.BAD_REQUEST


@dataclass
class Job:
    prompt: str
    params: SamplingParams
    density: float | None
    events: queue.Queue = field(default_factory=queue.Queue)  # Event | Exception | _DONE
    created: float = field(default_factory=time.time)
    cancelled: bool = False  # its client went away; a batch whose clients all left stops early


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.counters = {"requests_total": {}, "generated_tokens_total": 0, "prompt_tokens_total": 0,
                         "batches_total": 0, "decode_seconds_total": 0.0, "ttft_seconds_sum": 0.0}

    def request(self, code: int):
        with self.lock:
            c = self.counters["requests_total"]
            c[code] = c.get(code, 0) + 1

    def batch(self, stats: Stats):
        with self.lock:
            c = self.counters
            c["batches_total"] += 1
            c["generated_tokens_total"] += sum(stats.completion_tokens)
            c["prompt_tokens_total"] += sum(stats.prompt_tokens)
            c["decode_seconds_total"] += stats.decode_seconds
            c["ttft_seconds_sum"] += stats.time_to_first_token

    def render(self, queue_depth: int) -> str:
        with self.lock:
            c = self.counters
            lines = ["# TYPE tda_requests_total counter"]
            lines += [f'tda_requests_total{{code="{k}"}} {v}' for k, v in sorted(c["requests_total"].items())]
            for name in ("generated_tokens_total", "prompt_tokens_total", "batches_total", "decode_seconds_total",
                         "ttft_seconds_sum"):
                lines += [f"# TYPE tda_{name} counter", f"tda_{name} {c[name]}"]
            lines += ["# TYPE tda_queue_depth gauge", f"tda_queue_depth {queue_depth}"]
        return "\n".join(lines) + "\n"


class Scheduler(threading.Thread):
    def __init__(self, engine: Engine, queue_size: int, max_batch: int, metrics: Metrics):
        super().__init__(daemon=True, name="tda-scheduler")
        self.engine, self.max_batch, self.metrics = engine, max_batch, metrics
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.stopping = threading.Event()

    def run(self):
        held: list[Job] = []
        while not self.stopping.is_set():
            if not held:
                try:
                    held.append(self.queue.get(timeout=0.1))
                except queue.Empty:
                    continue
            time.sleep(0.005)  # let concurrent arrivals join the batch
            while len(held) < 4 * self.max_batch:
                try:
                    held.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            density = held[0].density
            batch = [j for j in held if j.density == density][: self.max_batch]
            held = [j for j in held if j not in batch]
            self._run_batch(batch)

    def _run_batch(self, jobs: list[Job]):
        stats = Stats()
        try:
            events = stream(self.engine, [j.prompt for j in jobs], [j.params for j in jobs], jobs[0].density, stats)
            for ev in events:
                jobs[ev.index].events.put(ev)
                if all(j.cancelled for j in jobs):
                    events.close()
                    break
            self.metrics.batch(stats)
        except Exception as e:  # noqa: BLE001 - one failed batch must not take the server down
            for j in jobs:
                j.events.put(e)
        for j in jobs:
            j.events.put(_DONE)


def _field(body: dict, name: str, kind, default, check=None, what=""):
    v = body.get(name, default)
    if v is None:
        return default
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise BadRequest(f"'{name}' must be {kind.__name__}, got {type(v).__name__}")
    if check and not check(v):
        raise BadRequest(f"'{name}'={v!r}: {what}")
    return v


def parse_params(body: dict) -> tuple[SamplingParams, float | None]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 non-empty strings")
    if _field(body, "n", int, 1) != 1:
        raise BadRequest("'n' must be 1")
    params = SamplingParams(
        max_new_tokens=_field(body, "max_tokens", int, 64, lambda v: 1 <= v <= MAX_TOKENS_CAP,
                              f"must be in [1, {MAX_TOKENS_CAP}]"),
        temperature=_field(body, "temperature", float, 0.0, lambda v: 0 <= v <= 2, "must be in [0, 2]"),
        top_k=_field(body, "top_k", int, 0, lambda v: v >= 0, "must be >= 0"),
        top_p=_field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]"),
        stop=tuple(stop), seed=_field(body, "seed", int, None))
    density = _field(body, "density", float, None, lambda v: 0 < v <= 1, "must be in (0, 1]")
    return params, density


def make_handler(engine: Engine, scheduler: Scheduler, metrics: Metrics, model_name: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "tda-export"

        def log_message(self, *args):  # quiet: /metrics counts requests
            pass

        def _send(self, code: int, payload, content_type="application/json"):
            data = payload if isinstance(payload, bytes) else (
                payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            metrics.request(code)

        def _error(self, code: int, message: str, kind="invalid_request_error"):
            self._send(code, {"error": {"message": message, "type": kind, "code": code}})

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {"status": "ok", "model": model_name, "queue_depth": scheduler.queue.qsize()})
            elif self.path == "/metrics":
                self._send(200, metrics.render(scheduler.queue.qsize()), "text/plain; version=0.0.4")
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._error(404, f"no route {self.path}", "not_found")

        def do_POST(self):
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                return self._error(404, f"no route {self.path}", "not_found")
            try:
                length = int(self.headers.get("Content-Length", "-1"))
            except ValueError:
                length = -1
            if length < 0:
                return self._error(411, "Content-Length required")
            if length > MAX_BODY:
                # Drain what a client may still be sending (within reason) so it reads the 413, not a reset.
                if length <= 16 * MAX_BODY:
                    while length > 0:
                        chunk = self.rfile.read(min(length, 1 << 16))
                        if not chunk:
                            break
                        length -= len(chunk)
                self.close_connection = True
                return self._error(413, f"body of {int(self.headers['Content-Length'])} bytes exceeds {MAX_BODY}")
            try:
                body = json.loads(self.rfile.read(length) or b"null")
                if not isinstance(body, dict):
                    raise BadRequest("body must be a JSON object")
                chat = self.path.endswith("chat/completions")
                prompt = self._chat_prompt(body) if chat else self._prompt(body)
                params, density = parse_params(body)
                if density is not None:
                    engine.thresholds(density)  # fail now for an uncalibrated density
                n_prompt = len(engine.tokenizer(prompt).input_ids)
                if n_prompt + params.max_new_tokens > engine.max_context:
                    raise BadRequest(f"prompt has {n_prompt} tokens; with max_tokens={params.max_new_tokens} that "
                                     f"exceeds the context of {engine.max_context}")
            except json.JSONDecodeError as e:
                return self._error(400, f"body is not JSON: {e}")
            except (BadRequest, EngineError) as e:
                return self._error(400, str(e))
            job = Job(prompt, params, density)
            try:
                scheduler.queue.put_nowait(job)
            except queue.Full:
                return self._error(429, "server busy: request queue is full, retry later", "overloaded")
            if body.get("stream"):
                self._stream(job, chat)
            else:
                self._complete(job, chat)

        def _prompt(self, body):
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
                p = p[0]
            if not isinstance(p, str) or not p:
                raise BadRequest("'prompt' must be a non-empty string")
            return p

        def _chat_prompt(self, body):
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise BadRequest("'messages' must be a non-empty list of {role, content} strings")
            if not getattr(engine.tokenizer, "chat_template", None):
                raise BadRequest("this engine's tokenizer has no chat template; use /v1/completions")
            return engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

        def _events(self, job: Job):
            while True:
                ev = job.events.get()
                if ev is _DONE:
                    return
                if isinstance(ev, Exception):
                    raise ev
                yield ev

        def _chunk(self, job_id, chat, text, finish):
            if chat:
                choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
                return {"id": job_id, "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": model_name, "choices": [choice]}
            return {"id": job_id, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish}]}

        def _stream(self, job: Job, chat: bool):
            job_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            metrics.request(200)
            try:
                for ev in self._events(job):
                    data = self._chunk(job_id, chat, ev.text, ev.finish_reason)
                    self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                job.cancelled = True
                return
            except Exception as e:  # noqa: BLE001 - report the failure in-band, then end the stream
                err = {"error": {"message": f"generation failed: {e}", "type": "server_error", "code": 500}}
                self.wfile.write(f"data: {json.dumps(err)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

        def _complete(self, job: Job, chat: bool):
            text, finish = "", None
            try:
                for ev in self._events(job):
                    text += ev.text
                    finish = ev.finish_reason or finish
            except ContextTooLong as e:
                return self._error(400, str(e))
            except Exception as e:  # noqa: BLE001
                return self._error(500, f"generation failed: {e}", "server_error")
            job_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            n_prompt = len(engine.tokenizer(job.prompt).input_ids)
            n_out = len(engine.tokenizer(text, add_special_tokens=False).input_ids)
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish}
                obj = "text_completion"
            self._send(200, {"id": job_id, "object": obj, "created": int(time.time()), "model": model_name,
                             "choices": [choice], "usage": usage})

    return Handler


class Server:
    """The HTTP server and its scheduler; `serve_forever()` blocks, `shutdown()` stops both."""

    def __init__(self, engine: Engine, host="127.0.0.1", port=8000, queue_size=32, max_batch=8):
        self.metrics = Metrics()
        self.scheduler = Scheduler(engine, queue_size, max_batch, self.metrics)
        name = engine.manifest.get("model", "tda-model")
        self.httpd = ThreadingHTTPServer((host, port), make_handler(engine, self.scheduler, self.metrics, name))
        self.httpd.daemon_threads = True

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def serve_forever(self):
        self.scheduler.start()
        self.httpd.serve_forever()

    def shutdown(self):
        self.httpd.shutdown()
        self.scheduler.stopping.set()
        self.httpd.server_close()

"""OpenAI-compatible HTTP server on FastAPI/uvicorn: /v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics.

The web layer only translates: pydantic models (openai_api.py) validate a request, it becomes a scheduler
`Job` (scheduler.py, which owns the engine on its own thread and batches), and the job's events come back
onto the event loop to be shaped into OpenAI responses or server-sent events. What HTTP itself needs
(parsing, 404/405, query strings, chunked bodies, keep-alive) is uvicorn's and Starlette's; the one piece
added here is `BodyGuard`, which bounds a request body's size and the time a client may take to send it.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineError
from .generate import Event
from .openai_api import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                         ChatCompletionRequest, ChatLogprobs, ChatTokenLogprob, Completion, CompletionChoice,
                         CompletionLogprobs, CompletionRequest, Delta, ErrorResponse, ModelCard, ModelList,
                         TopLogprob, Usage, finite_or_none)
from .scheduler import Done, Failed, Job, QueueFull, RequestTooLarge, Scheduler, Scored
from .token_bytes import token_bytes

MAX_BODY = 1 << 20
BODY_TIMEOUT = 10.0          # seconds a client may take to send its whole body
DEFAULT_MAX_TOKENS = 64
BACKLOG = 2048
QUEUE_SIZE = 256             # waiting sequences (prompts x n, and prompts to score) before 429
MAX_REQUEST = 64             # sequences one request may hold (at most QUEUE_SIZE) before 400


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error={"message": message, "type": kind, "param": param, "code": status})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now, so a busy port is reported before the engine loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


class BodyGuard:
    """ASGI middleware: read a POST body within `timeout` seconds and `max_body` bytes (chunked or not), then
    hand it on; answer 408/413 otherwise. Also counts responses by status code for /metrics."""

    def __init__(self, app, max_body: int = MAX_BODY, timeout: float = BODY_TIMEOUT, counts: dict | None = None):
        self.app, self.max_body, self.timeout = app, max_body, timeout
        self.counts = counts if counts is not None else {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[message["status"]] = self.counts.get(message["status"], 0) + 1
            await send(message)

        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, counting_send)
        chunks, size, too_big = [], 0, False
        try:
            with anyio.fail_after(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    size += len(message.get("body", b""))
                    too_big = too_big or size > self.max_body
                    if not too_big:
                        chunks.append(message.get("body", b""))
                    elif size > 16 * self.max_body:
                        break  # stop draining: the client gets the 413 and a closed connection
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            return await _send_error(counting_send, 408, f"request body not received within {self.timeout:g} s")
        if too_big:
            return await _send_error(counting_send, 413, f"request body exceeds {self.max_body} bytes")
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then disconnects, which cancel the request's work

        await self.app(scope, replay, counting_send)


async def _send_error(send, status: int, message: str):
    data = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


_GONE = object()  # put in an inbox when its client disconnected


class _Inbox:
    """Items the scheduler thread sends to one request, as an asyncio queue on the server's loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _Choice:
    prompt: int
    text: str = ""
    entries: list = field(default_factory=list)   # (token id, TokenLogprob | None) for logprobs
    generated: int = 0
    finish: str | None = None


class _Request:
    """One parsed request: its job, and how the job's events become choices."""

    def __init__(self, prompts: list[list[int]], prompt_texts: list[str], n: int, max_tokens: int,
                 echo: bool, logprobs: int | None):
        self.prompts, self.prompt_texts, self.n = prompts, prompt_texts, n
        self.max_tokens, self.echo, self.logprobs = max_tokens, echo, logprobs
        self.choices = [_Choice(p, finish="length" if max_tokens == 0 else None)
                        for p in range(len(prompts)) for _ in range(n)]
        self.error: str | None = None

    def apply(self, item) -> list[tuple[int, str, list, str | None]]:
        """Fold one scheduler item in; returns the (choice, new text, new entries, finish) it produced."""
        out = []
        if isinstance(item, Scored):
            entries = list(zip(self.prompts[item.prompt], item.logprobs))
            for c in range(item.prompt * self.n, (item.prompt + 1) * self.n):
                ch = self.choices[c]
                ch.entries[:0] = entries
                finish = "length" if self.max_tokens == 0 else None
                ch.finish = finish or ch.finish
                out.append((c, self.prompt_texts[item.prompt], entries, finish))
        elif isinstance(item, Event):
            ch = self.choices[item.index]
            if item.finish_reason == "error":
                self.error = item.error or "generation failed"
                return out
            ch.text += item.text
            ch.generated += len(item.tokens)
            entries = list(zip(item.tokens, item.logprobs)) if item.logprobs is not None else []
            ch.entries += entries
            ch.finish = item.finish_reason or ch.finish
            out.append((item.index, item.text, entries, item.finish_reason))
        elif isinstance(item, Failed):
            self.error = item.message
        return out

    def usage(self) -> Usage:
        prompt = sum(map(len, self.prompts))
        completion = sum(c.generated for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def create_app(engine: Engine, scheduler: Scheduler, model_name: str, max_body: int = MAX_BODY,
               body_timeout: float = BODY_TIMEOUT) -> FastAPI:
    app = FastAPI(title="tda-export", docs_url=None, redoc_url=None)
    created = int(time.time())
    status_counts: dict[int, int] = {}
    tok = engine.tokenizer
    vocab = engine.manifest.get("vocab_size")
    token_text = {}

    def piece(token: int) -> str:
        if token not in token_text:
            token_text[token] = tok.decode([token])
        return token_text[token]

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e.status, e.message, e.kind, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        kind = request.headers.get("content-type", "")
        if "json" not in kind:  # FastAPI reads JSON only when told so (curl -d sends a form by default)
            message = f"send the body as JSON with Content-Type: application/json (got {kind or 'none'!r}); {message}"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind,
                              headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queue_depth": scheduler.depth()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(render_metrics(scheduler, status_counts), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        if model_id != model_name:
            raise ApiError(404, f"model {model_id!r} does not exist; this server has {model_name!r}",
                           "not_found_error", "model")
        return ModelCard(id=model_name, created=created)

    def check_common(req, prompts: list[list[int]], max_tokens: int | None):
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; this server has {model_name!r}",
                           "not_found_error", "model")
        for ids in prompts:
            bad = [t for t in ids if vocab is not None and t >= vocab]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary of {vocab}", param="prompt")
            want = max_tokens if max_tokens is not None else 1
            if len(ids) + want > engine.max_context:
                raise ApiError(400, f"prompt has {len(ids)} tokens; with max_tokens={want} that exceeds the "
                                    f"context of {engine.max_context}", param="max_tokens")
        if req.density is not None:
            try:
                engine.thresholds(req.density)
            except EngineError as e:
                raise ApiError(400, str(e), param="density") from None

    def default_tokens(ids: list[list[int]]) -> int:
        return max(1, min(DEFAULT_MAX_TOKENS, engine.max_context - max(map(len, ids))))

    def submit(gen_prompts, params, density, score, score_top, prompts: int, n: int) -> tuple[Job, _Inbox]:
        inbox = _Inbox()
        job = Job(gen_prompts, params, density, score, score_top, on_event=inbox.put)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", headers={"Retry-After": str(e.retry_after)}) from None
        except RequestTooLarge as e:
            parts = f"{prompts} prompt(s) x n={n}" + (f" + {len(score)} scored prompt(s)" if score else "")
            raise ApiError(400, f"this request holds {e.size} sequences ({parts}); this server takes at most {e.cap} "
                                f"per request (serve --max-request-sequences): split it into smaller requests",
                           param="prompt" if n == 1 else "n") from None
        return job, inbox

    async def cancel_on_disconnect(job: Job, inbox: _Inbox, request: Request):
        """Wait for the client to go away, then cancel its job (the scheduler stops it before its next decode
        step) and end its wait for items. For non-streaming requests, whose response is sent only at the end;
        Starlette watches streaming ones itself."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()
        inbox.put(_GONE)

    async def items(job: Job, inbox: _Inbox, request: Request):
        """The job's items until Done; a client that went away cancels the job."""
        try:
            while True:
                try:
                    item = await asyncio.wait_for(inbox.queue.get(), 0.5)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    if await request.is_disconnected():
                        return
                    continue
                if isinstance(item, Done) or item is _GONE:
                    return
                yield item
        finally:
            job.cancel()  # no-op once done; frees the slot of a client that left

    def streamed(job, inbox, request, r: _Request, head: list[str], chunk, usage_chunk, options):
        """Server-sent events: `head`, a chunk per new piece of a choice, the usage chunk if asked, [DONE]."""
        async def events():
            for h in head:
                yield h
            async for item in items(job, inbox, request):
                produced = r.apply(item)
                if r.error:
                    yield _sse_error(r.error)
                    break
                for piece_of_choice in produced:
                    yield chunk(*piece_of_choice)
            else:
                if options is not None and options.include_usage:
                    yield usage_chunk(r.usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def collected(job, inbox, request, r: _Request) -> None:
        watcher = asyncio.create_task(cancel_on_disconnect(job, inbox, request))
        try:
            async for item in items(job, inbox, request):
                r.apply(item)
        finally:
            watcher.cancel()
        if r.error:
            raise ApiError(500, f"generation failed: {r.error}", "server_error")

    def completion_logprobs(entries, offset: int) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        for token, tlp in entries:
            text = piece(token)
            lp.tokens.append(text)
            lp.text_offset.append(offset)
            offset += len(text)
            if tlp is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(finite_or_none(tlp.logprob))
            top = {piece(t): finite_or_none(v) for t, v in tlp.top}
            top.setdefault(text, finite_or_none(tlp.logprob))  # the chosen token is always listed (as vLLM)
            lp.top_logprobs.append(top)
        return lp

    def chat_logprobs(entries) -> ChatLogprobs:
        def top(t, v):
            s = piece(t)
            return TopLogprob(token=s, logprob=finite_or_none(v), bytes=list(token_bytes(tok, t, s)))

        return ChatLogprobs(content=[ChatTokenLogprob(**top(t, lp.logprob).model_dump(),
                                                      top_logprobs=[top(a, v) for a, v in lp.top])
                                     for t, lp in entries if lp is not None])

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        texts = req.prompt_list()
        ids = [tok(p).input_ids if isinstance(p, str) else p for p in texts]
        if any(not x for x in ids):
            raise ApiError(400, "a prompt encodes to no tokens", param="prompt")
        check_common(req, ids, req.max_tokens)
        max_tokens = req.max_tokens if req.max_tokens is not None else default_tokens(ids)
        prompt_texts = [p if isinstance(p, str) else tok.decode(p) for p in texts]
        r = _Request(ids, prompt_texts, req.n, max_tokens, req.echo, req.logprobs)
        gen, params = [], []
        if max_tokens > 0:
            for p in ids:
                for j in range(req.n):
                    gen.append(p)
                    params.append(req.sampling(max_tokens, req.logprobs, j))
        score = ids if req.echo and req.logprobs is not None else []
        job, inbox = submit(gen, params, req.density, score, req.logprobs or 0, len(ids), req.n)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        offsets = [0] * len(r.choices)

        def chunk(c, text, entries, finish):
            lp = completion_logprobs(entries, offsets[c]) if r.logprobs is not None else None
            offsets[c] += len(text)
            return _sse(Completion(id=rid, created=now, model=model_name,
                                   choices=[CompletionChoice(index=c, text=text, logprobs=lp, finish_reason=finish)]))

        if req.stream:
            head = [] if not (r.echo and r.logprobs is None) else [  # no scoring pass: echo the prompt text now
                chunk(c, r.prompt_texts[ch.prompt], [], ch.finish) for c, ch in enumerate(r.choices)]
            return streamed(job, inbox, request, r, head, chunk, lambda usage: _sse(Completion(
                id=rid, created=now, model=model_name, choices=[], usage=usage)), req.stream_options)
        await collected(job, inbox, request, r)
        choices = []
        for c, ch in enumerate(r.choices):
            text = (r.prompt_texts[ch.prompt] if r.echo else "") + ch.text
            lp = completion_logprobs(ch.entries, 0) if r.logprobs is not None else None
            choices.append(CompletionChoice(index=c, text=text, logprobs=lp, finish_reason=ch.finish))
        return Completion(id=rid, created=now, model=model_name, choices=choices, usage=r.usage())

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "this engine's tokenizer has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template may refuse a role order; that is the client's
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None
        ids = [tok(text, add_special_tokens=False).input_ids]
        wanted = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        check_common(req, ids, wanted)
        max_tokens = wanted if wanted is not None else default_tokens(ids)
        top = (req.top_logprobs or 0) if req.logprobs else None
        r = _Request(ids, [text], req.n, max_tokens, False, top)
        params = [req.sampling(max_tokens, top, j) for j in range(req.n)]
        job, inbox = submit(ids * req.n, params, req.density, [], 0, 1, req.n)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(choices, usage=None):
            return _sse(ChatCompletionChunk(id=rid, created=now, model=model_name, choices=choices, usage=usage))

        def delta(c, new, entries, finish):
            return chunk([ChatChunkChoice(index=c, delta=Delta(content=new) if new else Delta(),
                                          logprobs=chat_logprobs(entries) if top is not None else None,
                                          finish_reason=finish)])

        if req.stream:
            head = [chunk([ChatChunkChoice(index=c, delta=Delta(role="assistant", content="")) for c in range(req.n)])]
            return streamed(job, inbox, request, r, head, delta, lambda usage: chunk([], usage), req.stream_options)
        await collected(job, inbox, request, r)
        choices = [ChatChoice(index=c, message=AssistantMessage(content=ch.text), finish_reason=ch.finish,
                              logprobs=chat_logprobs(ch.entries) if top is not None else None)
                   for c, ch in enumerate(r.choices)]
        return ChatCompletion(id=rid, created=now, model=model_name, choices=choices, usage=r.usage())

    return BodyGuard(app, max_body, body_timeout, status_counts)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors as one line naming each field; for a field that may take several shapes (prompt:
    text, texts, ids, lists of ids) the reason it failed, not that it is not each of the other shapes."""
    by_field: dict[str, list[str]] = {}
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and "[" not in str(x)]
        name = ".".join(loc)
        if err.get("type") == "json_invalid":
            name, msg = "", f"body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        else:
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        by_field.setdefault(name, []).append(msg)
    parts = []
    for name, msgs in by_field.items():
        specific = [m for m in msgs if not m.startswith("Input should be a valid")] or msgs
        text = "; ".join(dict.fromkeys(specific))
        parts.append(f"'{name}': {text}" if name else text)
    first = next(iter(by_field), "")
    return " | ".join(parts)[:2000], first or None


def _sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def _sse_error(message: str) -> str:
    body = ErrorResponse(error={"message": f"generation failed: {message}", "type": "server_error", "code": 500})
    return f"data: {body.model_dump_json()}\n\n"


def render_metrics(scheduler: Scheduler, status_counts: dict) -> str:
    m = scheduler.metrics.snapshot()
    lines = ["# HELP tda_requests_total HTTP responses by status code.", "# TYPE tda_requests_total counter"]
    lines += [f'tda_requests_total{{code="{k}"}} {v}' for k, v in sorted(status_counts.items())]
    counters = {"generated_tokens_total": m["generated_tokens"], "prompt_tokens_total": m["prompt_tokens"],
                "scored_tokens_total": m["scored_tokens"], "batches_total": m["batches"],
                "decode_seconds_total": m["decode_seconds"], "sequence_errors_total": m["sequence_errors"],
                "cancelled_requests_total": m["cancelled"]}
    for name, value in counters.items():
        lines += [f"# TYPE tda_{name} counter", f"tda_{name} {value}"]
    lines += ["# HELP tda_ttft_seconds Time to first token per batch.", "# TYPE tda_ttft_seconds summary",
              f"tda_ttft_seconds_sum {m['ttft_sum']}", f"tda_ttft_seconds_count {m['ttft_count']}"]
    lines += ["# TYPE tda_queue_depth gauge", f"tda_queue_depth {scheduler.depth()}",
              "# TYPE tda_running_requests gauge", f"tda_running_requests {len(scheduler.running)}"]
    return "\n".join(lines) + "\n"


class Server:
    """The scheduler and uvicorn serving the app; `serve_forever()` blocks, `shutdown()` stops both."""

    def __init__(self, engine: Engine, host="127.0.0.1", port=8000, queue_size=QUEUE_SIZE, max_batch=8,
                 sock: socket.socket | None = None, model_name: str | None = None, body_timeout=BODY_TIMEOUT,
                 max_body=MAX_BODY, max_request=MAX_REQUEST, batching="auto"):
        import uvicorn

        self.scheduler = Scheduler(engine, queue_size, max_batch, max_request=max_request, batching=batching)
        self.sock = sock if sock is not None else bind_socket(host, port)
        self.model_name = model_name or str(engine.manifest.get("model", "tda-model"))
        app = create_app(engine, self.scheduler, self.model_name, max_body, body_timeout)
        config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=5, backlog=BACKLOG,
                                timeout_graceful_shutdown=5, access_log=False)
        self.uvicorn = uvicorn.Server(config)
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def serve_forever(self):
        self.scheduler.start()
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.scheduler.stop()
            self._stopped.set()

    def shutdown(self, timeout: float = 15.0):
        self.uvicorn.should_exit = True
        self._stopped.wait(timeout)
        self.sock.close()

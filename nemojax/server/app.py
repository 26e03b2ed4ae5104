"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) over one `GenerationService`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with `stream: true` as
server-sent events ending in `data: [DONE]`), GET /health, GET /metrics (Prometheus text).

Every refused request gets an OpenAI error body `{"error": {"message", "type", "param", "code"}}`:
400 for invalid JSON or fields (and a prompt longer than the context), 429 with Retry-After when the
waiting queue is full, 503 with Retry-After when the generation worker is not running. A client that
goes away (mid-stream or while waiting for a plain response) cancels its requests: their slots are
free at the next scheduler round. Requests are checked completely before they reach the scheduler, so
one bad request never disturbs the others.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from tokenizers import Tokenizer

from nemojax.generate.requests import Defaults, Encoder
from nemojax.server.metrics import CONTENT_TYPE
from nemojax.server.outputs import ChoiceOutput, chat_logprobs, completion_logprobs
from nemojax.server.parsers import OutputParser
from nemojax.server.protocol import Job, RequestError, parse_chat, parse_completion
from nemojax.server.service import GenerationService, Overloaded, Stream, Unavailable

DISCONNECT_POLL_SECONDS = 0.2
RETRY_AFTER_SECONDS = "1"


def create_app(service: GenerationService, encoder: Encoder, tokenizer: Tokenizer | None, defaults: Defaults,
               model_name: str) -> FastAPI:
    """The application; the service's worker must be started (and stopped) by the caller."""
    app = FastAPI(title="nemojax", docs_url=None, redoc_url=None, openapi_url=None)
    config = service.engine.config
    context = service.scheduler.max_len
    eos_ids = service.engine.eos_ids
    created = int(time.time())

    @app.get("/health")
    async def health() -> Response:
        if not service.alive:
            return _error(503, "the generation worker is not running", "service_unavailable")
        return JSONResponse({"status": "ok", **service.snapshot()})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                                         "owned_by": "nemojax", "max_model_len": context}]})

    async def generate(request: Request, endpoint: str, parse: Callable[..., Job]) -> Response:
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as e:
            return _count(service, endpoint, _error(400, f"the request body is not valid JSON ({e})"))
        try:
            job = parse(body, encoder=encoder, defaults=defaults, context=context, vocab_size=config.vocab_size,
                        model=model_name)
            stream = service.submit(job.requests, asyncio.get_running_loop(), logprobs=job.logprobs is not None)
        except RequestError as e:
            return _count(service, endpoint, _error(e.status, str(e), param=e.param))
        except Overloaded as e:
            return _count(service, endpoint, _error(429, f"overloaded: {e}; retry later", "rate_limit_exceeded",
                                                    retry=True))
        except Unavailable as e:
            return _count(service, endpoint, _error(503, str(e), "service_unavailable", retry=True))
        outputs = [ChoiceOutput(t, tokenizer, eos_ids, job.stop,
                                OutputParser(job.thinks, job.tools) if job.chat else None, job.logprobs or 0)
                   for t in stream.tickets]
        if job.stream:
            _count(service, endpoint, None, 200)
            return StreamingResponse(_events(job, stream, outputs), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        finished = await _wait(stream, request)
        if not finished:
            return _count(service, endpoint, _error(499, "the client closed the request", "cancelled"))
        if any(t.finish_reason == "error" for t in stream.tickets):
            return _count(service, endpoint, _error(500, "generation failed", "server_error"))
        for output in outputs:
            output.update()
        return _count(service, endpoint, JSONResponse(_response(job, outputs)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completions", parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat", parse_chat)

    return app


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           retry: bool = False) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if retry else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


def _count(service: GenerationService, endpoint: str, response: Response | None, status: int | None = None
           ) -> Response | None:
    service.metrics.counted(endpoint, status if response is None else response.status_code)
    return response


async def _wait(stream: Stream, request: Request) -> bool:
    """Wait for every ticket of the call; False (and the tickets cancelled) when the client goes away."""
    try:
        while not stream.finished:
            try:
                await asyncio.wait_for(stream.updates.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    stream.cancel()
                    return False
        return True
    except asyncio.CancelledError:
        stream.cancel()
        raise


def _usage(job: Job, outputs: list[ChoiceOutput]) -> dict[str, Any]:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(len(o.ticket.output_ids) for o in outputs)
    cached = sum(max(o.ticket.cached_tokens for o in outputs[i * job.n:(i + 1) * job.n])
                 for i in range(len(job.prompts)))  # prompt tokens count once per prompt, not per choice
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _response(job: Job, outputs: list[ChoiceOutput]) -> dict[str, Any]:
    """A plain (non-streamed) response body."""
    choices = []
    for index, output in enumerate(outputs):
        ids = output.ticket.output_ids[:output.tokens_sent]
        if job.chat:
            message: dict[str, Any] = {"role": "assistant", "content": output.content}
            if output.reasoning or job.thinks:
                message["reasoning_content"] = message["reasoning"] = output.reasoning
            if output.tool_calls:
                message["tool_calls"] = [call.as_dict() for call in output.tool_calls]
                message["content"] = output.content or None
            choice = {"index": index, "message": message, "finish_reason": output.finish_reason,
                      "logprobs": None if job.logprobs is None else chat_logprobs(output, ids, 0)}
        else:
            choice = {"index": index, "text": output.content, "finish_reason": output.finish_reason,
                      "logprobs": None if job.logprobs is None else completion_logprobs(output, ids, 0, 0)}
        choices.append(choice)
    return {"id": _id(job), "object": "chat.completion" if job.chat else "text_completion", "created": int(time.time()),
            "model": job.model, "choices": choices, "usage": _usage(job, outputs)}


async def _events(job: Job, stream: Stream, outputs: list[ChoiceOutput]) -> AsyncIterator[str]:
    """The server-sent events of a streamed call; cancelling the generator (client gone) cancels the tickets."""
    call_id, created = _id(job), int(time.time())
    kind = "chat.completion.chunk" if job.chat else "text_completion"
    offsets = [0] * len(outputs)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": call_id, "object": kind, "created": created, "model": job.model, "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        if job.chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(outputs))])
        while not all(output.done for output in outputs):
            index = await stream.updates.get()
            output = outputs[index]
            delta = output.update()
            if output.ticket.finish_reason == "error":
                yield f"data: {json.dumps({'error': {'message': 'generation failed', 'type': 'server_error'}})}\n\n"
                return
            if delta is None:
                continue
            finish = output.finish_reason if output.done else None
            if job.chat:
                body: dict[str, Any] = {}
                if delta.parts.reasoning:
                    body["reasoning_content"] = body["reasoning"] = delta.parts.reasoning
                if delta.parts.content:
                    body["content"] = delta.parts.content
                if delta.parts.tool_calls:
                    start = len(output.tool_calls) - len(delta.parts.tool_calls)
                    body["tool_calls"] = [dict(call.as_dict(), index=start + n)
                                          for n, call in enumerate(delta.parts.tool_calls)]
                logprobs = (None if job.logprobs is None or not delta.token_ids
                            else chat_logprobs(output, delta.token_ids, delta.first))
                if body or finish or logprobs:
                    yield chunk([{"index": index, "delta": body, "logprobs": logprobs, "finish_reason": finish}])
            else:
                logprobs = None
                if job.logprobs is not None and delta.token_ids:
                    logprobs = completion_logprobs(output, delta.token_ids, delta.first, offsets[index])
                offsets[index] += len(delta.parts.content)
                if delta.parts.content or finish or logprobs:
                    yield chunk([{"index": index, "text": delta.parts.content, "logprobs": logprobs,
                                  "finish_reason": finish}])
        if job.include_usage:
            yield chunk([], usage=_usage(job, outputs))
        yield "data: [DONE]\n\n"
    finally:
        if not stream.finished:
            stream.cancel()


def _id(job: Job) -> str:
    return ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex

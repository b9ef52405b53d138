"""/v1/completions and /v1/chat/completions: validated requests in, engine deltas out, as one JSON
body or as server-sent events. A streaming client that disconnects aborts its request: the stream
closes the engine's generator, which frees the request's KV blocks and adapter reference."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from lorascope.engine.async_engine import Delta, OverloadedError
from lorascope.engine.sampling import SamplingParams
from lorascope.model.tokenizer import TextTokenizer
from lorascope.server import protocol as p
from lorascope.server.state import ApiError, ServerState

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class Detokenizer:
    """Text of the tokens so far, decoded incrementally; holds back a trailing partial UTF-8 character
    until it completes.

    Each `add` decodes only a window: the tokens of the last emitted piece (context, so that decoders
    which strip a leading space or merge across tokens see what came before) plus the new ones; the
    new text is the window's text past the context's. A stream of T tokens costs O(T) decoding, not the
    O(T^2) of re-decoding the whole sequence per chunk (at 4,096 output tokens that was ~0.3 ms of the
    event loop per chunk: benchmarks/cpu_detokenizer.py). tests/server/test_detokenizer.py checks the
    pieces join to the full decode.
    """

    def __init__(self, tok: TextTokenizer | None):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read]: the context, already emitted
        self.read = 0  # ids[read:]: not emitted yet
        self.emitted = 0  # characters emitted so far

    def add(self, ids: list[int], final: bool) -> str:
        self.ids.extend(ids)
        if self.tok is None or len(self.ids) == self.read:
            return ""
        context = self.tok.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        window = self.tok.decode(self.ids[self.prefix:])
        if window.endswith("\ufffd") and not final:
            return ""
        if window.startswith(context):
            new = window[len(context):]
        else:  # a decoder that rewrote the context in the window's light: the whole text decides
            new = self.tok.decode(self.ids)[self.emitted:]
        self.prefix, self.read = self.read, len(self.ids)
        self.emitted += len(new)
        return new


def sampling_params(req: p.CompletionRequest | p.ChatCompletionRequest, default_max_tokens: int) -> SamplingParams:
    max_tokens = req.max_tokens
    if isinstance(req, p.ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    return SamplingParams(
        max_tokens=max_tokens or default_max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        seed=req.seed, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
    )


async def start(state: ServerState, prompt: str | list[int], params: SamplingParams, adapter: str | None,
                request_id: str) -> tuple[AsyncIterator[Delta], Delta]:
    """Queue the request and wait for its first delta, so that input errors and overload become
    HTTP statuses before any byte of a stream is sent."""
    gen = state.engine.generate(prompt, params, adapter, request_id)
    try:
        first = await gen.__anext__()
    except OverloadedError as e:
        await gen.aclose()
        raise ApiError(429, str(e), "TooManyRequests", headers={"Retry-After": str(max(1, round(e.retry_after_s)))}) from None
    except ValueError as e:  # SamplingError, PromptError, AdapterError: the message names the field
        await gen.aclose()
        raise ApiError(400, str(e), "BadRequestError") from None
    except RuntimeError as e:  # the engine thread is not running
        await gen.aclose()
        raise ApiError(503, str(e), "ServiceUnavailable") from None
    except BaseException:
        await gen.aclose()
        raise
    return gen, first


async def collect(gen: AsyncIterator[Delta], first: Delta) -> tuple[list[int], Delta]:
    ids, last = list(first.token_ids), first
    try:
        async for delta in (_empty() if first.finished else gen):
            ids.extend(delta.token_ids)
            last = delta
    finally:
        await gen.aclose()  # a no-op once finished; aborts the request if we are cancelled midway
    if last.finish_reason == "error":
        raise ApiError(500, last.error or "the engine failed", "InternalServerError")
    return ids, last


async def _empty() -> AsyncIterator[Delta]:
    return
    yield  # an async generator that yields nothing


def usage(last: Delta) -> p.Usage:
    return p.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                   total_tokens=last.prompt_tokens + last.completion_tokens)


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def stream_response(gen: AsyncIterator[Delta], first: Delta, include_usage: bool,
                    chunk: Callable[[Delta, str], dict[str, Any]], usage_chunk: Callable[[p.Usage], dict[str, Any]],
                    detok: Detokenizer, prelude: list[dict[str, Any]] | None = None) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        delta, done = first, False
        try:
            for payload in prelude or []:
                yield sse(payload)
            while True:
                yield sse(chunk(delta, detok.add(delta.token_ids, delta.finished)))
                if delta.finished:
                    done = True
                    break
                # no per-chunk `http.is_disconnected()` (7% of the event loop's time per chunk, py-spy):
                # StreamingResponse listens for the disconnect itself and closes this generator, whose
                # `finally` aborts the request (tests/server/test_load.py kills clients mid-stream)
                delta = await gen.__anext__()
            if include_usage:
                yield sse(usage_chunk(usage(delta)))
            yield sse("[DONE]")
        finally:
            # closing an unfinished generator aborts the request; a finished one is drained instead,
            # so no needless abort command reaches the engine
            if done:
                async for _ in gen:
                    pass
            else:
                await gen.aclose()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def completions(state: ServerState, req: p.CompletionRequest) -> Any:
    adapter = state.resolve_model(req.model)
    params = _params(req, COMPLETIONS_MAX_TOKENS)
    rid, created = new_id("cmpl"), int(time.time())
    gen, first = await start(state, req.prompt, params, adapter, rid)
    detok = Detokenizer(state.engine.engine.tokenizer)
    base = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
    if req.stream:
        def chunk(d: Delta, text: str) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": d.finish_reason if d.finished else None,
                      "token_ids": d.token_ids}
            return {**base, "choices": [choice]}

        def usage_chunk(u: p.Usage) -> dict[str, Any]:
            return {**base, "choices": [], "usage": u.model_dump()}

        return stream_response(gen, first, req.include_usage, chunk, usage_chunk, detok)
    ids, last = await collect(gen, first)
    choice = p.CompletionChoice(text=detok.add(ids, True), finish_reason=last.finish_reason, token_ids=ids)
    return p.CompletionResponse(id=rid, created=created, model=req.model, choices=[choice], usage=usage(last)).model_dump()


async def chat_completions(state: ServerState, req: p.ChatCompletionRequest) -> Any:
    adapter = state.resolve_model(req.model)
    prompt = render_chat(state, req)
    params = _params(req, state.max_model_len)
    rid, created = new_id("chatcmpl"), int(time.time())
    gen, first = await start(state, prompt, params, adapter, rid)
    detok = Detokenizer(state.engine.engine.tokenizer)
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
    if req.stream:
        def chunk(d: Delta, text: str) -> dict[str, Any]:
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None,
                      "finish_reason": d.finish_reason if d.finished else None, "token_ids": d.token_ids}
            return {**base, "choices": [choice]}

        def usage_chunk(u: p.Usage) -> dict[str, Any]:
            return {**base, "choices": [], "usage": u.model_dump()}

        role = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        return stream_response(gen, first, req.include_usage, chunk, usage_chunk, detok, [role])
    ids, last = await collect(gen, first)
    choice = p.ChatChoice(message=p.ChatChoiceMessage(content=detok.add(ids, True)), finish_reason=last.finish_reason,
                          token_ids=ids)
    return p.ChatCompletionResponse(id=rid, created=created, model=req.model, choices=[choice],
                                    usage=usage(last)).model_dump()


def _params(req: p.CompletionRequest | p.ChatCompletionRequest, default_max_tokens: int) -> SamplingParams:
    try:
        return sampling_params(req, default_max_tokens)
    except ValueError as e:
        raise ApiError(400, str(e), "BadRequestError") from None


def render_chat(state: ServerState, req: p.ChatCompletionRequest) -> str:
    if state.chat_template is None:
        raise ApiError(400, f"model {state.served_model_name!r} has no chat template; use /v1/completions",
                       "BadRequestError", "messages")
    try:
        return state.chat_template.render(messages=[m.model_dump() for m in req.messages], add_generation_prompt=True)
    except TemplateError as e:
        raise ApiError(400, f"the chat template failed on these messages: {e}", "BadRequestError", "messages") from None

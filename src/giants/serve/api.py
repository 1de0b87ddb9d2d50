"""The two generation endpoints: OpenAI request -> prompts + SamplingParams -> engine -> OpenAI response/SSE.

Everything that can be refused is refused before the request reaches the engine, so the HTTP status is
right even for streams (whose 200 goes out with the first byte): unsupported fields, sampling values
(SamplingParams names the field, and bounds every number to what the sampler can take), unknown model, prompt
too long for the context, token ids outside the vocabulary, text that is not Unicode (lone surrogates), too
many stop strings or sequences (prompts x n) per request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from giants.serve import DEFAULT_MAX_SEQS_PER_REQUEST, MAX_PROMPTS, MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS, knobs
from giants.serve.bridge import Aborted, AsyncEngine, RequestGroup
from giants.serve.errors import APIError
from giants.serve.logprobs import chat_logprobs, completion_logprobs
from giants.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    Usage,
    new_id,
    now,
)
from giants.serve.structured import structured_kwargs
from giants.serve.template import TemplateError, TemplateLimit
from giants.serve.tools import (
    ChoiceStream,
    ToolPlan,
    check_tool_calls,
    finish_reason,
    reply_message,
    tool_plan,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Served:
    """What the endpoints need of the loaded model."""

    name: str
    aliases: tuple[str, ...]
    bridge: AsyncEngine
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    max_seqs_per_request: int = DEFAULT_MAX_SEQS_PER_REQUEST
    renderer: Any = None  # TemplateRenderer: the chat template in worker processes (None: in this thread)


# --- validation ---------------------------------------------------------------------------------------


def check_model(served: Served, model: str | None) -> str:
    if model is None or model in (served.name, *served.aliases):
        return served.name
    raise APIError(404, f"The model `{model}` does not exist; this server serves `{served.name}`", "model",
                   "model_not_found")


def check_text(value: Any, param: str) -> None:
    """Every string of the body (keys too) must be Unicode text: JSON's \\ud800 escapes decode to lone UTF-16
    surrogates, which no tokenizer or UTF-8 writer takes. 400 naming the field."""
    if isinstance(value, str):
        if value.isascii():
            return
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{param} is not valid Unicode text: it holds a lone UTF-16 surrogate "
                           f"({value[e.start]!r}) at character {e.start}", param, "invalid_value") from None
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            check_text(getattr(value, name), f"{param}.{name}" if param else name)
        for name, v in (value.model_extra or {}).items():
            check_text(name, f"{param}.{name}" if param else "body")
            check_text(v, f"{param}.{name}" if param else name)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_text(v, f"{param}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, param)
            check_text(v, f"{param}.{k}")


def _check_fan_out(served: Served, prompts: int, n: int) -> None:
    k, limit = prompts * n, served.max_seqs_per_request
    if k > limit:
        what = f"{prompts} prompts x n={n} = {k} sequences" if prompts > 1 else f"n={n} sequences"
        raise APIError(400, f"this request asks for {what}; the server allows at most {limit} per request "
                       "(giants serve --max-seqs-per-request)", "n", "invalid_value")


def _reject_unsupported(body: Any, names: dict[str, Any]) -> None:
    for name, ok in names.items():
        v = getattr(body, name, None)
        if v is not None and not ok(v):
            raise APIError(400, f"{name} is not supported by this server (got {v!r})", name, "unsupported_parameter")


def sampling_params(body: Any, max_tokens: int, logprobs: int | None, tokenizer: Any,
                    extra: dict[str, Any] | None = None) -> Any:
    """tokenizer: the served one (None: token ids only, where stop strings could never match); extra: more
    SamplingParams fields (giants.serve.knobs.sampling_kwargs, a tool plan's grammar)."""
    from giants.inference import SamplingParams

    stop = body.stop
    if stop and tokenizer is None:
        raise APIError(400, "stop strings are matched in the decoded text and this server has no tokenizer; use "
                       "stop_token_ids", "stop", "unsupported_parameter")
    if isinstance(stop, str):
        stop = [stop]
    if stop and len(stop) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings per request (got {len(stop)})", "stop", "invalid_value")
    for i, s in enumerate(stop or []):
        param = f"stop[{i}]" if isinstance(body.stop, list) else "stop"
        if not s:
            raise APIError(400, "stop strings must be non-empty", param, "invalid_value")
        if len(s) > MAX_STOP_CHARS:
            raise APIError(400, f"stop strings are limited to {MAX_STOP_CHARS} characters (got {len(s)})", param,
                           "invalid_value")
    if body.stop_token_ids is not None and len(body.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise APIError(400, f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids per request (got "
                       f"{len(body.stop_token_ids)})", "stop_token_ids", "invalid_value")
    kw = dict(n=body.n, max_tokens=max_tokens, logprobs=logprobs, stop=stop or None, seed=body.seed,
              stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos)
    defaults = dict(temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                    frequency_penalty=0.0)
    for name, default in defaults.items():
        v = getattr(body, name)
        kw[name] = default if v is None else v
    if kw["top_k"] == 0:
        kw["top_k"] = -1
    kw.update(structured_kwargs(body))
    if any(k.startswith("guided_") for k in kw) and tokenizer is None:
        raise APIError(400, "structured output needs the server's tokenizer", "response_format",
                       "unsupported_parameter")
    kw.update(extra or {})
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        msg = str(e)
        param = msg.split(":", 1)[0].removeprefix("SamplingParams.").strip()
        raise APIError(400, msg.removeprefix("SamplingParams."), param if param.isidentifier() else None,
                       "invalid_value") from None


def _check_length(served: Served, prompt: list[int], max_tokens: int | None, param: str) -> None:
    n, limit = len(prompt), served.max_model_len
    if n == 0:
        raise APIError(400, "the prompt is empty", param, "invalid_value")
    if n >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt has "
                       f"{n} tokens, which leaves no room for a completion. Please reduce the length of the "
                       f"{param}.", param, "context_length_exceeded")
    if max_tokens is not None and n + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{n + max_tokens} tokens ({n} in the {param}, {max_tokens} in the completion). Please "
                       "reduce the length of the prompt or max_tokens.", "max_tokens", "context_length_exceeded")


def _check_ids(served: Served, ids: list[int], param: str) -> None:
    for i, t in enumerate(ids):
        if not 0 <= t < served.vocab_size:
            raise APIError(400, f"token id {t} at position {i} is outside the vocabulary (0..{served.vocab_size - 1})",
                           param, "invalid_value")


# --- engine plumbing ----------------------------------------------------------------------------------


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request: Request, group: RequestGroup) -> dict[int, Any]:
    """Final RequestOutput per prompt index; cancels the engine requests if the client goes away."""
    finals: dict[int, Any] = {}

    async def run() -> None:
        async for i, out in group:
            if out.finished:
                finals[i] = out

    work = asyncio.ensure_future(run())
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise APIError(499, "client closed the request", None, "client_closed")
        try:
            work.result()
        except Aborted:
            raise APIError(503, "the server is shutting down and ended this request", None, "draining") from None
        return finals
    finally:
        watch.cancel()
        work.cancel()
        group.cancel()


def _sse(obj: Any) -> str:
    data = obj.model_dump_json(exclude_unset=False) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


async def _stream_events(group: RequestGroup, events: Any) -> AsyncIterator[str]:
    """Run `events(index, output)` per engine output and frame what it yields; errors become an SSE error event.
    Starlette cancels this generator when the client disconnects; `finally` then aborts the engine requests."""
    try:
        try:
            async for i, out in group:
                for ev in events(i, out):
                    yield _sse(ev)
        except Aborted:
            for ev in events(None, None):
                yield _sse(ev)
        except APIError as e:
            yield _sse(e.body())
        for ev in events("end", None):
            yield _sse(ev)
        yield "data: [DONE]\n\n"
    finally:
        group.cancel()


def _new_slice(c: Any) -> tuple[list[int], list[Any] | None]:
    new = list(c.new_token_ids or [])
    lps = c.logprobs[len(c.logprobs) - len(new):] if c.logprobs is not None and new else None
    return new, lps


class EngineStream(StreamingResponse):
    """A streaming response that cancels its engine requests however it ends (done, error, client gone),
    without waiting for the body generator to be garbage-collected."""

    def __init__(self, content: AsyncIterator[str], group: RequestGroup):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.group = group

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.group.cancel()


# --- /v1/completions ----------------------------------------------------------------------------------


def _completion_prompts(served: Served, body: CompletionRequest) -> list[list[int]]:
    p = body.prompt
    tok = served.tokenizer
    if isinstance(p, str):
        prompts = [tok.encode(p)]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = [tok.encode(x) for x in p]
    elif isinstance(p, list) and p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    elif isinstance(p, list) and p and all(isinstance(x, list) for x in p):
        prompts = [list(x) for x in p]
    else:
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists "
                       "of token ids, and not empty", "prompt", "invalid_value")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request (got {len(prompts)})", "prompt",
                       "invalid_value")
    for i, ids in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        _check_ids(served, ids, param)
    return prompts


async def _params(body: Any, max_tokens: int, logprobs: int | None, tokenizer: Any,
                  extra: dict[str, Any] | None = None) -> Any:
    params = sampling_params(body, max_tokens, logprobs, tokenizer, extra)
    if params.stop_strings:  # its matcher, for every sequence of the request, built off the event loop
        await asyncio.to_thread(lambda: params.stop_matcher)
    return params


async def create_completion(served: Served, body: CompletionRequest, request: Request) -> Any:
    check_text(body, "")
    model = check_model(served, body.model)
    _reject_unsupported(body, {"suffix": lambda v: v == ""})
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options", "invalid_value")
    prompts = await asyncio.to_thread(_completion_prompts, served, body)  # big prompts must not stall the loop
    for i, ids in enumerate(prompts):
        _check_length(served, ids, body.max_tokens, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    _check_fan_out(served, len(prompts), knobs.num_seqs(body))
    echo_lp = body.logprobs if body.echo else None  # echo with logprobs: the prompt's logprobs too
    params = await _params(body, body.max_tokens or 16, body.logprobs, served.tokenizer,
                           knobs.sampling_kwargs(body, served.vocab_size, served.tokenizer, echo_lp))
    echo = [served.tokenizer.decode(ids) for ids in prompts] if body.echo else None
    group = served.bridge.submit(prompts, params)
    rid, created, n, tok, nlp = new_id("cmpl"), now(), body.n, served.tokenizer, body.logprobs

    if not body.stream:
        finals = await collect(request, group)
        choices, completion_tokens = [], 0
        for i in range(len(prompts)):
            for c in finals[i].outputs:
                completion_tokens += len(c.token_ids)
                prefix = echo[i] if echo else ""
                head = knobs.echo_logprobs(tok, prompts[i], finals[i].prompt_logprobs, nlp) \
                    if echo and nlp is not None else None
                lp = completion_logprobs(tok, list(c.token_ids), c.logprobs, nlp, knobs.text_len(head) if head else 0) \
                    if nlp is not None else None
                lp = knobs.join_logprobs(head, lp) if head is not None else lp
                choices.append(CompletionChoice(index=i * n + c.index, text=prefix + c.text, logprobs=lp,
                                                finish_reason=c.finish_reason))
        choices.sort(key=lambda ch: ch.index)
        prompt_tokens = sum(len(p) for p in prompts)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
        resp = CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage).model_dump()
        if body.prompt_logprobs is not None:  # vLLM's extension, per choice
            for ch in resp["choices"]:
                ch["prompt_logprobs"] = knobs.prompt_logprobs_json(tok, finals[ch["index"] // n].prompt_logprobs)
        return JSONResponse(resp)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    counts: dict[int, int] = {}
    offsets: dict[int, int] = {}
    done: set[int] = set()
    started: set[int] = set()

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> dict[str, Any]:
        d = CompletionResponse(id=rid, created=created, model=model, choices=choices).model_dump()
        if include_usage:
            d["usage"] = usage.model_dump() if usage is not None else None
        else:
            d.pop("usage")
        return d

    def events(i: Any, out: Any):
        if i is None:  # aborted by the server: close every open choice
            left = [CompletionChoice(index=k, text="", finish_reason="abort")
                    for k in range(len(prompts) * n) if k not in done]
            done.update(c.index for c in left)
            if left:
                yield chunk(left)
            return
        if i == "end":
            if include_usage:
                pt = sum(len(p) for p in prompts)
                ct = sum(counts.values())
                yield chunk([], Usage(prompt_tokens=pt, completion_tokens=ct, total_tokens=pt + ct))
            return
        choices = []
        for c in out.outputs:
            idx = i * n + c.index
            if idx in done:
                continue
            new, lps = _new_slice(c)
            counts[idx] = len(c.token_ids)
            text = c.new_text or ""
            head = None
            if echo and idx not in started:
                text = echo[i] + text
                if nlp is not None:
                    head = knobs.echo_logprobs(tok, prompts[i], out.prompt_logprobs, nlp)
                    offsets[idx] = knobs.text_len(head)
            started.add(idx)
            finish = c.finish_reason
            if not text and not new and finish is None:
                continue
            lp = None
            if nlp is not None:
                lp = completion_logprobs(tok, new, lps, nlp, offsets.get(idx, 0))
                offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in lp.tokens)
                lp = knobs.join_logprobs(head, lp) if head is not None else lp
            if finish is not None:
                done.add(idx)
            choices.append(CompletionChoice(index=idx, text=text, logprobs=lp, finish_reason=finish))
        if choices:
            yield chunk(choices)

    return EngineStream(_stream_events(group, events), group)


# --- /v1/chat/completions -----------------------------------------------------------------------------


def _messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"content part type {part.type!r} is not supported (text only)",
                                   f"messages[{i}].content[{j}].type", "unsupported_parameter")
                extra = next(iter(part.model_extra or {}), None)
                if extra is not None:
                    raise APIError(400, f"content part field {extra!r} is not supported",
                                   f"messages[{i}].content[{j}].{extra}", "unsupported_parameter")
                parts.append(part.text)
            content = "".join(parts)
        for key in ("function_call", "refusal", "audio", "annotations"):
            if getattr(m, key):
                raise APIError(400, f"{key} in messages is not supported by this server",
                               f"messages[{i}].{key}", "unsupported_parameter")
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
        if m.name:
            msg["name"] = m.name
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            msg["tool_calls"] = check_tool_calls(m.tool_calls, f"messages[{i}].tool_calls")
        if m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        out.append(msg)
    return out


def chat_prompt(served: Served, body: ChatCompletionRequest, plan: ToolPlan | None = None) -> list[int]:
    tok = served.tokenizer
    messages = _messages(body)
    tools = None
    if plan is not None:
        messages, tools = plan.messages(messages), plan.template_tools()
    try:
        if served.renderer is not None:
            text = served.renderer.render(messages, body.add_generation_prompt, tools)
        else:
            kw = {"tools": tools} if tools else {}
            text = tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt, **kw)
    except TemplateLimit as e:
        raise APIError(400, str(e), "messages", "chat_template_limit") from None
    except TemplateError as e:
        raise APIError(400, f"the chat template rejected the messages: {e}", "messages", "invalid_value") from None
    except ValueError as e:
        raise APIError(400, f"cannot apply the chat template: {e}", "messages", "invalid_value") from None
    except Exception as e:  # template errors (raise_exception in the template, e.g. role order)
        raise APIError(400, f"the chat template rejected the messages: {e}", "messages", "invalid_value") from None
    return tok.encode(text, add_special_tokens=False)


async def create_chat_completion(served: Served, body: ChatCompletionRequest, request: Request) -> Any:
    check_text(body, "")
    model = check_model(served, body.model)
    plan = tool_plan(served, body)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options", "invalid_value")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs", "invalid_value")
    _check_fan_out(served, 1, knobs.num_seqs(body))
    prompt = await asyncio.to_thread(chat_prompt, served, body, plan)
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise APIError(400, f"max_tokens ({body.max_tokens}) and max_completion_tokens ({body.max_completion_tokens}) "
                       "disagree; send one of them", "max_tokens", "invalid_value")
    max_tokens = body.max_completion_tokens or body.max_tokens
    _check_length(served, prompt, max_tokens, "messages")
    if max_tokens is None:
        max_tokens = served.max_model_len - len(prompt)
    nlp = (body.top_logprobs or 0) if body.logprobs else None
    extra = knobs.sampling_kwargs(body, served.vocab_size, served.tokenizer)
    params = await _params(body, max_tokens, nlp, served.tokenizer, {**plan.sampling_kwargs(), **extra})
    group = served.bridge.submit([prompt], params)
    rid, created, n, tok = new_id("chatcmpl"), now(), body.n, served.tokenizer

    if not body.stream:
        finals = await collect(request, group)
        choices, completion_tokens = [], 0
        for c in finals[0].outputs:
            completion_tokens += len(c.token_ids)
            lp = chat_logprobs(tok, list(c.token_ids), c.logprobs, nlp) if nlp is not None else None
            message, finish = reply_message(plan, c.text, c.finish_reason)
            choices.append(ChatChoice(index=c.index, message=message, logprobs=lp, finish_reason=finish))
        choices.sort(key=lambda ch: ch.index)
        usage = Usage(prompt_tokens=len(prompt), completion_tokens=completion_tokens,
                      total_tokens=len(prompt) + completion_tokens)
        resp = ChatCompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage).model_dump()
        if body.prompt_logprobs is not None:  # vLLM's extension, beside the choices
            resp["prompt_logprobs"] = knobs.prompt_logprobs_json(tok, finals[0].prompt_logprobs)
        return JSONResponse(resp)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    counts: dict[int, int] = {}
    done: set[int] = set()
    streams = {k: ChoiceStream(plan) for k in range(n)} if plan.active else None

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> dict[str, Any]:
        d = ChatCompletionChunk(id=rid, created=created, model=model, choices=choices).model_dump(exclude_none=False)
        for ch in d["choices"]:  # deltas carry only what they set, as OpenAI's do
            ch["delta"] = {k: v for k, v in ch["delta"].items() if v is not None}
        if include_usage:
            d["usage"] = usage.model_dump() if usage is not None else None
        else:
            d.pop("usage")
        return d

    def first() -> dict[str, Any]:
        return chunk([ChatChunkChoice(index=k, delta=Delta(role="assistant", content="")) for k in range(n)])

    def events(i: Any, out: Any):
        if i is None:
            left = [ChatChunkChoice(index=k, delta=Delta(), finish_reason="abort") for k in range(n) if k not in done]
            done.update(c.index for c in left)
            if left:
                yield chunk(left)
            return
        if i == "end":
            if include_usage:
                ct = sum(counts.values())
                yield chunk([], Usage(prompt_tokens=len(prompt), completion_tokens=ct, total_tokens=len(prompt) + ct))
            return
        content, finished = [], []
        for c in out.outputs:
            if c.index in done:
                continue
            new, lps = _new_slice(c)
            counts[c.index] = len(c.token_ids)
            text = c.new_text or ""
            if streams is not None:  # tool calls / harmony: the reply re-read, its new fields sent
                lp = chat_logprobs(tok, new, lps, nlp) if nlp is not None and new else None
                d = streams[c.index].feed(text, c.finish_reason is not None)
                if d or lp is not None:
                    content.append(ChatChunkChoice(index=c.index, delta=Delta(**d), logprobs=lp))
            elif text or new:
                lp = chat_logprobs(tok, new, lps, nlp) if nlp is not None else None
                content.append(ChatChunkChoice(index=c.index, delta=Delta(content=text), logprobs=lp))
            if c.finish_reason is not None:
                done.add(c.index)
                reason = finish_reason(c.finish_reason, streams is not None and streams[c.index].called)
                finished.append(ChatChunkChoice(index=c.index, delta=Delta(), finish_reason=reason))
        # one entry per choice per chunk; the finish comes in its own chunk with an empty delta, as OpenAI's does
        if content:
            yield chunk(content)
        if finished:
            yield chunk(finished)

    async def framed() -> AsyncIterator[str]:
        yield _sse(first())
        async for s in _stream_events(group, events):
            yield s

    return EngineStream(framed(), group)

"""OpenAI-compatible completions at KServe's paths: `/openai/v1/completions`, `/openai/v1/models`.

KServe 0.21's own OpenAI routes import vLLM's protocol types and are skipped without vLLM, so
these are ours, modelled on the OpenAI API reference (legacy completions): `prompt` as a string,
a list of strings or token ids, `max_tokens` (default 16), `temperature` (1), `top_p`, `n`,
`stop`, `seed`, `echo`, `logprobs`, `stream` with server-sent events ending in `data: [DONE]`,
and `usage`. A field sent as null takes its OpenAI default. GPT-2 has no chat template, so chat
completions get a 400 saying so.

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` with the HTTP
status as `code` (as vLLM). A stream's response starts with its first chunk, so a failure
before it (no slot within --request_timeout) is a status of its own, 503 with Retry-After, as
without a stream. After it the status is sent, so a failure (the shutdown's grace ending) is
an event of that shape followed by `data: [DONE]`, as vLLM does; the `openai` client raises
it as an APIError.
"""

from __future__ import annotations

import codecs
import json
import re
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, NamedTuple

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse

from ..engine import Engine, Prompt, Request, TokenEvent
from ..sampling import (MAX_INSTANCES, MAX_SALT, SamplingError, SamplingParams, as_token_ids,
                        quoted)
from ..tokenizer import IncrementalDetokenizer
from . import jsonbody
from .errors import SERVER_SENT_EVENTS, failure, refusals
from .middleware import EventStream, started
from .repository import NAME_LIMIT, Repository, some_names

# OpenAI field -> SamplingParams field; everything else is either handled here or refused.
# `top_k`, `repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids` and
# `include_stop_str_in_output` are extensions that vLLM accepts too.
MAPPED = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
          "n": "n", "stop": "stop", "seed": "seed", "logprobs": "logprobs", "top_k": "top_k",
          "repetition_penalty": "repetition_penalty", "ignore_eos": "ignore_eos",
          "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
          "logit_bias": "logit_bias", "min_tokens": "min_tokens",
          "stop_token_ids": "stop_token_ids",
          "include_stop_str_in_output": "include_stop_str_in_output", "cache_salt": "cache_salt"}
IGNORED = {"user", "model", "prompt", "stream", "stream_options", "echo", "best_of"}
# Accepted only at their neutral value: GPT-2 completions here have no insertion mode.
NEUTRAL = {"suffix": None}

_NUMBER, _INT = {"type": "number"}, {"type": "integer"}
_STOP = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
# The request body's fields, for /openapi.json (the handler validates by hand, to answer
# OpenAI-style errors naming the field): those of MAPPED, IGNORED and NEUTRAL (a test checks
# that the route takes each), each of which may be null (OpenAI's default); no prompt is a new
# document's start (<|endoftext|>).
COMPLETION_FIELDS = {
    "model": {"type": "string", "description": "required where the server has several"},
    "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                         {"type": "array", "items": _INT},
                         {"type": "array", "items": {"type": "array", "items": _INT}}]},
    "max_tokens": _INT, "temperature": _NUMBER, "top_p": _NUMBER, "n": _INT,
    "stop": _STOP, "seed": _INT, "echo": {"type": "boolean"}, "logprobs": _INT,
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "additionalProperties": False, "properties": {
        "include_usage": {"type": ["boolean", "null"]},
        "continuous_usage_stats": {"type": ["boolean", "null"]}}},
    "best_of": _INT, "user": {"type": "string"}, "top_k": _INT,
    "repetition_penalty": _NUMBER, "ignore_eos": {"type": "boolean"},
    "presence_penalty": _NUMBER, "frequency_penalty": _NUMBER,
    "logit_bias": {"type": "object", "additionalProperties": _NUMBER,
                   "propertyNames": {"pattern": "^[0-9]+$"}},
    "min_tokens": _INT, "stop_token_ids": {"type": "array", "items": _INT},
    "include_stop_str_in_output": {"type": "boolean"},
    "cache_salt": {"type": "string", "minLength": 1, "maxLength": MAX_SALT},
    "suffix": {"type": "null"}}
COMPLETIONS_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "additionalProperties": False, "properties": {
        name: {"anyOf": [schema, {"type": "null"}]}
        for name, schema in COMPLETION_FIELDS.items()}}}}}}


class OpenAIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", retry_after: int = 1):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind
        self.retry_after = retry_after  # seconds, of a 503

    @classmethod
    def of(cls, exc: Exception) -> OpenAIError:
        """Any failure as the client should see it."""
        if isinstance(exc, OpenAIError):
            return exc
        status, message = failure(exc)
        kinds = {400: "invalid_request_error", 404: "not_found_error",
                 503: "service_unavailable_error"}
        return cls(message, status=status, kind=kinds.get(status, "server_error"),
                   param="model" if status == 404 else None,
                   retry_after=getattr(exc, "retry_after", 1))

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.status}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def openai_router(repository: Repository, max_prompts: int = MAX_INSTANCES) -> APIRouter:
    router = APIRouter(prefix="/openai/v1", tags=["OpenAI"])
    created = int(time.time())

    @router.get("/models")
    async def models() -> dict:
        """The servable models (loaded or not; not those unloaded through the API), each
        with its max_model_len, as vLLM lists them."""
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "gpt2serve",
             "max_model_len": repository.context_of(name)} for name in repository.names()]}

    @router.post("/chat/completions", status_code=400, responses={
        **refusals(openai=True), 400: {"description": "always: GPT-2 has no chat template",
                                       "content": refusals(openai=True)["4XX"]["content"]}})
    async def chat_completions(request: HTTPRequest) -> JSONResponse:
        try:  # the model first, as vLLM: one this server lacks is a 404
            model_of(await json_object(request), repository)
        except Exception as e:  # noqa: BLE001 - every failure in OpenAI's error shape
            return OpenAIError.of(e).response()
        return OpenAIError("GPT-2 has no chat template; use /openai/v1/completions with a "
                           "text prompt", param="messages").response()

    @router.post("/completions", response_model=None, openapi_extra=COMPLETIONS_SCHEMA,
                 responses={**refusals(openai=True), 200: SERVER_SENT_EVENTS})  # (or JSON)
    async def completions(request: HTTPRequest) -> Any:
        try:
            body = await json_object(request)
            name = model_of(body, repository)
            call = CompletionCall(await repository.engine(name), name, body, max_prompts)
            if call.stream:
                requests = call.submit()
                return EventStream(await started(call.sse(requests)), call.engine, requests)
            return await call.run()
        except Exception as e:  # noqa: BLE001 - every failure in OpenAI's error shape
            return OpenAIError.of(e).response()

    return router


def model_of(body: dict, repository: Repository) -> str:
    """The model a request names in `model`; absent or null names the server's only one
    (as vLLM's), and is an error where it has several."""
    name = body.get("model")
    if name is None and len(repository.entries) == 1:
        return next(iter(repository.entries))  # (unloaded through the API: it says so)
    if name is None:  # (every model: a load may bring an unloaded one back)
        raise OpenAIError(f"'model' is required: this server has "
                          f"{_some(repository.names(every=True))}", param="model")
    if not isinstance(name, str):
        raise OpenAIError("'model' must be a string", param="model")
    if repository.get_model(name) is None and name not in repository.entries:
        raise OpenAIError(f"model {quoted(name, NAME_LIMIT)} does not exist; this server has "
                          f"{_some(repository.names())}",
                          param="model", status=404, kind="not_found_error")
    return name


def _some(names: list[str]) -> str:
    return some_names(names, "GET /openai/v1/models")


async def json_object(request: HTTPRequest) -> dict:
    try:
        body = jsonbody.parse(await request.body())
    except jsonbody.BadJSON as e:
        raise OpenAIError(str(e), param=e.param) from None
    if not isinstance(body, dict):
        raise OpenAIError("request body must be a JSON object")
    return body


class CompletionCall:
    """One /completions request: validated fields, prompts as token ids, and the response."""

    def __init__(self, engine: Engine, model_name: str, body: dict,
                 max_prompts: int = MAX_INSTANCES):
        self.engine, self.model_name = engine, model_name
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        for name, neutral in NEUTRAL.items():
            if body.get(name, neutral) not in (neutral, None):
                raise OpenAIError(f"'{name}' is not supported by this server", param=name)
        unknown = set(body) - set(MAPPED) - IGNORED - set(NEUTRAL)
        if unknown:
            name = sorted(unknown)[0]
            raise OpenAIError(f"unknown parameter '{name}'", param=name)
        if body.get("user") is not None and not isinstance(body["user"], str):
            raise OpenAIError("'user' must be a string", param="user")
        self.stream = _flag(body, "stream")
        self.echo = _flag(body, "echo")
        self.include_usage, self.continuous_usage = _stream_options(body.get("stream_options"),
                                                                    self.stream)
        # null means the OpenAI default, not ours (aitextgen's max_length 256, temperature 0.7)
        fields = {MAPPED[k]: v for k, v in body.items() if k in MAPPED and v is not None}
        try:
            self.params = SamplingParams.from_dict(
                {"max_new_tokens": 16, "temperature": 1.0, "top_k": 0, **fields},
                max_n=engine.max_n)
            best_of = body.get("best_of")
            # (2.0 is 2, as n reads it; true is not)
            if best_of is not None and (isinstance(best_of, bool) or best_of != self.params.n):
                raise OpenAIError("'best_of' must equal 'n' when given", param="best_of")
            prompts = _prompt_list(body.get("prompt"))
            if len(prompts) > max_prompts:
                raise OpenAIError(f"'prompt' has {len(prompts)} prompts; this server takes at "
                                  f"most {max_prompts} per request", param="prompt")
            self.sent = prompts  # as sent, for echo
            self.prompts = []
            for i, prompt in enumerate(prompts):
                where = f"prompt[{i}]" if len(prompts) > 1 else ""  # which one, in a list
                try:
                    self.prompts.append(self._prompt_ids(prompt))
                except SamplingError as e:
                    raise SamplingError(f"{where}: {e}" if where else str(e)) from None
                engine.check(Prompt(self.prompts[-1], self.params, where))
        except SamplingError as e:
            message = str(e).replace("'max_new_tokens'", "'max_tokens'")
            raise OpenAIError(message, param=_param_of(message)) from None

    def submit(self) -> list[Request]:
        """Queue every prompt, all or none, before any response starts, so that overload is
        a 503 and not a broken stream."""
        # echo with logprobs scores the prompt too, as OpenAI's legacy completions did
        scored = self.params.logprobs if self.echo else None
        try:
            self.requests = self.engine.submit(
                [Prompt(ids, self.params, prompt_logprobs=scored) for ids in self.prompts],
                streamed=self.stream)
        except SamplingError as e:  # (more prompts than the queue takes)
            raise OpenAIError(str(e), param="prompt") from None
        return self.requests

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.engine.encode_prompt(prompt)
        vocab = self.engine.tokenizer.vocab_size
        ids = as_token_ids(prompt, vocab)
        if not ids:
            # a SamplingError, so that in a list of prompts it names which one
            raise SamplingError(f"prompt must be a non-empty list of token ids in [0, {vocab})")
        return ids

    # ---- non-streaming ----

    async def run(self) -> dict:
        results = [[Choice(i) for i in range(self.params.n)] for _ in self.prompts]
        async for p, ev in self.engine.stream(self.submit()):
            results[p][ev.index].add(ev, self.engine.eos_id)
        before = [self._before(p) for p in range(len(self.prompts))]
        scored = [self._prompt_logprobs(p) if self.echo and self.params.logprobs is not None
                  else None for p in range(len(self.prompts))]  # once a prompt, for its n
        choices = [self._choice(p, before[p], scored[p], c)
                   for p, cs in enumerate(results) for c in cs]
        completion_tokens = sum(len(c.token_ids) for cs in results for c in cs)
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model_name, "choices": choices,
                "usage": self._usage(completion_tokens)}

    def _choice(self, p: int, before: Before, scored: dict | None, c: Choice) -> dict:
        """Choice c of prompt p; `scored`: the prompt's logprobs where they are echoed."""
        logprobs = None
        if self.params.logprobs is not None:
            offsets = TextOffsets(self.engine.tokenizer, len(before.echo), before.held)
            logprobs = self._logprobs(c.token_ids, c.logprobs, c.top_logprobs, offsets)
            if scored is not None:
                logprobs = _join(scored, logprobs)
        return {"text": before.echo + (c.text or before.tail),
                "index": p * self.params.n + c.index, "logprobs": logprobs,
                "finish_reason": c.finish_reason}

    def _prompt_logprobs(self, p: int) -> dict:
        """The prompt's tokens and their logprobs; the first token has none (nothing came
        before it), as in OpenAI's legacy completions."""
        scored = self.requests[p].prompt_logprobs
        return self._logprobs(self.prompts[p], [None] + [lp for lp, _ in scored],
                              [None] + [top for _, top in scored],
                              TextOffsets(self.engine.tokenizer, 0, special=True))

    def _before(self, p: int) -> Before:
        """What comes before prompt p's completions. Echoed, the prompt is a string as sent
        (vLLM's; `<|endoftext|>` in it stays), else its token ids decoded with their special
        tokens (an empty prompt is read as, and echoed as, <|endoftext|>)."""
        if not self.echo and self.params.logprobs is None:
            return Before("", "", [])  # (held tokens only move text_offset)
        ids, sent, tokenizer = self.prompts[p], self.sent[p], self.engine.tokenizer
        held = ids[len(ids) - IncrementalDetokenizer(tokenizer, ids).held:]
        if not self.echo:
            return Before("", "", held)
        decode = tokenizer.decode
        text = sent if isinstance(sent, str) and sent else decode(ids, skip_special_tokens=False)
        tail = decode(held, skip_special_tokens=False) if held else ""
        return Before(text[:len(text) - len(tail)], tail, held)

    def _logprobs(self, ids, logprobs, tops, offsets: TextOffsets) -> dict:
        """OpenAI's logprobs object for tokens `ids`: each token's text, its logprob, the
        `logprobs` likeliest tokens with the token itself always among them (so an entry may
        have logprobs + 1 items, as OpenAI's), and its offset in characters in the text."""
        token_text = self.engine.tokenizer.token_text
        ids = ids[:len(logprobs)]
        top_logprobs = []
        for token, lp, top in zip(ids, logprobs, tops):
            if top is None:
                top_logprobs.append(None)
                continue
            # Tokens that are part of a UTF-8 character each read as U+FFFD, so several may
            # share one key: the likeliest of them gives its value (the last written, the least
            # likely, did), and the token itself its own, as token_logprobs has it.
            entry: dict[str, float] = {}
            for i, value in top:  # likeliest first
                entry.setdefault(token_text(i), value)
            entry[token_text(token)] = lp
            top_logprobs.append(entry)
        return {"tokens": [token_text(t) for t in ids], "token_logprobs": list(logprobs),
                "top_logprobs": top_logprobs, "text_offset": [offsets.add(t) for t in ids]}

    def _usage(self, completion_tokens: int) -> dict:
        # Each prompt counts once, however many sequences continue it (OpenAI, vLLM).
        prompt_tokens = sum(len(p) for p in self.prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {  # read from the prefix cache, as OpenAI reports it
                    "cached_tokens": sum(r.cached_tokens for r in self.requests)}}

    # ---- streaming ----

    async def sse(self, requests: list[Request]) -> AsyncIterator[str]:
        generated = [0] * (len(self.prompts) * self.params.n)  # completion tokens per choice
        sent = False
        try:
            async with aclosing(self._chunks(requests, generated)) as chunks:
                async for chunk in chunks:
                    sent = True
                    yield chunk
        except Exception as e:  # noqa: BLE001 - the status is sent: say it in the stream
            if not sent:  # no status yet (middleware.started): one of its own
                raise
            yield f"data: {json.dumps(OpenAIError.of(e).body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        if self.include_usage:
            usage = {"id": self.id, "object": "text_completion", "created": self.created,
                     "model": self.model_name, "choices": [],
                     "usage": self._usage(sum(generated))}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"

    async def _chunks(self, requests: list[Request], generated: list[int]
                      ) -> AsyncIterator[str]:
        """The stream's chunks of text and logprobs, counting each choice's tokens."""
        n, tokenizer = self.params.n, self.engine.tokenizer
        offsets: dict[int, TextOffsets] = {}  # per choice, over the whole stream
        before: dict[int, Before] = {}  # per prompt
        texted: set[int] = set()  # the choices that have sent text of their own
        async for p, ev in self.engine.stream(requests):
            if p * n not in offsets:  # the prompt's first event: it is read (and scored)
                before[p] = self._before(p)
                for i in range(n):
                    offsets[p * n + i] = TextOffsets(tokenizer, len(before[p].echo),
                                                     before[p].held)
                if self.echo:
                    scored = (self._prompt_logprobs(p) if self.params.logprobs is not None
                              else None)
                    for i in range(n):
                        yield self._chunk(p * n + i, before[p].echo, scored, None, p, 0)
            token = _token_of(ev, self.engine.eos_id)
            choice = p * n + ev.index
            generated[choice] += token is not None
            # with logprobs asked for, every chunk has the object, its lists empty where
            # the event took no token (max_tokens 0): the lists of the chunks join to
            # the answer's without a stream
            took = [] if token is None else [token]
            logprobs = None
            if self.params.logprobs is not None:
                logprobs = self._logprobs(took, [ev.logprob] * len(took),
                                          [ev.top_logprobs or []] * len(took),
                                          offsets[choice])
            text = ev.text
            if ev.finish_reason and choice not in texted:
                text = text or before[p].tail
            if text:
                texted.add(choice)
            if text or ev.finish_reason or took and logprobs:
                yield self._chunk(choice, text, logprobs, ev.finish_reason, p,
                                  generated[choice])

    def _chunk(self, index: int, text: str, logprobs, finish_reason, prompt: int,
               generated: int) -> str:
        # "usage": null on every chunk but the last one's (OpenAI, vLLM); with vLLM's
        # `continuous_usage_stats`, the choice's own so far: its prompt and its tokens
        usage = None
        if self.continuous_usage:
            prompt_tokens = len(self.prompts[prompt])
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                     "total_tokens": prompt_tokens + generated}
        chunk = {"id": self.id, "object": "text_completion", "created": self.created,
                 "model": self.model_name,
                 "choices": [{"text": text, "index": index, "logprobs": logprobs,
                              "finish_reason": finish_reason}],
                 "usage": usage}
        return f"data: {json.dumps(chunk)}\n\n"


def _token_of(ev: TokenEvent, eos_id: int | None) -> int | None:
    """The token a sequence took at this event, end-of-text included: the engine reports
    end-of-text as an event with no token (it adds no text) that finishes with "stop"; as
    OpenAI and vLLM, it is a completion token with a logprob like any other."""
    if ev.token_id is not None:
        return ev.token_id
    return eos_id if ev.finish_reason == "stop" else None


class Choice:
    """One choice of a non-streamed completion, accumulated from its events; unlike the
    engine's Completion it keeps the end-of-text token (counted, and scored with logprobs)."""

    def __init__(self, index: int):
        self.index, self.text, self.finish_reason = index, "", ""
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []

    def add(self, ev: TokenEvent, eos_id: int | None) -> None:
        self.text += ev.text
        token = _token_of(ev, eos_id)
        if token is not None:
            self.token_ids.append(token)
            if ev.logprob is not None:
                self.logprobs.append(ev.logprob)
                self.top_logprobs.append(ev.top_logprobs or [])
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason


class Before(NamedTuple):
    """What comes before a prompt's completions: the echoed prompt (`echo`) or nothing. A
    prompt of token ids may end inside a character; the engine's completion text then
    begins with that character whole (its detokenizer starts from the prompt's `held`
    tokens), so the echo stops before it, and a completion with no text of its own sends
    the prompt's `tail` (that character unfinished, as U+FFFD) in its place."""
    echo: str
    tail: str
    held: list[int]


class TextOffsets:
    """`text_offset` as OpenAI defines it: where each token starts in the choice's text, in
    characters, continuing across a stream's chunks. Token bytes go through a UTF-8 decoder:
    a token that starts inside a multi-byte character is at the character it completes.
    A character left unfinished is one U+FFFD before the token that cannot finish it.
    Special tokens (end-of-text) add nothing to generated text, which has none of them, and
    their own text to an echoed prompt (`special`), which keeps them. A completion's offsets
    start after the `held` prompt tokens, whose character its first tokens finish."""

    def __init__(self, tokenizer, start: int, held: list[int] = (), special: bool = False):
        self.tokenizer, self.offset, self.special = tokenizer, start, special
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for token_id in held:
            self.add(token_id)

    def add(self, token_id: int) -> int:
        data = self.tokenizer.token_bytes(token_id)
        if not data and self.special:
            data = self.tokenizer.token_text(token_id).encode()
        if self.decoder.getstate()[0] and (token_id in self.tokenizer.special_ids
                                           or data and not 0x80 <= data[0] < 0xC0):
            # the U+FFFD of a character that this token cannot finish (a special token ends
            # it too, as IncrementalDetokenizer writes it)
            self.offset += len(self.decoder.decode(b"", final=True))
        at = self.offset
        self.offset += len(self.decoder.decode(data))
        return at


def _stream_options(options: Any, stream: bool) -> tuple[bool, bool]:
    """Whether to send a final usage chunk, and usage in every chunk too: `stream_options`
    only with `stream: true`, `include_usage` a JSON boolean (OpenAI's rules), and vLLM's
    `continuous_usage_stats`. An `include_usage` left out is false, as OpenAI reads it, but
    beside `continuous_usage_stats: true`, which only vLLM takes: there it is vLLM's default,
    true (an explicit false turns both off, as in vLLM)."""
    if options is None:
        return False, False
    if not stream:
        raise OpenAIError("'stream_options' is only allowed when 'stream' is true",
                          param="stream_options")
    if not isinstance(options, dict):
        raise OpenAIError("'stream_options' must be an object", param="stream_options")
    unknown = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
    if unknown:
        raise OpenAIError(f"unknown parameter 'stream_options.{unknown[0][:40]}'",
                          param="stream_options")
    flags = {}
    for name in ("include_usage", "continuous_usage_stats"):
        value = options.get(name)
        if value is not None and not isinstance(value, bool):
            raise OpenAIError(f"'stream_options.{name}' must be true or false",
                              param="stream_options")
        flags[name] = value
    continuous = bool(flags["continuous_usage_stats"])
    usage = flags["include_usage"] if flags["include_usage"] is not None else continuous
    return usage, usage and continuous


def _join(first: dict, second: dict) -> dict:
    """Two logprobs objects one after the other (the second's offsets already follow)."""
    return {key: first[key] + second[key] for key in first}


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if prompt is None:
        return [""]  # OpenAI: no prompt starts a new document (<|endoftext|>)
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in prompt):
            return [prompt]  # token ids (_prompt_ids checks them)
        if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
            return prompt
    raise OpenAIError("'prompt' must be a string, a list of strings or a list of token ids",
                      param="prompt")


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise OpenAIError(f"'{name}' must be true or false", param=name)
    return value


def _param_of(message: str) -> str | None:
    """The field a SamplingError names, in OpenAI's spelling: the quoted name it starts with
    (after the prompt of a list it is about), or the prompt itself."""
    reverse = {v: k for k, v in MAPPED.items()}
    message = re.sub(r"^prompt\[\d+\]: ", "", message)
    if message.startswith("'"):
        name = message.split("'")[1]
        return reverse.get(name, name)
    return "prompt" if message.startswith("prompt") else None

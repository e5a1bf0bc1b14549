"""Serve a LightGPT over HTTP with OpenAI's API (completions and chat completions), decoding the requests together
(serving.BatchDecoder), with a chat page at /."""

import asyncio
import hmac
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from conversations import PromptTemplate, is_chat
from devices import compute_dtype
from finetuning import load_inference_model
from flags import ArgumentParser, add_device_argument, add_model_path_arguments, add_precision_argument, positive_int
from serving import BatchDecoder, Event, QueueFull
from serving import Request as Generation
from tokenizer import CHAT_VOCABULARY_SIZE, chat_tokenizer, load_tokenizer

MAX_BODY_BYTES = 4 * 2**20
CHAT_PAGE = Path(__file__).resolve().parent / "chat.html"
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("Serve a LightGPT with OpenAI's API: /v1/completions, /v1/chat/completions (for a model "
                            "with a chat template), /v1/models, /health, and a chat page at /.")
    add_model_path_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="The address to listen on; 0.0.0.0 opens the server to other machines.")
    parser.add_argument("--port", type=positive_int, default=8000, help="The port to listen on.")
    parser.add_argument("--model_name", default="lightgpt",
                        help="The model's name in the API: what /v1/models lists and requests' model must be.")
    parser.add_argument("--api_key", default=None,
                        help="Require 'Authorization: Bearer KEY' on every endpoint but /health and the page; "
                        "without it, the LIGHTGPT_API_KEY environment variable's key, if set.")
    parser.add_argument("--max_batch_size", type=positive_int, default=16,
                        help="The most requests decoded together, one token each per step.")
    parser.add_argument("--max_queued", type=positive_int, default=64,
                        help="The most prompts waiting for a place in the batch; more are answered 503, and a request of "
                        "more prompts than this 400.")
    add_precision_argument(parser)
    add_device_argument(parser)
    return parser


class APIError(Exception):
    """A request the server refuses, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers

    def response(self) -> JSONResponse:
        error = {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


# OpenAI's fields that this server cannot honour, each with what its harmless values are and why: a request that
# asks for more is refused, never answered as if it had not asked.
UNHONOURED_COMPLETION_FIELDS = {
    "suffix": (lambda value: value in (None, ""), "not supported: the model continues a prompt, it cannot write "
               "toward a suffix"),
    "best_of": (lambda value: value is None or type(value) is int and value == 1, "must be 1 (one candidate per "
                "choice, as n)"),
}
UNHONOURED_CHAT_FIELDS = {
    "tools": (lambda value: value is None, "not supported: the model has no function calling"),
    "functions": (lambda value: value is None, "not supported: the model has no function calling"),
    "tool_choice": (lambda value: value in (None, "none"), "not supported: the model has no function calling"),
    "function_call": (lambda value: value in (None, "none"), "not supported: the model has no function calling"),
    "response_format": (lambda value: value is None or value == {"type": "text"}, 'must be {"type": "text"}: '
                        "structured output (json_object, json_schema) is not supported"),
    "logprobs": (lambda value: value in (None, False), "not supported on chat completions; /v1/completions has them"),
    "top_logprobs": (lambda value: value is None, "not supported on chat completions; /v1/completions has them"),
    "modalities": (lambda value: value is None or value == ["text"], 'must be ["text"]: the model writes text only'),
    "audio": (lambda value: value is None, "not supported: the model writes text only"),
    "prediction": (lambda value: value is None, "not supported"),
    "web_search_options": (lambda value: value is None, "not supported: the model has no web search"),
}
# OpenAI's fields that change nothing here, checked only for their type.
METADATA_FIELDS = {"user": ((str,), "a string"), "metadata": ((dict,), "an object"), "store": ((bool,), "true or false"),
                   "service_tier": ((str,), "a string"), "parallel_tool_calls": ((bool,), "true or false")}
# What a chat message's content may be made of, and the role OpenAI's newer models give the system message.
MESSAGE_FORMAT = ('a list of {"role": "system" | "developer" | "user" | "assistant", "content": a string or a list of '
                  '{"type": "text", "text": string} parts}')


def refuse_unhonoured(body: dict, fields: dict) -> None:
    """A 400 naming the first of `fields` (see UNHONOURED_CHAT_FIELDS) that the request sets to what this server
    cannot do; the METADATA_FIELDS checked for their type."""
    for name, (harmless, why) in fields.items():
        if not harmless(body.get(name)):
            raise APIError(400, f"{name}: {why}; got {json.dumps(body[name])[:80]}", name, "unsupported_parameter")
    for name, (kinds, description) in METADATA_FIELDS.items():
        field(body, name, kinds, description=description)


def field(body: dict, name: str, kinds: tuple, default=None, allowed=None, description: str = ""):
    """body[name], checked to be of one of `kinds` (and `allowed(value)` when given), or the default if absent."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds) or (
            allowed is not None and not allowed(value)):
        raise APIError(400, f"{name}: must be {description}, got {json.dumps(value)[:80]}", name,
                       "invalid_value" if isinstance(value, kinds) else "invalid_type")
    return value


class Server:
    """The API over one BatchDecoder.

    Args:
        decoder: the decoding loop, started.
        tokenizer: the tiktoken Encoding of the model.
        block_size: the most tokens of a prompt and its completion.
        model_name: the name requests must give.
        template: the PromptTemplate of a chat model, else None.
        api_key: the bearer key every endpoint but /health requires, or None.
    """

    def __init__(self, decoder: BatchDecoder, tokenizer, block_size: int, model_name: str,
                 template: PromptTemplate | None = None, api_key: str | None = None):
        self.decoder, self.tokenizer, self.block_size = decoder, tokenizer, block_size
        self.model_name, self.template, self.api_key = model_name, template, api_key
        self.created = int(time.time())

    def app(self) -> FastAPI:
        app = FastAPI(title="LightGPT", docs_url=None, redoc_url=None, openapi_url=None)

        @app.middleware("http")
        async def guard(request: Request, call_next):
            try:
                self.authorize(request)
                if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                    raise APIError(413, f"the request body is over {MAX_BODY_BYTES:,} bytes", code="body_too_large")
            except APIError as error:
                return error.response()
            except ValueError:
                return APIError(400, "Content-Length: not a number").response()
            return await call_next(request)

        @app.exception_handler(APIError)
        async def refused(request: Request, error: APIError):
            return error.response()

        @app.exception_handler(HTTPException)
        async def not_here(request: Request, error: HTTPException):
            kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
            return APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                            kind=kind).response()

        app.get("/")(lambda: FileResponse(CHAT_PAGE, media_type="text/html"))
        app.get("/health")(lambda: {"status": "ok", "running": self.decoder.busy_rows,
                                    "waiting": len(self.decoder.waiting)})
        app.get("/v1/models")(lambda: {"object": "list", "data": [self.model_card()]})
        app.get("/v1/models/{name}")(self.model_named)
        app.get("/tokenizer_info")(self.tokenizer_info)
        app.post("/tokenize")(self.tokenize)
        app.post("/detokenize")(self.detokenize)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        return app

    def authorize(self, request: Request) -> None:
        if self.api_key is None or request.url.path in ("/health", "/"):  # the page holds no data, asks for the key
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise APIError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", kind="authentication_error")

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lightgpt",
                "max_model_len": self.block_size, "chat": self.template is not None}

    async def model_named(self, name: str) -> dict:
        self.check_model(name)
        return self.model_card()

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"model: {name!r} is not served here; this server serves {self.model_name!r}",
                           "model", "model_not_found", "not_found_error")

    async def tokenizer_info(self) -> dict:
        """What lm-evaluation-harness's remote tokenizer reads (vLLM's shape)."""
        eos = self.tokenizer.decode([self.decoder.model.eos_index])
        return {"eos_token": eos, "bos_token": None, "pad_token": eos, "model_max_length": self.block_size}

    async def tokenize(self, request: Request) -> dict:
        body = await self.body(request)
        prompt = field(body, "prompt", (str,), allowed=lambda _: True, description="a string")
        if prompt is None:
            raise APIError(400, "prompt: required", "prompt", "missing_required_parameter")
        tokens = self.encode(prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.block_size}

    async def detokenize(self, request: Request) -> dict:
        body = await self.body(request)
        tokens = field(body, "tokens", (list,), [], self.are_tokens, "a list of token ids")
        return {"prompt": self.tokenizer.decode(tokens)}

    def are_tokens(self, value) -> bool:
        vocabulary = self.decoder.model.vocabulary_size
        return all(isinstance(token, int) and not isinstance(token, bool) and 0 <= token < vocabulary
                   for token in value)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allowed_special="all")

    async def body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES:,} bytes", code="body_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON ({error})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def sampling(self, body: dict) -> dict:
        """The sampling fields both endpoints share, checked."""
        number = (int, float)
        bias = field(body, "logit_bias", (dict,), {}, self.is_logit_bias,
                     "an object mapping token ids below the vocabulary size to numbers in [-100, 100]")
        stop = field(body, "stop", (str, list), (), lambda v: isinstance(v, str) or (
            len(v) <= 4 and all(isinstance(s, str) and s for s in v)), "a string or a list of up to 4 strings")
        if field(body, "n", (int,), 1, lambda v: v == 1, "1 (one choice per prompt)") != 1:
            raise APIError(400, "n: must be 1")
        return {
            "temperature": float(field(body, "temperature", number, 1.0, lambda v: 0 <= v <= 2, "in [0, 2]")),
            "top_p": float(field(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "in (0, 1]")),
            "top_k": field(body, "top_k", (int,), None, lambda v: 1 <= v, "a positive integer"),
            "seed": field(body, "seed", (int,), None, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
            "stop": (stop,) if isinstance(stop, str) else tuple(stop),
            "presence_penalty": float(field(body, "presence_penalty", number, 0.0, lambda v: -2 <= v <= 2,
                                            "in [-2, 2]")),
            "frequency_penalty": float(field(body, "frequency_penalty", number, 0.0, lambda v: -2 <= v <= 2,
                                             "in [-2, 2]")),
            "logit_bias": {int(token): float(value) for token, value in bias.items()},
        }

    def is_logit_bias(self, value: dict) -> bool:
        vocabulary = self.decoder.model.vocabulary_size
        return all(token.isascii() and token.isdigit() and int(token) < vocabulary and type(bias) in (int, float)
                   and -100 <= bias <= 100 for token, bias in value.items())

    def max_tokens(self, body: dict, prompt: list[int], default: int, names=("max_tokens",)) -> int:
        """The completion's token budget, which must fit in the context after the prompt."""
        room = self.block_size - len(prompt)
        if room < 0 or room == 0 and names[0] != "max_tokens":
            raise APIError(400, f"the prompt is {len(prompt)} tokens, which leaves no room in this model's context of "
                           f"{self.block_size} tokens", "prompt" if names[0] == "max_tokens" else "messages",
                           "context_length_exceeded")
        chosen = None
        for name in names:
            chosen = field(body, name, (int,), chosen, lambda v: v >= 0, "zero or a positive integer")
        if chosen is None:
            return min(default, room)
        if chosen > room:
            raise APIError(400, f"{names[0]}: {chosen} tokens after a prompt of {len(prompt)} exceed this model's "
                           f"context of {self.block_size} tokens (at most {room})", names[0],
                           "context_length_exceeded")
        return chosen

    def prompts(self, body: dict) -> list[list[int]]:
        """The prompt field as token lists: a string, a list of strings, a token list or a list of token lists."""
        prompt = body.get("prompt")
        if prompt is None:
            raise APIError(400, "prompt: required", "prompt", "missing_required_parameter")
        if isinstance(prompt, str):
            prompts = [self.encode(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.encode(p) for p in prompt]
        elif isinstance(prompt, list) and prompt and self.are_tokens(prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and self.are_tokens(p) for p in prompt):
            prompts = prompt
        else:
            raise APIError(400, "prompt: must be a string, a list of strings, a list of token ids below the "
                           "vocabulary size, or a list of such lists", "prompt", "invalid_type")
        if any(len(p) == 0 for p in prompts):
            raise APIError(400, "prompt: must hold at least one token", "prompt", "invalid_value")
        return prompts

    async def completions(self, request: Request):
        body = await self.body(request)
        self.check_model(field(body, "model", (str,), None, description="a string"))
        prompts = self.prompts(body)
        if len(prompts) > self.decoder.max_queued:  # they could never all wait for a row at once
            raise APIError(400, f"prompt: {len(prompts):,} prompts in one request, more than the "
                           f"{self.decoder.max_queued} this server queues (--max_queued); send fewer at a time",
                           "prompt", "invalid_value")
        refuse_unhonoured(body, UNHONOURED_COMPLETION_FIELDS)
        sampling = self.sampling(body)
        echo = field(body, "echo", (bool,), False, description="true or false")
        logprobs = field(body, "logprobs", (int,), None, lambda v: 0 <= v <= 20, "an integer in [0, 20]")
        stream = field(body, "stream", (bool,), False, description="true or false")
        budgets = [self.max_tokens(body, prompt, DEFAULT_COMPLETION_TOKENS) for prompt in prompts]
        if stream and len(prompts) > 1:
            raise APIError(400, "stream: one prompt at a time", "stream")
        generations = [Generation(prompt, budget, None, logprobs=logprobs, score_prompt=echo and logprobs is not None,
                                  stop_tokens=frozenset(), **sampling) for prompt, budget in zip(prompts, budgets)]
        identity = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if stream:
            return self.stream(request, generations[0], lambda event, text: identity | {
                "object": "text_completion", "choices": [{"index": 0, "text": text, "logprobs": None,
                                                          "finish_reason": event.finish_reason}]},
                prefix=self.tokenizer.decode(prompts[0]) if echo else None, usage=self.include_usage(body))
        queues = self.submit(*generations)
        try:
            results = await asyncio.gather(*(self.complete(generation, events)
                                             for generation, events in zip(generations, queues)))
        finally:  # a client that left, or a failed prompt, frees the rows of the others too
            for generation in generations:
                generation.cancelled = True
        choices = []
        for index, (generation, (text, events)) in enumerate(zip(generations, results)):
            if echo:
                text = self.tokenizer.decode(generation.prompt) + text
            choices.append({"index": index, "text": text, "finish_reason": events[-1].finish_reason,
                            "logprobs": self.logprobs(events, echo) if logprobs is not None else None})
        usage = self.usage([g.prompt for g in generations], [events for _, events in results])
        return identity | {"object": "text_completion", "choices": choices, "usage": usage}

    def logprobs(self, events: list[Event], echo: bool) -> dict:
        """OpenAI's legacy logprobs object: tokens, token_logprobs, top_logprobs (token text to log-probability)
        and text_offset, of the prompt too when echoed."""
        choices = [choice for event in events for choice in (event.prompt_logprobs or []) if echo]
        choices += [choice for event in events for choice in event.tokens]
        tokens = [self.tokenizer.decode_single_token_bytes(c.token).decode("utf-8", "replace") for c in choices]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        top = [None if c.top is None else {self.tokenizer.decode([t]): p for t, p in c.top.items()} for c in choices]
        return {"tokens": tokens, "token_logprobs": [c.logprob for c in choices], "top_logprobs": top,
                "text_offset": offsets}

    def usage(self, prompts: list[list[int]], results: list[list[Event]]) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(events[-1].completion_tokens for events in results)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def chat_completions(self, request: Request):
        body = await self.body(request)
        self.check_model(field(body, "model", (str,), None, description="a string"))
        if self.template is None:
            raise APIError(400, f"{self.model_name} has no chat template: it is a base model, not instruction-tuned "
                           f"(serve one with --lora_path, or an export of one); use /v1/completions", "messages",
                           "no_chat_template")
        messages = self.messages(body)
        refuse_unhonoured(body, UNHONOURED_CHAT_FIELDS)
        try:
            prompt = self.template.prompt(messages)
        except ValueError as error:  # a role the template has no format for
            raise APIError(400, f"messages: {error}", "messages", "invalid_value") from None
        sampling = self.sampling(body)
        budget = self.max_tokens(body, prompt, self.block_size, ("max_completion_tokens", "max_tokens"))
        stream = field(body, "stream", (bool,), False, description="true or false")
        generation = Generation(prompt, budget, None, stop_tokens=frozenset(self.template.stop_tokens), **sampling)
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if stream:
            return self.stream(request, generation, lambda event, text: identity | {
                "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text} if text else {},
                                                                "finish_reason": event.finish_reason}]},
                first={"object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]} | identity,
                usage=self.include_usage(body))
        text, events = await self.complete(generation, self.submit(generation)[0])
        return identity | {"object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": events[-1].finish_reason,
            "logprobs": None}], "usage": self.usage([prompt], [events])}

    @staticmethod
    def include_usage(body: dict) -> bool:
        """Whether a stream ends with a chunk of usage counts (stream_options.include_usage)."""
        options = field(body, "stream_options", (dict,), {}, description="an object")
        return field(options, "include_usage", (bool,), False, description="true or false")

    @staticmethod
    def messages(body: dict) -> list[dict]:
        """The messages as {role, content} with string contents: a content of text parts is their text, joined by
        newlines, and the developer role is the system's (OpenAI's newer name)."""
        messages = field(body, "messages", (list,), None, description=MESSAGE_FORMAT)
        if not messages:
            raise APIError(400, "messages: required, with at least one message", "messages",
                           "missing_required_parameter")
        checked = []
        for number, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
                raise APIError(400, f"messages: must be {MESSAGE_FORMAT}, got {json.dumps(message)[:80]} as message "
                               f"{number}", "messages", "invalid_value")
            content = message.get("content")
            if isinstance(content, list) and content and all(isinstance(part, dict) for part in content):
                if kinds := sorted({str(part.get("type")) for part in content} - {"text"}):
                    raise APIError(400, f"messages: message {number} holds a part of type {', '.join(kinds)}; the "
                                   f"model reads text only (parts of type text)", "messages", "unsupported_value")
                texts = [part.get("text") for part in content]
                content = "\n".join(texts) if all(isinstance(text, str) for text in texts) else None
            if not isinstance(content, str):
                raise APIError(400, f"messages: must be {MESSAGE_FORMAT}, got {json.dumps(message)[:80]} as message "
                               f"{number}", "messages", "invalid_value")
            checked.append({"role": "system" if message["role"] == "developer" else message["role"],
                            "content": content})
        return checked

    def submit(self, *generations: Generation) -> list[asyncio.Queue]:
        """Hand the generations (one request's) to the decoding loop, all or none; the events of each arrive on its
        queue."""
        loop, queues = asyncio.get_running_loop(), []
        for generation in generations:
            queues.append(events := asyncio.Queue())
            generation.deliver = lambda event, events=events: loop.call_soon_threadsafe(events.put_nowait, event)
        try:
            self.decoder.submit(*generations)
        except QueueFull:
            raise APIError(503, f"the server is busy: {self.decoder.max_queued} requests are waiting; retry later",
                           code="server_busy", kind="server_error", headers={"Retry-After": "1"}) from None
        return queues

    async def complete(self, generation: Generation, events: asyncio.Queue) -> tuple[str, list[Event]]:
        collected = []
        try:
            while not collected or collected[-1].finish_reason is None:
                collected.append(await events.get())
        finally:
            generation.cancelled = True  # a client that left mid-way (the handler is cancelled) frees its row
        self.raise_failure(collected[-1])
        return "".join(event.text for event in collected), collected

    @staticmethod
    def raise_failure(event: Event) -> None:
        if event.error:
            raise APIError(500, f"the model failed on this request: {event.error}", kind="server_error")

    def stream(self, request: Request, generation: Generation, chunk, first: dict | None = None,
               prefix: str | None = None, usage: bool = False) -> StreamingResponse:
        """Server-sent events of the generation's text as it comes, then data: [DONE]."""
        events = self.submit(generation)[0]

        async def chunks() -> AsyncIterator[str]:
            try:
                if first:
                    yield f"data: {json.dumps(first)}\n\n"
                if prefix:
                    yield f"data: {json.dumps(chunk(Event(), prefix))}\n\n"
                while True:
                    event = await events.get()
                    if event.error:
                        error = {"message": f"the model failed on this request: {event.error}",
                                 "type": "server_error", "param": None, "code": None}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        break
                    if event.text or event.finish_reason:
                        yield f"data: {json.dumps(chunk(event, event.text))}\n\n"
                    if event.finish_reason:
                        if usage:
                            totals = self.usage([generation.prompt], [[event]])
                            yield f"data: {json.dumps(chunk(event, '') | {'choices': [], 'usage': totals})}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                generation.cancelled = True  # also when the client disconnects: its row is freed at the next step

        return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def serving_tokenizer(vocabulary_size: int, template: PromptTemplate | None):
    """The chat tokenizer for a ChatML model (it writes and reads <|im_start|> and <|im_end|>), else r50k_base, so
    that a base model's prompt never encodes an id beyond its vocabulary."""
    if is_chat(template) or vocabulary_size >= CHAT_VOCABULARY_SIZE:
        return chat_tokenizer()
    return load_tokenizer()


def main() -> None:
    args = build_parser().parse_args()
    try:
        model, block_size, template = load_inference_model(
            args.checkpoint_path, args.device, args.lora_path, compute_dtype(args.precision, torch.device(args.device)))
        tokenizer = serving_tokenizer(model.vocabulary_size, template)
        decoder = BatchDecoder(model, tokenizer, block_size, args.max_batch_size, args.max_queued).start()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"serve.py: error: {error}")
    api_key = args.api_key or os.environ.get("LIGHTGPT_API_KEY") or None
    server = Server(decoder, tokenizer, block_size, args.model_name, template, api_key)
    print(f"Serving {args.model_name} ({model.num_trainable_params:,} parameters, context {block_size} tokens) on "
          f"http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(server.app(), host=args.host, port=args.port, log_level="warning")
    finally:
        decoder.stop()


if __name__ == "__main__":
    main()

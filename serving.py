"""Continuous batching: one thread owns the model and decodes every running request together, a token per step.
A request joins the batch at the next step and leaves it when it finishes; each row of the batch keeps its own
number of cached tokens (the model has no positions, so only the attention mask differs from row to row)."""

import codecs
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from generation import check_cache_memory, top_k_top_p
from model import LightGPT


class RowCache:
    """One attention layer's keys and values for the rows of a batch, each holding its own number of tokens.

    Rows 0 to active - 1 decode; a decoding step adds one token to each of them, after its own last one, and
    every row's new token sees only that row's tokens.
    """

    def __init__(self, rows: int, num_kv_heads: int, capacity: int, head_dimensions: int, like: Tensor):
        # Zeros, not empty: a masked-out key still meets a weight of 0, and 0 * NaN would be NaN.
        self.keys = like.new_zeros(rows, num_kv_heads, capacity, head_dimensions)
        self.values = torch.zeros_like(self.keys)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=like.device)
        self.active = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store one new token's key and value per active row (k, v: (active, kv_heads, 1, head_dimensions));
        return the rows' keys and values up to the longest row, and the mask of each row's own tokens."""
        rows, lengths = torch.arange(self.active, device=k.device), self.lengths[: self.active]
        self.keys[rows, :, lengths] = k[:, :, 0]  # (active, kv_heads, head_dimensions) at each row's next place
        self.values[rows, :, lengths] = v[:, :, 0]
        lengths += 1
        width = int(lengths.max())
        mask = torch.arange(width, device=k.device) < lengths[:, None]  # (active, width)
        return self.keys[: self.active, :, :width], self.values[: self.active, :, :width], mask[:, None, None, :]

    def fill(self, row: int, keys: Tensor, values: Tensor) -> None:
        """Row `row` holds a prompt's keys and values (1, kv_heads, length, head_dimensions)."""
        length = keys.size(2)
        self.keys[row, :, :length], self.values[row, :, :length] = keys[0], values[0]
        self.lengths[row] = length

    def move(self, source: int, destination: int) -> None:
        """Row `destination` takes over row `source`'s tokens (to keep the active rows first)."""
        length = int(self.lengths[source])
        self.keys[destination, :, :length] = self.keys[source, :, :length]
        self.values[destination, :, :length] = self.values[source, :, :length]
        self.lengths[destination] = length


DEFAULT_TOP_K = 500  # generate.py's: sampling looks at the 500 most likely tokens unless a request says otherwise


class QueueFull(Exception):
    """More requests wait than the queue holds."""


@dataclass
class TokenChoice:
    """A token and, when asked for, its log-probability and the most likely alternatives'."""

    token: int
    logprob: float | None = None
    top: dict[int, float] | None = None


@dataclass
class Event:
    """What a request receives: new text (held back while it may be the start of a stop string, or an unfinished
    UTF-8 character), the tokens it came from, and, last, why it finished."""

    text: str = ""
    tokens: list[TokenChoice] = field(default_factory=list)
    prompt_logprobs: list[TokenChoice] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Request:
    """A prompt to continue and how. `deliver` is called from the decoding thread with each Event."""

    prompt: list[int]
    max_tokens: int
    deliver: Callable[[Event], None]
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int | None = None  # None: DEFAULT_TOP_K
    stop: tuple[str, ...] = ()
    stop_tokens: frozenset[int] = frozenset()
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once for each time a token was generated so far
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id: added to its logit
    logprobs: int | None = None  # with how many alternatives each generated token's log-probability comes
    score_prompt: bool = False  # the prompt's own tokens' log-probabilities (echo with logprobs)
    cancelled: bool = False  # set by the server when the client leaves: the slot is freed at the next step


class Running:
    """A request in the batch: its sampler, its text so far and what of it was delivered."""

    def __init__(self, request: Request, tokenizer, device: torch.device):
        self.request = request
        self.tokenizer = tokenizer
        self.generator = torch.Generator(device)
        if request.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(request.seed)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.delivered, self.count = "", 0, 0
        self.last_token = 0
        self.penalized = bool(request.presence_penalty or request.frequency_penalty)
        self.counts: Tensor | None = None  # how often each token was generated (vocabulary,), when penalized
        bias = request.logit_bias
        # logit_bias's token ids and values, made tensors once rather than at every step: (biased tokens,) each
        self.bias = (torch.tensor(list(bias), device=device), torch.tensor(list(bias.values()), device=device)
                     ) if bias else None

    @property
    def adjusts(self) -> bool:
        return self.penalized or self.bias is not None

    def adjusted(self, logits: Tensor) -> Tensor:
        """This row's logits (vocabulary,) after OpenAI's logit_bias and presence and frequency penalties:
        logits + bias - presence_penalty * (count > 0) - frequency_penalty * count."""
        request = self.request
        if self.bias is not None:
            tokens, biases = self.bias
            logits = logits.index_add(0, tokens, biases.to(logits.dtype))
        if self.penalized:
            if self.counts is None:
                self.counts = torch.zeros_like(logits)
            logits = logits - request.presence_penalty * (self.counts > 0) - request.frequency_penalty * self.counts
        return logits

    @property
    def top_k(self) -> int:
        return min(self.request.top_k or DEFAULT_TOP_K, self.tokenizer.n_vocab)

    def choose(self, logits: Tensor, top: tuple[Tensor, Tensor] | None) -> TokenChoice:
        """The next token from this row's logits (vocabulary,), with its log-probability when asked for; top: the
        row's most likely logits and their tokens, best first, at least top_k of them (sampling only)."""
        request = self.request
        if request.temperature == 0:
            token = int(logits.argmax())
        else:
            values, tokens = top[0][: self.top_k], top[1][: self.top_k]
            candidates, probabilities = top_k_top_p(values, request.temperature, self.top_k, request.top_p)
            token = int(tokens[candidates[torch.multinomial(probabilities, 1, generator=self.generator)]])
        choice = TokenChoice(token)
        if request.logprobs is not None:
            log_probabilities = logits.float().log_softmax(-1)
            choice.logprob = float(log_probabilities[token])
            choice.top = top_choices(log_probabilities, request.logprobs)
        self.last_token = token
        return choice

    def advance(self, choice: TokenChoice, eos_index: int) -> Event:
        """Take the chosen token: the event to deliver, with a finish_reason when the request ends here."""
        request = self.request
        if choice.token == eos_index or choice.token in request.stop_tokens:
            return self.finish("stop", [choice])  # its log-probability too, as what ended the text
        self.count += 1
        if self.counts is not None:
            self.counts[choice.token] += 1
        self.text += self.decoder.decode(self.tokenizer.decode_single_token_bytes(choice.token))
        for stop in request.stop:
            if (at := self.text.find(stop, max(0, self.delivered - len(stop)))) >= 0:
                self.text = self.text[:at]
                return self.event(at, [choice], "stop")
        if self.count == request.max_tokens:
            return self.finish("length", [choice])
        held = max((overlap(self.text, stop) for stop in request.stop), default=0)
        return self.event(len(self.text) - held, [choice])

    def event(self, end: int, tokens: list[TokenChoice], finish_reason: str | None = None) -> Event:
        text, self.delivered = self.text[self.delivered: end], max(self.delivered, end)
        return Event(text, tokens, finish_reason=finish_reason, completion_tokens=self.count)

    def finish(self, reason: str, tokens: list[TokenChoice] | None = None) -> Event:
        self.text += self.decoder.decode(b"", final=True)  # a character cut short by the end, as U+FFFD
        return self.event(len(self.text), tokens or [], reason)


def choose(rows: list[Running], logits: Tensor) -> list[TokenChoice]:
    """Each row's next token from its logits (rows, vocabulary). The sampling rows' candidates come from one top-k
    of the whole batch: sorting each row's 50257 logits alone took 15 ms a row on a CPU core."""
    if any(running.adjusts for running in rows):
        logits = torch.stack([running.adjusted(row_logits) for running, row_logits in zip(rows, logits)])
    widths = [running.top_k for running in rows if running.request.temperature > 0]
    top = logits.topk(max(widths), -1) if widths else None  # (rows, the widest top_k) values and indices
    return [running.choose(logits[row], top and (top.values[row], top.indices[row]))
            for row, running in enumerate(rows)]


def overlap(text: str, stop: str) -> int:
    """How many of text's last characters begin the stop string (and so must wait for what follows)."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


def top_choices(log_probabilities: Tensor, count: int) -> dict[int, float]:
    values, tokens = log_probabilities.topk(count) if count else (log_probabilities[:0], log_probabilities[:0])
    return dict(zip(tokens.tolist(), values.tolist()))


class BatchDecoder:
    """The decoding loop: admits waiting requests into free rows, then decodes one token for every row.

    Args:
        model: the model, which only this loop's thread runs.
        tokenizer: a tiktoken Encoding, to turn tokens into text.
        block_size: the most tokens of one request (prompt and completion).
        max_batch_size: the rows decoded together.
        max_queued: the requests that may wait for a row; submit raises QueueFull beyond.
    """

    def __init__(self, model: LightGPT, tokenizer, block_size: int, max_batch_size: int, max_queued: int):
        self.model, self.tokenizer, self.block_size = model, tokenizer, block_size
        self.max_batch_size, self.max_queued = max_batch_size, max_queued
        self.device = model.token_embeddings.weight.device
        config, weights = model.config, model.token_embeddings.weight
        check_cache_memory(model, max_batch_size, block_size, f"a batch of {max_batch_size} rows (--max_batch_size) of "
                           f"the model's {block_size:,}-token context", "lower --max_batch_size, or serve a model of a shorter context")
        self.cache = [RowCache(max_batch_size, config.num_kv_heads, block_size, config.head_dimensions, weights)
                      for _ in range(config.num_layers)]
        self.rows: list[Running] = []
        self.waiting: deque[Request] = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="decoding", daemon=True)

    def start(self) -> "BatchDecoder":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join()

    def submit(self, *requests: Request) -> None:
        """Queue the requests (the prompts of one API request) for the next free rows, all or none: raise QueueFull
        when they do not all fit in the queue now."""
        with self.wake:
            if len(self.waiting) + len(requests) > self.max_queued:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.extend(requests)
            self.wake.notify()

    @property
    def busy_rows(self) -> int:
        return len(self.rows)

    def run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not self.stopping and not self.waiting and not self.rows:
                        self.wake.wait()
                    if self.stopping:
                        return
                self.leave_cancelled()
                self.admit()
                if self.rows:
                    self.step()

    def admit(self) -> None:
        """Prefill waiting requests, one at a time, into the free rows."""
        while len(self.rows) < self.max_batch_size:
            with self.wake:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            if not request.cancelled:
                self.guarded(request, lambda: self.prefill(request))

    def guarded(self, request: Request, work: Callable[[], None]) -> None:
        """Run work for the request; an error ends that request alone, with the error, and the loop goes on."""
        try:
            work()
        except Exception as error:  # noqa: BLE001 - the server must outlive any one request
            request.deliver(Event(finish_reason="error", error=f"{type(error).__name__}: {error}"))

    def prefill(self, request: Request) -> None:
        """Score the prompt when asked, then cache it in a free row and choose its first token."""
        prompt = torch.tensor([request.prompt], device=self.device)  # (1, prompt length)
        running = Running(request, self.tokenizer, self.device)
        if request.score_prompt:
            request.deliver(Event(prompt_logprobs=self.score(prompt, request.logprobs or 0)))
        if request.max_tokens == 0:
            request.deliver(running.finish("length"))
            return
        cache = self.model.new_cache(1, prompt.size(1))
        logits = self.model.next_token_logits(prompt, cache)[0]  # (vocabulary,)
        event = running.advance(choose([running], logits[None])[0], self.model.eos_index)
        request.deliver(event)
        if event.finish_reason is None:
            row = len(self.rows)
            for layer, single in zip(self.cache, cache):
                layer.fill(row, single.keys, single.values)
                layer.active = row + 1
            self.rows.append(running)

    def score(self, prompt: Tensor, alternatives: int) -> list[TokenChoice]:
        """Each prompt token's log-probability given the tokens before it (None for the first)."""
        log_probabilities = self.model(prompt)[0][0, :-1].float().log_softmax(-1)  # (prompt length - 1, vocabulary)
        tokens = prompt[0].tolist()
        choices = [TokenChoice(tokens[0])]
        for position, token in enumerate(tokens[1:]):
            row = log_probabilities[position]
            choices.append(TokenChoice(token, float(row[token]), top_choices(row, alternatives)))
        return choices

    def step(self) -> None:
        """One token for every row; finished and cancelled rows leave the batch."""
        tokens = torch.tensor([[running.last_token] for running in self.rows], device=self.device)  # (rows, 1)
        try:
            logits = self.model.next_token_logits(tokens, self.cache)  # (rows, vocabulary)
        except Exception as error:  # noqa: BLE001 - every row fails with it; the loop goes on
            for running in self.rows:
                running.request.deliver(Event(finish_reason="error", error=f"{type(error).__name__}: {error}"))
            self.remove(list(range(len(self.rows))))
            return
        finished = []
        for row, (running, choice) in enumerate(zip(self.rows, choose(self.rows, logits))):
            try:
                event = running.advance(choice, self.model.eos_index)
            except Exception as error:  # noqa: BLE001 - a token this row cannot decode ends this row alone
                event = Event(finish_reason="error", error=f"{type(error).__name__}: {error}")
            running.request.deliver(event)
            if event.finish_reason is not None:
                finished.append(row)
        self.remove(finished)

    def leave_cancelled(self) -> None:
        self.remove([row for row, running in enumerate(self.rows) if running.request.cancelled])

    def remove(self, rows: list[int]) -> None:
        """Free these rows, moving the last active rows into them so that the active rows stay first."""
        for row in sorted(rows, reverse=True):
            last = len(self.rows) - 1
            if row != last:
                for layer in self.cache:
                    layer.move(last, row)
                self.rows[row] = self.rows[last]
            self.rows.pop()
            for layer in self.cache:
                layer.active = len(self.rows)

"""Decoding: sampling (temperature, top-k, top-p, repetition penalty) and beam search over a LightGPT's cached
next-token step."""

import math
from collections.abc import Collection, Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from conversations import PromptTemplate
from devices import available_memory
from model import LightGPT
from sizing import gigabytes, kv_cache_bytes
from tokenizer import chat_tokenizer


# Below this temperature sampling takes the most likely token: dividing the logits by much less overflows float32
# into NaN probabilities, and at it the next most likely token is already e^10 times less likely per 0.001 of logit.
GREEDY_BELOW_TEMPERATURE = 1e-4
# The repetition and length penalties that the arithmetic carries: logits times or over a penalty stay far within
# float32, and a length to the power of a penalty within a Python float (1e6 ** 10 = 1e60).
REPEAT_PENALTIES = (1e-6, 1e6)
LENGTH_PENALTIES = (-10.0, 10.0)


def penalize_repeats(logits: Tensor, context: Tensor, penalty: float) -> Tensor:
    """Make the tokens of the context less likely (CTRL's repetition penalty): their positive logits are divided
    by the penalty and their negative ones multiplied by it."""
    seen = context.unique()
    logits = logits.clone()
    logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
    return logits


def top_k_top_p(logits: Tensor, temperature: float, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """The tokens worth sampling and their probabilities: the top_k most likely at this temperature, then of those
    the fewest whose probabilities add up to top_p (nucleus sampling; the most likely token always stays). Below
    GREEDY_BELOW_TEMPERATURE, the most likely token alone."""
    if temperature < GREEDY_BELOW_TEMPERATURE:
        return logits.argmax(-1, keepdim=True), torch.ones(1, device=logits.device)
    values, tokens = (logits.float() / temperature).topk(top_k)
    probabilities = values.softmax(-1)
    more_likely_mass = probabilities.cumsum(-1) - probabilities
    probabilities = probabilities.masked_fill(more_likely_mass >= top_p, 0.0)
    return tokens, probabilities / probabilities.sum()


def sample_token(logits: Tensor, context: Tensor, temperature: float, top_k: int, top_p: float,
                 repeat_penalty: float) -> int:
    """One token drawn from a row of logits (see penalize_repeats and top_k_top_p); context: the tokens seen."""
    if repeat_penalty != 1.0:
        logits = penalize_repeats(logits, context, repeat_penalty)
    candidates, probabilities = top_k_top_p(logits, temperature, top_k, top_p)
    return candidates[torch.multinomial(probabilities, 1)].item()


def check_cache_memory(model: LightGPT, sequences: int, capacity: int, what: str, remedy: str) -> None:
    """Raise a one-line ValueError, before anything is allocated, when a key/value cache of `sequences` rows of
    `capacity` tokens exceeds the memory free on the model's device: a checkpoint's block_size is read from its
    file, and one of 10**12 asked for 512 TB. what: what needs the cache; remedy: what to change."""
    config, weight = model.config, model.token_embeddings.weight
    needed = kv_cache_bytes(config.num_layers, config.embedding_dimensions, config.num_heads, config.num_kv_heads,
                            sequences, capacity, weight.element_size())
    available = available_memory(weight.device)
    if needed > available:
        raise ValueError(f"{what} needs a key/value cache of about {gigabytes(needed)}, more than the "
                         f"{gigabytes(available)} available on {weight.device}; {remedy}")


class CachedContext:
    """The tokens a model sees, one sequence a row, with their key/value cache and the next token's logits.

    The model sees at most block_size tokens: a longer prompt is cut to its last block_size tokens, and when the
    context outgrows block_size, only its most recent half is kept and the cache is rebuilt from it, so that the
    next block_size / 2 tokens again cost one single-token pass each. Without a cache every step is a full
    forward pass over the context, the slow baseline.
    """

    def __init__(self, model: LightGPT, prompt: Tensor, block_size: int, max_tokens: int, use_cache: bool = True):
        """prompt: (batch, length) token ids; max_tokens: how many tokens will follow, to size the cache."""
        self.model, self.block_size = model, block_size
        self.tokens = prompt[:, -block_size:]  # (batch, at most block_size)
        capacity = min(block_size, self.tokens.size(1) + max_tokens)
        if use_cache:
            check_cache_memory(model, len(self.tokens), capacity, f"a context of {capacity:,} tokens (the prompt and "
                               f"those to generate)", "generate fewer tokens (--max_tokens)")
        self.cache = model.new_cache(len(self.tokens), capacity) if use_cache else None
        self.logits = model.next_token_logits(self.tokens, self.cache)  # (batch, vocabulary)

    def extend(self, new_tokens: Tensor, rows: Tensor | None = None) -> Tensor:
        """Continue each row with one new token (after keeping the rows at `rows`, in that order, if given: the
        surviving beams); the next token's logits."""
        if rows is not None:
            self.tokens = self.tokens[rows]
        self.tokens = torch.cat((self.tokens, new_tokens[:, None]), 1)  # (batch, length + 1)
        if self.cache is not None and self.tokens.size(1) <= self.block_size:
            if rows is not None:
                for layer in self.cache:
                    layer.reorder(rows)
            self.logits = self.model.next_token_logits(new_tokens[:, None], self.cache)
            return self.logits
        if self.tokens.size(1) > self.block_size:
            self.tokens = self.tokens[:, -((self.block_size + 1) // 2):]  # (batch, the most recent half)
        if self.cache is not None:
            self.cache = self.model.new_cache(len(self.tokens), self.block_size)
        self.logits = self.model.next_token_logits(self.tokens, self.cache)
        return self.logits


@torch.no_grad()
def generate(
    model: LightGPT,
    prompt: Tensor,
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int = 500,
    top_p: float = 0.9,
    repeat_penalty: float = 1.0,
    block_size: int = 1024,
    use_cache: bool = True,
    stop_tokens: Collection[int] | None = None,
) -> Iterator[int]:
    """Sample up to max_tokens tokens that follow the prompt (a 1-D tensor of at least one token id), yielding
    each as soon as it is chosen; stop at any of stop_tokens (by default the model's eos_index), which is not
    yielded. The context is cut as CachedContext cuts it; use_cache=False runs the same steps with a full forward
    pass for every token."""
    stop_tokens = {model.eos_index} if stop_tokens is None else set(stop_tokens)
    context = CachedContext(model, prompt[None], block_size, max_tokens, use_cache)
    for _ in range(max_tokens):
        token = sample_token(context.logits[0], context.tokens[0], temperature, top_k, top_p, repeat_penalty)
        if token in stop_tokens:
            return
        yield token
        context.extend(torch.tensor([token], device=prompt.device))


@torch.no_grad()
def beam_search(
    model: LightGPT,
    prompt: Tensor,
    max_tokens: int,
    beam_width: int = 16,
    num_candidates: int = 3,
    length_penalty: float = 1.0,
    block_size: int = 1024,
    show_progress: bool = False,
    stop_tokens: Collection[int] | None = None,
) -> list[tuple[list[int], float]]:
    """The num_candidates most likely continuations of the prompt (new tokens only), best first, with scores.

    All beams run as one batch against one cache: every step extends each of the beam_width most likely
    unfinished sequences by every token, keeps the beam_width most likely results, and finishes a sequence at
    any of stop_tokens (by default the model's eos_index; scored by the probability of any of them, which is not
    among its tokens) or at max_tokens. A score is the total log-probability divided
    by the length (eos included) to the power length_penalty: 0 ranks by probability alone, 1 by the average
    per token, which favours longer sequences more. The context is cut as CachedContext cuts it. show_progress
    draws a progress bar of the steps on standard error.
    """
    stops = torch.tensor(sorted({model.eos_index} if stop_tokens is None else set(stop_tokens)),
                         device=prompt.device)
    context = CachedContext(model, prompt[None], block_size, max_tokens)
    sequences = prompt.new_empty(1, 0)  # (beams, tokens generated so far)
    totals = torch.zeros(1, device=prompt.device)
    logits = context.logits
    finished: list[tuple[list[int], float]] = []

    def finish(sequences: Tensor, totals: Tensor, length: int) -> None:
        finished.extend((sequence, total / length**length_penalty)
                        for sequence, total in zip(sequences.tolist(), totals.tolist()))

    steps = tqdm(range(1, max_tokens + 1), desc="Beam search", unit="token", leave=False, disable=not show_progress)
    for length in steps:
        scores = totals[:, None] + logits.float().log_softmax(-1)  # (beams, vocabulary)
        finish(sequences, scores[:, stops].logsumexp(-1), length)
        scores[:, stops] = -math.inf
        totals, indices = scores.view(-1).topk(min(beam_width, scores.numel() - len(scores) * len(stops)))
        beams, tokens = indices // model.vocabulary_size, indices % model.vocabulary_size
        sequences = torch.cat((sequences[beams], tokens[:, None]), 1)
        if length == max_tokens:
            finish(sequences, totals, length)
        finished = sorted(finished, key=lambda candidate: candidate[1], reverse=True)[:num_candidates]
        if length == max_tokens or len(totals) == 0:
            break
        # A sequence only loses log-probability as it grows, which bounds the best score a live beam can reach.
        best_reachable = totals[0].item() / max((length + 1) ** length_penalty, max_tokens**length_penalty)
        if len(finished) == num_candidates and finished[-1][1] >= best_reachable:
            break
        logits = context.extend(tokens, rows=beams)
    return finished


class ChatSession:
    """A conversation with a model whose key/value cache is kept across turns: a new turn feeds only the end of
    the last reply, the new user message and the assistant's header. When the conversation would outgrow the
    context, its oldest turns (never the system message) are dropped and the cache is rebuilt once.

    reply_room: the tokens kept free for each reply (at most half the context), when dropping turns makes room; a
    message that leaves less room, but some, gets a shorter reply: the context bounds every reply.
    """

    def __init__(self, model: LightGPT, template: PromptTemplate, block_size: int, system: str | None = None,
                 reply_room: int = 256):
        self.model, self.template, self.block_size = model, template, block_size
        self.stop_tokens = {model.eos_index, *template.stop_tokens}
        self.reply_room = min(reply_room, block_size // 2)
        self.reset(system)

    def reset(self, system: str | None = None) -> None:
        """Start a new conversation, with a system message when one is given; a one-line ValueError, the
        conversation unchanged, when the system message leaves no room for a message and a reply."""
        messages = [{"role": "system", "content": system}] if system else []
        if system and len(self.template.prompt([*messages, {"role": "user", "content": ""}])) >= self.block_size:
            raise ValueError(f"the system message is {len(self.template.prompt(messages))} tokens with the template's, "
                             f"which leaves no room for a message and a reply in the {self.block_size}-token context")
        self.messages = messages
        self.tokens: list[int] = []  # the tokens in the cache
        self.unfed: list[int] = []  # the tokens that follow them, not yet in the cache
        self.cache = None
        self.rebuilds = 0

    def restart(self, messages: list[dict]) -> None:
        """Continue a conversation from its messages with an empty cache, as a server that keeps none would."""
        self.messages = list(messages)
        self.tokens, self.unfed, self.cache = [], self.template.render(self.messages)[0], None

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    @torch.no_grad()
    def feed(self) -> Tensor:
        """Put the unfed tokens into the cache (all of them again if a feed was interrupted); the next logits."""
        if self.cache is None:
            self.cache = self.model.new_cache(1, self.block_size)
            self.unfed, self.tokens = self.tokens + self.unfed, []
        cache, self.cache = self.cache, None  # an interrupted feed leaves no half-filled cache behind
        logits = self.model.next_token_logits(torch.tensor([self.unfed], device=self.device), cache)[0]
        self.cache, self.tokens, self.unfed = cache, self.tokens + self.unfed, []
        return logits

    @property
    def device(self) -> torch.device:
        return self.model.token_embeddings.weight.device

    def add_user_message(self, text: str) -> None:
        """The user's turn and the assistant's header, after dropping the oldest turns if they would not fit."""
        message = {"role": "user", "content": text}
        self.messages.append(message)
        new = self.template.prompt([message])
        if len(self.tokens) + len(self.unfed) + len(new) + self.reply_room <= self.block_size:
            self.unfed += new
            return
        first = 1 if self.system is not None else 0
        while len(self.template.prompt(self.messages)) + self.reply_room > self.block_size and \
                len(self.messages) - first > 1:
            del self.messages[first]
            while self.messages[first]["role"] != "user":  # a turn starts with the user
                del self.messages[first]
        if (length := len(self.template.prompt(self.messages))) >= self.block_size:  # less room is a shorter reply
            self.messages.pop()
            raise ValueError(f"the message is too long: the prompt is {length} tokens"
                             f"{' with the system message' if first else ''}, which leaves no room for a reply in "
                             f"the {self.block_size}-token context")
        self.tokens, self.unfed, self.cache = [], self.template.prompt(self.messages), None
        self.rebuilds += 1

    def reply(self, text: str, max_tokens: int, temperature: float = 1.0, top_k: int = 500, top_p: float = 0.9,
              repeat_penalty: float = 1.0) -> Iterator[int]:
        """The assistant's reply to the user's text, a token at a time as it is sampled, until a stop token, the
        end of the context or max_tokens. Stopping early (closing the iterator) keeps what was said."""
        self.add_user_message(text)
        said: list[int] = []
        try:
            for _ in range(max_tokens):
                if len(self.tokens) + len(self.unfed) >= self.block_size:
                    break
                logits = self.feed()
                token = sample_token(logits, torch.tensor(self.tokens, device=self.device), temperature, top_k,
                                     top_p, repeat_penalty)
                if token in self.stop_tokens:
                    break
                said.append(token)
                self.unfed.append(token)
                yield token
        finally:
            self.unfed += self.template.reply_end()
            self.messages.append({"role": "assistant", "content": chat_tokenizer().decode(said)})

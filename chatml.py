"""ChatML: conversations as <|im_start|>{role}\\n{content}<|im_end|>\\n, with two special tokens after r50k's 50,257.

The template follows the PromptTemplate contract of the house (render, prompt, stop_tokens, to_dict, from_dict), so
that it can join the other templates where they live.
"""

import functools

import tiktoken

from data import encode_prompt, load_tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IM_START_ID, IM_END_ID = 50257, 50258
CHAT_VOCABULARY_SIZE = 50259
ROLES = ("system", "user", "assistant")

# The same text as ChatML.render, in the HuggingFace convention (tokenizer_config.json's chat_template).
JINJA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@functools.cache
def chat_tokenizer() -> tiktoken.Encoding:
    """r50k_base with <|im_start|> and <|im_end|> after its 50,257 tokens (tiktoken's documented way to extend an
    encoding); <|endoftext|> keeps 50256 and stays the padding."""
    base = load_tokenizer()
    return tiktoken.Encoding(
        name=f"{base.name}_chatml",
        pat_str=base._pat_str,
        mergeable_ranks=base._mergeable_ranks,
        special_tokens={**base._special_tokens, IM_START: IM_START_ID, IM_END: IM_END_ID},
    )


class ChatML:
    """Messages {"role", "content"} as ChatML token ids; the loss covers each assistant's content and its
    <|im_end|>, nothing of the system and user turns, nor any header."""

    name = "chatml"
    stop_tokens = (IM_END_ID, 50256)
    vocabulary_size = CHAT_VOCABULARY_SIZE

    def __init__(self):
        self.tokenizer = chat_tokenizer()
        self.end_of_message = [IM_END_ID, *self.tokenizer.encode_ordinary("\n")]

    def header(self, role: str) -> list[int]:
        return [IM_START_ID, *self.tokenizer.encode_ordinary(f"{role}\n")]

    def message(self, message: dict) -> tuple[list[int], list[bool]]:
        """One message's ids, and per id whether the loss counts there."""
        header, content = self.header(message["role"]), self.tokenizer.encode_ordinary(message["content"])
        learned = message["role"] == "assistant"
        ids = header + content + self.end_of_message
        mask = [False] * len(header) + [learned] * (len(content) + 1) + [False] * (len(self.end_of_message) - 1)
        return ids, mask

    def render(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """The ids of the whole conversation, and per id whether the loss counts there."""
        ids, mask = [], []
        for message in messages:
            message_ids, message_mask = self.message(message)
            ids += message_ids
            mask += message_mask
        return ids, mask

    def prompt(self, messages: list[dict]) -> list[int]:
        """The conversation so far, then the opening of the next assistant reply."""
        return self.render(messages)[0] + self.header("assistant")

    def to_dict(self) -> dict:
        return {"name": self.name, "special_tokens": {IM_START: IM_START_ID, IM_END: IM_END_ID},
                "vocabulary_size": CHAT_VOCABULARY_SIZE}

    @classmethod
    def from_dict(cls, recorded: dict) -> "ChatML":
        if recorded != cls().to_dict():
            raise ValueError(f"not the ChatML template this LightGPT writes: {recorded!r}"[:300])
        return cls()


def chat_template(recorded: dict | None) -> ChatML | None:
    """The ChatML template an adapter or exported config records, or None for Alpaca's (and no template)."""
    if isinstance(recorded, dict) and recorded.get("name") == ChatML.name:
        return ChatML.from_dict(recorded)
    return None


def encode_request(text: str, recorded: dict | None) -> tuple[list[int], tuple[int, ...] | None, tiktoken.Encoding]:
    """A prompt of generate.py or beam_search.py under the template an adapter records: under ChatML one user
    turn and the assistant's header, ended by the template's stop tokens; else Alpaca's prompt (or the bare text),
    ended by the model's own end of text (None). Also the tokenizer that decodes the answer."""
    template = chat_template(recorded)
    if template is None:
        return encode_prompt(text, recorded), None, load_tokenizer()
    return template.prompt([{"role": "user", "content": text}]), template.stop_tokens, template.tokenizer


def tokenizer_config(block_size: int) -> dict:
    """An exported chat model's tokenizer_config.json, in the HuggingFace convention: its chat_template renders
    the text ChatML.render tokenizes."""
    return {
        "chat_template": JINJA_CHAT_TEMPLATE,
        "additional_special_tokens": [IM_START, IM_END],
        "eos_token": IM_END,
        "pad_token": "<|endoftext|>",
        "model_max_length": block_size,
    }

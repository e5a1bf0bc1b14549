"""Conversations: instruction records, prompt templates that turn messages into token ids and loss masks,
tokenized samples, and the prompts a user types."""

import json
import re
import string
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from files import resolve_files
from tokenizer import END_OF_TEXT, END_OF_TEXT_ID, IM_END, IM_END_ID, IM_START, chat_tokenizer, load_tokenizer

# The instruction datasets (instruction-tune.py --dataset) and the license of their text (None: the user's own).
# Each instruction and chat dataset, and its license (chats.py reads all but alpaca's).
INSTRUCTION_DATASETS = {"alpaca": "CC BY-NC 4.0", "chitchat": "MIT", "smol-smoltalk": "Apache 2.0",
                        "smoltalk": "Apache 2.0", "ultrafeedback": "MIT", "local": None}
INSTRUCTION_EXTENSIONS = (".json", ".jsonl")
INSTRUCTION_TEST_RATIO = 0.05
ROLES = ("system", "user", "assistant")

# A message is {"role": one of ROLES, "content": str}; a template may name further fields of a message in its
# formats (Alpaca's user message has an "input").
Message = dict[str, str]


@dataclass(frozen=True)
class PromptTemplate:
    """How a conversation becomes token ids: each system or user message through the first of its role's formats
    whose fields the message fills, and each assistant reply as reply_opening (not learned), then its content and
    reply_closing (learned). The template's own text may hold the tokenizer's special tokens (<|endoftext|>);
    what a message says never becomes one. Text between special tokens is encoded as one string, so that a
    template joins its words to a message's as one text would.

    Args:
        name: what the template is called, for messages and model cards.
        turns: each role but the assistant's, its formats in order of preference ({content} and further fields).
        reply_opening: the text before every assistant reply, which the prompt ends with.
        reply_closing: the text after every assistant reply, learned with it (it teaches the model to stop).
        stop_tokens: the token ids that end a reply in generation.
        reply_separator: the text after a reply's closing, not learned (ChatML's newline after <|im_end|>).
    """

    name: str
    turns: dict[str, tuple[str, ...]]
    reply_opening: str
    reply_closing: str
    stop_tokens: tuple[int, ...]
    reply_separator: str = ""

    def render(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        """The conversation's token ids, and for each whether the loss counts there (the assistant's replies and
        their closings)."""
        return encode_pieces(self.pieces(messages))

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """The ids of the conversation so far followed by the opening of the next assistant reply."""
        return encode_pieces([*self.pieces(messages), (self.reply_opening, False, True)])[0]

    def pieces(self, messages: Sequence[Message]) -> list[tuple[str, bool, bool]]:
        """The conversation as (text, learned, is the template's own text) pieces."""
        pieces = []
        for message in messages:
            if message["role"] == "assistant":
                pieces += [(self.reply_opening, False, True), (message["content"], True, False),
                           (self.reply_closing, True, True), (self.reply_separator, False, True)]
            else:
                pieces += [(text, False, own) for text, own in self.filled(message)]
        return pieces

    def filled(self, message: Message) -> list[tuple[str, bool]]:
        """A system or user message in the first of its role's formats whose fields (but content, which may be
        empty) it fills, as (text, is the template's own text) pieces."""
        formats = self.turns.get(message["role"])
        if not formats:
            raise ValueError(f"the {self.name} template has no format for a {message['role']!r} message")
        for form in formats:
            parts = list(string.Formatter().parse(form))
            if all(message.get(field) for _, field, _, _ in parts if field and field != "content"):
                pieces = []
                for literal, field, _, _ in parts:
                    pieces.append((literal, True))
                    if field:
                        pieces.append((message[field], False))
                return pieces
        raise ValueError(f"a {message['role']} message with the fields {', '.join(message)} fits none of the "
                         f"{self.name} template's formats")

    def renders_chats(self) -> bool:
        """Whether it renders whole conversations, with a format for system and user messages (ChatML does;
        Alpaca's renders an instruction)."""
        return {"system", "user"} <= self.turns.keys()

    def reply_end(self) -> list[int]:
        """The ids that close a reply and separate it from the next message (what follows a generated reply)."""
        return encode_pieces([(self.reply_closing, True, True), (self.reply_separator, False, True)])[0]

    def check_vocabulary(self, vocabulary_size: int) -> None:
        """Raise a one-line ValueError when a token id of the template, a stop token or a special token of its own
        text (<|im_start|>), is beyond the model's vocabulary: the model could never write or read it. Its end of
        text is always allowed: every template held it, also those of the tiny models of older tests' files."""
        own_text = [*(form for forms in self.turns.values() for form in forms), self.reply_opening,
                    self.reply_closing, self.reply_separator]
        special = [id for id in encode_pieces([(text, False, True) for text in own_text])[0] if id > END_OF_TEXT_ID]
        for what, ids in (("stop_tokens hold", self.stop_tokens), ("text holds", special)):
            if beyond := [id for id in ids if id >= vocabulary_size and id != END_OF_TEXT_ID]:
                raise ValueError(f"its prompt template's {what} token id {beyond[0]}, beyond the model's "
                                 f"vocabulary of {vocabulary_size} tokens (ids 0 to {vocabulary_size - 1})")

    def to_dict(self) -> dict:
        """What adapters and exported configurations store (plain lists and strings; from_dict reads it)."""
        saved = {"name": self.name, "turns": {role: list(forms) for role, forms in self.turns.items()},
                 "reply_opening": self.reply_opening, "reply_closing": self.reply_closing,
                 "stop_tokens": list(self.stop_tokens)}
        return saved | ({"reply_separator": self.reply_separator} if self.reply_separator else {})

    @classmethod
    def from_dict(cls, saved) -> "PromptTemplate":
        """A template from to_dict's form, or a one-line ValueError that says what is wrong with it."""
        fields = ("name", "turns", "reply_opening", "reply_closing", "stop_tokens")
        if not isinstance(saved, dict) or set(saved) - {"reply_separator"} != set(fields):
            found = ", ".join(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"a prompt template must have the fields {', '.join(fields)} (found: {found})")
        turns = saved["turns"]
        if not isinstance(turns, dict) or not set(turns) <= {"system", "user"} or not all(
                isinstance(forms, list) and forms and all(isinstance(form, str) for form in forms)
                for forms in turns.values()):
            raise ValueError(f"a prompt template's turns must map system or user to a list of format strings, "
                             f"got {str(turns)[:100]}")
        for forms in turns.values():
            for form in forms:
                try:
                    parts = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(form)
                             if field is not None]
                except ValueError as error:
                    raise ValueError(f"a prompt template's format {form[:60]!r} is not a format string "
                                     f"({error})") from None
                names = [field for field, _, _ in parts]
                if "content" not in names or not all(name.isidentifier() and not spec and not conversion
                                                     for name, spec, conversion in parts):
                    raise ValueError(f"a prompt template's format {form[:60]!r} must name {{content}}, and only "
                                     f"plain fields")
        for name in ("name", "reply_opening", "reply_closing", "reply_separator"):
            if not isinstance(saved.get(name, ""), str):
                raise ValueError(f"a prompt template's {name} must be a string, got {saved[name]!r}")
        stops = saved["stop_tokens"]
        if not isinstance(stops, list) or not stops or not all(type(id) is int and id >= 0 for id in stops):
            raise ValueError(f"a prompt template's stop_tokens must be a list of token ids, got {stops!r}")
        return cls(saved["name"], {role: tuple(forms) for role, forms in turns.items()}, saved["reply_opening"],
                   saved["reply_closing"], tuple(stops), saved.get("reply_separator", ""))


def encode_pieces(pieces: list[tuple[str, bool, bool]]) -> tuple[list[int], list[bool]]:
    """Encode (text, learned, is the template's own text) pieces: the template's special tokens become their ids,
    and the text between them (of the same learned flag) is encoded as one string."""
    tokenizer = chat_tokenizer()  # r50k_base's ids, and ChatML's two tokens for a template's own text
    special = re.compile("(" + "|".join(map(re.escape, sorted(tokenizer.special_tokens_set))) + ")")
    ids: list[int] = []
    learned: list[bool] = []
    text, text_learned = "", False

    def flush() -> None:
        nonlocal text
        tokens = tokenizer.encode_ordinary(text)
        ids.extend(tokens)
        learned.extend([text_learned] * len(tokens))
        text = ""

    for piece, is_learned, own in pieces:
        if is_learned != text_learned:
            flush()
            text_learned = is_learned
        for index, part in enumerate(special.split(piece) if own else [piece]):
            if index % 2:  # split puts the special tokens it matched at odd positions
                flush()
                ids.append(tokenizer.encode_single_token(part))
                learned.append(is_learned)
            else:
                text += part
    flush()
    return ids, learned


# Alpaca's own template, token for token as the original Alpaca code formats it.
ALPACA = PromptTemplate(
    name="alpaca",
    turns={"user": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{content}\n\n### Input:\n{input}\n\n",
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{content}\n\n",
    )},
    reply_opening="### Response:\n",
    reply_closing="<|endoftext|>",
    stop_tokens=(END_OF_TEXT_ID,),
)

# ChatML as litgpt, torchtune and SmolLM2 write it; the loss covers each reply and its <|im_end|>, not the newline.
CHATML = PromptTemplate(
    name="chatml",
    turns={role: (f"{IM_START}{role}\n{{content}}{IM_END}\n",) for role in ("system", "user")},
    reply_opening=f"{IM_START}assistant\n",
    reply_closing=IM_END,
    stop_tokens=(IM_END_ID, END_OF_TEXT_ID),
    reply_separator="\n",
)
# The text CHATML renders, in the HuggingFace convention (an export's tokenizer_config.json chat_template).
JINJA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def is_chat(template: PromptTemplate | None) -> bool:
    """Whether a template is ChatML, whose models have the two chat tokens."""
    return template is not None and template.name == CHATML.name


def tokenizer_config(block_size: int) -> dict:
    """A chat model's tokenizer_config.json in the HuggingFace convention, with a chat_template that renders the
    text CHATML tokenizes."""
    return {"chat_template": JINJA_CHAT_TEMPLATE, "additional_special_tokens": [IM_START, IM_END],
            "eos_token": IM_END, "pad_token": END_OF_TEXT, "model_max_length": block_size}


def stop_tokens(template: PromptTemplate | None, eos_index: int) -> set[int]:
    """Where a reply ends: at the model's end of text, and at the template's stop tokens."""
    return {eos_index, *(template.stop_tokens if template else ())}


def record_messages(record: dict[str, str]) -> list[Message]:
    """An instruction record as a conversation: the instruction (with its input) and the response."""
    return [{"role": "user", "content": record["instruction"], "input": record.get("input") or ""},
            {"role": "assistant", "content": record["output"]}]


def hub_dataset(name: str, alternative: str, **options):
    """The train split of a HuggingFace hub dataset, or a one-line ConnectionError that offers an alternative."""
    import datasets

    try:
        return datasets.load_dataset(name, split="train", **options)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as error:
        raise ConnectionError(
            f"--dataset: the HuggingFace hub could not be reached for {name} ({type(error).__name__}); {alternative}"
        ) from None




def checked_record(record, where: str) -> dict[str, str]:
    """An Alpaca record ({instruction, optional input, output}, all strings), or a ValueError naming it."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not a JSON object with instruction and output fields")
    for field in ("instruction", "output"):
        if field not in record:
            raise ValueError(f"{where} has no {field!r} field (found: {', '.join(record) or 'none'})")
    for field in ("instruction", "input", "output"):
        optional = field == "input" and record.get(field) is None  # a missing or null input is an empty one
        if not optional and not isinstance(record[field], str):
            got = "null" if record[field] is None else type(record[field]).__name__
            raise ValueError(f"{where}: {field!r} must be a string, got {got}")
    return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}


def json_records(path: Path) -> list[tuple[str, object]]:
    """The records of a .jsonl file (one a line) or a .json list, each with where it is ("FILE: line N" or
    "FILE: record N"); a file that is not UTF-8 JSON is a ValueError naming the line."""
    data = path.read_bytes()
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(data.split(b"\n"), start=1):
            where = f"{path}: line {number}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where} is not UTF-8 (byte {line[error.start]:#04x} at column {error.start + 1}); "
                                 f"save the file as UTF-8") from None
            if text.strip():
                try:
                    records.append((where, json.loads(text)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where} is not valid JSON ({error.msg})") from None
        return records
    try:
        loaded = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 (byte {data[error.start]:#04x}); save the file as "
                         f"UTF-8") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno} is not valid JSON ({error.msg})") from None
    if not isinstance(loaded, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a JSON {type(loaded).__name__}")
    return [(f"{path}: record {number}", record) for number, record in enumerate(loaded, start=1)]


def read_instruction_file(path: Path) -> list[dict[str, str]]:
    """A JSON list of records (Alpaca's alpaca_data.json) or JSON lines, one record a line, in UTF-8."""
    return [checked_record(record, where) for where, record in json_records(path)]


def load_instructions(dataset: str, dataset_path: str | None = None) -> list[dict[str, str]]:
    """Instruction/response records from the hub (alpaca) or from local .json/.jsonl files (local)."""
    if dataset == "alpaca":
        records = hub_dataset(
            "tatsu-lab/alpaca", "use your own files: --dataset local --dataset_path FILE.json (see the README)"
        )
        return [checked_record(record, f"tatsu-lab/alpaca: record {number}")
                for number, record in enumerate(records, start=1)]
    if dataset == "local":
        if not dataset_path:
            raise ValueError("--dataset_path: required with --dataset local (a .json or .jsonl file, a folder or a "
                             "glob)")
        files = resolve_files(dataset_path, INSTRUCTION_EXTENSIONS, "--dataset_path")
        return [record for file in files for record in read_instruction_file(file)]
    raise ValueError(f"--dataset: unknown instruction dataset {dataset!r}; choose from "
                     f"{', '.join(INSTRUCTION_DATASETS)}")


def split_instructions(records: list, dataset: str) -> tuple[list, list]:
    """About 5% of the records, at least one, held out for validation; the same ones on every run. dataset: the
    flags that chose them, for the one line that says there are too few."""
    if len(records) < 2:
        raise ValueError(f"{dataset}: {len(records)} record{'s' * (len(records) != 1)}, where at least 2 are "
                         f"needed (one is held out for validation)")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()
    num_test = max(1, round(INSTRUCTION_TEST_RATIO * len(records)))
    return [records[index] for index in order[num_test:]], [records[index] for index in order[:num_test]]


def tokenize_instruction(
    record: dict[str, str], template: PromptTemplate, block_size: int, mask_input: bool, padding_index: int
) -> tuple[list[int], list[int], bool]:
    """tokenize_conversation of an instruction record (its instruction, input and response)."""
    return tokenize_conversation(record_messages(record), template, block_size, mask_input, padding_index)


def tokenize_conversation(
    messages: Sequence[Message], template: PromptTemplate, block_size: int, mask_input: bool, padding_index: int
) -> tuple[list[int], list[int], bool]:
    """Inputs x and targets y of one sample, and whether it was truncated.

    Each reply ends with the template's reply closing. With mask_input the targets of all but the replies are
    padding_index, so only the replies are learned. A sample longer than block_size loses its start, never its
    last reply's end.
    """
    tokens, learned = template.render(messages)
    labels = [token if is_learned or not mask_input else padding_index for token, is_learned in zip(tokens, learned)]
    truncated = len(tokens) > block_size + 1
    tokens, labels = tokens[-(block_size + 1):], labels[-(block_size + 1):]
    return tokens[:-1], labels[1:], truncated


class ConversationSamples:
    """Tokenized conversations (lists of messages), batched with right padding that never enters the loss."""

    rows_per_sample = 1

    def __init__(
        self,
        conversations: list[list[Message]],
        template: PromptTemplate,
        block_size: int,
        mask_input: bool,
        padding_index: int,
        show_progress: bool = True,
        what: str = "conversations",
    ):
        from tqdm import tqdm

        self.padding_index = padding_index
        self.samples = []
        self.num_truncated = 0
        for messages in tqdm(conversations, desc=f"Tokenizing {what}", unit="sample", disable=not show_progress):
            x, y, truncated = tokenize_conversation(messages, template, block_size, mask_input, padding_index)
            self.samples.append((torch.tensor(x), torch.tensor(y)))
            self.num_truncated += truncated

    def __len__(self) -> int:
        return len(self.samples)

    def largest_batch(self, batch_size: int) -> tuple[int, int]:
        """The shape (rows, tokens) that batch() can reach with batch_size samples: every row as long as the
        longest sample."""
        return self.rows_per_sample * min(batch_size, len(self)), max(len(x) for x, _ in self.samples)

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Samples padded on the right: x with <|endoftext|>, y with padding_index. The causal mask keeps the
        padding, which comes after every real token, from changing any real token's logits."""
        length = max(len(self.samples[index][0]) for index in indices)
        x = torch.full((len(indices), length), load_tokenizer().eot_token)
        y = torch.full((len(indices), length), self.padding_index)
        for row, index in enumerate(indices):
            sample_x, sample_y = self.samples[index]
            x[row, : len(sample_x)] = sample_x
            y[row, : len(sample_y)] = sample_y
        return x, y


class InstructionSamples(ConversationSamples):
    """Tokenized instruction records (see ConversationSamples)."""

    def __init__(self, records: list[dict[str, str]], template: PromptTemplate, block_size: int, mask_input: bool,
                 padding_index: int, show_progress: bool = True):
        super().__init__([record_messages(record) for record in records], template, block_size, mask_input,
                         padding_index, show_progress, what="instructions")


def read_prompts(prompt: str | None) -> Iterator[str]:
    """The texts to complete: the one given, else one per line typed at a terminal (until Ctrl-D), else one per
    line of standard input, so that a script can pipe prompts in."""
    if prompt is not None:
        yield prompt
    elif not sys.stdin.isatty():
        for line in sys.stdin:
            yield line.rstrip("\n")
    else:
        while True:
            try:
                yield input("Prompt (Ctrl-D to quit): ")
            except EOFError:
                print()
                return


def encode_prompt(text: str, template: PromptTemplate | None = None) -> list[int]:
    """A prompt's tokens: the user's message in a template, then the opening of the reply, if a template is given
    (an adapter's); else the text alone, and an empty one as the end-of-text token, which comes before every
    training document."""
    if template is not None:
        return template.prompt([{"role": "user", "content": text}])
    tokenizer = load_tokenizer()
    return tokenizer.encode_ordinary(text) or [tokenizer.eot_token]

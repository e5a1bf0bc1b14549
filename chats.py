"""Chat data: conversations of {"role", "content"} messages from chitchat (offline), the HuggingFace hub (streamed
through datasets) or local JSON lines, checked, and cut to a context at a turn boundary."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path


from conversations import (
    INSTRUCTION_EXTENSIONS,
    ROLES,
    PromptTemplate,
    ConversationSamples,
    checked_record,
    json_records,
    load_instructions,
)
from corpora import hub_failure
from files import resolve_files
from tokenizer import package_data_path

OFFLINE_CHAT_DATASETS = ("chitchat", "local")
MAX_HELD_OUT = 500  # hub test splits run to tens of thousands; validation every epoch needs only a sample


@dataclass(frozen=True)
class HubChats:
    """A chat dataset on the hub whose 'messages' column holds conversations."""

    repository: str
    train_split: str = "train"
    test_split: str = "test"
    default_subset: str | None = None


HUB_CHATS = {
    "smol-smoltalk": HubChats("HuggingFaceTB/smol-smoltalk"),
    "smoltalk": HubChats("HuggingFaceTB/smoltalk", default_subset="all"),
    "ultrafeedback": HubChats("HuggingFaceH4/ultrafeedback_binarized", "train_sft", "test_sft"),
}
CHAT_DATASETS = ("chitchat", *HUB_CHATS)

Conversation = list[dict[str, str]]


def conversation_problem(messages) -> str | None:
    """What keeps a record's 'messages' from being a conversation: a list of {role, content} with known roles,
    string contents and at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        return "has an empty conversation (its 'messages' is not a non-empty list)"
    if problem := message_problem(messages):
        return problem
    if not any(message["role"] == "assistant" for message in messages):
        return "has no assistant turn, so nothing to learn"
    return None


def message_problem(messages: list) -> str | None:
    """What keeps a list from being messages: each a {role, content} with a known role and a string content."""
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"message {number} has no 'role' or no 'content' (each needs both)"
        if message["role"] not in ROLES:
            return f"message {number} has the unknown role {message['role']!r} (allowed: {', '.join(ROLES)})"
        if not isinstance(message["content"], str):
            return f"message {number}'s content is a {type(message['content']).__name__}, not a string"
    return None


def checked_conversation(record, where: str) -> Conversation:
    """The record's messages as {role, content} dicts, or a ValueError naming `where`."""
    problem = conversation_problem(record.get("messages") if isinstance(record, dict) else None)
    if problem:
        raise ValueError(f"{where} {problem}")
    return [{"role": message["role"], "content": message["content"]} for message in record["messages"]]


def chitchat_conversations() -> list[Conversation]:
    """The 4,017 of chitchat-dataset's 7,168 conversations (MIT) that have a reply, read from its data file
    without importing the package. Each conversation is a list of turns, a turn the consecutive messages of one
    sender: the first sender becomes the user, the other the assistant; empty turns are left out and same-sender
    neighbours joined."""
    path = package_data_path("chitchat_dataset", "dataset.json")
    with open(path, encoding="utf-8") as file:
        raw = json.load(file)
    conversations = []
    for chat in raw.values():
        turns: list[tuple[str, str]] = []  # (sender, text)
        for turn in chat["messages"]:
            text = "\n".join(message["text"].strip() for message in turn if message["text"].strip())
            if not text:
                continue
            sender = turn[0]["sender"]
            if turns and turns[-1][0] == sender:
                turns[-1] = (sender, f"{turns[-1][1]}\n{text}")
            else:
                turns.append((sender, text))
        if len(turns) >= 2:
            user = turns[0][0]
            conversations.append([{"role": "user" if sender == user else "assistant", "content": text}
                                  for sender, text in turns])
    return conversations


def hub_conversations(dataset: str, split: str, subset: str | None = None,
                      limit: int | None = None) -> tuple[list[Conversation], int]:
    """A split of a hub chat dataset streamed through datasets, at most `limit` conversations, and how many
    records were skipped as not conversations. Every failure to reach or read the hub is one line
    (data.hub_failure)."""
    import datasets

    chats = HUB_CHATS[dataset]
    subset = subset or chats.default_subset
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retries; offline, hub_failure's one line says all of it
    conversations, skipped = [], 0
    try:
        stream = datasets.load_dataset(chats.repository, subset, split=split, streaming=True,
                                       columns=["messages"])
        for record in stream:
            if conversation_problem(record["messages"]):
                skipped += 1
                continue
            conversations.append([{"role": message["role"], "content": message["content"]}
                                  for message in record["messages"]])
            if limit is not None and len(conversations) >= limit:
                break
    except Exception as error:  # whatever the hub or the connection raises: one line, never a traceback
        raise hub_failure(dataset, chats.repository, error, offline=OFFLINE_CHAT_DATASETS) from None
    finally:
        hub_logger.setLevel(level)
    return conversations, skipped


def read_local_examples(files: list[Path]) -> tuple[str, list]:
    """("chat", conversations) when the files' records hold 'messages', else ("alpaca", Alpaca records); one kind
    for all, decided by the first record."""
    records = [entry for file in files for entry in json_records(file)]
    if not records:
        raise ValueError(f"--dataset_path: {', '.join(map(str, files))} hold(s) no records")
    kind = "chat" if isinstance(records[0][1], dict) and "messages" in records[0][1] else "alpaca"
    check = checked_conversation if kind == "chat" else checked_record
    return kind, [check(record, where) for where, record in records]


def load_examples(dataset: str, dataset_path: str | None = None, subset: str | None = None,
                  ) -> tuple[str, list, list | None]:
    """(kind, training examples, held-out examples or None to hold out some of the training ones): Alpaca records
    (alpaca, or local files of them) or conversations (chitchat, the hub chat datasets, local files of them)."""
    if dataset == "alpaca":
        return "alpaca", load_instructions(dataset), None
    if dataset == "chitchat":
        return "chat", chitchat_conversations(), None
    if dataset == "local":
        if not dataset_path:
            raise ValueError("--dataset_path: required with --dataset local (a .json or .jsonl file, a folder or a "
                             "glob)")
        kind, examples = read_local_examples(resolve_files(dataset_path, INSTRUCTION_EXTENSIONS, "--dataset_path"))
        return kind, examples, None
    chats = HUB_CHATS[dataset]
    train, skipped = hub_conversations(dataset, chats.train_split, subset)
    test, _ = hub_conversations(dataset, chats.test_split, subset, limit=MAX_HELD_OUT)
    if skipped:
        print(f"{skipped:,} records of {chats.repository} are not conversations with an assistant turn; left out")
    return "chat", train, test


def fitting_end(segments: list[list[int]], messages: Conversation, limit: int) -> int | None:
    """How many of the messages (rendered one by one as segments) to keep: up to the last assistant turn that ends
    within `limit` + 1 ids (a sample's inputs are its ids but the last), or None when not even the first does."""
    length, kept = 0, None
    for count, (ids, message) in enumerate(zip(segments, messages), start=1):
        length += len(ids)
        if length > limit + 1:
            break
        if message["role"] == "assistant":
            kept = count
    return kept


class ChatSamples(ConversationSamples):
    """Conversations rendered by a template (the loss on the replies only), each cut after its last assistant turn
    that fits in `limit` input tokens, or dropped when none does; num_cut and num_dropped count both."""

    def __init__(self, conversations: list[Conversation], template: PromptTemplate, limit: int, padding_index: int,
                 show_progress: bool = True):
        kept, self.num_cut, self.num_dropped = [], 0, 0
        for messages in conversations:
            end = fitting_end([template.render([message])[0] for message in messages], messages, limit)
            if end is None:
                self.num_dropped += 1
                continue
            self.num_cut += end < len(messages)
            kept.append(messages[:end])
        super().__init__(kept, template, limit, True, padding_index, show_progress)

"""Preference data: pairs of a prompt and a chosen and a rejected response, from UltraFeedback (streamed from the
HuggingFace hub through datasets) or local JSON lines in TRL's layouts, checked, and tokenized by a template with
only the responses learned."""

import logging
from pathlib import Path

import torch
from torch import Tensor

from chats import MAX_HELD_OUT, message_problem
from conversations import INSTRUCTION_EXTENSIONS, ConversationSamples, Message, PromptTemplate, json_records
from corpora import hub_failure
from files import resolve_files

PREFERENCE_DATASETS = {"ultrafeedback": "MIT", "local": None}  # and the license of their text
ULTRAFEEDBACK = "HuggingFaceH4/ultrafeedback_binarized"
ULTRAFEEDBACK_SPLITS = ("train_prefs", "test_prefs")

Pair = tuple[list[Message], list[Message], list[Message]]  # the prompt, the chosen and the rejected messages


def as_messages(value, role: str) -> list | None:
    """A string as one message of `role`, a list as it is (messages, to check), anything else None."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return value if isinstance(value, list) else None


def checked_pair(record, where: str) -> Pair:
    """A record as (prompt, chosen, rejected) messages, or a one-line ValueError naming `where`.

    TRL's layouts: prompt, chosen and rejected as strings, or as messages (the responses the assistant's); or
    chosen and rejected as whole conversations that begin with the same messages (UltraFeedback's, whose string
    prompt repeats their first message), which are then the prompt, as TRL extracts it."""
    if not isinstance(record, dict) or not {"chosen", "rejected"} <= set(record):
        found = ", ".join(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise ValueError(f"{where} needs the fields chosen and rejected, and prompt unless both begin with it "
                         f"(found: {found or 'none'})")
    responses = {name: as_messages(record[name], "assistant") for name in ("chosen", "rejected")}
    prompt = record.get("prompt")
    for name, value in responses.items():
        if value is None or message_problem(value):
            problem = message_problem(value) if value is not None else "is neither a string nor a list of messages"
            raise ValueError(f"{where}: {name} {problem}")
    chosen, rejected = responses["chosen"], responses["rejected"]
    if isinstance(prompt, list):
        if problem := message_problem(prompt):
            raise ValueError(f"{where}: prompt {problem}")
        chosen, rejected = (messages[len(prompt):] if messages[:len(prompt)] == prompt else messages
                            for messages in (chosen, rejected))
    else:
        common = next((index for index, (first, second) in enumerate(zip(chosen, rejected)) if first != second),
                      min(len(chosen), len(rejected)))
        if common:
            prompt, chosen, rejected = chosen[:common], chosen[common:], rejected[common:]
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        else:
            raise ValueError(f"{where} has no prompt: give a prompt field, or chosen and rejected conversations "
                             f"that begin with it")
    if not prompt:
        raise ValueError(f"{where}: the prompt is empty")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or any(message["role"] != "assistant" for message in messages):
            raise ValueError(f"{where}: the {name} response must be one or more assistant messages after the "
                             f"prompt (found roles: {', '.join(message['role'] for message in messages) or 'none'})")
    return ([dict(role=message["role"], content=message["content"]) for message in prompt],
            [dict(role="assistant", content=message["content"]) for message in chosen],
            [dict(role="assistant", content=message["content"]) for message in rejected])


def read_local_preferences(files: list[Path]) -> list[Pair]:
    """The pairs of .jsonl/.json files, or one ValueError line: the first malformed record, and how many more
    there are (a file may hold millions)."""
    pairs, first_problem, num_malformed = [], None, 0
    for file in files:
        for where, record in json_records(file):
            try:
                pairs.append(checked_pair(record, where))
            except ValueError as error:
                first_problem, num_malformed = first_problem or str(error), num_malformed + 1
    if first_problem:
        more = num_malformed - 1
        raise ValueError(first_problem + (f" (and {more:,} more malformed record{'s' * (more > 1)} in --dataset_path)"
                                          if more else ""))
    if not pairs:
        raise ValueError(f"--dataset_path: {', '.join(map(str, files))} hold(s) no records")
    return pairs


def hub_preferences(split: str, limit: int | None = None) -> tuple[list[Pair], int]:
    """A split of UltraFeedback streamed through datasets, at most `limit` pairs, and how many records were left
    out as not pairs. Every failure to reach or read the hub is one line (corpora.hub_failure)."""
    import datasets

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retries; offline, hub_failure's one line says all of it
    pairs, skipped = [], 0
    try:
        stream = datasets.load_dataset(ULTRAFEEDBACK, split=split, streaming=True,
                                       columns=["prompt", "chosen", "rejected"])
        for number, record in enumerate(stream, start=1):
            try:
                pairs.append(checked_pair(record, f"{ULTRAFEEDBACK} {split}: record {number}"))
            except ValueError:
                skipped += 1
                continue
            if limit is not None and len(pairs) >= limit:
                break
    except Exception as error:  # whatever the hub or the connection raises: one line, never a traceback
        raise hub_failure("ultrafeedback", ULTRAFEEDBACK, error, offline=("local",)) from None
    finally:
        hub_logger.setLevel(level)
    return pairs, skipped


def load_preferences(dataset: str, dataset_path: str | None = None) -> tuple[list[Pair], list[Pair] | None]:
    """(training pairs, held-out pairs or None to hold out some of the training ones)."""
    if dataset == "local":
        if not dataset_path:
            raise ValueError("--dataset_path: required with --dataset local (a .json or .jsonl file, a folder or a "
                             "glob)")
        return read_local_preferences(resolve_files(dataset_path, INSTRUCTION_EXTENSIONS, "--dataset_path")), None
    train, skipped = hub_preferences(ULTRAFEEDBACK_SPLITS[0])
    test, _ = hub_preferences(ULTRAFEEDBACK_SPLITS[1], limit=MAX_HELD_OUT)
    if skipped:
        print(f"{skipped:,} records of {ULTRAFEEDBACK} are not preference pairs; left out")
    return train, test


def response_sample(template: PromptTemplate, prompt: list[Message], response: list[Message], limit: int,
                    padding_index: int) -> tuple[Tensor, Tensor, bool] | None:
    """Inputs and targets of the prompt and a response, the targets padding but on the response (its content and
    closing), the prompt's start cut to fit `limit` inputs, and whether it was; None when the response alone does
    not fit."""
    ids, learned = template.render(prompt + response)
    start = len(template.prompt(prompt))  # where the response's content starts: the prompt renders as a prefix
    if len(ids) - start > limit:
        return None
    labels = [token if counts and index >= start else padding_index
              for index, (token, counts) in enumerate(zip(ids, learned))]
    cut = len(ids) > limit + 1
    ids, labels = ids[-(limit + 1):], labels[-(limit + 1):]
    return torch.tensor(ids[:-1]), torch.tensor(labels[1:]), cut


class PreferenceSamples(ConversationSamples):
    """Pairs as samples 2i (prompt and chosen response) and 2i + 1 (prompt and rejected one); a pair whose
    responses do not fit `limit` tokens is dropped (num_dropped), one with a prompt too long cut (num_cut)."""

    rows_per_sample = 2

    def __init__(self, pairs: list[Pair], template: PromptTemplate, limit: int, padding_index: int,
                 show_progress: bool = True):
        from tqdm import tqdm

        self.padding_index, self.samples = padding_index, []  # ConversationSamples' batching, this tokenization
        self.num_cut = self.num_dropped = 0
        for prompt, chosen, rejected in tqdm(pairs, desc="Tokenizing pairs", unit="pair", disable=not show_progress):
            samples = [response_sample(template, prompt, response, limit, padding_index)
                       for response in (chosen, rejected)]
            if None in samples:
                self.num_dropped += 1
                continue
            self.samples += [(inputs, targets) for inputs, targets, _ in samples]
            self.num_cut += any(cut for _, _, cut in samples)

    def __len__(self) -> int:
        return len(self.samples) // 2

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """Inputs and targets of the pairs, (2 x pairs, sequence): the chosen rows, then the rejected ones."""
        return super().batch([2 * index for index in indices] + [2 * index + 1 for index in indices])

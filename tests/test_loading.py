"""Loading checks what it loads: a checkpoint's, an exported folder's and an adapter's entries, the weights' names,
shapes, dtypes and finiteness, a damaged sharded folder, a damaged metrics log, a corpus file of ids beyond the
vocabulary. Each is refused with one line that names the file and what is wrong, before anything large is built."""

import argparse
import itertools
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import exported_config, load_lora_checkpoint, load_model
from conftest import TINY_SHAPE, assert_one_line_error, load_script, run_script, save_pretrained_checkpoint, tiny_model
from conversations import ALPACA, CHATML, load_instructions
from finetuning import load_lora_model
from preparation import DamagedCorpus, TokenWindows
from run_log import append_metrics, records_up_to
from test_checkpoint import FIXTURES, sharded_checkpoint


# A prompt template as formats up to 2 stored it, which loading upgrades.
OLD_TEMPLATE = {"with_input": "{instruction}\n{input}\n", "without_input": "{instruction}\n"}


def one_line_refusal(load, *fragments: str) -> str:
    with pytest.raises(ValueError) as raised:
        load()
    message = str(raised.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message
    return message


def checkpoint_with(tmp_path: Path, model_args: dict | None = None, weights=None, **entries) -> Path:
    model = tiny_model()
    path = save_pretrained_checkpoint(model, tmp_path / "checkpoint.pt", block_size=8)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_args"] |= model_args or {}
    if weights:
        weights(checkpoint["model"])
    torch.save(checkpoint | entries, path)
    return path


@pytest.mark.parametrize("damage, fragments", [
    (lambda weights: weights.pop("blocks.1.mlp.up_projection.weight"), ["missing blocks.1.mlp.up_projection.weight"]),
    (lambda weights: weights.update(extra=torch.zeros(2)), ["unexpected extra"]),
    (lambda weights: weights.update({"output_norm.weight": torch.ones(5)}),
     ["of another shape: output_norm.weight (5,) instead of (32,)"]),
    (lambda weights: weights.update({"output_norm.weight": torch.ones(32, dtype=torch.int64)}),
     ["output_norm.weight must be a floating-point tensor, got a tensor of torch.int64"]),
    (lambda weights: weights["output_norm.weight"].fill_(math.nan), ["NaN or infinite", "output_norm.weight"]),
])
def test_weights_that_do_not_make_the_model_are_named_in_one_line(tmp_path, damage, fragments):
    path = checkpoint_with(tmp_path, weights=damage)
    one_line_refusal(lambda: load_model(path), str(path), *fragments)


@pytest.mark.parametrize("model_args, fragment", [
    ({"num_layers": "1"}, "num_layers must be a whole number of at least 1, got '1' (a str)"),
    ({"num_layers": True}, "got True (a bool)"),
    ({"num_layers": 20000}, "missing blocks.2."),  # refused from the file's names, without building 20,000 layers
    ({"eos_index": 10**6}, "eos_index must be a token id below vocabulary_size (97), got 1000000"),
    ({"dropout": "0.1"}, "dropout must be a number in [0, 1), got '0.1' (a str)"),
    ({"num_heads": 0}, "num_heads must be a whole number of at least 1, got 0"),
    ({"colour": "red"}, "its model_args hold colour"),
])
def test_model_args_are_checked_naming_the_value_and_its_type(tmp_path, model_args, fragment):
    path = checkpoint_with(tmp_path, model_args)
    one_line_refusal(lambda: load_model(path), str(path), fragment)


def exported_folder(tmp_path: Path, damage=None) -> Path:
    """A folder as export.py writes it, its config.json changed by damage(config)."""
    model = tiny_model()
    config = exported_config(model, block_size=8, prompt_template=ALPACA.to_dict())
    if damage:
        damage(config)
    model.save_pretrained(tmp_path / "exported", config=config)
    return tmp_path / "exported"


@pytest.mark.parametrize("damage, fragment", [
    (lambda config: config.update(num_layers=20000), "missing blocks.2."),
    (lambda config: config.update(num_layers="1"), "'1' (a str)"),
    (lambda config: config.update(block_size=0), "block_size must be a positive whole number, got 0"),
    (lambda config: config.update(block_size=True), "got True (a bool)"),
    (lambda config: config.update(eos_index=-1), "eos_index must be a token id"),
    (lambda config: config.update(tokenizer="cl100k_base"), "its tokenizer is 'cl100k_base' (a str)"),
    (lambda config: config.update(prompt_template={"with_input": 3}), "a prompt template must have the fields"),
    (lambda config: config.update(prompt_template=OLD_TEMPLATE | {"with_input": "{question}"}),  # upgraded, then
     "must name {content}, and only plain fields"),
    (lambda config: config.update(prompt_template=ALPACA.to_dict() | {"stop_tokens": []}),
     "stop_tokens must be a list of token ids"),
])
def test_an_exported_config_gets_a_checkpoint_s_checks_before_the_model_is_built(tmp_path, damage, fragment):
    folder = exported_folder(tmp_path, damage)
    one_line_refusal(lambda: load_model(folder), "config.json" if "block_size" in fragment or "prompt" in fragment
                     or "tokenizer" in fragment else str(folder), fragment)


def test_exported_weights_of_another_dtype_or_not_finite_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = exported_folder(tmp_path, lambda config: config.pop("checksums"))  # as exported before checksums
    weights = load_file(folder / "model.safetensors")
    for damaged, fragment in ((weights | {"output_norm.weight": torch.ones(32, dtype=torch.int32)}, "torch.int32"),
                              (weights | {"output_norm.weight": torch.full((32,), math.inf)}, "NaN or infinite")):
        save_file(damaged, folder / "model.safetensors", metadata={"token_embeddings.weight": "output_layer.weight"})
        one_line_refusal(lambda: load_model(folder), fragment)


@pytest.mark.parametrize("block_size", [0, -5, True, "8", None])
def test_export_refuses_a_checkpoint_whose_block_size_is_not_a_positive_whole_number(tmp_path, block_size):
    path = checkpoint_with(tmp_path, block_size=block_size)
    export = load_script("export")
    one_line_refusal(lambda: export.load_source(argparse.Namespace(checkpoint_path=path, lora_path=None)),
                     "block_size must be a positive whole number")


@pytest.mark.parametrize("tokenizer", [None, "cl100k_base", 50257, ["r50k_base"]])
def test_a_checkpoint_of_another_tokenizer_is_refused_in_one_line_as_an_exported_folder_is(tmp_path, tokenizer):
    """load_checkpoint's check: export.py (which exported it with exit 0), generate.py and resuming alike."""
    path = checkpoint_with(tmp_path, tokenizer=tokenizer)
    export = load_script("export")
    for load in (lambda: load_model(path), lambda: export.load_source(export.parse_args(["--checkpoint_path",
                                                                                        str(path), "--output_dir", "x"]))):
        one_line_refusal(load, str(path), "its tokenizer is", "this LightGPT reads r50k_base")


def test_export_with_an_adapter_alone_takes_the_base_it_names_as_generate_py_does(tmp_path):
    adapter = torch.load(FIXTURES / "v1_adapter.pt", weights_only=True)
    torch.save(adapter | {"base_model_path": str(FIXTURES / "v1_checkpoint.pt")}, tmp_path / "adapter.pt")
    torch.save(adapter | {"base_model_path": str(tmp_path / "gone.pt")}, tmp_path / "orphan.pt")
    export = load_script("export")

    def exported(*arguments: str):
        return export.load_source(export.parse_args([*arguments, "--output_dir", str(tmp_path / "out")]))[0]

    named_base = exported("--lora_path", str(tmp_path / "adapter.pt"))
    given_base = exported("--lora_path", str(tmp_path / "adapter.pt"), "--checkpoint_path",
                          str(FIXTURES / "v1_checkpoint.pt"))
    assert named_base.state_dict().keys() == given_base.state_dict().keys()
    assert all(torch.equal(named_base.state_dict()[name], tensor) for name, tensor in given_base.state_dict().items())
    for load in (lambda: exported("--lora_path", str(tmp_path / "orphan.pt")),
                 lambda: load_lora_model(tmp_path / "orphan.pt")):
        with pytest.raises(FileNotFoundError) as raised:
            load()
        assert str(raised.value) == (f"--lora_path {tmp_path / 'orphan.pt'}: the base it names, {tmp_path / 'gone.pt'}, "
                                     f"is not there; give the base it was trained on with --checkpoint_path")


def adapter_with(tmp_path: Path, **entries) -> Path:
    adapter = {"lora_args": {"rank": 2, "alpha": 1.0, "dropout": 0.0}, "model_args": TINY_SHAPE | {"dropout": 0.0},
               "lora": {"blocks.0.mlp.up_projection.lora_a": torch.zeros(2, 32)}, "prompt_template": ALPACA.to_dict(),
               "base_model_path": "base.pt", "format_version": 3}
    path = tmp_path / "adapter.pt"
    torch.save(adapter | entries, path)
    return path


@pytest.mark.parametrize("entries, fragment", [
    ({"lora_args": "rank 8"}, "its lora_args must be a dictionary, got 'rank 8' (a str)"),
    ({"lora_args": {"rank": 0, "alpha": 1.0}}, "rank must be a whole number of at least 1, got 0"),
    ({"lora_args": {"rank": "8", "alpha": 1.0}}, "got '8' (a str)"),
    ({"lora_args": {"rank": 8, "alpha": math.inf}}, "alpha must be a positive finite number, got inf"),
    ({"lora_args": {"rank": 8, "alpha": 1.0, "dropout": 1.5}}, "dropout must be a number in [0, 1), got 1.5"),
    ({"prompt_template": "Alpaca"}, "a prompt template must have the fields"),
    ({"prompt_template": ALPACA.to_dict() | {"turns": {"user": ["{0}"]}}}, "must name {content}"),
    ({"prompt_template": OLD_TEMPLATE | {"without_input": "{0}"}, "format_version": 2}, "must name {content}"),
    ({"base_model_path": 5}, "its base_model_path must be the path of a checkpoint, got 5"),
    ({"model_args": {"num_layers": 2}}, "its model_args do not make a LightGPT"),
    ({"lora": {"blocks.0.mlp.up_projection.lora_a": [0.0]}}, "must be a floating-point tensor, got a list"),
])
def test_a_malformed_adapter_is_refused_in_one_line(tmp_path, entries, fragment):
    path = adapter_with(tmp_path, **entries)
    one_line_refusal(lambda: load_lora_checkpoint(path), str(path), fragment)


@pytest.mark.parametrize("template, fragment", [
    (ALPACA.to_dict() | {"stop_tokens": [10**9]}, "stop_tokens hold token id 1000000000"),
    (ALPACA.to_dict() | {"stop_tokens": [50256, 97]}, "stop_tokens hold token id 97"),
    (CHATML.to_dict() | {"stop_tokens": [50256]}, "text holds token id 50257"),  # a chat template on a model without the chat tokens
])
def test_a_template_s_token_ids_must_be_in_the_model_s_vocabulary(tmp_path, template, fragment):
    path = adapter_with(tmp_path, prompt_template=template)
    one_line_refusal(lambda: load_lora_checkpoint(path), str(path), fragment, "vocabulary of 97 tokens")
    folder = exported_folder(tmp_path, lambda config: config.update(prompt_template=template))
    one_line_refusal(lambda: load_model(folder), "config.json", fragment)


@pytest.mark.parametrize("named, error", [("/etc/passwd", ValueError), ("{adapter}", ValueError),
                                           ("missing.pt", FileNotFoundError)])
def test_an_adapter_naming_a_base_that_is_not_a_checkpoint_says_so_in_one_line(tmp_path, named, error):
    base = save_pretrained_checkpoint(tiny_model(), tmp_path / "base.pt", block_size=8)
    named = named.format(adapter=tmp_path / "adapter.pt")
    path = adapter_with(tmp_path, base_model_path=named, model_args=torch.load(base, weights_only=True)["model_args"])
    with pytest.raises(error) as raised:
        load_lora_model(path)
    assert str(raised.value).startswith(f"--lora_path {path}: the base it names, {named}, is not ")
    assert "\n" not in str(raised.value) and str(raised.value).endswith("with --checkpoint_path")


@pytest.mark.parametrize("record, fragment", [
    ({"instruction": None, "output": "x"}, "'instruction' must be a string, got null"),
    ({"instruction": "x", "output": None}, "'output' must be a string, got null"),
    ({"instruction": "x", "input": 3, "output": "y"}, "'input' must be a string, got int"),
])
def test_instruction_records_with_null_or_wrong_fields_are_refused_when_read(tmp_path, record, fragment):
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    one_line_refusal(lambda: load_instructions("local", str(tmp_path / "data.jsonl")), "line 1", fragment)


def test_a_null_input_is_an_empty_one(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"instruction": "x", "input": None, "output": "y"}) + "\n")
    assert load_instructions("local", str(tmp_path / "data.jsonl")) == [{"instruction": "x", "input": "", "output": "y"}]


def shard_file(folder: Path) -> Path:
    return next(folder.glob("shards-*/*.distcp"))


def rewrite_index(folder: Path, change) -> None:
    index = torch.load(folder / "checkpoint.pt", weights_only=True)
    change(index)
    torch.save(index, folder / "checkpoint.pt")


@pytest.mark.parametrize("damage, fragment", [
    (lambda folder: shard_file(folder).unlink(), "its shard file __0_0.distcp is missing"),
    (lambda folder: shard_file(folder).write_bytes(shard_file(folder).read_bytes()[:100]), "differs from the checksum"),
    (lambda folder: shard_file(folder).write_bytes(b""), "differs from the checksum"),
    (lambda folder: (rewrite_index(folder, lambda index: index.pop("shard_checksums")),  # as saved before checksums
                     shard_file(folder).write_bytes(b"")), "its shards cannot be read"),
    (lambda folder: rewrite_index(folder, lambda index: index.pop("shards")), "no model_args and shards entries"),
    (lambda folder: rewrite_index(folder, lambda index: index.update(shards=5)), "its shards entry must name"),
    (lambda folder: rewrite_index(folder, lambda index: index["model_args"].update(embedding_dimensions=64)),
     "of another shape"),
])
def test_a_damaged_sharded_folder_is_one_line(tmp_path, damage, fragment):
    folder = tmp_path / "sharded"
    sharded_checkpoint(tiny_model(), folder)
    damage(folder)
    one_line_refusal(lambda: load_model(folder), str(folder), fragment)


def test_a_damaged_metrics_log_is_repaired_with_a_warning_that_names_it(tmp_path):
    path = tmp_path / "checkpoint.metrics.jsonl"
    for step in (1, 2, 3):
        append_metrics(path, {"step": step})
    with open(path, "ab") as file:
        file.write(b"garbage\n" + b'{"loss": 2.0}\n' + b'{"step": "2"}\n' + b'\xff\xfe{"step": 2}\n' + b"[1, 2]\n"
                   # what JSON has no word for, which json.loads reads and strict readers refuse
                   + b'{"step": 2, "loss": NaN}\n' + b'{"step": 1, "loss": -Infinity}\n')
    append_metrics(path, {"step": 2.5, "epoch": 9})  # a float step is no record of ours either
    with pytest.warns(UserWarning, match=rf"{path}: 8 damaged line\(s\) .* left out of the metrics log"):
        records_up_to(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1}, {"step": 2}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records_up_to(path, 2)  # repaired: no second warning


@pytest.mark.parametrize("largest", [97, 1000, 65535])
def test_a_corpus_file_holding_ids_beyond_the_vocabulary_is_named(tmp_path, largest):
    tokens = np.arange(64, dtype=np.uint16) % 97
    tokens[40] = largest
    tokens.tofile(tmp_path / "train.bin")
    windows = TokenWindows(tmp_path / "train.bin", block_size=8, vocabulary_size=97)
    windows.windows([0, 8])  # windows of valid ids read as before
    with pytest.raises(DamagedCorpus, match=rf"train.bin: holds token id {largest}, beyond the model's vocabulary"):
        windows.windows([36])


TINY = ["--embedding_dimensions", "16", "--num_attention_heads", "2", "--num_hidden_layers", "1", "--block_size", "16",
        "--feed_forward_ratio", "2", "--device", "cpu", "--batch_size", "4", "--gradient_accumulation_steps", "1",
        "--samples_per_epoch", "8", "--eval_samples", "8", "--no-tensorboard", "--optimizer", "adamw"]


def test_resuming_a_checkpoint_missing_a_weight_is_refused_naming_it(tmp_path):
    path = checkpoint_with(tmp_path, weights=lambda weights: weights.pop("output_norm.weight"))
    one_line_refusal(lambda: load_script("pre-train").checked_checkpoint(str(path)), "missing output_norm.weight")


@pytest.mark.slow
def test_resuming_a_damaged_sharded_checkpoint_is_one_line(tmp_path, dataset_path):
    """resume() runs on every rank, past the start-up's error handling: its errors too are one line."""
    checkpoint = tmp_path / "checkpoint"
    pretrain = ("pre-train.py", "--dataset", "wikipedia", "--dataset_path", dataset_path, "--checkpoint_path",
                checkpoint, "--checkpoint_format", "sharded", *TINY)
    assert run_script(*pretrain, "--num_epochs", "1").returncode == 0
    shard_file(checkpoint).write_bytes(b"")
    result = run_script(*pretrain, "--num_epochs", "2", "--resume")
    assert_one_line_error(result, "pre-train.py: error:", "differs from the checksum saved with it")


class CountingWindows(TokenWindows):
    """TokenWindows that count the windows read, to see when evaluation reads them."""
    read = 0

    def windows(self, starts):
        self.read += len(starts)
        return super().windows(starts)


def test_pre_training_draws_and_reads_each_evaluation_window_only_as_it_is_reached(tmp_path):
    (np.arange(64, dtype=np.uint16) % 97).tofile(tmp_path / "test.bin")
    windows = CountingWindows(tmp_path / "test.bin", block_size=8, vocabulary_size=97)
    eval_samples = 1_000_000_000  # --eval_samples: drawn up front, its starts alone would take 8 GB
    batches = load_script("pre-train").WindowBatches(windows, eval_samples, 4)
    assert windows.read == 0
    first = [next(iter(batches)) for _ in range(2)]  # evaluated at every interval, read again each time
    assert windows.read == 8 and torch.equal(first[0][0], first[1][0]) and first[0][2] == 4 / eval_samples
    assert first[0][0].shape == first[0][1].shape == (4, 8)
    *_, (inputs, targets, weight) = itertools.islice(batches, 3)
    assert not torch.equal(inputs, first[0][0])  # each micro-batch its own windows


def test_the_evaluation_windows_are_the_same_at_any_batch_size_the_last_micro_batch_partial(tmp_path):
    (np.arange(640, dtype=np.uint16) % 97).tofile(tmp_path / "test.bin")
    windows = TokenWindows(tmp_path / "test.bin", block_size=8, vocabulary_size=97)
    by_four, by_three = (list(load_script("pre-train").WindowBatches(windows, 10, size)) for size in (4, 3))
    assert [len(inputs) for inputs, _, _ in by_four] == [4, 4, 2] and {weight for *_, weight in by_four} == {1 / 3}
    assert torch.equal(torch.cat([inputs for inputs, _, _ in by_four]), torch.cat([inputs for inputs, _, _ in by_three]))

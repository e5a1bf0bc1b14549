import json
import re
import shlex
import signal
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from safetensors import safe_open

import export
from checkpoint import exported_config, load_checkpoint, load_model, model_from_checkpoint, save_atomically
from conftest import (
    REPOSITORY,
    TINY_MODEL_FLAGS,
    assert_one_line_error,
    flag_error,
    one_thread,
    run_script,
    tiny_model,
)
from files import write_folder_atomically
from formats import upgraded_template
from tokenizer import load_tokenizer
from model import LightGPT

FIXTURES = REPOSITORY / "tests" / "fixtures"


def export_folder(output_dir, *args) -> subprocess.CompletedProcess:
    return run_script("export.py", "--output_dir", output_dir, *args)


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory, dataset_path):
    """A checkpoint and metrics file that pre-train.py wrote: two optimizer steps of a tiny model."""
    path = tmp_path_factory.mktemp("pretrained") / "checkpoint.pt"
    result = run_script("pre-train.py", "--dataset", "wikipedia", "--dataset_path", dataset_path, "--checkpoint_path",
                        path, *TINY_MODEL_FLAGS, "--batch_size", "2", "--gradient_accumulation_steps", "1",
                        "--samples_per_epoch", "4", "--num_epochs", "1", "--eval_samples", "4", "--seed", "0",
                        "--no-tensorboard")
    assert result.returncode == 0, result.stderr
    return path


def readme_export_flags() -> list[str]:
    command = re.search(r"^python export.py (.+)$", (REPOSITORY / "README.md").read_text(), re.M)
    assert command, "the README shows no export command"
    return shlex.split(command.group(1))


@pytest.fixture(scope="module")
def exported(checkpoint_path, tmp_path_factory):
    """The README's export command (with --onnx) on the tiny checkpoint."""
    folder = tmp_path_factory.mktemp("exports") / "tiny-lightgpt"
    result = run_script("export.py", *readme_export_flags(), "--checkpoint_path", checkpoint_path,
                        "--output_dir", folder)
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr and "Warning" not in result.stderr, result.stderr  # no noise
    return folder


@pytest.mark.slow
def test_the_readme_s_python_example_generates_text_from_an_exported_folder_offline(exported):
    section = (REPOSITORY / "README.md").read_text().split("## Sharing a model", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert example == export.USAGE.replace("FOLDER", "./out/lightgpt")  # the model card's, too
    assert export.USAGE.replace("FOLDER", "<this folder or Hub id>") in (exported / "README.md").read_text()
    code = example.replace("./out/lightgpt", str(exported))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(load_tokenizer().encode_ordinary(result.stdout)) > 10


def checkpoint_model(path) -> LightGPT:
    return model_from_checkpoint(load_checkpoint(path), path).eval()


@pytest.mark.slow
def test_an_exported_folder_loads_with_from_pretrained_to_the_same_logits(checkpoint_path, exported):
    assert sorted(path.name for path in exported.iterdir()) == [
        "README.md", "config.json", "model.onnx", "model.onnx.data", "model.safetensors"]
    assert not list(exported.parent.glob("*.tmp"))
    with safe_open(exported / "model.safetensors", "pt") as weights:
        tied = {"token_embeddings.weight", "output_layer.weight"} & set(weights.keys())
    assert len(tied) == 1, "the tied matrix is stored once"
    config = json.loads((exported / "config.json").read_text())
    assert config["block_size"] == 16 and config["tokenizer"] == "r50k_base" and config["vocabulary_size"] == 50257

    tokens = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = checkpoint_model(checkpoint_path)(tokens)[0]
    model = LightGPT.from_pretrained(exported)
    assert not model.training
    assert torch.equal(model(tokens)[0], expected)


@pytest.mark.slow
def test_the_model_card_says_what_the_model_is_and_how_it_was_trained(checkpoint_path, exported):
    card = (exported / "README.md").read_text()
    validation_loss = json.loads(checkpoint_path.with_suffix(".metrics.jsonl").read_text())["validation_loss"]
    parameters = checkpoint_model(checkpoint_path).num_trainable_params
    for fact in ("library_name: lightgpt", "1 layers, 16 wide, 2 heads", f"{parameters:,}", "16 tokens",
                 "r50k_base", "wikipedia (CC BY-SA 4.0", "2 (64 tokens)", f"{validation_loss:.4f}"):
        assert fact in card, fact


@pytest.mark.slow
def test_onnxruntime_gives_pytorch_s_logits_at_any_batch_and_length(checkpoint_path, exported):
    import onnxruntime

    session = onnxruntime.InferenceSession(exported / "model.onnx")
    model = checkpoint_model(checkpoint_path)
    for shape in ((1, 3), (3, 16)):
        tokens = torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(1))
        (logits,) = session.run(["logits"], {"token_ids": tokens.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), model(tokens)[0], rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("script, arguments", [
    ("generate.py", ["--max_tokens", "12", "--seed", "5"]),
    ("beam_search.py", ["--max_tokens", "6", "--beam_width", "3", "--num_candidates", "2"]),
])
def test_an_exported_folder_generates_the_same_text_as_its_checkpoint(checkpoint_path, exported, script, arguments):
    results = [run_script(script, "--checkpoint_path", path, "--prompt", "The history of", "--device", "cpu",
                          *arguments) for path in (checkpoint_path, exported)]
    assert results[0].returncode == results[1].returncode == 0, results[0].stderr + results[1].stderr
    assert results[0].stdout == results[1].stdout
    assert len(load_tokenizer().encode_ordinary(results[1].stdout)) > 3


@pytest.mark.slow
def test_an_adapter_is_merged_before_export_and_its_template_travels_along(tmp_path):
    """The version 1 fixtures: an old checkpoint and adapter export like any other."""
    result = export_folder(tmp_path / "tuned", "--checkpoint_path", FIXTURES / "v1_checkpoint.pt",
                           "--lora_path", FIXTURES / "v1_adapter.pt")
    assert result.returncode == 0, result.stderr
    expected = torch.load(FIXTURES / "v1_expected_logits.pt", weights_only=True)
    model, block_size, template = load_model(tmp_path / "tuned")
    torch.testing.assert_close(model(expected["tokens"])[0], expected["adapted_logits"])
    assert block_size == 8 and template == load_checkpoint(FIXTURES / "v1_adapter.pt", required=())["prompt_template"]
    assert "LoRA rank 2" in (tmp_path / "tuned" / "README.md").read_text()


def test_the_model_card_states_the_license_the_registries_give():
    assert [export.data_license(name) for name in ("fineweb-edu", "fineweb", "openwebtext", "kjv", "alpaca")] == \
        ["ODC-By 1.0", "ODC-By 1.0", "CC0", "public domain", "CC BY-NC 4.0"]
    assert export.data_license("text") == export.data_license("local") == "see the data's own license"


def test_from_pretrained_reads_a_hub_id_from_the_hub_cache(tmp_path):
    """The Hub code path, offline (HF_HUB_OFFLINE): a model pushed to someone/tiny-lightgpt and downloaded before
    sits in the cache in the Hub's layout."""
    assert huggingface_hub.constants.HF_HUB_OFFLINE, "conftest sets HF_HUB_OFFLINE before huggingface_hub is imported"
    model = tiny_model()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repository = tmp_path / "models--someone--tiny-lightgpt"
    model.save_pretrained(repository / "snapshots" / commit, config=exported_config(model, block_size=8))
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commit)
    loaded = LightGPT.from_pretrained("someone/tiny-lightgpt", cache_dir=tmp_path)
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert loaded.config == model.config
    assert torch.equal(loaded(tokens)[0], model.eval()(tokens)[0])


def test_a_folder_exported_before_format_3_loads_its_weights_and_its_dict_template(tmp_path):
    """Its weights named the blocks body, and its config.json held the prompt template as a dict."""
    from safetensors.torch import load_file, save_file

    written = torch.load(FIXTURES / "v2_adapter.pt", weights_only=True)["prompt_template"]
    model = tiny_model().eval()
    model.save_pretrained(tmp_path, config=exported_config(model, 8, written))
    weights = load_file(tmp_path / "model.safetensors")
    save_file({name.replace("blocks.", "body."): tensor for name, tensor in weights.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, block_size, template = load_model(tmp_path)
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(loaded(tokens)[0], model(tokens)[0])
    assert template == upgraded_template(written)


def test_from_pretrained_refuses_weights_that_miss_a_layer(tmp_path):
    """The mixin's default would leave the missing layer at its random initial weights, silently."""
    model = tiny_model()
    deeper = exported_config(model, block_size=8) | {"num_layers": model.config.num_layers + 1}
    model.save_pretrained(tmp_path, config=deeper)
    with pytest.raises(RuntimeError, match=f"blocks.{model.config.num_layers}"):
        LightGPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage, fragments", [
    (lambda folder: (folder / "model.safetensors").unlink(), ["no model.safetensors"]),
    (lambda folder: (folder / "config.json").write_text("{"), ["config.json", "not the configuration"]),
    (lambda folder: (folder / "config.json").write_text(json.dumps({"vocabulary_size": 97})),
     ["config.json", "block_size"]),
    (lambda folder: (folder / "config.json").write_text(json.dumps({"block_size": 8, "num_heads": 3})),
     ["do not make a LightGPT"]),
])
def test_a_damaged_exported_folder_is_one_line(tmp_path, damage, fragments):
    model = tiny_model()
    model.save_pretrained(tmp_path, config=exported_config(model, block_size=8))
    damage(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load_model(tmp_path)
    assert "\n" not in str(error.value) and all(fragment in str(error.value) for fragment in fragments), error.value


def test_help_explains_every_flag():
    help_text = export.build_parser().format_help()
    for flag in ("--checkpoint_path", "--lora_path", "--output_dir", "--onnx"):
        assert flag in help_text


def test_an_output_folder_that_is_not_empty_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    message = flag_error(export, ["--output_dir", str(tmp_path)], capsys)
    assert "--output_dir" in message and str(tmp_path) in message and "not an empty folder" in message
    assert flag_error(export, ["--output_dir", str(tmp_path / "notes.txt")], capsys).startswith("--output_dir")


def test_onnx_without_its_packages_names_the_missing_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what Python does for a package that is not there
    message = flag_error(export, ["--output_dir", str(tmp_path / "out"), "--onnx"], capsys)
    assert "--onnx" in message and "onnxscript" in message and "requirements-dev.txt" in message


@pytest.mark.slow
@pytest.mark.parametrize("arguments, fragments", [
    (["--checkpoint_path", "/nonexistent/checkpoint.pt"], ["/nonexistent/checkpoint.pt", "no checkpoint file"]),
    (["--lora_path", FIXTURES / "v1_adapter.pt"], ["v1_adapter.pt", "cannot be applied", "vocabulary_size=64"]),
    (["--checkpoint_path", "other_weights.pt", "--lora_path", FIXTURES / "v1_adapter.pt"],
     ["v1_adapter.pt", "other weights", "other_weights.pt"]),
])
def test_bad_sources_are_one_line_and_write_nothing(checkpoint_path, tmp_path, arguments, fragments):
    base = load_checkpoint(FIXTURES / "v1_checkpoint.pt")
    trained_further = {name: tensor + 0.01 for name, tensor in base["model"].items()}
    save_atomically(base | {"model": trained_further}, tmp_path / "other_weights.pt")
    arguments = [str(tmp_path / argument) if argument == "other_weights.pt" else argument for argument in arguments]
    result = export_folder(tmp_path / "out", "--checkpoint_path", checkpoint_path, *arguments)
    assert_one_line_error(result, *fragments)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other_weights.pt"]


def test_a_folder_is_written_whole_or_not_at_all(tmp_path):
    """It is written under a temporary name and renamed only once complete, over an empty folder if need be."""
    def write_then_fail(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_folder_atomically(tmp_path / "out", write_then_fail)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    write_folder_atomically(tmp_path / "out", lambda folder: (folder / "config.json").write_text("{}"))
    assert [path.name for path in tmp_path.rglob("*")] == ["out", "config.json"]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_an_export_leaves_nothing_and_says_so_in_one_line(checkpoint_path, tmp_path, stop):
    """Stopped while ONNX is written (seconds, even for a tiny model), export.py removes its temporary folder,
    writes no --output_dir and exits 128 + the signal's number."""
    output_dir = tmp_path / "exported"
    process = subprocess.Popen([sys.executable, REPOSITORY / "export.py", "--checkpoint_path", checkpoint_path,
                                "--output_dir", output_dir, "--onnx"], cwd=REPOSITORY, env=one_thread(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "Exporting model.onnx" in process.stdout.readline()  # the weights are written, ONNX under way
        process.send_signal(stop)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + stop, stderr
    assert stderr.strip().splitlines() == [
        f"export.py: stopped by {stop.name}; nothing was written to --output_dir {output_dir}"]
    assert list(tmp_path.iterdir()) == []

import functools
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import load_checkpoint, model_from_checkpoint, save_atomically, save_sharded
from devices import peak_tflops
from conftest import (
    REPOSITORY,
    TINY_MODEL_FLAGS,
    assert_one_line_error,
    lightgpt,
    limit_file_size,
    metrics,
    one_thread,
    run_script,
    tensorboard_run,
    run_until_first_epoch_then_terminate,
    save_pretrained_checkpoint,
)

pytestmark = pytest.mark.slow  # every test here starts processes


def pretrain(tmp_path, dataset_path, *args, name="checkpoint.pt", **kwargs):
    return run_script(
        "pre-train.py", "--dataset", "wikipedia", "--dataset_path", dataset_path,
        "--checkpoint_path", tmp_path / name, *TINY_MODEL_FLAGS, *args, **kwargs,
    )


def load_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def readme_quick_start_pretraining() -> list[str]:
    readme = (REPOSITORY / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"^pip install -r requirements.txt && python pre-train.py (.+)$", quick_start, re.M)
    assert command, "the README's Quick start has no pre-training command"
    return shlex.split(command.group(1))


def test_the_readme_quick_start_pretrains_with_a_falling_validation_loss(tmp_path, dataset_path):
    checkpoint = tmp_path / "quick.pt"
    shrunk = ["--samples_per_epoch", "64", "--num_epochs", "2", "--eval_interval", "1", "--eval_samples", "16",
              "--checkpoint_path", checkpoint, "--dataset_path", dataset_path]
    result = run_script("pre-train.py", *readme_quick_start_pretraining(), *shrunk)
    assert result.returncode == 0, result.stderr
    records = metrics(checkpoint)
    assert [record["epoch"] for record in records] == [1, 2]
    assert records[1]["validation_loss"] < records[0]["validation_loss"] < 10.9
    assert model_from_checkpoint(load_checkpoint(checkpoint), checkpoint).num_trainable_params > 0


def test_a_tiny_model_learns_the_embedded_corpus(tmp_path, dataset_path):
    result = pretrain(tmp_path, dataset_path, "--optimizer", "adamw", "--learning_rate", "1e-2",
                      "--warmup_steps", "2", "--batch_size", "8", "--gradient_accumulation_steps", "1",
                      "--samples_per_epoch", "80", "--num_epochs", "4", "--eval_interval", "1",
                      "--eval_samples", "64", "--dropout", "0", "--seed", "0")
    assert result.returncode == 0, result.stderr
    records = metrics(tmp_path / "checkpoint.pt")
    losses = [record["validation_loss"] for record in records]
    assert losses == sorted(losses, reverse=True)
    assert losses[-1] < losses[0] - 1.0
    assert {"loss", "gradient_norm", "tokens_per_second", "validation_perplexity"} <= records[-1].keys()


def test_the_default_optimizer_and_learning_rate_learn(tmp_path, dataset_path):
    # PyTorch's Adafactor rule at the old default of 5e-4 moved this loss by hundredths of a nat; now about half a nat.
    result = pretrain(tmp_path, dataset_path, "--warmup_steps", "2", "--batch_size", "8",
                      "--gradient_accumulation_steps", "1", "--samples_per_epoch", "80", "--num_epochs", "4",
                      "--eval_interval", "1", "--eval_samples", "64", "--dropout", "0", "--seed", "0")
    assert result.returncode == 0, result.stderr
    losses = [record["validation_loss"] for record in metrics(tmp_path / "checkpoint.pt")]
    assert losses[-1] < losses[0] - 0.3, losses


def test_the_checkpoint_is_a_plain_safe_dictionary(tmp_path, dataset_path):
    result = pretrain(tmp_path, dataset_path, "--batch_size", "2", "--gradient_accumulation_steps", "1",
                      "--samples_per_epoch", "2", "--num_epochs", "1", "--seed", "0")
    assert result.returncode == 0, result.stderr
    checkpoint = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert {"format_version", "model_args", "model", "optimizer", "step", "epoch", "rng", "sampler", "tokenizer",
            "block_size"} <= checkpoint.keys()
    assert checkpoint["tokenizer"] == "r50k_base" and checkpoint["block_size"] == 16
    assert not [key for key in checkpoint["model"] if key.startswith(("_orig_mod", "module"))]
    model_from_checkpoint(checkpoint, "checkpoint.pt")
    assert not list(tmp_path.glob("*.tmp"))


def test_accumulating_k_batches_of_b_equals_one_batch_of_k_times_b(tmp_path, dataset_path):
    # In fp32: bf16 rounds a batch of 4 and four batches of 1 differently, and AdamW's normalised steps carry the
    # difference into the weights.
    common = ["--samples_per_epoch", "8", "--num_epochs", "2", "--dropout", "0", "--seed", "0",
              "--optimizer", "adamw", "--learning_rate", "1e-3", "--precision", "fp32"]
    one = pretrain(tmp_path, dataset_path, *common, "--batch_size", "4", "--gradient_accumulation_steps", "1",
                   name="one.pt")
    four = pretrain(tmp_path, dataset_path, *common, "--batch_size", "1", "--gradient_accumulation_steps", "4",
                    name="four.pt")
    assert one.returncode == four.returncode == 0, one.stderr + four.stderr
    for name, tensor in load_weights(tmp_path / "one.pt").items():
        torch.testing.assert_close(tensor, load_weights(tmp_path / "four.pt")[name], rtol=1e-4, atol=1e-5)
    losses = [[record["loss"] for record in metrics(tmp_path / name)] for name in ("one.pt", "four.pt")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path, dataset_path):
    common = ["--batch_size", "2", "--gradient_accumulation_steps", "2", "--samples_per_epoch", "8",
              "--num_epochs", "60", "--eval_interval", "20", "--checkpoint_interval", "1000", "--dropout", "0.1",
              "--seed", "7"]
    uninterrupted = pretrain(tmp_path, dataset_path, *common, name="uninterrupted.pt")
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    interrupted_path = tmp_path / "interrupted.pt"
    result = run_until_first_epoch_then_terminate(
        "pre-train.py", "--dataset", "wikipedia", "--dataset_path", dataset_path, "--checkpoint_path",
        interrupted_path, *TINY_MODEL_FLAGS, *common, metrics_path=interrupted_path.with_suffix(".metrics.jsonl"),
    )
    assert result.returncode == 143, result.stderr  # 128 + SIGTERM, after a clean save
    assert "Stopped by signal" in result.stdout
    stopped_at = torch.load(interrupted_path, weights_only=True)["step"]
    assert 0 < stopped_at < 120

    resumed = pretrain(tmp_path, dataset_path, *common, "--resume", name="interrupted.pt")
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {stopped_at}" in resumed.stdout
    expected = load_weights(tmp_path / "uninterrupted.pt")
    for name, tensor in load_weights(interrupted_path).items():
        assert torch.equal(tensor, expected[name]), name


def test_an_fp16_run_resumes_with_the_state_of_its_loss_scaler(tmp_path, dataset_path):
    common = ["--batch_size", "2", "--gradient_accumulation_steps", "2", "--samples_per_epoch", "4",
              "--num_epochs", "6", "--eval_interval", "100", "--checkpoint_interval", "100", "--seed", "7",
              "--precision", "fp16"]
    assert pretrain(tmp_path, dataset_path, *common, name="uninterrupted.pt").returncode == 0
    interrupted_path = tmp_path / "interrupted.pt"
    stopped = run_until_first_epoch_then_terminate(
        "pre-train.py", "--dataset", "wikipedia", "--dataset_path", dataset_path, "--checkpoint_path",
        interrupted_path, *TINY_MODEL_FLAGS, *common, metrics_path=interrupted_path.with_suffix(".metrics.jsonl"),
    )
    assert "Stopped by signal" in stopped.stdout, stopped.stderr
    assert pretrain(tmp_path, dataset_path, *common, "--resume", name="interrupted.pt").returncode == 0
    resumed, expected = (torch.load(tmp_path / name, weights_only=True) for name in ("interrupted.pt",
                                                                                        "uninterrupted.pt"))
    # The scaler counts the steps since its scale last changed, and doubles it after 2000 of them.
    assert resumed["grad_scaler"] == expected["grad_scaler"] and expected["grad_scaler"]["_growth_tracker"] == 6
    for name, tensor in resumed["model"].items():
        assert torch.equal(tensor, expected["model"][name]), name


def test_a_resumed_run_continues_its_tensorboard_curves_and_a_new_run_replaces_them(tmp_path, dataset_path):
    common = ["--batch_size", "2", "--gradient_accumulation_steps", "1", "--samples_per_epoch", "4",
              "--eval_interval", "1", "--seed", "0"]
    first = pretrain(tmp_path, dataset_path, *common, "--num_epochs", "1")
    resumed = pretrain(tmp_path, dataset_path, *common, "--num_epochs", "2", "--resume")
    assert first.returncode == resumed.returncode == 0, first.stderr + resumed.stderr

    assert [folder.name for folder in (tmp_path / "runs").iterdir()] == ["checkpoint"]
    run = tensorboard_run(tmp_path / "runs" / "checkpoint")
    steps = {tag: [event.step for event in run.Scalars(tag)] for tag in run.Tags()["scalars"]}
    every_step, every_epoch = [1, 2, 3, 4], [2, 4]
    expected = {"train/loss": every_step, "train/gradient_norm": every_step, "train/learning_rate": every_step,
                "speed/tokens_per_second": every_epoch, "validation/loss": every_epoch,
                "validation/perplexity": every_epoch}
    if peak_tflops(torch.device("cpu"), torch.float32):
        expected["speed/mfu"] = every_epoch
    assert steps == expected
    validation_losses = [record["validation_loss"] for record in metrics(tmp_path / "checkpoint.pt")]
    assert [event.value for event in run.Scalars("validation/loss")] == pytest.approx(validation_losses)
    flags = run.Tensors("flags/text_summary")
    assert [event.step for event in flags] == [1, 3]
    assert "| --resume | True |" in flags[1].tensor_proto.string_val[0].decode()

    written = (tmp_path / "checkpoint.pt").read_bytes()
    refused = pretrain(tmp_path, dataset_path, *common, "--num_epochs", "1")  # it once wrote over it silently
    assert_one_line_error(refused, f"--checkpoint_path {tmp_path / 'checkpoint.pt'}: already holds a checkpoint, "
                                   f"saved at step 4; add --resume to continue it, or choose another")
    assert (tmp_path / "checkpoint.pt").read_bytes() == written
    (tmp_path / "checkpoint.pt").unlink()
    started_over = pretrain(tmp_path, dataset_path, *common, "--num_epochs", "1")
    assert started_over.returncode == 0, started_over.stderr
    assert [event.step for event in tensorboard_run(tmp_path / "runs" / "checkpoint").Scalars("train/loss")] == [1, 2]


def test_no_tensorboard_writes_the_metrics_file_alone(tmp_path, dataset_path):
    result = pretrain(tmp_path, dataset_path, "--batch_size", "2", "--gradient_accumulation_steps", "1",
                      "--samples_per_epoch", "2", "--num_epochs", "1", "--no-tensorboard")
    assert result.returncode == 0, result.stderr
    assert len(metrics(tmp_path / "checkpoint.pt")) == 1
    assert not (tmp_path / "runs").exists()


# pre-train.py on a file system without flock (some network file systems): flock on the lock files whose names
# end with sys.argv[1] fails as it fails there.
WITHOUT_FLOCK = """
import errno, fcntl, runpy, sys
real_flock, suffix = fcntl.flock, sys.argv.pop(1)
def flock(file, operation):
    if file.name.endswith(suffix):
        raise OSError(errno.ENOLCK, "No locks available")
    return real_flock(file, operation)
fcntl.flock = flock
runpy.run_path("pre-train.py", run_name="__main__")
"""


@pytest.mark.parametrize("lock, flag", [("checkpoint.pt.lock", "--checkpoint_path"),
                                        ("prepare.lock", "--dataset_path")])
def test_a_file_system_that_cannot_lock_is_one_line_naming_the_path(tmp_path, dataset_path, lock, flag):
    command = [sys.executable, "-c", WITHOUT_FLOCK, lock, "--dataset", "wikipedia", "--dataset_path", dataset_path,
               "--checkpoint_path", tmp_path / "checkpoint.pt", *TINY_MODEL_FLAGS, "--num_epochs", "1",
               "--samples_per_epoch", "2", "--gradient_accumulation_steps", "1"]
    result = subprocess.run(list(map(str, command)), cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, flag, lock, "No locks available", "on a local disk")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_diverging_loss_stops_the_run_with_a_clear_message(tmp_path, dataset_path):
    result = pretrain(tmp_path, dataset_path, "--optimizer", "adamw", "--learning_rate", "1e30",
                      "--warmup_steps", "0", "--batch_size", "2", "--gradient_accumulation_steps", "1",
                      "--samples_per_epoch", "2", "--num_epochs", "5", "--seed", "0")
    # a step whose gradient norm is not finite is skipped: three in a row stop the run before the loss is NaN
    assert_one_line_error(result, "the gradient norm was nan 3 steps in a row", "training stopped",
                          "--learning_rate")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--embedding_dimensions", "0"], ["--embedding_dimensions", "positive", "0"]),
        (["--batch_size", "-2"], ["--batch_size", "positive", "-2"]),
        (["--num_attention_heads", "3"], ["--embedding_dimensions (16)", "--num_attention_heads (3)"]),
        (["--learning_rate", "0"], ["--learning_rate", "must be in (0, 1e+30]", "0.0"]),
        (["--dropout", "1"], ["--dropout", "[0, 1)"]),
        (["--samples_per_epoch", "4", "--batch_size", "2", "--gradient_accumulation_steps", "4"],
         ["--samples_per_epoch (4)", "(8)"]),
        (["--resume", "--checkpoint_path", "/nonexistent/checkpoint.pt"], ["--resume", "/nonexistent/checkpoint.pt"]),
        (["--dataset", "shakespeare"], ["--dataset", "shakespeare", "wikipedia"]),
        (["--dataset", "text"], ["--text_files", "required"]),
        (["--dataset", "text", "--text_files", "/nonexistent/*.txt"], ["--text_files", "/nonexistent/*.txt"]),
        (["--device", "cuda"], ["--device", "cuda", "cpu"]),
        (["--device", "toaster"], ["--device", "toaster"]),
        (["--ddp_sharding_level", "1"], ["--ddp_sharding_level", "1"]),
        (["--block_size", "many"], ["--block_size", "many"]),
        (["--seed", "99999999999999999999999"], ["--seed", "[0, 2**63)", "99999999999999999999999"]),
        (["--embedding_dimensions", "1099511627776"], ["needs about", "for its weights, gradients and optimizer state",
                                                       "available on cpu"]),
        (["--dataset_path", REPOSITORY / "README.md"], ["--dataset_path", "README.md is a file, not a folder"]),
    ],
)
def test_bad_arguments_get_one_clear_line(tmp_path, dataset_path, args, fragments):
    result = run_script("pre-train.py", "--dataset", "wikipedia", "--dataset_path", dataset_path,
                        "--checkpoint_path", tmp_path / "checkpoint.pt", *TINY_MODEL_FLAGS, *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("variable", ["LIGHTGPT_PG_TIMEOUT_S", "LIGHTGPT_STARTUP_TIMEOUT_S"])
def test_a_timeout_that_is_not_a_number_of_seconds_is_a_clear_error(tmp_path, dataset_path, variable):
    result = run_script("pre-train.py", "--dataset", "wikipedia", "--dataset_path", dataset_path,
                        "--checkpoint_path", tmp_path / "checkpoint.pt", *TINY_MODEL_FLAGS,
                        env=one_thread() | {variable: "soon"})
    assert_one_line_error(result, variable, "positive number of seconds", "'soon'")


def test_a_corpus_shorter_than_the_context_is_a_clear_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("Too short.\n\nStill short.")
    result = run_script("pre-train.py", "--dataset", "text", "--text_files", tmp_path / "tiny.txt",
                        "--dataset_path", tmp_path / "dataset", "--checkpoint_path", tmp_path / "c.pt",
                        *TINY_MODEL_FLAGS)
    assert_one_line_error(result, "fewer than block_size + 1")


def test_resuming_with_other_model_flags_is_refused(tmp_path, dataset_path):
    first = pretrain(tmp_path, dataset_path, "--batch_size", "2", "--gradient_accumulation_steps", "1",
                     "--samples_per_epoch", "2", "--num_epochs", "1")
    assert first.returncode == 0, first.stderr
    wider = pretrain(tmp_path, dataset_path, "--batch_size", "2", "--gradient_accumulation_steps", "1",
                     "--samples_per_epoch", "2", "--num_epochs", "2", "--resume", "--embedding_dimensions", "32")
    assert_one_line_error(wider, "--resume", "embedding_dimensions=16", "32")


def test_help_explains_every_flag():
    result = run_script("pre-train.py", "--help")
    assert result.returncode == 0
    flags = set(re.findall(r"--(\w+)", result.stdout)) - {"help"}
    assert len(flags) >= 25
    for flag in ("batch_size", "gradient_accumulation_steps", "samples_per_epoch", "learning_rate",
                 "max_gradient_norm", "num_epochs", "eval_interval", "block_size", "embedding_dimensions",
                 "num_attention_heads", "num_hidden_layers", "dropout", "activation_checkpointing",
                 "ddp_sharding_level", "checkpoint_interval", "checkpoint_path", "dataset_path",
                 "num_dataset_processes", "resume", "device", "seed", "log_dir", "tensorboard"):
        assert f"--{flag}" in result.stdout


ONE_STEP_EPOCHS = ["--batch_size", "2", "--gradient_accumulation_steps", "1", "--samples_per_epoch", "2",
                   "--eval_samples", "2"]


def test_a_second_run_on_the_same_checkpoint_is_refused_while_the_first_trains(tmp_path, dataset_path):
    path = tmp_path / "checkpoint.pt"
    first = subprocess.Popen(
        [sys.executable, "pre-train.py", "--dataset", "wikipedia", "--dataset_path", dataset_path, "--checkpoint_path",
         path, *TINY_MODEL_FLAGS, *ONE_STEP_EPOCHS, "--num_epochs", "100000", "--checkpoint_interval", "100000"],
        cwd=REPOSITORY, env=one_thread(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not path.with_suffix(".metrics.jsonl").exists():
        assert first.poll() is None, first.communicate()
        time.sleep(0.1)
    second = pretrain(tmp_path, dataset_path, *ONE_STEP_EPOCHS, "--num_epochs", "1")
    assert_one_line_error(second, str(path), f"another run (process {first.pid})")
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 143 and "Stopped by signal" in stdout, stderr
    assert [record["epoch"] for record in metrics(path)] == list(range(1, len(metrics(path)) + 1))


def test_a_checkpoint_path_that_is_a_folder_is_refused_before_any_work(tmp_path):
    result = run_script("pre-train.py", "--dataset", "wikipedia", "--dataset_path", tmp_path / "dataset",
                        "--checkpoint_path", tmp_path, *TINY_MODEL_FLAGS)
    assert_one_line_error(result, f"--checkpoint_path {tmp_path}", "is a folder")
    assert os.listdir(tmp_path) == []  # not even the corpus was prepared


def test_a_checkpoint_path_that_is_one_of_the_corpus_files_is_refused(dataset_path):
    corpus_file = dataset_path / "wikipedia" / "train.bin"
    before = corpus_file.read_bytes()
    result = run_script("pre-train.py", "--dataset", "wikipedia", "--dataset_path", dataset_path,
                        "--checkpoint_path", corpus_file, *TINY_MODEL_FLAGS, *ONE_STEP_EPOCHS, "--num_epochs", "1")
    assert_one_line_error(result, f"{corpus_file} is also --dataset_path, an input of this run")
    assert corpus_file.read_bytes() == before


def test_a_save_that_fails_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, dataset_path):
    first = pretrain(tmp_path, dataset_path, *ONE_STEP_EPOCHS, "--num_epochs", "1")
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "checkpoint.pt").read_bytes()
    # Any file larger than 100 kB fails to write, as on a full disk; the checkpoint is 3 MB.
    full_disk = pretrain(tmp_path, dataset_path, *ONE_STEP_EPOCHS, "--num_epochs", "2", "--resume",
                         preexec_fn=functools.partial(limit_file_size, 100_000))
    assert_one_line_error(full_disk, f"could not write {tmp_path / 'checkpoint.pt'}: File too large")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_resuming_on_another_corpus_or_with_another_optimizer_is_refused(tmp_path, dataset_path):
    first = pretrain(tmp_path, dataset_path, *ONE_STEP_EPOCHS, "--num_epochs", "1", "--optimizer", "adamw")
    assert first.returncode == 0, first.stderr
    resume = ["--resume", *ONE_STEP_EPOCHS, "--num_epochs", "2", "--optimizer", "adamw"]
    other_corpus = run_script("pre-train.py", "--dataset", "kjv", "--dataset_path", tmp_path / "dataset",
                              "--checkpoint_path", tmp_path / "checkpoint.pt", *TINY_MODEL_FLAGS, *resume)
    assert_one_line_error(other_corpus, "--resume", "trained on --dataset wikipedia", "ask for --dataset kjv")
    assert not (tmp_path / "dataset").exists()  # refused before preparing the other corpus
    other_optimizer = pretrain(tmp_path, dataset_path, *resume, "--optimizer", "adafactor")
    assert_one_line_error(other_optimizer, "--resume", "--optimizer adamw", "adafactor")


def test_resuming_a_finished_run_says_there_is_nothing_left_and_writes_nothing(tmp_path, dataset_path):
    first = pretrain(tmp_path, dataset_path, *ONE_STEP_EPOCHS, "--num_epochs", "2")
    assert first.returncode == 0, first.stderr
    files = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    again = pretrain(tmp_path, dataset_path, *ONE_STEP_EPOCHS, "--num_epochs", "2", "--resume")
    assert again.returncode == 0, again.stderr
    assert "Nothing left to train" in again.stdout and "a larger --num_epochs" in again.stdout
    assert "Done" not in again.stdout
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == files


def test_resuming_from_a_checkpoint_without_optimizer_state_says_the_optimizer_starts_afresh(tmp_path,
                                                                                            dataset_path):
    model = lightgpt(vocabulary_size=50257, embedding_dimensions=16, num_heads=2, num_layers=1, feed_forward_ratio=2,
                     eos_index=50256, dropout=0.1)
    save_pretrained_checkpoint(model, tmp_path / "checkpoint.pt", block_size=16)
    result = pretrain(tmp_path, dataset_path, *ONE_STEP_EPOCHS, "--num_epochs", "1", "--resume")
    assert result.returncode == 0, result.stderr
    assert "holds no optimizer state" in result.stdout and "starts afresh" in result.stdout
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


def test_resuming_an_optimizer_state_that_does_not_fit_the_optimizer_is_one_line(tmp_path, dataset_path):
    first = pretrain(tmp_path, dataset_path, *ONE_STEP_EPOCHS, "--num_epochs", "1")
    assert first.returncode == 0, first.stderr
    path = tmp_path / "checkpoint.pt"
    good = torch.load(path, weights_only=True)
    name = next(iter(good["optimizer"]["state"]))
    another_optimizers = {key: value for key, value in good["optimizer"]["param_groups"][0].items() if key != "lr"}
    wrong_shape = {key: value.flatten() if value.dim() > 1 else value[:1] if value.dim() else value
                   for key, value in good["optimizer"]["state"][name].items()}
    for optimizer, fragment in (
        (good["optimizer"] | {"param_groups": [another_optimizers | {"momentum": 0.9}]}, "another optimizer's"),
        (good["optimizer"] | {"state": good["optimizer"]["state"] | {name: wrong_shape}}, f"parameter {name}"),
    ):
        save_atomically(good | {"optimizer": optimizer}, path)
        resumed = pretrain(tmp_path, dataset_path, *ONE_STEP_EPOCHS, "--num_epochs", "2", "--resume")
        assert_one_line_error(resumed, str(path), fragment)


def test_resuming_a_sharded_checkpoint_whose_optimizer_state_does_not_fit_is_one_line(tmp_path, dataset_path):
    """Its parameter groups (in the index) and the shapes of its state (in DCP's metadata) are checked before a
    shard is read: DCP would load another optimizer's groups without a word, and fail on other shapes in its own
    words."""
    flags = [*ONE_STEP_EPOCHS, "--optimizer", "adamw", "--checkpoint_format", "sharded"]
    first = pretrain(tmp_path, dataset_path, *flags, "--num_epochs", "1")
    assert first.returncode == 0, first.stderr
    path = tmp_path / "checkpoint.pt"
    good = load_checkpoint(path)  # its index and whole weights
    groups = good["optimizer"]["param_groups"]
    state = {name: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(good["model"][name]),
                    "exp_avg_sq": torch.zeros_like(good["model"][name])} for name in groups[0]["params"]}
    name = "blocks.0.attention.qkv_projection.weight"
    for param_groups, optimizer_state, fragment in (
        ([groups[0] | {"momentum": 0.9}], state, "another optimizer's"),
        (groups * 2, state, "parameter groups of"),
        (groups, state | {name: {key: value.flatten() for key, value in state[name].items()}}, f"parameter {name}"),
    ):
        save_sharded(good | {"optimizer": {"param_groups": param_groups, "state": optimizer_state}}, path)
        resumed = pretrain(tmp_path, dataset_path, *flags, "--num_epochs", "2", "--resume")
        assert_one_line_error(resumed, str(path), fragment)


@pytest.mark.slow
def test_resuming_a_damaged_checkpoint_stops_with_one_line_before_training(tmp_path, dataset_path):
    """A sampler state of 5 bytes once ended in a traceback from Generator.set_state, and NaN weights (in a file
    written without checksums) trained until the loss became NaN."""
    first = pretrain(tmp_path, dataset_path, *ONE_STEP_EPOCHS, "--num_epochs", "1")
    assert first.returncode == 0, first.stderr
    path = tmp_path / "checkpoint.pt"
    written = torch.load(path, weights_only=True)
    nan_weights = {name: torch.full_like(tensor, torch.nan) for name, tensor in written["model"].items()}
    for damage, message in (({"sampler": torch.zeros(5, dtype=torch.uint8)}, "its sampler must be a CPU generator"),
                            ({"model": nan_weights}, "its weights hold NaN or infinite numbers")):
        torch.save({name: value for name, value in written.items() if name != "checksums"} | damage, path)
        result = pretrain(tmp_path, dataset_path, *ONE_STEP_EPOCHS, "--num_epochs", "2", "--resume")
        assert_one_line_error(result, f"pre-train.py: error: {path}: {message}")
        assert "epoch=2" not in result.stdout

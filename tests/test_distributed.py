"""Two real processes (torchrun, gloo on the CPU) at every sharding level, against one process seeing the same
batches. Run as a script under torchrun, this file measures each rank's training-state memory."""

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from profiling import PeakTensorMemory, kept_between_micro_batches  # noqa: E402
from checkpoint import load_checkpoint, load_model, model_from_checkpoint  # noqa: E402
from conftest import (  # noqa: E402
    REPOSITORY,
    TINY_MODEL_FLAGS,
    lightgpt,
    load_script,
    metrics,
    one_thread,
    run_script,
    terminate_after_first_epoch,
)
from tokenizer import load_tokenizer  # noqa: E402
from devices import gradient_scaler  # noqa: E402
from distributed import REDUCE_EVERY_MICRO_BATCH, distributed, parallelize, rank, values_of_every_rank  # noqa: E402
from sizing import parameter_counts  # noqa: E402
from optimizers import Adafactor  # noqa: E402
from training import optimizer_step  # noqa: E402

pytestmark = pytest.mark.slow  # nearly every test here starts processes

# Four micro-batches per step: two for each of the two ranks. In fp32, where two ranks' sums and one process's
# agree to a few parts in a million; under FSDP2 a reduced precision also computes the norms and the residual
# stream in it (see test_two_processes_train_like_one_in_reduced_precision).
COMMON = ["--dataset", "wikipedia", *TINY_MODEL_FLAGS, "--batch_size", "2", "--gradient_accumulation_steps", "4",
          "--samples_per_epoch", "8", "--eval_interval", "1", "--eval_samples", "6", "--dropout", "0",
          "--seed", "3", "--warmup_steps", "0", "--learning_rate", "1e-2", "--num_dataset_processes", "1",
          "--precision", "fp32"]


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *map(str, args)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=timeout, env=one_thread(),
    )


def pretrain(processes: int, checkpoint: Path, dataset_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [*COMMON, "--dataset_path", dataset_path, "--checkpoint_path", checkpoint, *args]
    result = torchrun("pre-train.py", *flags) if processes == 2 else run_script("pre-train.py", *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def assert_same_training(checkpoint: Path, expected: Path) -> None:
    for field in ("loss", "validation_loss"):
        assert [record[field] for record in metrics(checkpoint)] == pytest.approx(
            [record[field] for record in metrics(expected)], rel=1e-5)
    state, expected_state = (torch.load(path, weights_only=True) for path in (checkpoint, expected))
    # Each step moves a weight by up to 1e-2; summing over ranks in another order moves a few by 1e-5.
    torch.testing.assert_close(state["model"], expected_state["model"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(state["optimizer"]["state"], expected_state["optimizer"]["state"],
                               rtol=1e-3, atol=1e-5)
    assert state["step"] == expected_state["step"]


def test_our_adafactor_steps_exactly_like_pytorchs():
    models = []
    for optimizer_class in (torch.optim.Adafactor, Adafactor):
        model = lightgpt(vocabulary_size=64, embedding_dimensions=16, num_heads=2, num_layers=1, eos_index=0)
        optimizer = optimizer_class(model.parameters(), lr=1e-2, weight_decay=0.1)
        for step in range(3):
            tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(step))
            model(tokens[:, :-1], tokens[:, 1:])[1].backward()
            optimizer.step()
            optimizer.zero_grad()
        models.append((model, optimizer))
    (theirs, their_optimizer), (ours, our_optimizer) = models
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())
    ours_state = our_optimizer.state_dict()
    # Ours has one hyperparameter more, the choice of PyTorch's rule.
    assert [group.pop("scale_parameter") for group in ours_state["param_groups"]] == [True]
    torch.testing.assert_close(ours_state, their_optimizer.state_dict())


def test_adafactor_without_parameter_scaling_steps_by_the_learning_rate_itself():
    vector = torch.nn.Parameter(torch.tensor([0.5, -2.0, 0.0, 3.0]))
    optimizer = Adafactor([vector], lr=0.1, scale_parameter=False)
    vector.grad = torch.tensor([4.0, -1e-3, 0.0, 2.0])
    optimizer.step()
    # The first step's second moment is the squared gradient itself: the update is the gradient's sign.
    torch.testing.assert_close(vector.detach(), torch.tensor([0.4, -1.9, 0.0, 2.9]))


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, dataset_path):
    """For each optimizer, one process trains 2 epochs, then resumes to 4: the reference for every level."""
    def reference(optimizer: str) -> tuple[Path, Path]:
        folder = tmp_path_factory.mktemp(optimizer)
        half, whole = folder / "half.pt", folder / "whole.pt"
        pretrain(1, half, dataset_path, "--optimizer", optimizer, "--num_epochs", "2")
        shutil.copy(half, whole)
        shutil.copy(half.with_suffix(".metrics.jsonl"), whole.with_suffix(".metrics.jsonl"))
        pretrain(1, whole, dataset_path, "--optimizer", optimizer, "--num_epochs", "4", "--resume")
        return half, whole

    return {optimizer: reference(optimizer) for optimizer in ("adamw", "adafactor")}


@pytest.mark.parametrize("level, optimizer", [(0, "adamw"), (2, "adafactor"), (3, "adamw")])
def test_two_processes_train_like_one_and_resume_across_world_sizes(
    tmp_path, dataset_path, one_process_runs, level, optimizer
):
    half, whole = one_process_runs[optimizer]
    flags = ["--optimizer", optimizer, "--ddp_sharding_level", str(level)]

    two_then_one = tmp_path / "two_then_one.pt"
    first = pretrain(2, two_then_one, dataset_path, *flags, "--num_epochs", "2")
    assert "2 processes" in first.stdout and first.stdout.count("Done") == 1
    assert_same_training(two_then_one, half)
    model_from_checkpoint(load_checkpoint(two_then_one), two_then_one)
    pretrain(1, two_then_one, dataset_path, *flags, "--num_epochs", "4", "--resume")
    assert_same_training(two_then_one, whole)

    one_then_two = tmp_path / "one_then_two.pt"
    shutil.copy(half, one_then_two)
    shutil.copy(half.with_suffix(".metrics.jsonl"), one_then_two.with_suffix(".metrics.jsonl"))
    pretrain(2, one_then_two, dataset_path, *flags, "--num_epochs", "4", "--resume")
    assert_same_training(one_then_two, whole)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_two_processes_train_like_one_in_reduced_precision(tmp_path, dataset_path, precision):
    flags = ["--optimizer", "adamw", "--num_epochs", "2", "--precision", precision]
    pretrain(1, tmp_path / "one.pt", dataset_path, *flags)
    pretrain(2, tmp_path / "two.pt", dataset_path, *flags)  # FSDP2, its parameters gathered in `precision`
    for field in ("loss", "validation_loss"):
        assert [record[field] for record in metrics(tmp_path / "two.pt")] == pytest.approx(
            [record[field] for record in metrics(tmp_path / "one.pt")], rel=1e-3)
    scaler = torch.load(tmp_path / "two.pt", weights_only=True)["grad_scaler"]
    assert bool(scaler) == (precision == "fp16")


def copy_run(source: Path, destination: Path) -> None:
    """A checkpoint (file or folder) and its metrics, as if the run had been made at `destination`."""
    (shutil.copytree if source.is_dir() else shutil.copy)(source, destination)
    shutil.copy(source.with_suffix(".metrics.jsonl"), destination.with_suffix(".metrics.jsonl"))


def assert_same_losses_and_weights(checkpoint: Path, expected: Path) -> None:
    for field in ("loss", "validation_loss"):
        assert [record[field] for record in metrics(checkpoint)] == pytest.approx(
            [record[field] for record in metrics(expected)], rel=1e-5)
    state, expected_state = load_checkpoint(checkpoint), load_checkpoint(expected)
    torch.testing.assert_close(state["model"], expected_state["model"], rtol=1e-3, atol=1e-4)
    assert state["step"] == expected_state["step"]


@pytest.mark.parametrize("level, optimizer", [(2, "adafactor"), (3, "adamw")])
def test_a_sharded_checkpoint_resumes_at_one_and_at_two_processes_and_generates(
    tmp_path, dataset_path, one_process_runs, level, optimizer
):
    half, whole = one_process_runs[optimizer]
    flags = ["--optimizer", optimizer, "--ddp_sharding_level", str(level), "--checkpoint_format", "sharded"]
    sharded = tmp_path / "sharded"
    pretrain(2, sharded, dataset_path, *flags, "--num_epochs", "2")
    shards = [path.name for path in sharded.glob("shards-*/*")]
    assert sorted(shards) == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards  # each rank wrote its own
    assert_same_losses_and_weights(sharded, half)
    for processes in (1, 2):
        resumed = tmp_path / f"resumed_at_{processes}"
        copy_run(sharded, resumed)
        pretrain(processes, resumed, dataset_path, *flags, "--num_epochs", "4", "--resume")
        assert_same_losses_and_weights(resumed, whole)
        assert len(list(resumed.glob("shards-*"))) == 1  # the earlier save's shards are gone
    result = run_script("generate.py", "--checkpoint_path", sharded, "--prompt", "The", "--max_tokens", "3",
                        "--top_k", "1", "--device", "cpu")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    model, _, _ = load_model(sharded)
    first = model(torch.tensor([load_tokenizer().encode("The")]))[0][0, -1].argmax().item()
    assert result.stdout.startswith("The" + load_tokenizer().decode([first]))  # the prompt, then its continuation


def test_the_readme_cpu_torchrun_command_trains_in_two_processes(tmp_path, dataset_path):
    readme = (REPOSITORY / "README.md").read_text()
    command = re.search(r"^torchrun --standalone --nproc-per-node=2 pre-train.py (.+)$", readme, re.M)
    assert command, "the README has no two-process CPU command"
    checkpoint = tmp_path / "readme.pt"
    result = torchrun("pre-train.py", *shlex.split(command.group(1)), "--samples_per_epoch", "32",
                      "--num_epochs", "1", "--eval_samples", "8", "--dataset_path", dataset_path,
                      "--checkpoint_path", checkpoint)
    assert result.returncode == 0, result.stderr
    assert "2 processes" in result.stdout and len(metrics(checkpoint)) == 1
    assert len(list((tmp_path / "runs" / "readme").iterdir())) == 1  # one TensorBoard event file: rank 0's


def test_uneven_accumulation_warns_and_still_trains_like_one_process(tmp_path, dataset_path):
    flags = ["--optimizer", "adamw", "--gradient_accumulation_steps", "3", "--samples_per_epoch", "6",
             "--num_epochs", "2", "--ddp_sharding_level", "3"]
    pretrain(1, tmp_path / "one.pt", dataset_path, *flags)
    two = pretrain(2, tmp_path / "two.pt", dataset_path, *flags)
    assert two.stderr.count("--gradient_accumulation_steps (3) does not divide evenly by the 2 processes") == 1
    assert_same_training(tmp_path / "two.pt", tmp_path / "one.pt")


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "text", "--text_files", "/nonexistent/*.txt"], "pre-train.py: error: --text_files"),
    (["--dataset", "fineweb-edu"], "pre-train.py: error: --dataset fineweb-edu: could not read HuggingFaceFW/"),
    (["--batch_size", "0"], "pre-train.py: error: argument --batch_size: must be a positive integer, got 0"),
    (["--batch_size", "two"], "pre-train.py: error: argument --batch_size: must be a positive integer, got 'two'"),
])
def test_a_rank_that_fails_stops_every_rank_with_one_message(tmp_path, dataset_path, flags, message):
    result = torchrun("pre-train.py", *COMMON, *flags, "--dataset_path", tmp_path, "--checkpoint_path",
                      tmp_path / "c.pt", timeout=120)
    assert result.returncode != 0
    assert result.stderr.count(message) == 1, result.stderr
    assert not (tmp_path / "c.pt").exists()


def test_sigterm_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path, dataset_path):
    checkpoint = tmp_path / "stopped.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "pre-train.py",
               *map(str, COMMON), "--dataset_path", str(dataset_path), "--checkpoint_path", str(checkpoint),
               "--num_epochs", "1000", "--eval_interval", "1000", "--checkpoint_interval", "1000"]
    # torchrun passes the signal on to both ranks, then reports that it was signalled.
    result = terminate_after_first_epoch(command, checkpoint.with_suffix(".metrics.jsonl"))
    stdout, stderr = result.stdout, result.stderr
    assert stdout.count("Stopped by signal") == 1, stdout + stderr
    stopped_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < stopped_at < 1000 and f"Stopped by signal at step {stopped_at};" in stdout
    resumed = pretrain(1, checkpoint, dataset_path, "--num_epochs", str(stopped_at + 1), "--resume")
    assert f"step {stopped_at}" in resumed.stdout


@pytest.mark.parametrize("level", [0, 3])
def test_two_processes_with_dropout_resume_exactly_where_they_stopped(tmp_path, dataset_path, level):
    flags = ["--optimizer", "adamw", "--dropout", "0.1", "--ddp_sharding_level", str(level), "--num_epochs", "40",
             "--eval_interval", "1000", "--checkpoint_interval", "1000"]
    pretrain(2, tmp_path / "uninterrupted.pt", dataset_path, *flags)
    interrupted = tmp_path / "interrupted.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "pre-train.py",
               *COMMON, "--dataset_path", dataset_path, "--checkpoint_path", interrupted, *flags]
    stopped = terminate_after_first_epoch(command, interrupted.with_suffix(".metrics.jsonl"))
    assert "Stopped by signal" in stopped.stdout, stopped.stdout + stopped.stderr
    assert len(torch.load(interrupted, weights_only=True)["rng"]) == 2
    pretrain(2, interrupted, dataset_path, *flags, "--resume")
    resumed, expected = (torch.load(path, weights_only=True) for path in (interrupted, tmp_path / "uninterrupted.pt"))
    assert resumed["step"] == expected["step"] == 40
    torch.testing.assert_close(resumed["model"], expected["model"], rtol=0, atol=0)


def local_bytes(tensors) -> int:
    """What this rank stores for `tensors`: a DTensor's own shard only."""
    return sum(getattr(tensor, "_local_tensor", tensor).nbytes for tensor in tensors)


def measure_training_memory() -> None:
    """Under torchrun: each rank's parameter, gradient and AdamW-state bytes at every sharding level."""
    figures = {}
    with distributed("cpu"):
        for level in (0, 2, 3):
            model = lightgpt(vocabulary_size=1024, embedding_dimensions=64, num_heads=4, num_layers=4, eos_index=0)
            training_model = parallelize(model, torch.device("cpu"), activation_checkpointing=False, compile=False,
                                         sharding_level=level)
            optimizer = torch.optim.AdamW(training_model.parameters())
            at_rest = local_bytes(training_model.parameters())
            tokens = torch.randint(0, 1024, (2, 33), generator=torch.Generator().manual_seed(0))
            _, loss = training_model(tokens[:, :-1], tokens[:, 1:])
            # FSDP2 swaps a module's shards for whole parameters while they are gathered.
            gathered = sum(p.nbytes for p in training_model.parameters() if not hasattr(p, "_local_tensor"))
            between_forward_and_backward = at_rest + (gathered if level else 0)
            loss.backward()
            gradients = local_bytes(p.grad for p in training_model.parameters())
            optimizer.step()
            optimizer_state = local_bytes(value for state in optimizer.state.values() for value in state.values()
                                          if value.dim() > 0)
            figures[level] = {"parameters": at_rest, "parameters_between_forward_and_backward":
                              between_forward_and_backward, "gradients": gradients,
                              "optimizer_state": optimizer_state}
        if rank() == 0:
            print(json.dumps(figures))


def figures_by_level(mode: str) -> dict:
    """Run this file under torchrun in `mode`, and read the figures by sharding level that rank 0 printed."""
    result = torchrun(Path(__file__).resolve(), mode)
    assert result.returncode == 0, result.stderr
    return {int(level): value for level, value in json.loads(result.stdout.strip().splitlines()[-1]).items()}


def test_sharding_levels_divide_the_training_state_between_two_ranks():
    figures = figures_by_level("measure")
    print("\nBytes per rank with 2 ranks (LightGPT 1024 vocabulary, 64 wide, 4 layers; AdamW):")
    for level, value in figures.items():
        print(f"level {level}: " + ", ".join(f"{name} {size:,}" for name, size in value.items()))
    replicated = figures[0]
    assert replicated["parameters"] == replicated["parameters_between_forward_and_backward"]
    for level in (2, 3):
        for name in ("parameters", "gradients", "optimizer_state"):
            assert figures[level][name] == pytest.approx(replicated[name] / 2, rel=0.02), (level, name)
    # Level 2 keeps every gathered parameter from its forward to its backward, beside the shards; level 3 gathers
    # each block (and the root) again only while it computes it.
    assert figures[2]["parameters_between_forward_and_backward"] == 3 * figures[2]["parameters"]
    assert figures[3]["parameters_between_forward_and_backward"] == figures[3]["parameters"]


def measure_accumulated_gradients() -> None:
    """Under torchrun: the tensor bytes each level keeps from the first of two micro-batches to the second, in the
    optimizer step that pre-train.py runs."""
    kept = {}
    with distributed("cpu") as device:
        for level in (2, 3):
            model = lightgpt(vocabulary_size=64, embedding_dimensions=64, num_heads=4, num_layers=4, eos_index=0)
            training_model = parallelize(model, device, activation_checkpointing=False, compile=False,
                                         sharding_level=level)
            tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
            micro_batch = (tokens[:, :-1], tokens[:, 1:], 0.5)
            kept[level] = kept_between_micro_batches(lambda: optimizer_step(
                training_model, torch.optim.SGD(training_model.parameters()), [micro_batch] * 2, 1e-3, 1.0,
                nullcontext(), gradient_scaler(device, torch.float32),
                reduce_every_micro_batch=REDUCE_EVERY_MICRO_BATCH[level],
            ), training_model)
        if rank() == 0:
            print(json.dumps(kept))


def test_level_2_keeps_whole_gradients_between_micro_batches_and_level_3_only_its_shards():
    kept = figures_by_level("accumulation")
    counts = parameter_counts(vocabulary_size=64, embedding_dimensions=64, num_layers=4)
    # What sizing.memory_per_device counts as gradients held while a step accumulates, at 2 processes.
    assert kept[2] == pytest.approx(4 * counts["total"], rel=0.02)
    assert kept[3] == pytest.approx(4 * counts["total"] / 2, rel=0.02)


def overflow_on_one_rank() -> None:
    """Under torchrun, in fp16 under FSDP2: one backward pass, then an infinite gradient in rank 1's shard alone,
    as an overflow in one part of the model makes it; prints every rank's loss scale and whether its weights
    changed."""
    with distributed("cpu") as device:
        model = lightgpt(**SMALL_VOCABULARY_MODEL)
        training_model = parallelize(model, device, False, False, 2, torch.float16)
        optimizer = torch.optim.SGD(training_model.parameters(), lr=0.1)
        scaler = gradient_scaler(device, torch.float16)
        tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
        scaler.scale(training_model(tokens[:, :-1], tokens[:, 1:])[1]).backward()
        if rank() == 1:
            next(iter(training_model.blocks.parameters())).grad.to_local().view(-1)[0] = float("inf")
        before = [parameter.to_local().clone() for parameter in training_model.parameters()]
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        unchanged = all(torch.equal(old, new.to_local()) for old, new in zip(before, training_model.parameters()))
        states = values_of_every_rank({"scale": scaler.get_scale(), "unchanged": unchanged})
        if rank() == 0:
            print(json.dumps(states))


def test_in_fp16_every_rank_skips_the_step_that_overflowed_on_one_and_lowers_its_scale():
    result = torchrun(Path(__file__).resolve(), "overflow")
    assert result.returncode == 0, result.stderr
    states = json.loads(result.stdout.strip().splitlines()[-1])
    assert states == [{"scale": 32768.0, "unchanged": True}] * 2


# Blocks, not the embedding, make up most of this model, as of any large one: a rank that held the whole model
# would show it.
SMALL_VOCABULARY_MODEL = dict(vocabulary_size=64, embedding_dimensions=64, num_heads=4, num_layers=4, eos_index=0)


def initial_weights(level: int) -> tuple[dict, int]:
    """The weights pre-train.py starts from at seed 0 at this sharding level, whole, and the most tensor memory
    this process held while building them."""
    pretrain = load_script("pre-train")
    args = pretrain.parse_args(["--device", "cpu", "--ddp_sharding_level", str(level)])
    torch.manual_seed(0)
    with PeakTensorMemory() as memory:
        model, _ = pretrain.build_model(args, SMALL_VOCABULARY_MODEL, torch.device("cpu"), torch.float32)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), memory.peak


def save_initial_weights(path: str) -> None:
    """Under torchrun: rank 0 saves the initial weights and every rank's peak memory at levels 2 and 3."""
    with distributed("cpu"):
        figures = {level: initial_weights(level) for level in (2, 3)}
        peaks = values_of_every_rank({level: peak for level, (_, peak) in figures.items()})
        if rank() == 0:
            torch.save({level: state for level, (state, _) in figures.items()} | {"peaks": peaks}, path)


def test_sharded_ranks_start_from_one_process_s_weights_without_ever_holding_the_whole_model(tmp_path):
    result = torchrun(Path(__file__).resolve(), "initial-weights", tmp_path / "weights.pt")
    assert result.returncode == 0, result.stderr
    two_processes = torch.load(tmp_path / "weights.pt", weights_only=True)
    one_process, _ = initial_weights(2)
    whole_model_bytes = 4 * sum(tensor.numel() for name, tensor in one_process.items() if name != "output_layer.weight")
    for level in (2, 3):
        torch.testing.assert_close(two_processes[level], one_process, rtol=0, atol=0)
        for rank_peaks in two_processes["peaks"]:
            assert rank_peaks[level] < 0.75 * whole_model_bytes, (level, rank_peaks, whole_model_bytes)


def pretrain_slowed(slow_part: str, seconds: float, argv: list[str]) -> None:
    """Under torchrun: pre-train.py with one part made slow, as a download, slow storage or a stuck rank make it:
    "preparation" (every rank's corpus preparation), "save" (rank 0 writing the checkpoint) or "step" (rank 1's
    third optimizer step)."""
    import training

    pretrain = load_script("pre-train")

    def slowed(function, on_call=lambda calls: True):
        calls = []

        def slow(*args, **kwargs):
            calls.append(1)
            if on_call(len(calls)):
                time.sleep(seconds)
            return function(*args, **kwargs)
        return slow

    if slow_part == "preparation":
        pretrain.prepare_corpus = slowed(pretrain.prepare_corpus)
    elif slow_part == "save":
        pretrain.save_atomically = slowed(pretrain.save_atomically)
    else:
        training.optimizer_step = slowed(training.optimizer_step, lambda calls: calls == 3 and rank() == 1)
    sys.argv = ["pre-train.py", *argv]
    pretrain.main()


def torchrun_slowed(slow_part: str, seconds: float, *args: str, timeout_s: float = 3) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--shutdown-timeout=1",
         Path(__file__).resolve(), "slowed", slow_part, str(seconds), *map(str, args)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300,
        env=one_thread() | {"LIGHTGPT_PG_TIMEOUT_S": str(timeout_s)},
    )


@pytest.mark.parametrize("slow_part", ["preparation", "save"])
def test_a_preparation_or_a_save_slower_than_the_timeout_still_ends_in_a_trained_run(tmp_path, slow_part):
    # A first run on a GPU cluster downloads and tokenizes for tens of minutes, and rank 0 writes a large
    # checkpoint to slow storage, while the other ranks wait.
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"Document {index} is here." for index in range(40)))
    flags = [*COMMON, "--dataset", "text", "--text_files", tmp_path / "corpus.txt", "--dataset_path", tmp_path,
             "--checkpoint_path", tmp_path / "c.pt", "--num_epochs", "2", "--block_size", "4"]
    result = torchrun_slowed(slow_part, 6, *flags)
    assert result.returncode == 0, result.stderr
    assert [record["epoch"] for record in metrics(tmp_path / "c.pt")] == [1, 2]


def test_a_rank_that_stalls_while_training_stops_the_job_within_the_timeout(tmp_path, dataset_path):
    start = time.monotonic()
    result = torchrun_slowed("step", 120, *COMMON, "--dataset_path", dataset_path, "--checkpoint_path",
                             tmp_path / "c.pt", "--num_epochs", "4")
    assert result.returncode != 0 and "Timed out" in result.stderr, result.stderr
    assert time.monotonic() - start < 60


if __name__ == "__main__" and sys.argv[1:2] == ["slowed"]:
    pretrain_slowed(sys.argv[2], float(sys.argv[3]), sys.argv[4:])
if __name__ == "__main__" and sys.argv[1:] == ["accumulation"]:
    measure_accumulated_gradients()
if __name__ == "__main__" and sys.argv[1:] == ["overflow"]:
    overflow_on_one_rank()
if __name__ == "__main__" and sys.argv[1:] == ["measure"]:
    measure_training_memory()
if __name__ == "__main__" and sys.argv[1:2] == ["initial-weights"]:
    save_initial_weights(sys.argv[2])

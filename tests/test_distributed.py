"""Two real processes (torchrun, gloo on the CPU) at every sharding level, against one process seeing the same
batches. Run as a script under torchrun, this file measures each rank's training-state memory."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import REPOSITORY, TINY_MODEL, run_script  # noqa: E402

# Four micro-batches per step: two for each of the two ranks.
COMMON = ["--dataset", "wikipedia", *TINY_MODEL, "--batch_size", "2", "--gradient_accumulation_steps", "4",
          "--samples_per_epoch", "8", "--eval_interval", "1", "--eval_samples", "6", "--dropout", "0",
          "--seed", "3", "--warmup_steps", "0", "--learning_rate", "1e-2", "--num_dataset_processes", "1"]


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *map(str, args)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=timeout, env=os.environ | {"OMP_NUM_THREADS": "1"},
    )


def pretrain(processes: int, checkpoint: Path, dataset_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [*COMMON, "--dataset_path", dataset_path, "--checkpoint_path", checkpoint, *args]
    result = torchrun("pre-train.py", *flags) if processes == 2 else run_script("pre-train.py", *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def metrics(checkpoint: Path) -> list[dict]:
    return [json.loads(line) for line in checkpoint.with_suffix(".metrics.jsonl").read_text().splitlines()]


def assert_same_training(checkpoint: Path, expected: Path) -> None:
    for field in ("loss", "validation_loss"):
        assert [record[field] for record in metrics(checkpoint)] == pytest.approx(
            [record[field] for record in metrics(expected)], rel=1e-5)
    state, expected_state = (torch.load(path, weights_only=True) for path in (checkpoint, expected))
    torch.testing.assert_close(state["model"], expected_state["model"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(state["optimizer"]["state"], expected_state["optimizer"]["state"],
                               rtol=1e-3, atol=1e-7)
    assert state["step"] == expected_state["step"]


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
    assert not [key for key in torch.load(two_then_one, weights_only=True)["model"]
                if key.startswith(("module", "_orig_mod", "_fsdp"))]
    pretrain(1, two_then_one, dataset_path, *flags, "--num_epochs", "4", "--resume")
    assert_same_training(two_then_one, whole)

    one_then_two = tmp_path / "one_then_two.pt"
    shutil.copy(half, one_then_two)
    shutil.copy(half.with_suffix(".metrics.jsonl"), one_then_two.with_suffix(".metrics.jsonl"))
    pretrain(2, one_then_two, dataset_path, *flags, "--num_epochs", "4", "--resume")
    assert_same_training(one_then_two, whole)

"""Fault injection: pre-train.py killed with SIGKILL at random moments (preparing the corpus, training, saving),
one rank of a two-process torchrun run killed while it saves, and torchrun itself killed. After each kill the
last checkpoint loads with weights_only=True, --resume continues from it, the next run leaves no temporary file
of the dead one, and the metrics log holds every epoch once; no process outlives its launcher."""

import os
import random
import re
import signal
import sys
import time
from pathlib import Path
from subprocess import Popen

import pytest
import torch

from conftest import REPOSITORY, TINY_MODEL_FLAGS, metrics, one_thread, run_script

pytestmark = pytest.mark.slow  # every test here starts processes

# One optimizer step per epoch and a checkpoint every epoch: saves are frequent, so kills land in them too.
FLAGS = [*TINY_MODEL_FLAGS, "--dataset", "wikipedia", "--num_dataset_processes", "1", "--batch_size", "2",
         "--gradient_accumulation_steps", "2", "--samples_per_epoch", "4", "--eval_samples", "4",
         "--checkpoint_interval", "1", "--optimizer", "adamw", "--seed", "0"]
FOREVER = ["--num_epochs", "100000"]
SECONDS_TO_STOP = 10


STARTED: list[int] = []  # every process a test starts or watches, killed when it ends, whether it passes or fails


@pytest.fixture(autouse=True)
def no_process_left_running():
    yield
    for pid in STARTED:
        if running(pid):
            os.kill(pid, signal.SIGKILL)
    STARTED.clear()


def start(command: list, output: Path) -> Popen:
    """A process whose standard output and error go, unbuffered, to a file (a pipe nobody reads could fill)."""
    with open(output, "w") as file:
        process = Popen([str(part) for part in command], cwd=REPOSITORY, stdout=file, stderr=file,
                        env=one_thread() | {"PYTHONUNBUFFERED": "1"})
    STARTED.append(process.pid)
    return process


def pretraining(dataset: Path, checkpoint: Path, output: Path, *args) -> Popen:
    resume = ["--resume"] if checkpoint.exists() else []
    return start([sys.executable, "pre-train.py", *FLAGS, "--dataset_path", dataset, "--checkpoint_path",
                  checkpoint, *FOREVER, *resume, *args], output)


def wait_for(condition, process: Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the process ended first (exit status {process.returncode})"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def temporary_files(folder: Path, pid: int | None = None) -> list[Path]:
    """The temporary files in a folder and the folders in it, or only those of the process `pid`."""
    return [path for path in folder.rglob("*.tmp") if pid is None or re.search(rf"\b{pid}\b", path.name)]


def preparing(corpus: Path, pid: int) -> bool:
    """Whether the process holds the corpus folder's preparation lock (it writes its id into the lock file)."""
    lock = corpus / "prepare.lock"
    return lock.exists() and lock.read_text().strip() == str(pid)


def epochs_logged(checkpoint: Path) -> int:
    path = checkpoint.with_suffix(".metrics.jsonl")
    return path.read_text().count("\n") if path.exists() else 0


def saved_step(checkpoint: Path) -> int:
    """The step of the last checkpoint, which must load safely whenever a run was killed."""
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]


def assert_resumed(checkpoint: Path, output: Path, process: Popen, step: int) -> None:
    """The run after a kill resumes where the checkpoint is, and has removed the dead runs' temporary files."""
    wait_for(lambda: re.search(rf"^Resuming from .* step {step}$", output.read_text(), re.M), process)
    others = [path for path in temporary_files(checkpoint.parent) if not re.search(rf"\b{process.pid}\b", path.name)]
    assert others == []  # one listing: the resuming run's own temporary file may be renamed between two


def finish(checkpoint: Path, dataset: Path, more_epochs: int = 2) -> None:
    """Resume the run to a few epochs past its checkpoint: it must end cleanly, leave no temporary file, and its
    metrics log must hold every epoch once, in order."""
    step = saved_step(checkpoint)
    result = run_script("pre-train.py", *FLAGS, "--dataset_path", dataset, "--checkpoint_path", checkpoint,
                        "--resume", "--num_epochs", step + more_epochs)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"^Resuming from .* step {step}$", result.stdout, re.M)
    assert saved_step(checkpoint) == step + more_epochs
    assert not temporary_files(checkpoint.parent)
    assert [record["step"] for record in metrics(checkpoint)] == list(range(1, step + more_epochs + 1))


def test_pretraining_killed_at_random_moments_loses_nothing(tmp_path):
    generator = random.Random(16)
    dataset, checkpoint = tmp_path / "dataset", tmp_path / "out" / "checkpoint.pt"
    moments = ["preparation"] * 3 + generator.sample(["training"] * 4 + ["saving"] * 3, 7)
    for kill, moment in enumerate(moments):
        step = saved_step(checkpoint) if checkpoint.exists() else None
        output = tmp_path / f"run_{kill}.txt"
        process = pretraining(dataset, checkpoint, output)
        if step is not None:
            assert_resumed(checkpoint, output, process, step)
        if moment == "preparation":
            wait_for(lambda: preparing(dataset / "wikipedia", process.pid), process)
            time.sleep(generator.uniform(0, 0.5))
        elif moment == "saving":
            wait_for(lambda: temporary_files(checkpoint.parent, process.pid), process)
        else:
            epochs = epochs_logged(checkpoint) + generator.randint(1, 3)
            wait_for(lambda: epochs_logged(checkpoint) >= epochs, process)
            time.sleep(generator.uniform(0, 0.2))
        process.kill()
        process.wait()
        if checkpoint.exists():  # the first save may be the one killed
            saved_step(checkpoint)
    finish(checkpoint, dataset)


def children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an orphan's exit may wait for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the ranks' watch on torchrun is Linux's")
@pytest.mark.parametrize("victim", ["rank 0 while it saves", "torchrun"])
def test_a_two_process_run_stops_within_seconds_and_loses_nothing_when_a_process_is_killed(
    tmp_path, dataset_path, victim
):
    checkpoint = tmp_path / "checkpoint.pt"
    agent = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   "pre-train.py", *FLAGS, "--dataset_path", dataset_path, "--checkpoint_path", checkpoint,
                   *FOREVER], tmp_path / "torchrun.txt")
    wait_for(lambda: epochs_logged(checkpoint) >= 2, agent)
    ranks = children(agent.pid)
    STARTED.extend(ranks)
    assert len(ranks) == 2
    if victim == "torchrun":
        agent.kill()
    else:
        rank_0 = next(rank for rank in ranks if "RANK=0" in Path(f"/proc/{rank}/environ").read_text().split("\0"))
        wait_for(lambda: temporary_files(tmp_path, rank_0), agent)
        os.kill(rank_0, signal.SIGKILL)
    deadline = time.monotonic() + SECONDS_TO_STOP
    while any(map(running, ranks)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(running, ranks)), f"a rank still runs {SECONDS_TO_STOP} s after {victim} was killed"
    agent.wait(timeout=SECONDS_TO_STOP)
    finish(checkpoint, dataset_path)


def test_a_run_killed_while_preparing_the_corpus_leaves_no_temporary_file_after_the_next(tmp_path):
    dataset, checkpoint = tmp_path / "dataset", tmp_path / "checkpoint.pt"
    process = pretraining(dataset, checkpoint, tmp_path / "killed.txt")
    wait_for(lambda: temporary_files(dataset, process.pid), process)
    process.kill()
    process.wait()
    result = run_script("pre-train.py", *FLAGS, "--dataset_path", dataset, "--checkpoint_path", checkpoint,
                        "--num_epochs", "1")
    assert result.returncode == 0, result.stderr
    assert not temporary_files(dataset)

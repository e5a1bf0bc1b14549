import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch

from checkpoint import (
    FORMAT_VERSION,
    check_outputs,
    claimed_checkpoint,
    exclusive_lock,
    load_checkpoint,
    load_lora_checkpoint,
    load_lora_model,
    load_model,
    save_atomically,
    trained_on_these_weights,
)
from conftest import REPOSITORY, tiny_model
from distributed import load_training_state
from training import append_metrics, records_up_to

FIXTURES = REPOSITORY / "tests" / "fixtures"


def test_a_checkpoint_written_before_format_versions_loads_to_the_same_logits():
    expected = torch.load(FIXTURES / "v1_expected_logits.pt", weights_only=True)
    model, block_size, template = load_model(FIXTURES / "v1_checkpoint.pt")
    assert block_size == 8 and template is None
    torch.testing.assert_close(model(expected["tokens"])[0], expected["base_logits"], rtol=0, atol=0)


def test_an_adapter_written_before_format_versions_merges_to_the_same_logits_without_a_warning():
    expected = torch.load(FIXTURES / "v1_expected_logits.pt", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _, _ = load_lora_model(FIXTURES / "v1_adapter.pt", FIXTURES / "v1_checkpoint.pt")
    torch.testing.assert_close(model(expected["tokens"])[0], expected["adapted_logits"])
    adapter, base = load_lora_checkpoint(FIXTURES / "v1_adapter.pt"), load_checkpoint(FIXTURES / "v1_checkpoint.pt")
    assert trained_on_these_weights(adapter, base)
    assert isinstance(adapter["rng"], list) and adapter["format_version"] == FORMAT_VERSION


def test_an_old_checkpoint_s_optimizer_state_resumes_under_the_new_parameter_names():
    checkpoint = load_checkpoint(FIXTURES / "v1_checkpoint.pt")
    assert not [name for name in checkpoint["optimizer"]["state"] if ".mlp.0." in name or ".mlp.2." in name]
    model = tiny_model(**checkpoint["model_args"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_training_state(model, optimizer, checkpoint)
    moments = optimizer.state[model.body[0].mlp.up_projection.weight]["exp_avg"]
    torch.testing.assert_close(moments, checkpoint["optimizer"]["state"]["body.0.mlp.up_projection.weight"]["exp_avg"])


def test_a_checkpoint_from_a_newer_lightgpt_is_refused_in_one_line(tmp_path):
    checkpoint = load_checkpoint(FIXTURES / "v1_checkpoint.pt") | {"format_version": FORMAT_VERSION + 1}
    save_atomically(checkpoint, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match=f"format {FORMAT_VERSION + 1}, newer than"):
        load_checkpoint(tmp_path / "newer.pt")


def a_dead_process_id() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_failed_save_names_the_file_and_leaves_the_previous_checkpoint_whole(tmp_path, full_disk_after_4_kb):
    path = tmp_path / "checkpoint.pt"
    save_atomically({"step": 1}, path)
    with pytest.raises(OSError, match=f"could not write {path}: File too large"):
        save_atomically({"step": 2, "weights": torch.zeros(10_000)}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_failed_metrics_record_leaves_no_half_line(tmp_path, full_disk_after_4_kb):
    path = tmp_path / "checkpoint.metrics.jsonl"
    append_metrics(path, {"step": 1})
    with pytest.raises(OSError, match=f"could not write {path}: File too large"):
        append_metrics(path, {"step": 2, "note": "x" * 5000})
    assert path.read_text() == '{"step": 1}\n'


def test_resuming_drops_the_metrics_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.metrics.jsonl"
    for step in (2, 4, 6):
        append_metrics(path, {"step": step})
    with open(path, "a") as file:
        file.write('{"step": 8, "loss"')  # cut short by a kill
    records_up_to(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    records_up_to(path, 0)  # a new run starts a new log
    assert path.read_text() == ""


def test_a_second_run_on_the_same_checkpoint_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "checkpoint.pt"
    with claimed_checkpoint(path, {}):
        with pytest.raises(ValueError, match=rf"{path}: another run \(process {os.getpid()}\) is writing"):
            with claimed_checkpoint(path, {}):
                pass
    with claimed_checkpoint(path, {}):  # released when the first run ended
        pass


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_free_for_the_next(tmp_path):
    path = tmp_path / "checkpoint.pt"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from checkpoint import exclusive_lock\nwith exclusive_lock({str(path)!r}):\n"
         f"    print('locked', flush=True)\n    input()"],
        cwd=REPOSITORY, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(ValueError, match=f"process {holder.pid}"):
        with exclusive_lock(path):
            pass
    holder.kill()
    holder.wait()
    with exclusive_lock(path):
        pass


@pytest.mark.parametrize("where, message", [
    (".", "is a folder, where a file must go"),
    ("file.txt/checkpoint.pt", "file.txt is a file, not a folder"),
    ("inputs.jsonl", "is also --dataset_path, an input of this run"),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, where, message):
    (tmp_path / "file.txt").write_text("")
    (tmp_path / "inputs.jsonl").write_text("")
    with pytest.raises(ValueError, match=f"--checkpoint_path {tmp_path / where}: .*{message}"):
        check_outputs(tmp_path / where, {"--dataset_path": [tmp_path / "inputs.jsonl"]})


def test_temporary_files_of_dead_processes_of_this_machine_are_removed(tmp_path):
    dead, alive, host = a_dead_process_id(), os.getpid(), socket.gethostname()
    names = {
        f"checkpoint.pt.{dead}.tmp": False,
        f"checkpoint.pt.{host}.{dead}.tmp": False,
        f"checkpoint.metrics.jsonl.{dead}.tmp": False,
        f"checkpoint.pt.{alive}.tmp": True,  # a live process may still be writing it
        f"checkpoint.pt.another-machine.{dead}.tmp": True,  # whose processes this one cannot see
        f"notes.txt.{dead}.tmp": True,  # not a file this run writes
    }
    for name in names:
        (tmp_path / name).write_text("")
    with claimed_checkpoint(tmp_path / "checkpoint.pt", {}):
        pass
    assert sorted(path.name for path in tmp_path.glob("*.tmp")) == sorted(name for name, kept in names.items() if kept)

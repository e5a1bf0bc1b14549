"""Files that are not files, outputs checked up front, writes that fail whole, sizes checked before allocation, and
what export.py writes and says."""

import argparse
import functools
import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint import exported_config
from conftest import (
    assert_one_line_error,
    flag_error,
    limit_file_size,
    load_script,
    run_script,
    save_pretrained_checkpoint,
    tiny_model,
)
from files import resolve_files, write_folder_atomically
from finetuning import check_adapter_memory
from lora import add_lora, merge_lora
from run_log import check_log_dir
from test_checkpoint import a_dead_process_id


def not_files(folder):
    """A FIFO, a link to /dev/zero and a link to a folder, each named like a text file."""
    os.mkfifo(folder / "fifo.txt")
    (folder / "zero.txt").symlink_to("/dev/zero")
    (folder / "folder.txt").symlink_to(folder)
    return ["fifo.txt", "zero.txt"]


@pytest.mark.parametrize("name", ["fifo.txt", "zero.txt"])
def test_a_fifo_or_a_device_named_directly_is_refused_instead_of_read_forever(tmp_path, name):
    not_files(tmp_path)
    with pytest.raises(ValueError, match=f"--text_files: .*{name} is not a regular file"):
        resolve_files(str(tmp_path / name), (".txt",), "--text_files")


def test_a_folder_or_a_glob_reads_only_its_regular_files(tmp_path):
    not_files(tmp_path)
    (tmp_path / "real.txt").write_text("text")
    for pattern in (str(tmp_path), str(tmp_path / "*.txt")):
        assert resolve_files(pattern, (".txt",), "--text_files") == [tmp_path / "real.txt"]


def training_flags(tmp_path, **flags):
    return argparse.Namespace(**{"checkpoint_path": str(tmp_path / "out" / "c.pt"), "log_dir": None,
                                 "tensorboard": True} | flags)


@pytest.mark.parametrize("log_dir, fragment", [
    ("file.txt", "file.txt is a file, not a folder"),
    ("file.txt/runs", "file.txt is a file, not a folder"),
])
def test_a_log_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path, log_dir, fragment):
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(ValueError, match=f"--log_dir .*{fragment}"):
        check_log_dir(training_flags(tmp_path, log_dir=str(tmp_path / log_dir)))
    check_log_dir(training_flags(tmp_path, log_dir=str(tmp_path / log_dir), tensorboard=False))  # not written


def test_the_default_log_dir_beside_a_checkpoint_under_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ValueError, match="out is a file"):
        check_log_dir(training_flags(tmp_path))


def sysfs_refuses_folders() -> bool:
    """Whether /sys takes no new folder: Linux's sysfs refuses root too, as read-only permissions do not."""
    try:
        os.mkdir("/sys/lightgpt-test")
    except OSError:
        return Path("/sys").is_dir()
    os.rmdir("/sys/lightgpt-test")
    return False


@pytest.mark.skipif(not sysfs_refuses_folders(), reason="needs Linux's /sys, where no one can make a folder")
@pytest.mark.parametrize("script, arguments", [
    ("pre-train", ["--log_dir", "/sys/lightgpt-runs"]),
    ("pre-train", ["--dataset_path", "/sys/dataset"]),
    ("instruction-tune", ["--log_dir", "/sys/runs/lora"]),
    ("evaluate", ["--output_path", "/sys/results.json"]),
    ("export", ["--output_dir", "/sys/exported"]),
])
def test_an_output_where_no_folder_can_be_made_is_refused_before_any_work(tmp_path, capsys, script, arguments):
    """Root may write in read-only folders, and os.access says so; /sys refuses even root."""
    if script == "instruction-tune":
        arguments = arguments + ["--base_model_path", str(save_pretrained_checkpoint(tiny_model(), tmp_path / "base.pt", 8))]
    error = flag_error(load_script(script), arguments, capsys)
    assert error.startswith(f"{arguments[0]} {arguments[1]}: /sys is not writable ("), error


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_a_read_only_dataset_path_is_refused(tmp_path, capsys):
    (tmp_path / "read-only").mkdir(mode=0o555)
    error = flag_error(load_script("pre-train"), ["--dataset_path", str(tmp_path / "read-only" / "dataset")], capsys)
    assert "read-only is not writable" in error


def test_a_dataset_path_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    error = flag_error(load_script("pre-train"), ["--dataset_path", str(tmp_path / "file" / "dataset")], capsys)
    assert "--dataset_path" in error and "file is a file, not a folder" in error


def test_the_temporary_folder_of_a_killed_export_is_removed_by_the_next(tmp_path):
    dead = tmp_path / f"exported.{socket.gethostname()}-{a_dead_process_id()}-0123abcd.tmp"
    alive = tmp_path / f"exported.{socket.gethostname()}-{os.getppid()}-0123abcd.tmp"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    write_folder_atomically(tmp_path / "exported", lambda folder: (folder / "a").write_text("a"))
    assert not dead.exists() and alive.exists() and (tmp_path / "exported" / "a").read_text() == "a"


def on_a_full_disk(code: str) -> str:
    """The last line a Python process running `code` prints, in the tests' folder, its files unable to grow past
    4 kB (a fork of pytest would do, but torch's threads do not survive a fork)."""
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                            timeout=120, preexec_fn=functools.partial(limit_file_size, 4096))
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_sharded_save_on_a_full_disk_is_one_line_and_leaves_no_shards_folder(tmp_path):
    last_line = on_a_full_disk(f"from conftest import tiny_model; from test_checkpoint import sharded_checkpoint; "
                               f"sharded_checkpoint(tiny_model(), {str(tmp_path / 'sharded')!r})")
    assert re.search(r"OSError: could not write .*shards-1-\w+: File too large", last_line), last_line
    assert not list((tmp_path / "sharded").glob("shards-*"))


def test_the_card_and_console_count_every_parameter_of_a_merged_model(tmp_path):
    export = load_script("export")
    model = tiny_model()
    total = sum(parameter.numel() for parameter in model.parameters())
    add_lora(model, rank=2, alpha=1.0, dropout=0.0)
    merged = merge_lora(model)
    assert merged.num_trainable_params != total  # what the card said before
    assert export.num_parameters(merged) == total
    assert f"| Parameters | {total:,} |" in str(export.model_card(merged, 8, {}))


def test_the_exported_weights_are_as_readable_as_the_other_files(tmp_path):
    model = tiny_model()
    umask = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path, config=exported_config(model, block_size=8))
    finally:
        os.umask(umask)
    modes = {file.name: stat.S_IMODE(file.stat().st_mode) for file in tmp_path.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes


def test_a_damaged_metrics_file_is_named_and_left_out_of_the_card(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.with_suffix(".metrics.jsonl").write_bytes(b'{"step": 1, "validation_loss": 2.5}\n\xffgarbage\n'
                                                   b'{"step": 2, "validation_loss": NaN}\n')
    with pytest.warns(UserWarning, match=re.escape(f"{path.with_suffix('.metrics.jsonl')}: 2 damaged line(s)")
                      + ".* left out of the model card's figures"):
        facts = load_script("export").training_facts({"step": 2}, path)
    assert facts["validation loss"].startswith("2.5000")


@pytest.mark.parametrize("rank", [10**8, 10**12])
def test_adapters_that_cannot_fit_are_refused_before_they_are_allocated(rank):
    with pytest.raises(ValueError, match=rf"--rank {rank}: the adapters need about .* more than the .* available"):
        check_adapter_memory(tiny_model(), rank, "cpu")
    check_adapter_memory(tiny_model(), 8, "cpu")


@pytest.mark.slow
def test_a_full_disk_during_corpus_preparation_is_one_line_and_keeps_what_was_recorded(tmp_path):
    last_line = on_a_full_disk(f"import conftest; from preparation import prepare_corpus; prepare_corpus('kjv', {str(tmp_path)!r}, "
                               f"show_progress=False)")
    assert re.search(r"could not write .*kjv/train.bin: File too large; the [\d,]+ training tokens prepared are "
                     r"kept", last_line), last_line
    meta = json.loads((tmp_path / "kjv" / "meta.json").read_text()) if (tmp_path / "kjv" / "meta.json").exists() \
        else {"train_tokens": 0, "test_tokens": 0}
    for split in ("train", "test"):  # no half-written batch: the files hold what meta.json records
        path = tmp_path / "kjv" / f"{split}.bin"
        assert (path.stat().st_size if path.exists() else 0) == 2 * meta[f"{split}_tokens"]


@pytest.mark.slow
def test_export_on_a_full_disk_is_one_line_and_leaves_no_folder(tmp_path):
    checkpoint = save_pretrained_checkpoint(tiny_model(vocabulary_size=50257, eos_index=50256), tmp_path / "c.pt", 16)
    result = run_script("export.py", "--checkpoint_path", checkpoint, "--output_dir", tmp_path / "exported",
                        preexec_fn=lambda: limit_file_size(checkpoint.stat().st_size // 2))
    assert_one_line_error(result, "export.py: error: --output_dir", "File too large")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.pt"]


@pytest.mark.parametrize("name, content", [("bad.parquet", b"PAR1garbage"), ("bad.jsonl", b'{"text": "a"}\n{bad\n')])
def test_a_damaged_parquet_or_json_file_is_one_line_without_the_libraries_log(tmp_path, capfd, name, content):
    from preparation import prepare_corpus

    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"--text_files: .*{name}"):
        prepare_corpus("text", tmp_path / "dataset", text_files=[tmp_path / name], show_progress=False)
    assert capfd.readouterr().err == ""

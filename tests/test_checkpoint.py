import contextlib
import fcntl
import functools
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator

import psutil
import pytest
import torch

from checkpoint import (
    check_outputs,
    claimed_checkpoint,
    exclusive_lock,
    is_sharded_checkpoint,
    load_checkpoint,
    load_index,
    load_lora_checkpoint,
    load_model,
    load_shards,
    model_from_checkpoint,
    save_atomically,
    save_sharded,
    trained_on_these_weights,
    training_checkpoint,
)
from conftest import (
    REPOSITORY,
    assert_one_line_error,
    flag_error,
    load_script,
    run_script,
    TINY_MODEL_FLAGS,
    save_pretrained_checkpoint,
    tiny_model,
)
from conversations import ALPACA, PromptTemplate
from distributed import load_training_state, sharded_training_state
from finetuning import load_lora_model, resumable_adapters
from files import still_at, write_text_atomically
from formats import FORMAT_VERSION, upgraded_template
from integrity import file_checksums
from preparation import preparation_lock
from run_log import append_metrics, records_up_to
from model import LightGPT, LightGPTConfig
from tokenizer import load_tokenizer
from training import rng_state

FIXTURES = REPOSITORY / "tests" / "fixtures"


def test_a_checkpoint_written_before_format_versions_loads_the_same_weights_to_the_same_logits():
    """The weights are data and load exactly; the logits were computed on another CPU, whose float kernels may
    round differently, so they are compared within float32's tolerance."""
    expected = torch.load(FIXTURES / "v1_expected_logits.pt", weights_only=True)
    model, block_size, template = load_model(FIXTURES / "v1_checkpoint.pt")
    assert block_size == 8 and template is None
    stored = torch.load(FIXTURES / "v1_checkpoint.pt", weights_only=True)["model"]
    assert len(stored) == len(model.state_dict())
    for (name, loaded), original in zip(model.state_dict().items(), stored.values()):  # same order, renamed keys
        assert torch.equal(loaded, original), name
    torch.testing.assert_close(model(expected["tokens"])[0], expected["base_logits"])


def test_an_adapter_written_before_format_versions_merges_to_the_same_logits_without_a_warning():
    expected = torch.load(FIXTURES / "v1_expected_logits.pt", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _, _ = load_lora_model(FIXTURES / "v1_adapter.pt", FIXTURES / "v1_checkpoint.pt")
    torch.testing.assert_close(model(expected["tokens"])[0], expected["adapted_logits"])
    adapter, base = load_lora_checkpoint(FIXTURES / "v1_adapter.pt"), load_checkpoint(FIXTURES / "v1_checkpoint.pt")
    assert trained_on_these_weights(adapter, base)
    assert isinstance(adapter["rng"], list) and adapter["format_version"] == FORMAT_VERSION


@pytest.mark.parametrize("version", [1, 2])
def test_an_old_checkpoint_s_optimizer_state_resumes_under_the_new_parameter_names(version):
    checkpoint = load_checkpoint(FIXTURES / f"v{version}_checkpoint.pt")
    assert all(name.startswith(("blocks.", "token_embeddings.", "output_")) and ".mlp.0." not in name
               for name in checkpoint["optimizer"]["state"])
    model = tiny_model(**checkpoint["model_args"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_training_state(model, optimizer, checkpoint)
    moments = optimizer.state[model.blocks[0].mlp.up_projection.weight]["exp_avg"]
    written = checkpoint["optimizer"]["state"]["blocks.0.mlp.up_projection.weight"]
    torch.testing.assert_close(moments, written["exp_avg"])


def test_a_format_2_checkpoint_loads_the_same_weights_to_the_same_logits():
    expected = torch.load(FIXTURES / "v2_expected_logits.pt", weights_only=True)
    written = torch.load(FIXTURES / "v2_checkpoint.pt", weights_only=True)["model"]
    for path in ("v2_checkpoint.pt", "v2_sharded"):  # the same weights, in a file and in a folder of shards
        model, block_size, template = load_model(FIXTURES / path)
        assert block_size == 8 and template is None
        for (name, tensor), weight in zip(written.items(), model.state_dict().values(), strict=True):
            assert torch.equal(tensor, weight), name
        torch.testing.assert_close(model(expected["tokens"])[0], expected["base_logits"])


def test_a_format_2_adapter_with_the_dict_template_merges_to_the_same_logits_without_a_warning():
    expected = torch.load(FIXTURES / "v2_expected_logits.pt", weights_only=True)
    written = torch.load(FIXTURES / "v2_adapter.pt", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, block_size, template = load_lora_model(FIXTURES / "v2_adapter.pt", FIXTURES / "v2_checkpoint.pt")
    torch.testing.assert_close(model(expected["tokens"])[0], expected["adapted_logits"])
    assert block_size == 8 and template == PromptTemplate.from_dict(upgraded_template(written["prompt_template"]))
    assert template.prompt([{"role": "user", "content": "Hi"}]) == \
        load_tokenizer().encode_ordinary(written["prompt_template"]["without_input"].format(instruction="Hi"))
    adapter = load_lora_checkpoint(FIXTURES / "v2_adapter.pt")
    for (name, tensor), loaded in zip(written["lora"].items(), adapter["lora"].values(), strict=True):
        assert torch.equal(tensor, loaded), name


def test_a_format_2_sharded_checkpoint_resumes_its_optimizer_state():
    written = torch.load(FIXTURES / "v2_checkpoint.pt", weights_only=True)["optimizer"]["state"]
    model = tiny_model(**load_checkpoint(FIXTURES / "v2_checkpoint.pt")["model_args"])
    model_state, optimizer_state = sharded_training_state(model, torch.optim.AdamW(model.parameters()))
    load_shards(FIXTURES / "v2_sharded", load_index(FIXTURES / "v2_sharded"),
                {"model": model_state, "optimizer": optimizer_state["state"]})
    for (index, moments), state in zip(written.items(), optimizer_state["state"].values(), strict=True):
        torch.testing.assert_close(state["exp_avg"], moments["exp_avg"], rtol=0, atol=0)


def test_a_checkpoint_from_a_newer_lightgpt_is_refused_in_one_line(tmp_path):
    checkpoint = load_checkpoint(FIXTURES / "v1_checkpoint.pt") | {"format_version": FORMAT_VERSION + 1}
    save_atomically(checkpoint, tmp_path / "newer.pt")
    with pytest.raises(ValueError, match=f"format {FORMAT_VERSION + 1}, newer than"):
        load_checkpoint(tmp_path / "newer.pt")


def test_a_save_leaves_alone_the_temporary_file_of_a_process_with_the_same_id_on_another_node(tmp_path):
    # Containers on several nodes sharing a filesystem often run the trainer with the same process id.
    path = tmp_path / "checkpoint.pt"
    others = [path.with_name(f"checkpoint.pt.{os.getpid()}.tmp"), tmp_path / f"meta.json.{os.getpid()}.tmp"]
    for other in others:
        other.write_text("another node's half-written file")
    save_atomically({"step": 1}, path)
    write_text_atomically(tmp_path / "meta.json", "{}")
    assert torch.load(path, weights_only=True) == {"step": 1} and (tmp_path / "meta.json").read_text() == "{}"
    for other in others:
        assert other.read_text() == "another node's half-written file"
    assert len(list(tmp_path.glob("*.tmp"))) == 2


def test_a_loaded_model_runs_on_the_checkpoint_s_memory_mapped_tensors_without_copying_them(tmp_path):
    # A 7B base must not need twice its size in RAM to be instruction-tuned or to generate.
    path = save_pretrained_checkpoint(tiny_model(), tmp_path / "base.pt", block_size=8)
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, path)
    for name, parameter in model.named_parameters():
        assert parameter.data_ptr() == checkpoint["model"][name].data_ptr(), name
    assert model.output_layer.weight is model.token_embeddings.weight
    tokens = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(model.eval()(tokens)[0], tiny_model().eval()(tokens)[0], rtol=0, atol=0)


def sharded_checkpoint(model, path):
    """A sharded checkpoint of the model and a step of AdamW, saved as pre-train.py saves one, in this process."""
    optimizer = torch.optim.AdamW(model.parameters())
    model(*[torch.randint(0, 97, (2, 8))] * 2)[1].backward()
    optimizer.step()
    model_state, optimizer_state = sharded_training_state(model, optimizer)
    save_sharded(training_checkpoint(vars(model.config), 8, optimizer_state, 1, 1, [], {}, grad_scaler={},
                                     model=model_state, sampler=torch.Generator().get_state()), path)


def test_a_sharded_checkpoint_is_a_folder_that_loads_like_a_file(tmp_path):
    model = tiny_model()
    sharded_checkpoint(model, tmp_path / "sharded")
    assert is_sharded_checkpoint(tmp_path / "sharded") and not is_sharded_checkpoint(tmp_path)
    assert "model" not in load_index(tmp_path / "sharded")
    loaded, block_size, _ = load_model(tmp_path / "sharded")
    tokens = torch.randint(0, 97, (1, 8))
    assert block_size == 8
    torch.testing.assert_close(loaded(tokens)[0], model.eval()(tokens)[0], rtol=0, atol=0)
    sharded_checkpoint(model, tmp_path / "sharded")  # a second save replaces the first one's shards
    assert len(list((tmp_path / "sharded").glob("shards-*"))) == 1


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_sharded_checkpoint_whose_metadata_would_run_code_is_refused(tmp_path, capsys):
    sharded_checkpoint(tiny_model(), tmp_path / "sharded")
    metadata = next((tmp_path / "sharded").glob("shards-*/.metadata"))
    metadata.write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(ValueError, match=r"builtins\.print has no place in a checkpoint"):
        load_checkpoint(tmp_path / "sharded")
    assert "this ran" not in capsys.readouterr().out


def calling(module: str, name: str, argument: str, then: bytes) -> bytes:
    """A protocol 4 pickle that calls module.name(argument) (STACK_GLOBAL, REDUCE), drops the result and goes
    on with `then`, another pickle without its protocol opcode."""
    def string(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()  # SHORT_BINUNICODE
    return b"\x80\x04" + string(module) + string(name) + b"\x93" + string(argument) + b"\x85R0" + then[2:]


def sharded_with_crafted_metadata(root, module: str, name: str, marker) -> tuple:
    """A sharded checkpoint whose .metadata first runs `touch marker` through module.name, then is DCP's own;
    and its index. Also a rank's own metadata, which DCP falls back to when .metadata fails, runs it."""
    sharded_checkpoint(tiny_model(), root / "sharded")
    metadata = next((root / "sharded").glob("shards-*/.metadata"))
    crafted = calling(module, name, f"touch {marker}", metadata.read_bytes())
    metadata.write_bytes(crafted)
    (metadata.parent / "__0.metadata").write_bytes(crafted)
    index_path = root / "sharded" / "checkpoint.pt"  # whoever crafts the files can rewrite their checksums too
    index = torch.load(index_path, weights_only=True)
    torch.save(index | {"shard_checksums": file_checksums(metadata.parent)}, index_path)
    return root / "sharded", load_index(root / "sharded")


CODE_RUNNERS = [("os", "system"), ("torch.distributed.checkpoint.metadata", "os.system"),
                ("torch", "serialization.os.system"), ("torch.distributed.checkpoint.filesystem", "os.system")]


@pytest.mark.parametrize("module, name", CODE_RUNNERS)
def test_sharded_metadata_that_reaches_os_system_runs_nothing_on_loading_or_resuming(tmp_path, module, name):
    path, index = sharded_with_crafted_metadata(tmp_path, module, name, tmp_path / "marker")
    refusal = f"not a readable folder of shards ({module}.{name} has no place in a checkpoint)"
    with pytest.raises(ValueError, match=re.escape(refusal)):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=re.escape(refusal)):  # pre-train.py --resume's way in
        load_shards(path, index, {"model": tiny_model().state_dict()})
    assert not (tmp_path / "marker").exists()


def test_without_metadata_dcp_s_fallback_to_a_rank_s_metadata_is_never_read(tmp_path):
    path, _ = sharded_with_crafted_metadata(tmp_path, "os", "system", tmp_path / "marker")
    next(path.glob("shards-*/.metadata")).unlink()
    with pytest.raises(ValueError, match="not a readable folder of shards"):
        load_checkpoint(path)
    assert not (tmp_path / "marker").exists()


@pytest.mark.slow
def test_generate_refuses_sharded_metadata_that_would_run_code_in_one_line(tmp_path):
    path, _ = sharded_with_crafted_metadata(tmp_path, *CODE_RUNNERS[1], tmp_path / "marker")
    result = run_script("generate.py", "--checkpoint_path", path, "--prompt", "The", "--max_tokens", "2",
                        "--device", "cpu")
    assert_one_line_error(result, "not a readable folder of shards", "os.system has no place in a checkpoint")
    assert not (tmp_path / "marker").exists()


@contextlib.contextmanager
def files_opened() -> Iterator[list[str]]:
    """The paths this process opens (Python's audit event "open") while in the block."""
    opened = []
    OPEN_LISTENERS.append(opened)
    try:
        yield opened
    finally:
        OPEN_LISTENERS.remove(opened)


OPEN_LISTENERS: list[list[str]] = []
sys.addaudithook(lambda event, args: [opened.append(str(args[0])) for opened in OPEN_LISTENERS if event == "open"])


def test_a_shards_entry_naming_a_folder_outside_the_checkpoint_is_refused_unopened(tmp_path):
    sharded_checkpoint(tiny_model(), tmp_path / "other")  # another checkpoint's shards, which would load
    outside = next((tmp_path / "other").glob("shards-*"))
    path, index = tmp_path / "sharded", None
    sharded_checkpoint(tiny_model(), path)
    index = torch.load(path / "checkpoint.pt", weights_only=True)
    for shards in (f"../other/{outside.name}", str(outside), "/etc"):
        save_atomically(index | {"shards": shards}, path / "checkpoint.pt")
        with files_opened() as opened, pytest.raises(ValueError, match=re.escape(
                f"{path}: the index's shards entry {shards!r} is not a name inside the folder")):
            load_checkpoint(path)
        assert not [name for name in opened if not name.startswith(str(path))], opened


@pytest.mark.parametrize("relative_path", ["../../other/shards/__0_0.distcp", "/etc/passwd"])
def test_a_shard_file_named_outside_the_folder_of_shards_is_refused_unopened(tmp_path, relative_path):
    path = tmp_path / "sharded"
    sharded_checkpoint(tiny_model(), path)
    metadata_file = next(path.glob("shards-*/.metadata"))
    metadata = pickle.loads(metadata_file.read_bytes())
    for storage in metadata.storage_data.values():
        storage.relative_path = relative_path
    metadata_file.write_bytes(pickle.dumps(metadata))
    with files_opened() as opened, pytest.raises(ValueError, match=re.escape(
            f"the shard file {relative_path!r} is not a name inside the folder")):
        load_checkpoint(path)
    assert not [name for name in opened if not name.startswith(str(path))], opened


@pytest.mark.parametrize("format, existing, message", [
    ("sharded", "file", "is a single-file checkpoint, and --checkpoint_format sharded writes a folder"),
    ("single", "folder", "is a folder; use --checkpoint_format sharded"),
])
def test_the_checkpoint_format_must_fit_what_is_at_the_checkpoint_path(tmp_path, capsys, format, existing, message):
    path = tmp_path / "checkpoint"
    if existing == "file":
        save_pretrained_checkpoint(tiny_model(), path, block_size=8)
    else:
        sharded_checkpoint(tiny_model(), path)
    error = flag_error(load_script("pre-train"), ["--checkpoint_path", str(path), "--checkpoint_format", format,
                                                  "--resume", "--device", "cpu"], capsys)
    assert message in error


def a_dead_process_id() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_failed_save_names_the_file_and_leaves_the_previous_checkpoint_whole(tmp_path, full_disk_after_4_kb):
    path = tmp_path / "checkpoint.pt"
    save_atomically({"step": 1}, path)
    with pytest.raises(OSError, match=f"could not write {path}: File too large"):
        full_disk_after_4_kb(save_atomically, {"step": 2, "weights": torch.zeros(10_000)}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_failed_metrics_record_leaves_no_half_line(tmp_path, full_disk_after_4_kb):
    path = tmp_path / "checkpoint.metrics.jsonl"
    append_metrics(path, {"step": 1})
    with pytest.raises(OSError, match=f"could not write {path}: File too large"):
        full_disk_after_4_kb(append_metrics, path, {"step": 2, "note": "x" * 5000})
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


@pytest.mark.parametrize("lock", ["checkpoint", "preparation"])
def test_a_lock_file_is_removed_when_its_run_ends_and_a_run_that_waited_on_it_locks_a_new_one(tmp_path, lock):
    """A run that opened the lock file before its holder removed it must not hold the removed file, which locks
    nothing: a third run would take a new one at the same time."""
    if lock == "checkpoint":
        path, hold = tmp_path / "checkpoint.pt.lock", functools.partial(exclusive_lock, tmp_path / "checkpoint.pt")
    else:
        path, hold = tmp_path / "prepare.lock", functools.partial(preparation_lock, tmp_path)
    with hold():
        assert path.read_text() == f"{os.getpid()}\n"
        waiting = open(path, "a+")  # opened now, locked once the holder lets go, as a waiting run does
    assert not path.exists()
    fcntl.flock(waiting, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the removed file's lock, free to take
    assert not still_at(waiting, path)
    with hold():
        assert path.exists()  # a new file, locked by the new run
        with pytest.raises(BlockingIOError):
            fcntl.flock(open(path, "a+"), fcntl.LOCK_EX | fcntl.LOCK_NB)
    waiting.close()
    assert not path.exists()


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
    # A file last written before this live process started: its id was another's (ids wrap around, at 32,768 here).
    reused = tmp_path / f"checkpoint.metrics.jsonl.{host}-{alive}-579a516f.tmp"
    reused.write_text("")
    os.utime(reused, (psutil.Process().create_time() - 60,) * 2)
    with claimed_checkpoint(tmp_path / "checkpoint.pt", {}):
        pass
    assert sorted(path.name for path in tmp_path.glob("*.tmp")) == sorted(name for name, kept in names.items() if kept)



@pytest.mark.parametrize("kind", ["file", "folder of shards", "adapter", "file of notes"])
def test_a_new_run_never_writes_over_a_checkpoint_already_there(tmp_path, kind):
    """Without --resume, a checkpoint at --checkpoint_path once was written over silently (hours of training): it
    is refused in one line that names it, its step and both ways out; a file that is no checkpoint is refused too.
    With --resume, the run continues it."""
    path = tmp_path / "checkpoint"
    if kind == "folder of shards":
        sharded_checkpoint(tiny_model(), path)
    elif kind == "file of notes":
        path.write_text("notes")
    else:
        save_atomically(training_checkpoint(vars(tiny_model().config), 8, {}, 1, 1, [], {}, grad_scaler={},
                                            **({"lora": {}} if kind == "adapter" else {})), path)
    with pytest.raises(ValueError) as refused:
        check_outputs(path, {}, sharded=kind == "folder of shards")
    assert str(refused.value) == (
        f"--checkpoint_path {path}: already holds a file that is not a readable checkpoint; choose another "
        f"--checkpoint_path (or remove it)" if kind == "file of notes" else
        f"--checkpoint_path {path}: already holds a checkpoint, saved at step 1; add --resume to continue it, or "
        f"choose another --checkpoint_path (or remove it) to start anew")
    check_outputs(path, {}, sharded=kind == "folder of shards", resume=True)

DAMAGED_PROGRESS = [
    ("step", -5, "its step must be a whole number of at least 0, got -5"),
    ("step", "7", "its step must be a whole number of at least 0, got '7' (a str)"),
    ("rng", [{"torch": torch.zeros(3, dtype=torch.uint8)}], "its rng must be a list of each rank's random-number"),
    ("rng", torch.get_rng_state(), "its rng must be a list"),
    ("sampler", torch.zeros(5, dtype=torch.uint8), "its sampler must be a CPU generator's state "
                                                    "(torch.Generator().get_state(), 5056 bytes), got a tensor of 5"),
    ("sampler", torch.zeros(5056, dtype=torch.uint8), "its sampler must be a CPU generator's state"),
    ("grad_scaler", {"scale": 1.0}, "its grad_scaler must be a GradScaler's state"),
    ("grad_scaler", [65536.0], "its grad_scaler must be a GradScaler's state"),
    ("tokenizer", "cl100k_base", "its tokenizer is 'cl100k_base' (a str); this LightGPT reads r50k_base"),
]


@pytest.mark.parametrize("format", ["single", "sharded"])
def test_resuming_refuses_damaged_progress_entries_with_one_line_naming_the_entry(tmp_path, format):
    """Each of these once reached PyTorch and ended in a traceback (ZeroDivisionError, TypeError, RuntimeError), or,
    for another tokenizer, resumed on the wrong one: pre-train.py's checks, before any work, name the entry."""
    pretrain = load_script("pre-train")
    path = tmp_path / "checkpoint"
    args = pretrain.parse_args([*TINY_MODEL_FLAGS, "--block_size", "8", "--checkpoint_path", str(path), "--resume"])
    model_args = pretrain.model_args_from(args)
    model = LightGPT(LightGPTConfig(**model_args))
    sharded_checkpoint(model, path) if format == "sharded" else save_atomically(training_checkpoint(
        model_args, 8, {}, 1, 1, [rng_state(torch.device("cpu"))], {}, grad_scaler={}, model=model.state_dict(),
        sampler=torch.Generator().get_state()), path)
    index = path / "checkpoint.pt" if format == "sharded" else path
    written = torch.load(index, weights_only=True)
    for entry, value, message in DAMAGED_PROGRESS:
        save_atomically(written | {entry: value}, index)
        with pytest.raises(ValueError) as refused:
            pretrain.check_resumable(load_index(path), model_args, args)
        assert str(refused.value).startswith(f"{index if entry == 'tokenizer' else path}: {message}"), refused.value
    save_atomically(written, index)
    pretrain.check_resumable(load_index(path), model_args, args)  # undamaged, it resumes



def test_resuming_adapters_refuses_damaged_progress_and_weights_that_are_not_finite(tmp_path):
    """instruction-tune.py and preference-tune.py resume through resumable_adapters, which reads the same entries."""
    path = tmp_path / "adapter.pt"
    lora = {"blocks.0.mlp.up_projection.lora_a": torch.randn(2, 32)}
    adapter = {"format_version": FORMAT_VERSION, "lora_args": {"rank": 2, "alpha": 1.0},
               "model_args": vars(tiny_model().config), "lora": lora, "prompt_template": ALPACA.to_dict(), "step": 3}
    save_atomically(adapter, path)
    assert resumable_adapters(path)["step"] == 3
    for entry, value, message in [*DAMAGED_PROGRESS, ("lora", {name: tensor * torch.nan for name, tensor in
                                                               lora.items()}, "its weights hold NaN")]:
        save_atomically(adapter | {entry: value}, path)
        with pytest.raises(ValueError) as refused:
            resumable_adapters(path)
        assert str(refused.value).startswith(f"{path}: {message}"), refused.value

import json
import math
import os
import re

import pytest
import torch

from checkpoint import save_atomically
from conftest import (
    assert_one_line_error,
    flag_error,
    load_script,
    metrics,
    run_script,
    run_until_first_epoch_then_terminate,
    save_pretrained_checkpoint,
    tensorboard_run,
    tiny_model,
)
from conversations import ALPACA, CHATML
from finetuning import (
    adapter_checkpoint,
    adapter_on_base,
    adapters_off,
    add_chat_tokens,
    chat_token_entries,
    load_lora_model,
    lora_model,
    merged_adapter_entry,
    preference_loss,
    resume_adapters,
)
from lora import add_lora, lora_layers, lora_state_dict, merge_lora
from preferences import PreferenceSamples, checked_pair, hub_preferences, read_local_preferences
from tokenizer import CHAT_VOCABULARY_SIZE

BASE_SHAPE = dict(vocabulary_size=50257, embedding_dimensions=16, num_heads=2, num_layers=2, eos_index=50256)
LORA_ARGS = {"rank": 4, "alpha": 1.0, "dropout": 0.0}


def toy_pairs(count: int, offset: int = 0) -> list[dict]:
    """Pairs a chat model can tell apart: whatever the question, Yes. is chosen and No. rejected."""
    return [{"prompt": [{"role": "user", "content": f"Question {number}: is {number} a number?"}],
             "chosen": [{"role": "assistant", "content": "Yes."}],
             "rejected": [{"role": "assistant", "content": "No."}]} for number in range(offset, offset + count)]


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    """A tiny pre-trained base and a chat adapter of it (ChatML's two tokens, adapters that change the model),
    written by finetuning's own functions as instruction-tune.py writes them."""
    folder = tmp_path_factory.mktemp("preference")
    base_model = tiny_model(**BASE_SHAPE)
    base_path = save_pretrained_checkpoint(base_model, folder / "base.pt", block_size=32)
    base = torch.load(base_path, weights_only=True)
    torch.manual_seed(1)
    chat = lora_model(base, base_path, LORA_ARGS, "cpu")
    add_chat_tokens(chat, CHAT_VOCABULARY_SIZE)
    with torch.no_grad():
        for layer in lora_layers(chat).values():
            layer.lora_b.normal_(std=0.2)
    save_atomically(adapter_checkpoint(chat, base, base_path, LORA_ARGS, CHATML, None, 0, 0, None, {},
                                       grad_scaler=None, **chat_token_entries(chat, base)), folder / "lora_chat.pt")
    return folder, base_path, folder / "lora_chat.pt"


def preference_model(base_path, chat_path):
    """The chat model with a fresh adapter, as preference-tune.py builds it."""
    chat = torch.load(chat_path, weights_only=True)
    model = adapter_on_base(chat, torch.load(base_path, weights_only=True), chat_path, base_path)
    torch.manual_seed(2)
    add_lora(model, 4, 1.0, 0.0)
    return model.train(), chat


def toy_batch(count: int = 4):
    samples = PreferenceSamples([checked_pair(record, "toy") for record in toy_pairs(count)], CHATML, 32, -100,
                                show_progress=False)
    return samples.batch(list(range(count)))


def test_at_step_0_the_loss_is_ln_2_and_every_reward_0(chat_files):
    _, base_path, chat_path = chat_files
    model, _ = preference_model(base_path, chat_path)
    inputs, targets = toy_batch()
    for label_smoothing in (0.0, 0.2):
        loss, figures, units = preference_loss(model, inputs, targets, beta=0.1, label_smoothing=label_smoothing)
        assert units == 4 and math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
        assert figures["rewards/chosen"] == figures["rewards/rejected"] == figures["rewards/margins"] == 0
        assert figures["rewards/accuracies"] == 0  # no pair is preferred yet


def test_the_adapter_off_reference_is_the_separately_loaded_chat_model(chat_files):
    _, base_path, chat_path = chat_files
    model, _ = preference_model(base_path, chat_path)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.normal_(std=0.5)
    inputs, targets = toy_batch()
    chat_model, _, _ = load_lora_model(chat_path, base_path)
    with torch.no_grad():
        _, expected = chat_model(inputs, targets, per_row=True)
        with adapters_off(model):
            _, reference = model(inputs, targets, per_row=True)
        _, policy = model(inputs, targets, per_row=True)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    assert (policy - expected).abs().min() > 1e-3
    # each row's summed cross entropy: the logits' log-softmax at the response's targets
    logits, _ = chat_model(inputs)
    kept = targets != -100
    log_probabilities = logits.log_softmax(-1).gather(-1, targets.where(kept, 0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(expected, -(log_probabilities * kept).sum(-1), rtol=1e-5, atol=1e-5)


def test_the_per_row_loss_s_gradient_is_autograd_s_through_the_whole_logits(chat_files):
    _, base_path, chat_path = chat_files
    model, _ = preference_model(base_path, chat_path)
    inputs, targets = toy_batch(3)
    weights = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.3])
    gradients = []
    for fused in (True, False):
        model.zero_grad()
        if fused:
            _, losses = model(inputs, targets, per_row=True)
        else:
            logits, _ = model(inputs)
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(-1)
        (losses * weights).sum().backward()
        gradients.append([parameter.grad.clone() for parameter in model.parameters() if parameter.requires_grad])
    for fused, whole in zip(*gradients):
        torch.testing.assert_close(fused, whole, rtol=1e-3, atol=1e-5)  # float32 sums over 50,259 logits


def test_a_preference_adapter_merges_after_the_chat_adapter_it_was_trained_on(chat_files, tmp_path):
    _, base_path, chat_path = chat_files
    model, chat = preference_model(base_path, chat_path)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.normal_(std=0.3)
    base = torch.load(base_path, weights_only=True)
    entries = {"grad_scaler": None, "merged_adapter": merged_adapter_entry(chat, chat_path)}
    save_atomically(adapter_checkpoint(model, base, base_path, LORA_ARGS, CHATML, None, 0, 0, None, {}, **entries),
                    tmp_path / "pref.pt")
    loaded, block_size, template = load_lora_model(tmp_path / "pref.pt")
    expected = merge_lora(model).eval()
    assert block_size == 32 and template == CHATML
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=1e-6)

    damaged = torch.load(tmp_path / "pref.pt", weights_only=True)
    next(iter(damaged["merged_adapter"]["lora"].values())).view(-1)[0] += 1  # the chat adapter's bytes, saved inside
    torch.save(damaged, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match=r"damaged.pt: merged_adapter/lora/\S+ differs from the checksum"):
        load_lora_model(tmp_path / "damaged.pt")


def test_local_pairs_in_trl_s_layouts_and_one_line_for_malformed_records(tmp_path):
    good = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go."}, toy_pairs(1)[0],
            {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go."}]}]
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(record) + "\n" for record in good))
    pairs = read_local_preferences([tmp_path / "good.jsonl"])
    exchange = ([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello!"}],
                [{"role": "assistant", "content": "Go."}])
    assert pairs[0] == pairs[2] == exchange and pairs[1][1] == [{"role": "assistant", "content": "Yes."}]
    bad = [good[0], {"prompt": "Hi", "chosen": "Hello!"}, good[1], {"prompt": "Hi", "chosen": 3, "rejected": "x"},
           {"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}], "rejected": "x"}]

    def error_of(records: list) -> str:
        (tmp_path / "bad.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        with pytest.raises(ValueError) as failure:
            read_local_preferences([tmp_path / "good.jsonl", tmp_path / "bad.jsonl"])
        assert "\n" not in str(failure.value)
        return str(failure.value)

    # one line, however many records are malformed: the first of them, and how many more there are
    for line, fragment, records in ((2, "chosen and rejected", bad), (1, "chosen is neither", bad[3:]),
                                    (1, "roles: user", bad[4:])):
        message = error_of(records)
        assert message.startswith(f"{tmp_path / 'bad.jsonl'}: line {line}") and fragment in message, message
    assert error_of(bad).endswith(" (and 2 more malformed records in --dataset_path)")
    assert error_of(bad[3:]).endswith(" (and 1 more malformed record in --dataset_path)")
    assert "more malformed" not in error_of(bad[4:])


def ultrafeedback_mirror(root, splits: dict[str, list[dict]]) -> None:
    """A local folder laid out as HuggingFaceH4/ultrafeedback_binarized on the hub (its README's configs, Parquet
    shards with its real columns), which datasets.load_dataset reads by the repository's name from `root`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "HuggingFaceH4" / "ultrafeedback_binarized"
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, rows in splits.items():
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
        path = folder / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        conversations = {name: [[{"role": "user", "content": row["prompt"]}, {"role": "assistant",
                                                                               "content": row[name]}] for row in rows]
                         for name in ("chosen", "rejected")}
        pq.write_table(pa.table({"prompt": [row["prompt"] for row in rows], "prompt_id": ["0" * 64] * len(rows),
                                 **conversations, "messages": conversations["chosen"],
                                 "score_chosen": [8.0] * len(rows), "score_rejected": [4.0] * len(rows)}), path)
    (folder / "README.md").write_text("\n".join(lines + ["---", ""]))


def test_ultrafeedback_s_pairs_stream_from_a_local_mirror_of_the_hub_s_layout(tmp_path, monkeypatch):
    rows = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go."}, {"prompt": "Same", "chosen": "A", "rejected": "A"}]
    ultrafeedback_mirror(tmp_path, {"train_prefs": rows, "test_prefs": rows[:1], "train_sft": rows})
    monkeypatch.chdir(tmp_path)
    exchange = ([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello!"}],
                [{"role": "assistant", "content": "Go."}])
    assert hub_preferences("train_prefs") == ([exchange], 1)  # chosen and rejected the same: not a pair
    assert hub_preferences("test_prefs") == ([exchange], 0)
    monkeypatch.chdir(tmp_path / "HuggingFaceH4")  # no mirror here: the hub itself, offline in the tests
    with pytest.raises(ConnectionError) as failure:
        hub_preferences("train_prefs")
    assert "HuggingFaceH4/ultrafeedback_binarized" in str(failure.value) and "\n" not in str(failure.value)
    assert "--dataset local" in str(failure.value)


def test_flags_that_cannot_work_are_one_line(chat_files, capsys):
    script = load_script("preference-tune")
    _, _, chat_path = chat_files
    assert "--dataset_path: required" in flag_error(script, ["--dataset", "local", "--lora_path", str(chat_path)],
                                                     capsys)
    assert "--label_smoothing: must be below 0.5" in flag_error(
        script, ["--label_smoothing", "0.5", "--lora_path", str(chat_path)], capsys)
    assert "--lora_path: no chat adapter" in flag_error(script, ["--lora_path", "nowhere.pt"], capsys)
    for beta in ("1e308", "inf", "nan", "0", "1e-9", "-1"):  # beyond what DPO's float32 gradients carry
        assert "argument --beta: must be in [1e-06, 1e+06]" in flag_error(
            script, ["--beta", beta, "--lora_path", str(chat_path)], capsys)


def test_an_instruction_adapter_is_neither_the_chat_adapter_nor_the_adapter_to_resume(chat_files, tmp_path):
    script = load_script("preference-tune")
    _, base_path, chat_path = chat_files
    base, chat = torch.load(base_path, weights_only=True), torch.load(chat_path, weights_only=True)
    assert script.chat_template(chat, str(chat_path)) == CHATML
    with pytest.raises(ValueError, match=r"^--lora_path lora.pt: an adapter in the alpaca template, not a chat "
                                         r"\(ChatML\) adapter; train one with instruction-tune.py on chats"):
        script.chat_template(chat | {"prompt_template": ALPACA.to_dict()}, "lora.pt")

    flags = ["--lora_path", str(chat_path), "--dataset", "local", "--dataset_path", "pairs.jsonl", "--rank", "4",
             "--checkpoint_path", str(tmp_path / "pref.pt")]
    args = script.parse_args(flags)
    model, _ = preference_model(base_path, chat_path)
    preference = adapter_checkpoint(model, base, base_path, LORA_ARGS, CHATML, None, 0, 0, None, vars(args),
                                    grad_scaler=None, merged_adapter=merged_adapter_entry(chat, chat_path))
    script.check_resumable(preference, base, chat, args, str(base_path))  # the same flags
    for changed, trained_with in ((["--beta", "0.5"], "--beta 0.1"), (["--label_smoothing", "0.2"],
                                  "--label_smoothing 0.0"), (["--rank", "2"], "--rank 4")):
        with pytest.raises(ValueError, match=rf"^--resume: the checkpoint was trained with {trained_with}, the flags "
                                             rf"ask for {' '.join(changed)}; repeat the original run's flags$"):
            script.check_resumable(preference, base, chat, script.parse_args(flags + changed), str(base_path))
    instruction = {name: entry for name, entry in preference.items() if name != "merged_adapter"}
    with pytest.raises(ValueError, match=r"is an instruction adapter \(instruction-tune.py's\), not a preference "
                                         r"adapter \(preference-tune.py's\)"):
        script.check_resumable(instruction, base, chat, args, str(base_path))


def test_a_base_that_is_no_checkpoint_file_is_named_in_one_line_by_both_fine_tuning_scripts(chat_files, tmp_path,
                                                                                            capsys):
    preference_tune, instruction_tune = load_script("preference-tune"), load_script("instruction-tune")
    _, _, chat_path = chat_files
    os.mkfifo(tmp_path / "fifo.pt")
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "config.json").write_text("{}")
    for name, problem in (("fifo.pt", "is not a regular file but a FIFO"), ("zero.pt", "is not a regular file"),
                          ("exported", "is an exported folder (export.py's), which cannot be a base to tune"),
                          ("nowhere.pt", "no checkpoint at")):
        path = str(tmp_path / name)
        assert problem in flag_error(instruction_tune, ["--base_model_path", path], capsys)
        args = preference_tune.parse_args(["--lora_path", str(chat_path), "--base_model_path", path])
        with pytest.raises(ValueError, match=r"^--base_model_path: .*" + re.escape(problem)):
            preference_tune.base_path_of(args, {})
        args = preference_tune.parse_args(["--lora_path", str(chat_path)])
        with pytest.raises(ValueError, match=rf"^the base_model_path of --lora_path {re.escape(str(chat_path))}: "
                                             rf".*{re.escape(problem)}"):
            preference_tune.base_path_of(args, {"base_model_path": path})


def test_resuming_an_adapter_of_another_shape_names_its_file(chat_files, tmp_path):
    _, base_path, chat_path = chat_files
    model, _ = preference_model(base_path, chat_path)
    saved = lora_state_dict(model)
    name = next(iter(saved))
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad])
    with pytest.raises(ValueError, match=rf"^--resume: {re.escape(str(tmp_path / 'lora.pt'))}: the adapter's "
                                         rf"{re.escape(name)} has shape \(5, 5\)"):
        resume_adapters(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                        {"lora": saved | {name: torch.zeros(5, 5)}}, torch.device("cpu"), tmp_path / "lora.pt")


PREFERENCE_FLAGS = ["--dataset", "local", "--batch_size", "8", "--gradient_accumulation_steps", "1",
                    "--learning_rate", "2e-2", "--warmup_steps", "0", "--beta", "0.5", "--rank", "4",
                    "--device", "cpu", "--seed", "0", "--no-tensorboard"]


def long_pairs(count: int) -> list[dict]:
    """Pairs whose chosen response alone is longer than a 32-token context: preference-tune.py drops them."""
    return [pair | {"chosen": [{"role": "assistant", "content": "Yes, it is. " * 12}]} for pair in toy_pairs(count)]


@pytest.fixture(scope="module")
def preference_run(chat_files):
    """preference-tune.py for 4 epochs on 60 toy pairs (3 held out) and 3 too long for the context (dropped from
    the training ones); and the same run stopped by SIGTERM after its first epoch, then resumed."""
    folder, base_path, chat_path = chat_files
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in [*long_pairs(3), *toy_pairs(60)]))
    flags = [*PREFERENCE_FLAGS, "--lora_path", chat_path, "--dataset_path", data]
    whole = run_script("preference-tune.py", *flags, "--checkpoint_path", folder / "whole.pt", "--num_epochs", "4",
                       "--tensorboard")
    assert whole.returncode == 0, whole.stderr
    assert "0 with the start of their prompt cut, 3 dropped" in whole.stdout
    halves = [*flags, "--checkpoint_path", folder / "halves.pt", "--num_epochs", "4"]
    first = run_until_first_epoch_then_terminate("preference-tune.py", *halves,
                                                 metrics_path=folder / "halves.metrics.jsonl")
    assert first.returncode == 143 and "Stopped by signal" in first.stdout, first.stderr
    second = run_script("preference-tune.py", *halves, "--resume")
    assert second.returncode == 0 and "Resuming from" in second.stdout, second.stderr
    return folder, whole


@pytest.mark.slow
def test_held_out_reward_accuracy_rises_and_chosen_answers_gain_on_the_reference(preference_run):
    folder, whole = preference_run
    records = metrics(folder / "whole.pt")
    assert [record["epoch"] for record in records] == [1, 2, 3, 4]
    last = records[-1]
    assert last["validation_rewards/accuracies"] > 0.9 and last["validation_rewards/chosen"] > 0
    assert last["validation_rewards/margins"] > records[0]["validation_rewards/margins"] > 0
    assert last["validation_loss"] < math.log(2) and "validation_perplexity" not in last
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(last)
    assert "validation_rewards/accuracies=" in whole.stdout + whole.stderr
    tags = tensorboard_run(folder / "runs" / "whole").Tags()["scalars"]
    assert {f"{split}/rewards/{name}" for split in ("train", "validation")
            for name in ("chosen", "rejected", "margins", "accuracies")} <= set(tags)


@pytest.mark.slow
def test_a_new_run_never_writes_over_an_adapter_already_there(preference_run, chat_files):
    folder, _ = preference_run
    written = (folder / "whole.pt").read_bytes()
    result = run_script("preference-tune.py", *PREFERENCE_FLAGS, "--lora_path", chat_files[2], "--dataset_path",
                        folder / "pairs.jsonl", "--checkpoint_path", folder / "whole.pt")
    assert_one_line_error(result, f"--checkpoint_path {folder / 'whole.pt'}: already holds a checkpoint, saved at "
                                  f"step 32; add --resume")
    assert (folder / "whole.pt").read_bytes() == written


@pytest.mark.slow
def test_resume_is_exact(preference_run):
    folder, _ = preference_run
    whole, halves = (torch.load(folder / name, weights_only=True) for name in ("whole.pt", "halves.pt"))
    assert whole["step"] == halves["step"] == 32
    for name, tensor in whole["lora"].items():
        assert torch.equal(tensor, halves["lora"][name]), name
    # the held-out figures (the training means of the epoch resumed in its middle cover only its later steps)
    assert [{key: value for key, value in record.items() if key.startswith(("validation", "step"))}
            for record in metrics(folder / "whole.pt")] == [
        {key: value for key, value in record.items() if key.startswith(("validation", "step"))}
        for record in metrics(folder / "halves.pt")]


@pytest.mark.slow
def test_the_preference_adapter_loads_in_chat_py_as_a_chat_adapter_does(preference_run, chat_files):
    folder, _ = preference_run
    _, base_path, chat_path = chat_files
    result = run_script("chat.py", "--lora_path", folder / "whole.pt", "--max_tokens", "4", "--top_k", "1",
                        "--device", "cpu", "--seed", "0", input="Question 99: is 99 a number?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n\n") and len(result.stdout.strip().splitlines()) == 1
    adapter = torch.load(folder / "whole.pt", weights_only=True)
    assert adapter["merged_adapter"]["path"] == str(chat_path.resolve())
    assert adapter["merged_adapter"]["lora"].keys() == adapter["lora"].keys() == lora_state_dict(
        preference_model(base_path, chat_path)[0]).keys()


@pytest.mark.slow
def test_a_file_of_malformed_records_is_one_line(chat_files, tmp_path):
    _, _, chat_path = chat_files
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in [*toy_pairs(2), {"prompt": "Hi"}, [1, 2],
                                                                      *toy_pairs(1)]))
    result = run_script("preference-tune.py", *PREFERENCE_FLAGS, "--lora_path", chat_path, "--dataset_path", data,
                        "--checkpoint_path", tmp_path / "pref.pt")
    assert_one_line_error(result, f"preference-tune.py: error: {data}: line 3 needs the fields chosen and rejected",
                          "(and 1 more malformed record in --dataset_path)")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "pref.pt").exists()


def test_a_rank_whose_adapters_outgrow_the_device_is_refused_before_they_are_allocated(chat_files):
    script = load_script("preference-tune")
    _, base_path, chat_path = chat_files
    args = script.parse_args(["--lora_path", str(chat_path), "--rank", "100000000000", "--device", "cpu"])
    chat, base = torch.load(chat_path, weights_only=True), torch.load(base_path, weights_only=True)
    with pytest.raises(ValueError, match=r"^--rank 100000000000: the adapters need about .* choose a smaller --rank$"):
        script.preference_model(chat, base, args, str(base_path))


def test_the_largest_batch_that_memory_is_checked_for_bounds_every_batch_of_pairs():
    """finetuning.check_batch_memory sizes the activations of samples.largest_batch: two rows a pair, each as long
    as the longest sample, so no batch train_adapters builds can be larger."""
    pairs = [checked_pair(record, "toy") for record in toy_pairs(7)]
    pairs[3] = checked_pair(toy_pairs(1)[0] | {"chosen": [{"role": "assistant", "content": "Yes, it is. " * 4}]}, "toy")
    samples = PreferenceSamples(pairs, CHATML, 64, -100, show_progress=False)
    for batch_size in (1, 3, 7, 1000):
        rows, tokens = samples.largest_batch(batch_size)
        assert rows == 2 * min(batch_size, 7)
        shapes = [samples.batch(list(indices))[0].shape for indices in torch.arange(7).split(batch_size)]
        assert all(batch_rows <= rows and length <= tokens for batch_rows, length in shapes)
        assert max(length for _, length in shapes) == tokens

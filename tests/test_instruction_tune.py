import json
import random
import re
import resource
import shlex
from contextlib import nullcontext

import pytest
import torch

from checkpoint import (
    load_checkpoint,
    load_lora_checkpoint,
    model_from_checkpoint,
    save_atomically,
    save_sharded,
    trained_on_these_weights,
)
from finetuning import load_adapted_model, load_lora_model
from conftest import (
    REPOSITORY,
    assert_one_line_error,
    lightgpt,
    load_script,
    metrics,
    run_script,
    run_until_first_epoch_then_terminate,
    save_pretrained_checkpoint,
    tensorboard_run,
)
from conversations import ALPACA, InstructionSamples, encode_prompt, load_instructions
from lora import LoRALinear, add_lora
from tokenizer import load_tokenizer
from model import LightGPT
from training import optimizer_step, weighted_by_targets

pytestmark = pytest.mark.slow  # every test here starts processes, or uses a base that pre-train.py trained

# The base learns the answers' words from sentences that pair every thing with every place, so each answer is
# plausible to it but none is known (why not Wikipedia: docs/testing.md).
THINGS = ["city", "state", "country", "sea", "river", "town", "lake", "island", "village"]
PLACES = ["Europe", "America", "Asia", "Africa", "Australia", "the north", "the south", "the east", "the west"]
INSTRUCTIONS = [(f"Where is the {thing}?", f"The {thing} is in {place}.") for thing, place in zip(THINGS, PLACES)]
BASE_MODEL = ["--embedding_dimensions", "64", "--num_attention_heads", "4", "--num_hidden_layers", "2",
              "--feed_forward_ratio", "2", "--block_size", "64", "--device", "cpu"]
FINE_TUNING = ["--batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "3e-2",
               "--rank", "8", "--alpha", "1.0", "--dropout", "0", "--mask_input", "--device", "cpu"]


@pytest.fixture(scope="module")
def base_model_path(tmp_path_factory):
    """A tiny model pre-trained by pre-train.py for a few steps on sentences of the form of the answers."""
    folder = tmp_path_factory.mktemp("base")
    generator = random.Random(0)
    sentences = [f"The {generator.choice(THINGS)} is in {generator.choice(PLACES)}." for _ in range(3000)]
    (folder / "places.txt").write_text("\n\n".join(" ".join(sentences[start:start + 10])
                                                   for start in range(0, len(sentences), 10)))
    path = folder / "base.pt"
    result = run_script(
        "pre-train.py", "--dataset", "text", "--text_files", folder / "places.txt", "--dataset_path", folder,
        "--checkpoint_path", path,
        *BASE_MODEL, "--optimizer", "adamw", "--learning_rate", "2e-2", "--warmup_steps", "2", "--batch_size", "8",
        "--gradient_accumulation_steps", "1", "--samples_per_epoch", "240", "--num_epochs", "1",
        "--eval_samples", "16", "--dropout", "0", "--seed", "0",
    )
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def instructions_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("instructions") / "instructions.jsonl"
    path.write_text("".join(json.dumps({"instruction": instruction, "input": "", "output": output}) + "\n"
                            for instruction, output in INSTRUCTIONS))
    return path


def instruction_tune(base_model_path, instructions_path, checkpoint_path, *args, **kwargs):
    return run_script("instruction-tune.py", "--base_model_path", base_model_path, "--dataset", "local",
                      "--dataset_path", instructions_path, "--checkpoint_path", checkpoint_path, *FINE_TUNING,
                      *args, **kwargs)


@torch.no_grad()
def loss_on_instructions(model: LightGPT, instructions_path) -> float:
    samples = InstructionSamples(load_instructions("local", str(instructions_path)), ALPACA, 64, True,
                                 model.padding_index, show_progress=False)
    return model.eval()(*samples.batch(range(len(samples))))[1].item()


@pytest.fixture(scope="module")
def adapter_path(base_model_path, instructions_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "lora.pt"
    result = instruction_tune(base_model_path, instructions_path, path, "--num_epochs", "30",
                              "--eval_interval", "10", "--checkpoint_interval", "10", "--seed", "0")
    assert result.returncode == 0, result.stderr
    return path


def test_lora_learns_to_answer_the_training_instructions(base_model_path, instructions_path, adapter_path):
    base = load_checkpoint(base_model_path)
    before = loss_on_instructions(model_from_checkpoint(base, base_model_path), instructions_path)
    after = loss_on_instructions(load_adapted_model(load_lora_checkpoint(adapter_path), base), instructions_path)
    print(f"loss on the training instructions' responses: {before:.3f} before, {after:.3f} after LoRA")
    assert after < 0.5 * before
    records = metrics(adapter_path)
    assert [record["epoch"] for record in records] == list(range(1, 31))
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert {"validation_loss", "validation_perplexity"} <= records[9].keys()
    curves = tensorboard_run(adapter_path.parent / "runs" / "lora")
    assert {"train/loss", "train/learning_rate", "speed/samples_per_second"} <= set(curves.Tags()["scalars"])
    assert [event.value for event in curves.Scalars("validation/loss")] == pytest.approx(
        [record["validation_loss"] for record in records if "validation_loss" in record])


def other_base() -> LightGPT:
    """A base of another width than the adapters' base."""
    return lightgpt(vocabulary_size=50257, embedding_dimensions=32, num_heads=2, num_layers=2)


def test_the_adapter_checkpoint_holds_only_adapters_and_is_a_small_fraction_of_the_base(
    base_model_path, adapter_path
):
    adapter = load_lora_checkpoint(adapter_path)
    assert adapter["lora"] and all(name.endswith((".lora_a", ".lora_b")) for name in adapter["lora"])
    assert adapter["prompt_template"] == ALPACA.to_dict()
    assert adapter["lora_args"] == {"rank": 8, "alpha": 1.0, "dropout": 0.0}
    assert adapter["base_model_path"] == str(base_model_path.resolve())
    ratio = adapter_path.stat().st_size / base_model_path.stat().st_size
    print(f"adapter checkpoint / base checkpoint = {adapter_path.stat().st_size:,} / "
          f"{base_model_path.stat().st_size:,} bytes = {ratio:.2%}")
    assert ratio < 0.02
    assert not list(adapter_path.parent.glob("*.tmp"))


def test_sigterm_saves_adapters_that_resume_exactly(base_model_path, instructions_path, tmp_path):
    common = ["--num_epochs", "12", "--eval_interval", "1", "--checkpoint_interval", "1000", "--dropout", "0.1",
              "--seed", "3", "--learning_rate", "1e-3"]
    uninterrupted = instruction_tune(base_model_path, instructions_path, tmp_path / "uninterrupted.pt", *common)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert "Done: adapters saved" in uninterrupted.stdout, uninterrupted.stdout

    interrupted = tmp_path / "interrupted.pt"
    result = run_until_first_epoch_then_terminate(
        "instruction-tune.py", "--base_model_path", base_model_path, "--dataset", "local", "--dataset_path",
        instructions_path, "--checkpoint_path", interrupted, *FINE_TUNING, *common,
        metrics_path=interrupted.with_suffix(".metrics.jsonl"),
    )
    assert result.returncode == 143, result.stderr
    assert "Stopped by signal" in result.stdout
    stopped_at = load_lora_checkpoint(interrupted)["step"]
    assert 0 < stopped_at < 24

    resumed = instruction_tune(base_model_path, instructions_path, interrupted, *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {stopped_at}" in resumed.stdout
    assert load_lora_checkpoint(interrupted)["step"] == 24
    # Every epoch after the stop trains as the uninterrupted run did: its losses agree to 1e-5, where skipping the
    # RNG or the optimizer restore moves them by 2e-4 to 2e-1 ...
    expected = {record["step"]: record for record in metrics(tmp_path / "uninterrupted.pt")}
    steps_per_epoch = expected[24]["step"] // expected[24]["epoch"]
    after_stop = [record for record in metrics(interrupted) if record["step"] > stopped_at]
    assert [record["step"] for record in after_stop] == [step for step in expected if step > stopped_at]
    for record in after_stop:
        assert record["validation_loss"] == pytest.approx(expected[record["step"]]["validation_loss"], rel=1e-5)
        if record["step"] - steps_per_epoch >= stopped_at:  # an epoch trained wholly after the resume
            assert record["loss"] == pytest.approx(expected[record["step"]]["loss"], rel=1e-5)
    # ... and it ends with the same adapters. AdamW divides each update by its gradient's size, so where a
    # gradient is near zero a difference of one part in a million in the base grows to 4e-7 here, over this
    # bound: it holds only because both processes round alike (one thread each, see conftest), while that
    # difference moves the losses by about 1e-6.
    final = load_lora_checkpoint(tmp_path / "uninterrupted.pt")["lora"]
    for name, tensor in load_lora_checkpoint(interrupted)["lora"].items():
        torch.testing.assert_close(tensor, final[name], rtol=1e-5, atol=1e-7)


def test_a_new_run_never_writes_over_an_adapter_already_there(base_model_path, instructions_path, adapter_path):
    written = adapter_path.read_bytes()
    result = instruction_tune(base_model_path, instructions_path, adapter_path)
    assert_one_line_error(result, f"--checkpoint_path {adapter_path}: already holds a checkpoint, saved at step",
                          "add --resume to continue it")
    assert adapter_path.read_bytes() == written


def test_resuming_with_another_rank_is_refused(base_model_path, instructions_path, adapter_path):
    result = instruction_tune(base_model_path, instructions_path, adapter_path, "--resume", "--rank", "4")
    assert_one_line_error(result, "--resume", "--rank 8", "4")


def test_resuming_on_another_dataset_of_the_same_size_is_refused(base_model_path, instructions_path, adapter_path,
                                                                  tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(instructions_path.read_text().replace("Europe", "Asia"))
    result = instruction_tune(base_model_path, other, adapter_path, "--resume")
    assert_one_line_error(result, "--resume", f"--dataset_path {instructions_path}", f"--dataset_path {other}")


def test_a_run_that_dropped_long_conversations_resumes_and_flags_that_change_its_samples_are_refused(
        base_model_path, tmp_path):
    """The checkpoint counts the conversations trained on after those too long for the context were dropped (here
    4 of 15), and a resumed run with the same flags makes as many."""
    chats = tmp_path / "chats.jsonl"
    long = [[{"role": "user", "content": "Tell me about every place. " * 20}, {"role": "assistant", "content": "No."}]]
    short = [[{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
             for instruction, output in INSTRUCTIONS]
    chats.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in 4 * long + short + short[:3]))
    flags = ["--seed", "0", "--no-tensorboard"]
    first = instruction_tune(base_model_path, chats, tmp_path / "chat.pt", *flags, "--num_epochs", "1")
    assert first.returncode == 0 and "4 dropped" in first.stdout, first.stderr
    resumed = instruction_tune(base_model_path, chats, tmp_path / "chat.pt", *flags, "--num_epochs", "2", "--resume")
    assert resumed.returncode == 0 and "Resuming from" in resumed.stdout, resumed.stderr
    assert load_lora_checkpoint(tmp_path / "chat.pt")["num_train_samples"] == 11
    cut = instruction_tune(base_model_path, chats, tmp_path / "chat.pt", *flags, "--num_epochs", "3", "--resume",
                           "--max_tokens_per_sample", "32")
    assert_one_line_error(cut, "--resume: the checkpoint was trained with no --max_tokens_per_sample, the flags ask "
                          "for --max_tokens_per_sample 32; repeat the original run's flags")


@pytest.fixture
def retrained_base_path(base_model_path, tmp_path):
    """A base of the same sizes as base_model_path with other weights, as if it had been trained further."""
    base = load_checkpoint(base_model_path)
    base["model"] = {name: tensor + 0.01 for name, tensor in base["model"].items()}
    save_atomically(base, tmp_path / "retrained.pt")  # with its new weights' checksums, as training writes them
    return tmp_path / "retrained.pt"


def test_resuming_on_a_base_with_other_weights_is_refused(retrained_base_path, instructions_path, adapter_path):
    result = instruction_tune(retrained_base_path, instructions_path, adapter_path, "--resume")
    assert_one_line_error(result, "--resume", "other weights", str(retrained_base_path))


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--rank", "0"], ["--rank", "positive", "0"]),
        (["--alpha", "0"], ["--alpha", "must be in (0, 1e+30]", "0.0"]),
        (["--dropout", "1"], ["--dropout", "[0, 1)"]),
        (["--batch_size", "two"], ["--batch_size", "two"]),
        (["--mask_input", "False"], ["unrecognized arguments: False"]),
        (["--dataset", "dolly"], ["--dataset", "dolly", "alpaca"]),
        (["--dataset_path", "/nonexistent/*.jsonl"], ["--dataset_path", "/nonexistent/*.jsonl"]),
        (["--base_model_path", "/nonexistent/base.pt"], ["--base_model_path", "/nonexistent/base.pt"]),
        (["--resume"], ["--resume", "no adapter checkpoint"]),
        (["--device", "cuda"], ["--device", "cuda", "cpu"]),
    ],
)
def test_bad_arguments_get_one_clear_line(base_model_path, instructions_path, tmp_path, args, fragments):
    result = instruction_tune(base_model_path, instructions_path, tmp_path / "lora.pt", *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "lora.pt").exists()


def test_adapters_are_never_written_over_the_base_model(base_model_path, instructions_path):
    before = base_model_path.read_bytes()
    result = instruction_tune(base_model_path, instructions_path, base_model_path)
    assert_one_line_error(result, f"--checkpoint_path {base_model_path}", "is also --base_model_path")
    assert base_model_path.read_bytes() == before


def test_a_base_whose_model_args_do_not_match_its_weights_is_named_in_one_line(base_model_path, instructions_path,
                                                                               tmp_path):
    base = load_checkpoint(base_model_path)
    torch.save(base | {"model_args": base["model_args"] | {"embedding_dimensions": 32}}, tmp_path / "mismatched.pt")
    result = instruction_tune(tmp_path / "mismatched.pt", instructions_path, tmp_path / "lora.pt")
    assert_one_line_error(result, "mismatched.pt: its model_args and weights do not make a LightGPT")


def test_bad_data_and_an_offline_hub_get_one_clear_line(base_model_path, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "Hi", "output": "Hello"}\n{"instruction": "Bye"}\n')
    bad = run_script("instruction-tune.py", "--base_model_path", base_model_path, "--dataset", "local",
                     "--dataset_path", tmp_path / "bad.jsonl", "--checkpoint_path", tmp_path / "lora.pt",
                     "--device", "cpu")
    assert_one_line_error(bad, "bad.jsonl: line 2 has no 'output' field")
    offline = run_script("instruction-tune.py", "--base_model_path", base_model_path, "--checkpoint_path",
                         tmp_path / "lora.pt", "--device", "cpu")
    assert_one_line_error(offline, "tatsu-lab/alpaca", "--dataset local --dataset_path")


def test_the_original_readme_arguments_keep_their_names_and_defaults():
    parse_args = load_script("instruction-tune").parse_args
    defaults = vars(parse_args([]))
    seed_table = {
        "base_model_path": "./out/checkpoint.pt", "batch_size": 1, "gradient_accumulation_steps": 128,
        "learning_rate": 5e-4, "mask_input": False, "rank": 8, "alpha": 1.0, "dropout": 0.05, "num_epochs": 4,
        "eval_interval": 1, "checkpoint_interval": 1, "checkpoint_path": "./out/lora_instruction.pt",
        "resume": False, "seed": None, "dataset": "alpaca", "dataset_path": None,
    }
    assert {name: defaults[name] for name in seed_table} == seed_table
    assert defaults["device"] == "cpu"
    assert parse_args(["--mask_input"]).mask_input is True
    assert parse_args(["--mask_input", "--no-mask_input"]).mask_input is False
    help_text = run_script("instruction-tune.py", "--help").stdout
    for flag in defaults:
        assert f"--{flag}" in help_text
    assert len(re.findall(r"^  --", help_text, re.M)) == len(defaults)


def test_an_adapter_loads_onto_the_base_it_names_and_refuses_another_size(base_model_path, adapter_path, tmp_path):
    model, block_size, template = load_lora_model(adapter_path)
    assert block_size == 64 and template == ALPACA
    expected = load_adapted_model(load_lora_checkpoint(adapter_path), load_checkpoint(base_model_path))
    tokens = torch.randint(0, 50257, (1, 10))
    assert torch.equal(model(tokens)[0], expected(tokens)[0])
    save_pretrained_checkpoint(other_base(), tmp_path / "other.pt", block_size=64)
    with pytest.raises(ValueError, match="embedding_dimensions=64, but the base checkpoint has embedding_dimensions=32"):
        load_lora_model(adapter_path, tmp_path / "other.pt")


def test_an_adapter_on_a_base_with_other_weights_of_the_same_sizes_is_refused(adapter_path, retrained_base_path,
                                                                            base_model_path):
    with pytest.raises(ValueError, match=f"trained on a base with other weights .* use the base it was trained on, "
                                         f"{base_model_path.resolve()}"):
        load_lora_model(adapter_path, retrained_base_path)
    result = run_script("generate.py", "--lora_path", adapter_path, "--checkpoint_path", retrained_base_path,
                        "--prompt", "Where is the city?", "--max_tokens", "2", "--device", "cpu")
    assert_one_line_error(result, "other weights", str(retrained_base_path))



def test_accumulating_padded_batches_gives_the_gradient_of_one_batch(instructions_path):
    samples = InstructionSamples(load_instructions("local", str(instructions_path)), ALPACA, 64, True,
                                 -100, show_progress=False)
    indices = range(3, 7)  # answers that end "in Africa", "in Australia", "in the north", "in the south"
    counts = [int((samples.batch([index])[1] != -100).sum()) for index in indices]
    assert len(set(counts)) > 1, "the samples must differ in length for the weighting to matter"
    weights = []
    for micro_batches in ([samples.batch(indices)], [samples.batch([index]) for index in indices]):
        model = lightgpt(vocabulary_size=50257, embedding_dimensions=16, num_heads=2, num_layers=1)
        add_lora(model, rank=2, alpha=1.0, dropout=0.0)
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                torch.nn.init.normal_(layer.lora_b)
        adapters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer_step(model, torch.optim.SGD(adapters), weighted_by_targets(micro_batches, -100), 1.0, 1e9,
                       nullcontext(), torch.amp.GradScaler("cpu", enabled=False))
        weights.append(adapters)
    for one_batch, accumulated in zip(*weights):
        torch.testing.assert_close(accumulated, one_batch)


@pytest.mark.parametrize("script", ["generate.py", "beam_search.py"])
def test_the_scripts_answer_with_the_adapter_in_its_prompt_template(adapter_path, script, tmp_path):
    question = "Where is the city?"
    model, _, template = load_lora_model(adapter_path)
    prompt = encode_prompt(question, template)
    first_token = model(torch.tensor([prompt]))[0][0, -1].argmax().item()
    greedy = ["--top_k", "1"] if script == "generate.py" else ["--beam_width", "1", "--num_candidates", "1"]
    result = run_script(script, "--lora_path", adapter_path, "--prompt", question, "--max_tokens", "4",
                        "--device", "cpu", *greedy)
    assert result.returncode == 0, result.stderr
    assert load_tokenizer().decode([first_token]) in result.stdout
    save_pretrained_checkpoint(other_base(), tmp_path / "other.pt", block_size=64)
    mismatched = run_script(script, "--lora_path", adapter_path, "--checkpoint_path", tmp_path / "other.pt",
                            "--prompt", question, "--device", "cpu")
    assert_one_line_error(mismatched, "other.pt", "embedding_dimensions=64", "embedding_dimensions=32")


def test_the_readme_instruction_tuning_commands_run(base_model_path, tmp_path):
    readme = (REPOSITORY / "README.md").read_text()
    section = readme.split("## Instruction-tuning", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```json\n(.*?)```", section, re.S).group(1)
    (tmp_path / "my_instructions.jsonl").write_text(example)
    tune = re.search(r"^python instruction-tune.py (--dataset local .+)$", section, re.M)
    assert tune, "the README's Instruction-tuning section has no command for local files"
    result = run_script("instruction-tune.py", *shlex.split(tune.group(1)), "--base_model_path", base_model_path,
                        "--gradient_accumulation_steps", "1", "--num_epochs", "2", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "lora_instruction.pt").is_file()
    commands = re.findall(r"^python ((?:generate|beam_search)\.py --lora_path .+)$", section, re.M)
    assert len(commands) == 2, "the README's Instruction-tuning section shows no generation commands"
    for script, *arguments in map(shlex.split, commands):
        result = run_script(script, *arguments, "--max_tokens", "3", "--device", "cpu", cwd=tmp_path)
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert result.stdout.strip(), f"{script} printed nothing"


def test_an_adapter_trained_compiled_loads_in_the_scripts_and_resumes_uncompiled(
    base_model_path, instructions_path, tmp_path
):
    path = tmp_path / "compiled.pt"
    common = ["--num_epochs", "1", "--eval_interval", "1", "--seed", "0", "--batch_size", "9"]
    compiled = instruction_tune(base_model_path, instructions_path, path, *common, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    for script in ("generate.py", "beam_search.py"):
        result = run_script(script, "--lora_path", path, "--prompt", "Where is the city?", "--max_tokens", "2",
                            "--device", "cpu")
        assert result.returncode == 0, f"{script}: {result.stderr}"
    resumed = instruction_tune(base_model_path, instructions_path, path, *common[2:], "--num_epochs", "2",
                               "--resume", "--no-compile")
    assert resumed.returncode == 0, resumed.stderr
    assert [record["epoch"] for record in metrics(path)] == [1, 2]


def test_a_sharded_base_checkpoint_is_tuned_and_generates_like_its_single_file(
    base_model_path, instructions_path, tmp_path
):
    base = load_checkpoint(base_model_path)
    sharded = tmp_path / "sharded_base"
    save_sharded(base | {"optimizer": {"state": {}, "param_groups": []}}, sharded)
    path = tmp_path / "lora.pt"
    result = instruction_tune(sharded, instructions_path, path, "--num_epochs", "1", "--seed", "0")
    assert result.returncode == 0, result.stderr
    adapter = load_lora_checkpoint(path)
    assert adapter["base_model_path"] == str(sharded.resolve()) and trained_on_these_weights(adapter, base)
    answers = [run_script("generate.py", "--lora_path", path, *base_flag, "--prompt", "Where is the city?",
                          "--max_tokens", "4", "--top_k", "1", "--device", "cpu")
               for base_flag in ([], ["--checkpoint_path", base_model_path])]
    assert answers[0].returncode == 0 and "Traceback" not in answers[0].stderr, answers[0].stderr
    assert answers[0].stdout == answers[1].stdout and not answers[1].stderr.strip()


def test_resuming_adapters_whose_optimizer_state_does_not_fit_is_one_line(base_model_path, instructions_path,
                                                                           adapter_path, tmp_path):
    good = load_lora_checkpoint(adapter_path)
    state = good["optimizer"]
    wrong_shape = {key: value.flatten() if value.dim() > 1 else value for key, value in state["state"][0].items()}
    for optimizer, fragment in (
        (state | {"param_groups": [group | {"momentum": 0.9} for group in state["param_groups"]]},
         "another optimizer's"),
        (state | {"param_groups": state["param_groups"] * 2}, "parameter groups of"),
        (state | {"state": state["state"] | {0: wrong_shape}}, "parameter 0"),
    ):
        path = tmp_path / "lora.pt"
        save_atomically(good | {"optimizer": optimizer}, path)
        result = instruction_tune(base_model_path, instructions_path, path, "--num_epochs", "31", "--resume")
        assert_one_line_error(result, str(path), fragment)


def address_space_of(size: int):
    """A preexec_fn: the child process may map `size` bytes at most (`ulimit -v`), so that what it would allocate
    past them fails instead of taking the machine's memory."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (size, resource.getrlimit(resource.RLIMIT_AS)[1]))


def test_a_batch_whose_activations_cannot_fit_is_refused_before_training(base_model_path, tmp_path):
    """--batch_size beyond the dataset makes one batch of all of it: 3,000 instructions of 64 tokens need about
    2.6 GB of activations, more than a process limited to 3 GB has left (without the check: an allocation's
    traceback here, a kill by the kernel without a word where memory runs out)."""
    words = " ".join(["The city is in Europe."] * 20)
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"{number} {words}", "output": words}) + "\n"
                            for number in range(3000)))
    result = instruction_tune(base_model_path, path, tmp_path / "lora.pt", "--batch_size", "100000",
                              preexec_fn=address_space_of(3 * 2**30))
    assert_one_line_error(result, "--batch_size 100000: a batch of 2,850 rows of up to 64 tokens needs about",
                          "GB available on cpu; choose a smaller --batch_size")
    assert not (tmp_path / "lora.pt").exists()

import io
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from chats import ChatSamples, chitchat_conversations, hub_conversations, read_local_examples
from conftest import (
    REPOSITORY,
    assert_one_line_error,
    load_script,
    metrics,
    one_thread,
    run_script,
    save_pretrained_checkpoint,
    tiny_model,
)
from conversations import CHATML, JINJA_CHAT_TEMPLATE, PromptTemplate, encode_prompt, is_chat, stop_tokens
from finetuning import load_lora_model
from generation import ChatSession, beam_search, generate
from tokenizer import chat_tokenizer

FIXTURES = REPOSITORY / "tests" / "fixtures"
THREE_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine, thanks."},
    {"role": "user", "content": "Bye."},
    {"role": "assistant", "content": "Bye!"},
]
CHAT_SHAPE = dict(vocabulary_size=50259, embedding_dimensions=16, num_heads=2, num_layers=2, eos_index=50256)


def test_chatml_ids_and_loss_mask_of_three_turns_with_a_system_message():
    ids, mask = CHATML.render(THREE_TURNS)
    system, user, assistant, end = [50257, 10057, 198], [50257, 7220, 198], [50257, 562, 10167, 198], [50258, 198]
    assert ids == (system + [1639, 389, 1059, 325, 13] + end + user + [17250, 0] + end
                   + assistant + [15496, 13] + end + user + [2437, 389, 345, 30] + end
                   + assistant + [34389, 11, 5176, 13] + end + user + [3886, 68, 13] + end
                   + assistant + [3886, 68, 0] + end)
    learned = [token for token, counts in zip(ids, mask) if counts]
    # every assistant's content and its <|im_end|>, nothing else
    assert learned == [15496, 13, 50258, 34389, 11, 5176, 13, 50258, 3886, 68, 0, 50258]
    assert chat_tokenizer().decode(ids).count("<|im_start|>assistant\n") == 3


def test_the_jinja_chat_template_renders_the_same_text():
    """As transformers renders a tokenizer_config.json's chat_template."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    jinja = environment.from_string(JINJA_CHAT_TEMPLATE)
    template, tokenizer = CHATML, chat_tokenizer()
    assert jinja.render(messages=THREE_TURNS, add_generation_prompt=False) == tokenizer.decode(
        template.render(THREE_TURNS)[0])
    assert jinja.render(messages=THREE_TURNS[:-1], add_generation_prompt=True) == tokenizer.decode(
        template.prompt(THREE_TURNS[:-1]))


def test_the_chatml_template_round_trips_and_asks_one_user_turn():
    assert PromptTemplate.from_dict(CHATML.to_dict()) == CHATML and is_chat(CHATML)
    assert encode_prompt("Hi!", CHATML) == [50257, 7220, 198, 17250, 0, 50258, 198, 50257, 562, 10167, 198]
    assert stop_tokens(CHATML, 50256) == {50258, 50256}


def test_turn_three_logits_with_the_kept_cache_equal_a_full_recompute():
    model = tiny_model(**CHAT_SHAPE).eval()
    session = ChatSession(model, CHATML, block_size=96, system="Be brief.", reply_room=6)
    torch.manual_seed(0)
    for text in ("Hi there", "How are you today?"):
        assert len(list(session.reply(text, 6))) == 6
    session.add_user_message("Tell me more.")
    fed_before = len(session.tokens)
    kept = session.feed()
    # only reply 2's last token and end, the new user turn and the assistant's header were fed
    turn = CHATML.prompt([{"role": "user", "content": "Tell me more."}])
    assert session.rebuilds == 0 and len(session.tokens) - fed_before == 1 + 2 + len(turn)
    assert session.tokens[-4:] == CHATML.prompt([])
    recomputed = model.next_token_logits(torch.tensor([session.tokens]))[0]
    torch.testing.assert_close(kept, recomputed)


def test_a_conversation_longer_than_the_context_drops_its_oldest_turn_and_keeps_the_system_message():
    model = tiny_model(**CHAT_SHAPE).eval()
    session = ChatSession(model, CHATML, block_size=48, system="Be brief.", reply_room=4)
    torch.manual_seed(0)
    texts = ["First question here", "Second question here", "Third question here"]
    for text in texts:
        list(session.reply(text, 4))
    assert session.rebuilds == 1
    assert session.messages[0] == {"role": "system", "content": "Be brief."}
    assert [message["content"] for message in session.messages if message["role"] == "user"][0] != texts[0]
    assert len(session.tokens) + len(session.unfed) <= 48
    session.add_user_message("Again")
    torch.testing.assert_close(session.feed(), model.next_token_logits(torch.tensor([session.tokens]))[0])
    with pytest.raises(ValueError, match="too long"):
        session.add_user_message("word " * 60)


@pytest.mark.parametrize("max_tokens", [10**12, 48, 30])
def test_a_reply_gets_the_room_the_context_leaves_and_only_a_message_that_leaves_none_is_too_long(max_tokens):
    """chat.py --max_tokens beyond the context (or its default 256 on a small model) bounds each reply; it never
    makes a message that fits 'too long'."""
    model = tiny_model(**CHAT_SHAPE).eval()
    session = ChatSession(model, CHATML, block_size=48, system="Be brief.", reply_room=max_tokens)
    message = "word " * (45 - len(CHATML.prompt([{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": ""}])))
    prompt_length = len(CHATML.prompt(session.messages + [{"role": "user", "content": message}]))
    assert 48 - 24 < prompt_length < 48  # it leaves some room, less than half the context
    torch.manual_seed(0)
    reply = list(session.reply(message, max_tokens, top_k=1))  # the tiny model never writes a stop token
    assert len(reply) == 48 - prompt_length
    with pytest.raises(ValueError, match=r"too long: the prompt is \d+ tokens with the system message, which "
                                         r"leaves no room for a reply in the 48-token context"):
        session.add_user_message("word " * 48)


@pytest.mark.parametrize("system", ["word " * 48, "word " * 20_000])
def test_a_system_message_that_leaves_no_room_is_refused_at_the_start_and_by_the_system_command(system):
    model = tiny_model(**CHAT_SHAPE).eval()
    with pytest.raises(ValueError, match="the system message is .* tokens .* no room for a message and a reply in the "
                                         "48-token context"):
        ChatSession(model, CHATML, block_size=48, system=system)
    session = ChatSession(model, CHATML, block_size=48, system="Be brief.")
    chat = load_script("chat")
    assert chat.run_command(session, f"/system {system}") and session.system == "Be brief."


def test_chitchat_becomes_alternating_user_and_assistant_turns_with_nothing_empty():
    conversations = chitchat_conversations()
    assert len(conversations) == 4017
    for messages in conversations:
        roles = [message["role"] for message in messages]
        assert roles[0] == "user" and "assistant" in roles
        assert all(first != second for first, second in zip(roles, roles[1:]))
        assert all(message["content"].strip() for message in messages)


def hub_mirror(root, repository: str, configs: dict[str, dict[str, list]], extra_columns: dict) -> None:
    """A local folder laid out as the hub repository (README configs, Parquet shards with its real columns), which
    datasets.load_dataset reads by the repository's name from a working directory of `root`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / repository
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            prefix = "data" if config == "default" else f"data/{config}"
            lines += [f"  - split: {split}", f"    path: {prefix}/{split}-*"]
            path = folder / prefix / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            columns = {"messages": rows} | {name: [value] * len(rows) for name, value in extra_columns.items()}
            pq.write_table(pa.table(columns), path)
    (folder / "README.md").write_text("\n".join(lines + ["---", ""]))


def test_the_hub_chat_datasets_stream_from_local_mirrors_of_their_real_layout(tmp_path, monkeypatch):
    exchange = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    no_reply = [{"role": "user", "content": "Anyone?"}]
    hub_mirror(tmp_path, "HuggingFaceTB/smol-smoltalk", {"default": {"train": [exchange] * 3, "test": [exchange]}},
               {"source": "smol-magpie-ultra"})
    hub_mirror(tmp_path, "HuggingFaceTB/smoltalk",
               {"all": {"train": [exchange] * 4, "test": [exchange]},
                "everyday-conversations": {"train": [exchange, no_reply], "test": [exchange]}}, {})
    hub_mirror(tmp_path, "HuggingFaceH4/ultrafeedback_binarized",
               {"default": {"train_sft": [exchange] * 2, "test_sft": [exchange], "train_prefs": [exchange]}},
               {"prompt": "Hi", "prompt_id": "0" * 64, "chosen": exchange, "rejected": exchange,
                "score_chosen": 8.0, "score_rejected": 4.0})
    monkeypatch.chdir(tmp_path)
    assert hub_conversations("smol-smoltalk", "train") == ([exchange] * 3, 0)
    assert hub_conversations("smoltalk", "train") == ([exchange] * 4, 0)
    assert hub_conversations("smoltalk", "train", "everyday-conversations") == ([exchange], 1)
    assert hub_conversations("ultrafeedback", "test_sft") == ([exchange], 0)
    with pytest.raises(ConnectionError) as failure:
        hub_conversations("smoltalk", "train", "no-such-subset")
    assert "HuggingFaceTB/smoltalk" in str(failure.value) and "\n" not in str(failure.value)
    monkeypatch.chdir(tmp_path / "HuggingFaceTB")  # no mirror here: the hub itself, offline in the tests
    with pytest.raises(ConnectionError) as failure:
        hub_conversations("ultrafeedback", "train_sft")
    message = str(failure.value)
    assert "HuggingFaceH4/ultrafeedback_binarized" in message and "\n" not in message
    assert "connect to the internet, or train offline with --dataset chitchat, local" in message


@pytest.mark.parametrize("line, fragment", [
    ({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "message 1 has no 'role'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "Hello"}]}, "message 1 has no 'role' or no 'content'"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "has no assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}, "unknown role 'bot'"),
    ({"messages": []}, "empty conversation"),
])
def test_bad_conversations_are_named_by_file_and_line(tmp_path, line, fragment):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError) as error:
        read_local_examples([path])
    assert f"{path}: line 2 " in str(error.value) and fragment in str(error.value)


def test_a_latin_1_file_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Olé"}]}, ensure_ascii=False)
    path.write_bytes((good + "\n" + good + "\n").encode("latin-1"))
    with pytest.raises(ValueError, match=r"chats.jsonl: line 1 is not UTF-8 \(byte 0xe9"):
        read_local_examples([path])


def test_conversations_are_cut_after_an_assistant_turn_or_dropped_and_counted():
    template = CHATML
    long_first_reply = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 40}]
    samples = ChatSamples([THREE_TURNS, long_first_reply], template, limit=30, padding_index=-100,
                          show_progress=False)
    assert (len(samples), samples.num_cut, samples.num_dropped) == (1, 1, 1)
    x, y = samples.samples[0]
    ids, _ = template.render(THREE_TURNS[:3])  # the system message and the first exchange: 26 ids
    assert x.tolist() == ids[:-1] and y.tolist()[-2:] == [50258, -100]


def test_an_adapter_written_before_chat_generates_as_before():
    """Tokens the code before this change generated and found from the version 1 fixtures, at seed 0."""
    model, block_size, template = load_lora_model(FIXTURES / "v1_adapter.pt", FIXTURES / "v1_checkpoint.pt")
    assert not is_chat(template)
    torch.manual_seed(0)
    assert list(generate(model, torch.tensor([5, 9, 12]), 20, top_k=64, block_size=block_size)) == [
        44, 54, 31, 22, 41, 35, 51, 52, 40, 51, 17, 54, 39, 21, 36, 19, 51, 5, 23, 16]
    candidates = beam_search(model, torch.tensor([5, 9, 12]), 6, beam_width=4, num_candidates=2,
                             block_size=block_size)
    assert [tokens for tokens, _ in candidates] == [[22] * 6, [41] + [22] * 5]
    assert [score for _, score in candidates] == pytest.approx([-3.965287, -3.965813], abs=1e-5)


EXCHANGE = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
                         {"role": "assistant", "content": "Hi there, friend."}, {"role": "user", "content": "Bye"},
                         {"role": "assistant", "content": "See you soon."}]}
CHAT_FLAGS = ["--top_k", "1", "--max_tokens", "12", "--device", "cpu", "--system", "Be kind."]


@pytest.fixture(scope="module")
def chat_adapter(tmp_path_factory):
    """A tiny base (its embedding scaled up so that its logits can be sure) tuned on one fixed exchange."""
    folder = tmp_path_factory.mktemp("chat")
    model = tiny_model(vocabulary_size=50257, embedding_dimensions=64, num_heads=4, num_layers=2, eos_index=50256)
    with torch.no_grad():
        model.token_embeddings.weight.mul_(25)
    base = save_pretrained_checkpoint(model, folder / "base.pt", block_size=64)
    (folder / "chats.jsonl").write_text((json.dumps(EXCHANGE) + "\n") * 8)
    result = tune_on_the_exchange(base, folder / "lora.pt")
    assert result.returncode == 0, result.stderr
    return base, folder / "lora.pt"


def tune_on_the_exchange(base: Path, adapter: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_script("instruction-tune.py", "--base_model_path", base, "--dataset", "local", "--dataset_path",
                      base.parent / "chats.jsonl", "--checkpoint_path", adapter, "--batch_size", "4",
                      "--gradient_accumulation_steps", "1", "--learning_rate", "3e-2", "--rank", "8", "--dropout",
                      "0", "--num_epochs", "30", "--eval_interval", "30", "--checkpoint_interval", "30",
                      "--device", "cpu", "--seed", "2", *flags)


@pytest.mark.slow
def test_a_chat_adapter_holds_only_what_changed_and_answers_through_piped_chat_py(chat_adapter, tmp_path):
    base, adapter = chat_adapter
    saved = torch.load(adapter, weights_only=True)
    assert saved["added_token_embeddings"].shape == (2, 64) and saved["vocabulary_size"] == 50259
    assert saved["prompt_template"] == CHATML.to_dict() and saved["model_args"]["vocabulary_size"] == 50257
    assert all(name.endswith((".lora_a", ".lora_b")) for name in saved["lora"])
    result = run_script("chat.py", "--checkpoint_path", base, "--lora_path", adapter, *CHAT_FLAGS,
                        "--max_tokens", str(10**12), input="Hello\nBye\n/reset\nHello\n")  # bounded by the context
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hi there, friend.\n\nSee you soon.\n\nHi there, friend.\n\n"
    assert "Chatting with" in result.stderr
    result = run_script("chat.py", "--checkpoint_path", base, "--lora_path", adapter, *CHAT_FLAGS, "--system",
                        "word " * 64, input="Hello\n")
    assert_one_line_error(result, "--system: the system message is", "64-token context")
    for script in ("generate.py", "beam_search.py"):
        answer = run_script(script, "--lora_path", adapter, "--prompt", "Hello", "--max_tokens", "12",
                            "--device", "cpu", *(["--top_k", "1"] if script == "generate.py" else []))
        assert answer.returncode == 0 and "Hi there, friend." in answer.stdout, answer.stderr

    exported = tmp_path / "exported"
    result = run_script("export.py", "--checkpoint_path", base, "--lora_path", adapter, "--output_dir", exported)
    assert result.returncode == 0, result.stderr
    config = json.loads((exported / "config.json").read_text())
    assert config["vocabulary_size"] == 50259 and config["prompt_template"] == CHATML.to_dict()
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        json.loads((exported / "tokenizer_config.json").read_text())["chat_template"])
    assert jinja.render(messages=EXCHANGE["messages"]) == chat_tokenizer().decode(
        CHATML.render(EXCHANGE["messages"])[0])
    result = run_script("chat.py", "--checkpoint_path", exported, *CHAT_FLAGS, input="Hello\n")
    assert result.stdout == "Hi there, friend.\n\n", result.stderr


@pytest.mark.slow
def test_a_chat_adapter_resumes_with_its_trained_chat_token_rows(chat_adapter, tmp_path):
    base, adapter = chat_adapter
    resumed = tmp_path / "lora.pt"
    shutil.copy(adapter, resumed)
    shutil.copy(adapter.with_suffix(".metrics.jsonl"), resumed.with_suffix(".metrics.jsonl"))
    result = tune_on_the_exchange(base, resumed, "--resume", "--num_epochs", "31", "--eval_interval", "1")
    assert result.returncode == 0, result.stderr
    assert "at epoch 31, step 60" in result.stdout
    # the 31st epoch starts from the learnt <|im_start|> and <|im_end|> rows: fresh ones would cost it over 1
    before, after = metrics(adapter)[-1], metrics(resumed)[-1]
    assert after["epoch"] == 31 and after["loss"] < 0.1 and after["validation_loss"] < 0.1, (before, after)
    saved = torch.load(resumed, weights_only=True)
    assert saved["step"] == 62 and saved["added_token_embeddings"].shape == (2, 64)


def read_until(descriptor: int, expected: str, timeout: float = 60) -> str:
    """What a pseudo-terminal shows until `expected` appears (or the time runs out)."""
    shown, deadline = "", time.monotonic() + timeout
    while expected not in shown and time.monotonic() < deadline:
        ready, _, _ = select.select([descriptor], [], [], 1)
        if ready:
            try:
                shown += os.read(descriptor, 4096).decode("utf-8", "replace")
            except OSError:  # the program closed the terminal
                break
    return shown


@pytest.mark.slow
def test_chat_py_in_a_real_terminal_streams_replies_resets_and_exits(chat_adapter):
    base, adapter = chat_adapter
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, REPOSITORY / "chat.py", "--checkpoint_path", base, "--lora_path",
                                adapter, *CHAT_FLAGS], stdin=terminal, stdout=terminal, stderr=terminal,
                               env=one_thread() | {"TERM": "dumb"}, close_fds=True)
    os.close(terminal)
    try:
        assert "You: " in read_until(controller, "You: ")
        os.write(controller, b"Hello\r")
        assert "Assistant: Hi there, friend." in read_until(controller, "friend.")
        os.write(controller, b"/reset\r")
        assert "(a new conversation)" in read_until(controller, "(a new conversation)")
        os.write(controller, b"Hello\r")
        assert "Hi there, friend." in read_until(controller, "friend.")
        os.write(controller, b"/exit\r")
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()
        os.close(controller)


class CtrlCWhilePrinting(io.StringIO):
    """Standard output where Ctrl-C arrives as the second piece of a reply is printed."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += bool(text)
        if self.writes == 3:  # "Assistant: ", the first piece, then the second
            raise KeyboardInterrupt
        return super().write(text)


@pytest.mark.parametrize("where", ["printing", "computing"])
def test_ctrl_c_during_a_reply_stops_only_the_reply_and_the_next_turn_follows_what_was_said(where, monkeypatch):
    chat = load_script("chat")
    model = tiny_model(**CHAT_SHAPE).eval()
    session = ChatSession(model, CHATML, block_size=96, reply_room=8)
    args = chat.parse_args(["--max_tokens", "8", "--device", "cpu"])
    shown = CtrlCWhilePrinting() if where == "printing" else io.StringIO()
    monkeypatch.setattr(sys, "stdout", shown)
    if where == "computing":  # Ctrl-C inside the model as the fourth token is computed: its first block is fed
        calls = []

        def interrupt_the_fourth(*_):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt

        model.blocks[-1].register_forward_pre_hook(interrupt_the_fourth)
    torch.manual_seed(0)
    chat.answer(session, "Hi there", args, interactive=True)
    assert shown.getvalue().startswith("Assistant: ") and shown.getvalue().endswith(" [stopped]\n")
    said = session.messages[-1]
    assert said["role"] == "assistant" and said["content"].startswith(shown.getvalue()[11:-11])
    # the stopped reply, closed by <|im_end|>, is what the cache holds before the next turn
    opening = len(CHATML.prompt(session.messages[:1]))
    held = session.tokens + session.unfed
    end = held.index(50258, opening)
    assert chat_tokenizer().decode(held[opening:end]) == said["content"] and held[end:] == CHATML.reply_end()
    assert where == "printing" or end - opening == 3  # the three tokens computed before Ctrl-C
    chat.answer(session, "Go on", args, interactive=True)
    assert shown.getvalue().count("[stopped]") == 1 and session.messages[-2]["content"] == "Go on"
    session.add_user_message("And then?")
    torch.testing.assert_close(session.feed(), model.next_token_logits(torch.tensor([session.tokens]))[0])


@pytest.mark.parametrize("arguments, fragment", [
    (["--lora_path", FIXTURES / "v1_adapter.pt", "--checkpoint_path", FIXTURES / "v1_checkpoint.pt"],
     "was tuned with the alpaca template; chat.py needs a ChatML model"),
    (["--checkpoint_path", FIXTURES / "v1_checkpoint.pt"], "is not tuned on conversations"),
])
def test_chat_py_refuses_a_model_that_cannot_chat_in_one_line(arguments, fragment):
    chat = load_script("chat")
    with pytest.raises(ValueError, match=fragment):
        chat.load_chat_model(chat.parse_args([*map(str, arguments), "--device", "cpu"]))


@pytest.mark.slow
def test_instruction_tune_names_a_bad_conversation_in_one_line(chat_adapter, tmp_path):
    base, _ = chat_adapter
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EXCHANGE) + "\n" + json.dumps({"messages": [{"role": "user", "content": "Hi"}]}))
    result = run_script("instruction-tune.py", "--base_model_path", base, "--dataset", "local", "--dataset_path",
                        path, "--checkpoint_path", tmp_path / "lora.pt", "--device", "cpu")
    assert_one_line_error(result, f"{path}: line 2 has no assistant turn")


def test_bench_times_the_last_chat_turn_with_the_kept_cache_and_recomputed():
    import bench

    args = bench.parse_args(["--embedding_dimensions", "16", "--num_attention_heads", "2", "--num_hidden_layers",
                             "1", "--block_size", "256", "--chat_turns", "3", "--reply_tokens", "4", "--device", "cpu"])
    args.dtype = torch.float32
    rows = {row.metric: row for row in bench.measure_chat(args)}
    assert all(row.value > 0 for row in rows.values())
    assert rows["chat_last_over_first_turn"].value == pytest.approx(
        rows["chat_last_turn_kept_cache_s"].value / rows["chat_first_turn_s"].value)
    template = CHATML
    system = len(template.render([{"role": "system", "content": "You are a helpful assistant."}])[0])
    question = len(template.prompt([{"role": "user", "content": bench.CHAT_QUESTION}]))
    turn = question + 4 + len(template.reply_end())
    assert rows["chat_first_turn_s"].details == {"turns": 3, "reply_tokens": 4, "context_tokens": system + 3 * turn}
    args.block_size = 64
    with pytest.raises(ValueError, match="outgrow --block_size 64"):
        bench.measure_chat(args)

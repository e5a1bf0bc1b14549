import json

import pytest
import torch

from conversations import (
    ALPACA,
    ConversationSamples,
    InstructionSamples,
    PromptTemplate,
    encode_prompt,
    load_instructions,
    split_instructions,
    tokenize_instruction,
)
from tokenizer import load_tokenizer
from conftest import lightgpt, load_script
from formats import upgraded_template

RECORDS = [
    {"instruction": "What is the capital of France?", "output": "Paris."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
]


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


def test_local_json_and_jsonl_files_load_the_same_records(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS[:2]))
    write_jsonl(tmp_path / "b.jsonl", RECORDS[2:])
    records = load_instructions("local", str(tmp_path))
    assert [record["instruction"] for record in records] == [record["instruction"] for record in RECORDS]
    assert [record["input"] for record in records] == ["", "Good morning", ""]
    assert load_instructions("local", str(tmp_path / "a.json")) == records[:2]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "Hi"}\n', r"data.jsonl: line 1 has no 'output' field \(found: instruction\)"),
        ('{"instruction": "Hi", "output": "Hello"}\n\n{"output": "x"}\n', "data.jsonl: line 3 has no 'instruction'"),
        ('{"instruction": "Hi", "output": 3}\n', "data.jsonl: line 1: 'output' must be a string, got int"),
        ('["Hi", "Hello"]\n', "data.jsonl: line 1 is not a JSON object"),
        ('{"instruction": "Hi", "output": \n', "data.jsonl: line 1 is not valid JSON"),
    ],
)
def test_a_bad_record_is_named_by_file_and_line(tmp_path, content, message):
    (tmp_path / "data.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_instructions("local", str(tmp_path / "data.jsonl"))


def test_a_file_that_is_not_utf_8_is_named(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes('{"instruction": "Où?", "output": "Ici."}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl: line 1 is not UTF-8 \(byte 0xf9 at column 19\); save the file as UTF-8"):
        load_instructions("local", str(tmp_path / "latin1.jsonl"))


def test_a_json_file_must_hold_a_list_of_complete_records(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps(RECORDS + [{"input": "x", "output": "y"}]))
    with pytest.raises(ValueError, match="data.json: record 4 has no 'instruction' field"):
        load_instructions("local", str(tmp_path / "data.json"))
    (tmp_path / "data.json").write_text(json.dumps({"instruction": "Hi", "output": "Hello"}))
    with pytest.raises(ValueError, match="expected a JSON list of records, got a JSON dict"):
        load_instructions("local", str(tmp_path / "data.json"))


def test_missing_files_and_offline_hub_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--dataset_path: no .json, .jsonl files found"):
        load_instructions("local", str(tmp_path / "nothing.json"))
    with pytest.raises(ConnectionError, match="tatsu-lab/alpaca.*--dataset local --dataset_path"):
        load_instructions("alpaca")


# The prompt template as format 2 stored it in adapters, and format 2's tokenization (data.py at commit 35c83a8).
DICT_TEMPLATE = {
    "with_input": "Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                  "{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "without_input": "Below is an instruction that describes a task. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
}


def dict_template_sample(record: dict) -> tuple[list[int], list[int]]:
    """Format 2's ids and loss mask (1 where the loss counts) of a record: prompt, response, <|endoftext|>."""
    tokenizer = load_tokenizer()
    form = DICT_TEMPLATE["with_input" if record.get("input") else "without_input"]
    prompt = tokenizer.encode_ordinary(form.format(instruction=record["instruction"], input=record.get("input")))
    response = tokenizer.encode_ordinary(record["output"]) + [tokenizer.eot_token]
    return prompt + response, [0] * len(prompt) + [1] * len(response)


TRICKY_RECORDS = RECORDS + [
    {"instruction": "Say <|endoftext|> twice ", "input": "  ", "output": "<|endoftext|>, <|endoftext|>\n"},
    {"instruction": "", "input": "", "output": ""},
    {"instruction": "List:\n\n1.", "input": "a\n\n", "output": "\n\n### Response:\n b"},
]


@pytest.mark.parametrize("template", [ALPACA, PromptTemplate.from_dict(upgraded_template(DICT_TEMPLATE))],
                         ids=["alpaca", "upgraded dict"])
def test_alpaca_as_a_template_object_gives_format_2_s_ids_and_masks(template):
    for record in TRICKY_RECORDS:
        ids, learned = template.render([{"role": "user", "content": record["instruction"],
                                         "input": record.get("input", "")},
                                        {"role": "assistant", "content": record["output"]}])
        assert (ids, [int(flag) for flag in learned]) == dict_template_sample(record), record
        for mask_input in (True, False):
            x, y, _ = tokenize_instruction(record, template, 1024, mask_input, padding_index=-100)
            assert x == ids[:-1]
            assert y == [id if flag or not mask_input else -100 for id, flag in zip(ids, learned)][1:]
        tokenizer = load_tokenizer()
        prompt = tokenizer.encode_ordinary(DICT_TEMPLATE["without_input"].format(instruction=record["instruction"]))
        assert encode_prompt(record["instruction"], template) == prompt


def test_a_template_renders_a_multi_turn_conversation_and_learns_only_the_replies():
    template = PromptTemplate("turns", {"system": ("[system] {content}\n",), "user": ("[user] {content}\n",)},
                              "[assistant] ", "\n<|endoftext|>", (load_tokenizer().eot_token,))
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    ids, learned = template.render([*conversation, {"role": "assistant", "content": "Bye."}])
    tokenizer = load_tokenizer()
    learned_text = tokenizer.decode([id for id, flag in zip(ids, learned) if flag])
    assert learned_text == "Hello.\n<|endoftext|>Bye.\n<|endoftext|>"
    assert tokenizer.decode(template.prompt(conversation)) == \
        "[system] Be brief.\n[user] Hi\n[assistant] Hello.\n<|endoftext|>[user] Bye\n[assistant] "
    with pytest.raises(ValueError, match="the alpaca template has no format for a 'system' message"):
        ALPACA.render(conversation)
    samples = ConversationSamples([[*conversation, {"role": "assistant", "content": "Bye."}]], template, 1024,
                                  mask_input=True, padding_index=-100, show_progress=False)
    x, y = samples.batch([0])
    assert x[0].tolist() == ids[:-1] and y[0].tolist() == [id if flag else -100 for id, flag in zip(ids, learned)][1:]


def test_the_template_object_round_trips_and_refuses_a_bad_dict_in_one_line():
    assert PromptTemplate.from_dict(ALPACA.to_dict()) == ALPACA
    for bad, message in [
        ({"name": "x"}, "must have the fields"),
        (ALPACA.to_dict() | {"turns": {"robot": ["{content}"]}}, "turns must map system or user"),
        (ALPACA.to_dict() | {"turns": {"user": ["no field"]}}, "must name {content}"),
        (ALPACA.to_dict() | {"turns": {"user": ["{content!r}"]}}, "and only plain fields"),
        (ALPACA.to_dict() | {"stop_tokens": []}, "stop_tokens must be a list of token ids"),
    ]:
        with pytest.raises(ValueError, match=message):
            PromptTemplate.from_dict(bad)


def test_a_template_s_special_tokens_are_tokens_and_a_message_s_are_text():
    ids, learned = ALPACA.render([{"role": "user", "content": "<|endoftext|>"},
                                  {"role": "assistant", "content": "<|endoftext|>"}])
    eot = load_tokenizer().eot_token
    assert ids.count(eot) == 1 and ids[-1] == eot and learned[-1]


def test_masking_leaves_only_the_response_and_its_end_of_text_as_targets():
    tokenizer = load_tokenizer()
    record = {"instruction": "What is the capital of France?", "input": "", "output": "Paris."}
    prompt = encode_prompt(record["instruction"], ALPACA)
    response = tokenizer.encode_ordinary("Paris.") + [tokenizer.eot_token]
    x, y, truncated = tokenize_instruction(record, ALPACA, 1024, mask_input=True, padding_index=-100)
    assert not truncated
    assert x == (prompt + response)[:-1]
    assert y == [-100] * (len(prompt) - 1) + response
    x_unmasked, y_unmasked, _ = tokenize_instruction(record, ALPACA, 1024, False, -100)
    assert x_unmasked == x and y_unmasked == (prompt + response)[1:]


def test_masked_prompt_tokens_do_not_enter_the_loss():
    torch.manual_seed(0)
    model = lightgpt(vocabulary_size=50257, embedding_dimensions=16, num_heads=2, num_layers=1).eval()
    records = [{"instruction": "What is the capital of France?", "input": "", "output": "Paris."}]
    masked = InstructionSamples(records, ALPACA, 1024, True, model.padding_index, show_progress=False)
    unmasked = InstructionSamples(records, ALPACA, 1024, False, model.padding_index, show_progress=False)
    x, y = masked.batch([0])
    logits, _ = model(x)
    _, loss = model(x, y)
    response_length = len(load_tokenizer().encode_ordinary("Paris.")) + 1
    expected = torch.nn.functional.cross_entropy(logits[0, -response_length:], y[0, -response_length:])
    torch.testing.assert_close(loss, expected)
    _, unmasked_loss = model(*unmasked.batch([0]))
    assert not torch.isclose(loss, unmasked_loss)


def test_a_long_sample_loses_the_start_of_its_prompt_never_its_response():
    record = {"instruction": "word " * 300, "input": "", "output": "The answer."}
    x, y, truncated = tokenize_instruction(record, ALPACA, 32, mask_input=True, padding_index=-100)
    tokenizer = load_tokenizer()
    response = tokenizer.encode_ordinary("The answer.") + [tokenizer.eot_token]
    assert truncated and len(x) == len(y) == 32
    assert y[-len(response):] == response
    assert tokenizer.decode(x).endswith("### Response:\nThe answer.")
    samples = InstructionSamples([record] + RECORDS, ALPACA, 32, True, -100, show_progress=False)
    assert len(samples) == 4 and samples.num_truncated >= 1


def test_batches_are_padded_and_the_padding_changes_neither_logits_nor_loss():
    torch.manual_seed(0)
    model = lightgpt(vocabulary_size=50257, embedding_dimensions=16, num_heads=2, num_layers=1).eval()
    samples = InstructionSamples(RECORDS, ALPACA, 1024, False, model.padding_index, show_progress=False)
    x, y = samples.batch([0, 1, 2])
    lengths = [len(sample_x) for sample_x, _ in samples.samples]
    assert x.shape == y.shape == (3, max(lengths))
    (batch_logits, _), (_, batch_loss) = model(x), model(x, y)
    total, count = 0.0, 0
    for row, length in enumerate(lengths):
        assert (y[row, length:] == model.padding_index).all()
        single_x, single_y = samples.batch([row])
        (single_logits, _), (_, single_loss) = model(single_x), model(single_x, single_y)
        torch.testing.assert_close(batch_logits[row, :length], single_logits[0], rtol=1e-4, atol=1e-5)
        total, count = total + single_loss * length, count + length
    torch.testing.assert_close(batch_loss, total / count)


def test_the_held_out_split_is_fixed_and_never_empty():
    records = [{"instruction": str(number), "input": "", "output": "x"} for number in range(40)]
    train, test = split_instructions(records, "--dataset alpaca")
    assert len(test) == 2 and len(train) == 38 and not set(map(str, train)) & set(map(str, test))
    assert split_instructions(records, "--dataset alpaca") == (train, test)
    assert [len(split) for split in split_instructions(records[:2], "--dataset alpaca")] == [1, 1]
    for count in (0, 1):
        with pytest.raises(ValueError, match=rf"^--dataset local --dataset_path one.jsonl: {count} records?, where "
                                             rf"at least 2 are needed \(one is held out for validation\)$"):
            split_instructions(records[:count], "--dataset local --dataset_path one.jsonl")


def test_max_tokens_per_sample_cuts_instructions_as_it_cuts_conversations(capsys):
    """instruction-tune.py's --max_tokens_per_sample is the context of instruction records too: each is cut from
    its start to the limit (or the base's context, if shorter), the end of its response kept."""
    script = load_script("instruction-tune")
    end_of_text = load_tokenizer().eot_token
    for limit, block_size in ((1, 64), (8, 64), (30, 64), (100, 20)):
        args = script.parse_args(["--max_tokens_per_sample", str(limit)])
        samples, = script.alpaca_samples(args, block_size, -100, RECORDS)
        assert [len(inputs) for inputs, _ in samples.samples] == [min(limit, block_size)] * len(RECORDS)
        assert all(targets[-1] == end_of_text for _, targets in samples.samples)
        assert f"3 samples are longer than {min(limit, block_size)} tokens" in capsys.readouterr().out
    samples, = script.alpaca_samples(script.parse_args([]), 64, -100, RECORDS)
    assert all(len(inputs) > 30 for inputs, _ in samples.samples)


def test_alpaca_loads_through_the_hub_code_from_a_local_copy(tmp_path, monkeypatch):
    """datasets.load_dataset reads a local folder named like the hub repository: the users' real loading code,
    run offline on a parquet file shaped like tatsu-lab/alpaca's."""
    import datasets

    folder = tmp_path / "tatsu-lab" / "alpaca" / "data"
    folder.mkdir(parents=True)
    alpaca = [{"input": ""} | record | {"text": "the formatted prompt"} for record in RECORDS]
    datasets.Dataset.from_list(alpaca).to_parquet(folder / "train-00000-of-00001.parquet")
    monkeypatch.chdir(tmp_path)
    records = load_instructions("alpaca")
    assert [(record["instruction"], record["input"], record["output"]) for record in records] == [
        (record["instruction"], record["input"], record["output"]) for record in alpaca
    ]
    train, test = split_instructions(records, "--dataset alpaca")
    assert len(train) == 2 and len(test) == 1

"""serve.py: OpenAI's API over continuous batching, tested with the official openai client against live servers on
loopback, and serving.BatchDecoder's text handling directly."""

import concurrent.futures
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx
import pytest
import torch

import sizing
from checkpoint import exported_config
from conftest import REPOSITORY, lightgpt, save_pretrained_checkpoint
from conversations import CHATML, PromptTemplate
from test_chat import EXCHANGE, chat_adapter  # noqa: F401 (a fixture: a tiny base tuned in ChatML)
from tokenizer import IM_END, chat_tokenizer, load_tokenizer
from serving import Request, Running

openai = pytest.importorskip("openai")

BLOCK_SIZE = 256
API_KEY = "test-key-123"


def served_model(**overrides):
    """A tiny grouped-query model with weights wide enough that greedy decoding wanders instead of repeating."""
    model = lightgpt(**{"vocabulary_size": 50257, "embedding_dimensions": 64, "num_heads": 4, "num_layers": 2,
                        "num_kv_heads": 2} | overrides)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_pretrained_checkpoint(served_model(), tmp_path_factory.mktemp("serve") / "model.pt", BLOCK_SIZE)


# A chat template with a system turn, whose replies end at a newline (token 198) or at the end of text.
CHAT_TEMPLATE = PromptTemplate(name="test-chat",
                               turns={"system": ("System: {content}\n",), "user": ("User: {content}\n",)},
                               reply_opening="Assistant:", reply_closing="\n", stop_tokens=(198, 50256))


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    """An exported chat model: the served model's weights with CHAT_TEMPLATE, as export.py writes them."""
    folder, model = tmp_path_factory.mktemp("chat") / "export", served_model()
    model.save_pretrained(folder, config=exported_config(model, BLOCK_SIZE, CHAT_TEMPLATE.to_dict()))
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def live_server(checkpoint: Path, *flags: str):
    """serve.py on a free loopback port until the block ends; its base URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, REPOSITORY / "serve.py", "--checkpoint_path", checkpoint, "--port",
                                str(port), "--device", "cpu", "--precision", "fp32", *flags], cwd=REPOSITORY,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert process.poll() is None, process.stdout.read()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a server stuck on a hung request must not outlive the test
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(checkpoint):
    with live_server(checkpoint) as url:
        yield url


@pytest.fixture(scope="module")
def chat_server(chat_folder):
    """The chat model behind a key, one row and a queue of one."""
    with live_server(chat_folder, "--api_key", API_KEY, "--max_batch_size", "1", "--max_queued", "1") as url:
        yield url


def client(url: str, **options) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=options.pop("api_key", "unused"), max_retries=0, timeout=60,
                         **options)


def complete(url: str, prompt: str, **options) -> str:
    options = {"temperature": 0} | options
    return client(url).completions.create(model="lightgpt", prompt=prompt, **options).choices[0].text


def streamed(url: str, prompt: str, **options) -> tuple[str, float, float]:
    """The joined text of a streamed greedy completion, and when its first and last chunks came."""
    pieces, times = [], []
    for chunk in client(url).completions.create(model="lightgpt", prompt=prompt, temperature=0, stream=True,
                                                **options):
        pieces.append(chunk.choices[0].text)
        times.append(time.monotonic())
    return "".join(pieces), times[0], times[-1]


@pytest.mark.slow
def test_a_completion_its_stream_and_usage_agree(server):
    response = client(server).completions.create(model="lightgpt", prompt="The history of", max_tokens=20,
                                                 temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "length" and len(choice.text) > 10
    assert response.usage.prompt_tokens == 3 and response.usage.completion_tokens == 20
    assert response.usage.total_tokens == 23
    assert streamed(server, "The history of", max_tokens=20)[0] == choice.text
    sampled = [complete(server, "The history of", max_tokens=20, temperature=1.0, seed=seed) for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert [model.id for model in client(server).models.list()] == ["lightgpt"]


@pytest.mark.slow
def test_a_stop_string_ends_the_text_before_it(server):
    text = complete(server, "The history of", max_tokens=30)
    stop = text[12:16]
    assert complete(server, "The history of", max_tokens=30, stop=[stop]) == text[: text.index(stop)]
    assert streamed(server, "The history of", max_tokens=30, stop=stop)[0] == text[: text.index(stop)]


@pytest.mark.slow
def test_echo_with_logprobs_gives_the_model_s_own_scores_of_the_prompt(server, checkpoint):
    text = "In mathematics, a group is a set with an operation"
    choice = client(server).completions.create(model="lightgpt", prompt=text, max_tokens=0, echo=True, logprobs=1,
                                               temperature=0).choices[0]
    tokens = load_tokenizer().encode(text)
    model = served_model()
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0][0, :-1].log_softmax(-1)
    expected = expected.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]
    assert choice.text == text and choice.logprobs.tokens == [load_tokenizer().decode([t]) for t in tokens]
    assert choice.logprobs.token_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs[1:]), expected, rtol=0, atol=1e-4)
    assert all(len(top) == 1 and max(top.values()) >= logprob - 1e-6
               for top, logprob in zip(choice.logprobs.top_logprobs[1:], choice.logprobs.token_logprobs[1:]))


@pytest.mark.slow
@pytest.mark.parametrize("request_body, error, code", [
    ({"prompt": "x", "temperature": 2.5}, openai.BadRequestError, "invalid_value"),
    ({"prompt": "x", "top_p": 0}, openai.BadRequestError, "invalid_value"),
    ({"prompt": 5}, openai.BadRequestError, "invalid_type"),
    ({"prompt": "x", "max_tokens": "many"}, openai.BadRequestError, "invalid_type"),
    ({"prompt": "word " * (BLOCK_SIZE + 1)}, openai.BadRequestError, "context_length_exceeded"),
    ({"prompt": "x", "max_tokens": BLOCK_SIZE}, openai.BadRequestError, "context_length_exceeded"),
    ({"prompt": "x", "model": "gpt-4"}, openai.NotFoundError, "model_not_found"),
], ids=["temperature", "top_p", "prompt type", "max_tokens type", "long prompt", "max_tokens", "model"])
def test_bad_requests_arrive_as_the_client_s_exceptions(server, request_body, error, code):
    body = {"model": "lightgpt"} | request_body
    with pytest.raises(error) as raised:
        client(server).completions.create(**body)
    assert raised.value.code == code and raised.value.body["message"]


@pytest.mark.slow
def test_malformed_bodies_get_openai_s_error_shape_and_a_base_model_refuses_chat(server):
    for body, status in ((b'{"prompt": "x"', 400), (b"[1, 2]", 400), (b"{" + b" " * 5_000_000 + b"}", 413)):
        response = httpx.post(f"{server}/v1/completions", content=body, timeout=30)
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client(server).chat.completions.create(model="lightgpt", messages=[{"role": "user", "content": "Hi"}])
    assert httpx.get(f"{server}/", timeout=10).headers["content-type"].startswith("text/html")


@pytest.mark.slow
def test_sixteen_concurrent_streams_each_get_their_solo_text(server):
    prompts = [f"Story {index}: the {word} of" for index, word in enumerate(
        "river city king music science water light stone forest bridge garden tower ship road song moon".split())]
    alone = [complete(server, prompt, max_tokens=60) for prompt in prompts]
    with concurrent.futures.ThreadPoolExecutor(17) as pool:
        streams = pool.map(lambda prompt: streamed(server, prompt, max_tokens=60), prompts)
        # Bad requests meanwhile: each refused alone, the streams undisturbed.
        refused = [httpx.post(f"{server}/v1/completions", content=body, timeout=30).status_code
                   for body in (b"{", b'{"prompt": "x", "temperature": -1}', b'{"prompt": [99999999]}')]
        together = list(streams)
    assert refused == [400, 400, 400]
    assert [text for text, _, _ in together] == alone
    assert len(set(alone)) > 8, "the texts differ, so that a row mixed up with another would show"
    latest_start = max(first for _, first, _ in together)
    assert sum(last > latest_start for _, _, last in together) >= 4, "the streams overlapped in time"


@pytest.mark.slow
@pytest.mark.slow
def test_a_chat_completion_its_stream_and_usage_agree(chat_server):
    chat = client(chat_server, api_key=API_KEY).chat.completions
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]
    response = chat.create(model="lightgpt", messages=messages, temperature=0, max_tokens=40)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert "\n" not in choice.message.content
    assert response.usage.prompt_tokens == len(CHAT_TEMPLATE.prompt(messages))
    chunks = list(chat.create(model="lightgpt", messages=messages, temperature=0, max_tokens=40, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    with pytest.raises(openai.BadRequestError, match="n: must be 1"):
        chat.create(model="lightgpt", messages=messages, n=2)


@pytest.mark.slow
def test_a_chatml_adapter_is_served_and_its_replies_stop_at_im_end(chat_adapter):
    """The chat Quick start's shape: a base checkpoint and a ChatML adapter with the two grown token rows."""
    base, adapter = chat_adapter
    messages, reply = EXCHANGE["messages"][:2], EXCHANGE["messages"][2]["content"]
    with live_server(base, "--lora_path", adapter) as url:
        chat = client(url).chat.completions
        response = chat.create(model="lightgpt", messages=messages, temperature=0, max_tokens=20)
        chunks = list(chat.create(model="lightgpt", messages=messages, temperature=0, max_tokens=20, stream=True,
                                  stream_options={"include_usage": True}))
        # The same conversation written out as ChatML text: its special tokens are encoded, and <|im_end|> decoded.
        raw = client(url).completions.create(model="lightgpt", prompt=chat_tokenizer().decode(CHATML.prompt(messages)),
                                             temperature=0, max_tokens=len(chat_tokenizer().encode(reply)) + 1)
    choice = response.choices[0]
    assert choice.message.content == reply and choice.finish_reason == "stop" and IM_END not in reply
    assert response.usage.prompt_tokens == len(CHATML.prompt(messages))
    assert response.usage.completion_tokens == len(chat_tokenizer().encode(reply))  # <|im_end|> is not counted
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.model_dump() == response.usage.model_dump()
    assert raw.choices[0].text == reply + IM_END and raw.usage.prompt_tokens == response.usage.prompt_tokens


@pytest.mark.slow
def test_api_key_full_queue_and_a_disconnect_that_frees_its_row(chat_server):
    url = chat_server
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(url, api_key="wrong").models.list()
    keyed = client(url, api_key=API_KEY)
    assert keyed.models.list().data[0].id == "lightgpt"

    long_request = {"model": "lightgpt", "prompt": "The", "max_tokens": BLOCK_SIZE - 1, "temperature": 0}
    stream = keyed.completions.create(**long_request, stream=True)
    next(iter(stream))  # the one row is taken
    queued = concurrent.futures.ThreadPoolExecutor(1).submit(
        lambda: keyed.completions.create(**long_request | {"max_tokens": 5}))
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/health", timeout=10).json()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    full = httpx.post(f"{url}/v1/completions", json=long_request, timeout=10,
                      headers={"Authorization": f"Bearer {API_KEY}"})
    assert full.status_code == 503 and full.headers["retry-after"] == "1"

    closed_at = time.monotonic()
    stream.close()
    assert queued.result(timeout=60).usage.completion_tokens == 5
    freed_after = time.monotonic() - closed_at
    started = time.monotonic()
    assert keyed.completions.create(**long_request).usage.completion_tokens == BLOCK_SIZE - 1
    assert freed_after < time.monotonic() - started, "the queued request ran before the long one could end"


@pytest.mark.slow
@pytest.mark.parametrize("options, param", [
    ({"presence_penalty": 1e308}, "presence_penalty"), ({"frequency_penalty": "x"}, "frequency_penalty"),
    ({"logit_bias": "x"}, "logit_bias"), ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"best_of": 5}, "best_of"), ({"suffix": "x"}, "suffix"),
    ({"user": 5}, "user"), ({"prompt": ["a"] * 65}, "prompt"), ({"prompt": ["a"] * 10_000}, "prompt"),
])
def test_a_completion_field_out_of_range_or_not_honoured_is_refused_naming_it_and_queues_nothing(server, options,
                                                                                                 param):
    """As OpenAI's API: the field's type and range; what this server cannot do is refused, never ignored; a request
    of more prompts than the queue holds (--max_queued 64) could never run."""
    with pytest.raises(openai.BadRequestError) as raised:
        client(server).completions.create(**{"model": "lightgpt", "prompt": "x", "max_tokens": 2} | options)
    assert raised.value.param == param and param in raised.value.body["message"]
    assert httpx.get(f"{server}/health", timeout=10).json() == {"status": "ok", "running": 0, "waiting": 0}


@pytest.mark.slow
def test_chat_content_as_text_parts_is_its_text_and_what_chat_cannot_honour_is_refused(chat_server):
    chat = client(chat_server, api_key=API_KEY).chat.completions
    ask = {"model": "lightgpt", "temperature": 0, "max_tokens": 8}
    parts = [{"type": "text", "text": "Name a"}, {"type": "text", "text": "river."}]
    as_parts = chat.create(messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}],
                           response_format={"type": "text"}, **ask)
    as_text = chat.create(messages=[{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Name a\nriver."}], **ask)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens
    for options, param in (({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,AAAA"}}]}]}, "messages"),
            ({"tools": [{"type": "function", "function": {"name": "weather"}}]}, "tools"),
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
             "response_format"), ({"logprobs": True}, "logprobs"), ({"presence_penalty": 3}, "presence_penalty")):
        with pytest.raises(openai.BadRequestError) as raised:
            chat.create(**{"messages": [{"role": "user", "content": "Hi"}]} | ask | options)
        assert raised.value.param == param, raised.value.body


def test_presence_and_frequency_penalties_and_logit_bias_follow_openai_s_definition():
    """logits + bias - presence * (count > 0) - frequency * count, the counts of the tokens generated so far."""
    from serving import BatchDecoder

    model = served_model()
    decoder = BatchDecoder(model, load_tokenizer(), BLOCK_SIZE, 2, 2).start()

    def served(**adjustments) -> list[int]:
        done, tokens = threading.Event(), []
        decoder.submit(Request([464], 12, lambda event: (tokens.extend(c.token for c in event.tokens),
                                                         event.finish_reason and done.set()), temperature=0,
                               **adjustments))
        assert done.wait(60)
        return tokens

    def expected(presence: float, frequency: float, bias: dict[int, float]) -> list[int]:
        tokens, counts = [464], torch.zeros(model.vocabulary_size)
        with torch.no_grad():
            for _ in range(12):
                logits = model.next_token_logits(torch.tensor([tokens]))[0]
                logits[list(bias)] += torch.tensor(list(bias.values()))
                token = int((logits - presence * (counts > 0) - frequency * counts).argmax())
                counts[token] += 1
                tokens.append(token)
        return tokens[1:]

    try:
        plain = served()
        for presence, frequency, bias in ((2.0, 0.0, {}), (0.0, 1.5, {}), (-0.5, 2.0, {11: 5.0}), (0.0, 0.0, {11: 100})):
            penalized = served(presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias)
            assert penalized == expected(presence, frequency, bias) != plain
    finally:
        decoder.stop()


class FailsOnItsSecondToken:
    """r50k_base, except that decoding the second generated token raises, as a token beyond it once did."""

    def __init__(self):
        self.decoded, self.n_vocab = 0, load_tokenizer().n_vocab

    def decode_single_token_bytes(self, token: int) -> bytes:
        self.decoded += 1
        if self.decoded == 2:
            raise KeyError(token)
        return load_tokenizer().decode_single_token_bytes(token)


def test_a_token_that_cannot_be_decoded_ends_its_request_and_the_loop_goes_on():
    from serving import BatchDecoder

    decoder = BatchDecoder(served_model(), FailsOnItsSecondToken(), BLOCK_SIZE, 2, 2).start()
    try:
        results = []
        for _ in range(2):
            done, events = threading.Event(), []
            decoder.submit(Request([464], 4, lambda event: (events.append(event), event.finish_reason and done.set()),
                                   temperature=0))
            assert done.wait(60)
            results.append(events[-1])
    finally:
        decoder.stop()
    assert results[0].finish_reason == "error" and "KeyError" in results[0].error
    assert results[1].finish_reason == "length"


def running(request: Request, tokens: list[int]) -> list:
    """serving.Running's events for the tokens, as if the model had chosen them, up to the one that finishes."""
    from serving import TokenChoice

    row, events = Running(request, load_tokenizer(), torch.device("cpu")), []
    for token in tokens:
        events.append(row.advance(TokenChoice(token), eos_index=50256))
        if events[-1].finish_reason:
            break
    return events


def test_a_character_split_across_tokens_is_held_back_until_whole():
    tokens = load_tokenizer().encode("A 𝔘 B")
    events = running(Request([0], 10, None), tokens)
    assert "".join(event.text for event in events) == "A 𝔘 B"
    assert all("\ufffd" not in event.text for event in events)
    assert any(event.text == "" for event in events), "a piece of the character waited for the rest"


def test_text_that_may_begin_a_stop_string_waits_and_the_stop_string_is_cut():
    tokenizer = load_tokenizer()
    tokens = tokenizer.encode("one two three four")
    events = running(Request([0], 10, None, stop=("three",)), tokens)
    assert "".join(event.text for event in events) == "one two "
    assert events[-1].finish_reason == "stop" and len(events) == len(tokenizer.encode("one two three"))
    events = running(Request([0], 10, None, stop=("two three five",)), tokens)
    assert "".join(event.text for event in events[:3]) == "one "  # "two three" might yet be the stop string
    assert events[-1].finish_reason is None and "".join(event.text for event in events) == "one two three four"


CHOICE_ITEMS = [
    ("The capital of France is", ["Paris", "a river", "green"], 0),
    ("Water boils at", ["100 degrees", "the moon", "music"], 0),
    ("The opposite of hot is", ["cold", "tall", "seven"], 0),
    ("A week has", ["seven days", "blue", "a king"], 0),
    ("Birds can", ["fly", "sing", "swim"], 0),
    ("The sun rises in the", ["east", "west", "north"], 0),
]


def direct_loglikelihoods(model, context: str, continuation: str) -> float:
    """The model's own log-probability of the continuation after the context, split as lm-eval splits it."""
    tokenizer = load_tokenizer()
    tokens, context_length = tokenizer.encode(context + continuation), len(tokenizer.encode(context))
    with torch.no_grad():
        log_probabilities = model(torch.tensor([tokens]))[0][0].log_softmax(-1)
    return sum(float(log_probabilities[position - 1, tokens[position]])
               for position in range(context_length, len(tokens)))


@pytest.mark.slow
def test_lm_eval_s_local_completions_scores_a_multiple_choice_task_as_the_model_does(server, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                             for q, c, a in CHOICE_ITEMS))
    (tmp_path / "task.yaml").write_text(
        "task: lightgpt_choices\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {items}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["lightgpt_choices"], task_manager=tasks,
        model_args={"base_url": f"{server}/v1/completions", "model": "lightgpt", "num_concurrent": 2,
                    "max_retries": 1}, log_samples=True)
    model = served_model()
    scores = [[direct_loglikelihoods(model, question, " " + choice) for choice in choices]
              for question, choices, _ in CHOICE_ITEMS]
    accuracy = sum(max(range(3), key=row.__getitem__) == answer
                   for row, (_, _, answer) in zip(scores, CHOICE_ITEMS)) / len(CHOICE_ITEMS)
    assert results["results"]["lightgpt_choices"]["acc,none"] == pytest.approx(accuracy)
    served = {sample["doc_id"]: [response[0][0] for response in sample["resps"]]
              for sample in results["samples"]["lightgpt_choices"]}
    torch.testing.assert_close(torch.tensor([served[index] for index in range(len(CHOICE_ITEMS))]),
                               torch.tensor(scores), rtol=0, atol=1e-3)


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def chat_in_the_page(page, message: str) -> str:
    """Type a message into the chat page and wait for its streamed reply to finish; the reply's text."""
    replies = page.locator(".assistant").count()
    page.fill("#message", message)
    page.click("#send")
    reply = page.locator(".assistant").nth(replies)
    reply.and_(page.locator("[data-done]")).wait_for(timeout=60_000)
    return reply.text_content()


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/run installs it)")
def test_the_chat_page_streams_a_reply_in_a_real_browser_and_resets(chat_server, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]
    expected = client(chat_server, api_key=API_KEY).chat.completions.create(
        model="lightgpt", messages=messages, temperature=0, max_tokens=40).choices[0].message.content
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{chat_server}/")
            page.fill("#api_key", API_KEY)
            page.fill("#system", "Be brief.")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "40")
            assert chat_in_the_page(page, "Name a river.") == expected
            pieces = int(page.locator(".assistant").first.get_attribute("data-pieces"))
            assert pieces > 3, "the reply streamed in, in pieces"
            page.screenshot(path=tmp_path / "chat.png")
            page.click("#reset")
            assert page.locator(".message").count() == 0
            assert chat_in_the_page(page, "Name a river.") == expected  # the same first turn: nothing was kept
        finally:
            browser.close()


def test_the_batch_s_cache_is_what_sizing_predicts():
    from serving import BatchDecoder

    model = served_model()
    decoder = BatchDecoder(model, load_tokenizer(), BLOCK_SIZE, max_batch_size=16, max_queued=1)
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in decoder.cache)
    architecture = sizing.Architecture(50257, BLOCK_SIZE, 64, 4, 2, num_kv_heads=2)
    assert measured == architecture.kv_cache_bytes(sequences=16)

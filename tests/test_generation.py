import itertools
import re
import shlex
from collections.abc import Iterator

import pytest
import torch

import beam_search as beam_search_script
import generate as generate_script
from checkpoint import load_model, model_from_checkpoint
from conftest import (
    REPOSITORY,
    TINY_SHAPE,
    assert_one_line_error,
    flag_error,
    lightgpt,
    run_script,
    save_pretrained_checkpoint,
)
from conftest import tiny_model as random_tiny_model
from devices import compute_dtype
from finetuning import load_inference_model
from generation import beam_search, generate, penalize_repeats, top_k_top_p
from serving import BatchDecoder
from model import LightGPT
from tokenizer import load_tokenizer

VOCABULARY = TINY_SHAPE["vocabulary_size"]


def tiny_model(**overrides) -> LightGPT:
    """A random tiny model with embeddings five times the usual size: distinct, not quite uniform predictions."""
    model = random_tiny_model(**overrides).eval()
    with torch.no_grad():
        model.token_embeddings.weight.mul_(5)
    return model


def full_forward_logits(model: LightGPT, tokens: torch.Tensor) -> torch.Tensor:
    logits, _ = model(tokens)
    return logits[:, -1]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_cache_gives_the_logits_of_a_full_forward_pass_step_after_step(batch_size):
    model = tiny_model()
    tokens = torch.randint(0, VOCABULARY, (batch_size, 20))
    cache = model.new_cache(batch_size, 20)
    with torch.no_grad():
        cached = model.next_token_logits(tokens[:, :5], cache)
        torch.testing.assert_close(cached, full_forward_logits(model, tokens[:, :5]))
        for end in range(6, 16):
            cached = model.next_token_logits(tokens[:, end - 1 : end], cache)
            torch.testing.assert_close(cached, full_forward_logits(model, tokens[:, :end]))
        # several new tokens at once against a filled cache: each sees the cache and the new ones before it
        cached = model.next_token_logits(tokens[:, 15:20], cache)
        torch.testing.assert_close(cached, full_forward_logits(model, tokens))
    assert cache[0].length == 20


def test_a_bf16_model_caches_in_bf16_and_gives_float32_logits_near_float32_s():
    model = tiny_model()
    tokens = torch.randint(0, VOCABULARY, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.next_token_logits(tokens)
        model.to(torch.bfloat16)
        cache = model.new_cache(2, 12)
        model.next_token_logits(tokens[:, :11], cache)
        logits = model.next_token_logits(tokens[:, 11:], cache)
    assert cache[0].keys.dtype == torch.bfloat16 and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0.05, atol=0.05)


def test_reordering_the_cache_follows_the_chosen_beams():
    model = tiny_model()
    tokens = torch.randint(0, VOCABULARY, (3, 6))
    cache = model.new_cache(3, 7)
    rows = torch.tensor([2, 2, 0, 1])
    with torch.no_grad():
        model.next_token_logits(tokens, cache)
        for layer in cache:
            layer.reorder(rows)
        new = torch.randint(0, VOCABULARY, (4, 1))
        cached = model.next_token_logits(new, cache)
        torch.testing.assert_close(cached, full_forward_logits(model, torch.cat((tokens[rows], new), 1)))


def test_training_forward_is_unchanged_by_the_cache_code():
    model = tiny_model()
    model.train()
    x = torch.randint(0, VOCABULARY, (2, 9))
    _, loss = model(x, x)
    loss.backward()
    assert model.token_embeddings.weight.grad is not None


def greedy_reference(model: LightGPT, prompt: list[int], max_tokens: int, block_size: int) -> list[int]:
    """Greedy decoding written the slow, obvious way, with the documented context rule."""
    context, generated = list(prompt[-block_size:]), []
    for _ in range(max_tokens):
        token = full_forward_logits(model, torch.tensor([context])).argmax().item()
        if token == model.eos_index:
            break
        generated.append(token)
        context.append(token)
        if len(context) > block_size:
            context = context[-((block_size + 1) // 2) :]
    return generated


@pytest.mark.parametrize("use_cache", [True, False])
def test_top_k_of_one_is_greedy_decoding_even_past_the_block_size(use_cache):
    model = tiny_model(eos_index=VOCABULARY - 1)
    prompt = [5, 17, 3]
    with torch.no_grad():
        expected = greedy_reference(model, prompt, 40, block_size=8)
    tokens = generate(model, torch.tensor(prompt), 40, top_k=1, block_size=8, use_cache=use_cache)
    assert isinstance(tokens, Iterator)
    assert list(tokens) == expected


def test_cached_and_uncached_sampling_draw_the_same_tokens_under_one_seed():
    model = tiny_model()
    prompt = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])  # longer than block_size: cut to its end
    settings = dict(temperature=1.5, top_k=VOCABULARY, top_p=1.0, repeat_penalty=1.3, block_size=10)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        runs.append(list(generate(model, prompt, 30, use_cache=use_cache, **settings)))
    assert runs[0] == runs[1]
    assert len(runs[0]) > 10


def test_seeded_sampling_is_reproducible_and_the_seed_matters():
    model = tiny_model()
    prompt = torch.tensor([4, 2])

    def sample(seed):
        torch.manual_seed(seed)
        return list(generate(model, prompt, 20, temperature=2.0, top_k=50, top_p=0.95))

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_generation_stops_at_the_end_of_text_token_and_at_max_tokens():
    model = tiny_model()

    def sample(max_tokens):
        torch.manual_seed(0)
        return list(generate(model, torch.tensor([3]), max_tokens, top_k=VOCABULARY, top_p=1.0))

    tokens = sample(12)
    assert len(tokens) == 12 and model.eos_index not in tokens
    assert sample(5) == tokens[:5]
    # The same draws, but now the sixth distinct token ends the text.
    distinct = list(dict.fromkeys(tokens))
    assert len(distinct) >= 6
    model.config.eos_index = distinct[5]
    assert sample(12) == tokens[: tokens.index(distinct[5])]


def test_generation_stops_at_any_of_a_set_of_stop_tokens():
    model = tiny_model()

    def sample(stop_tokens):
        torch.manual_seed(0)
        return list(generate(model, torch.tensor([3]), 12, top_k=VOCABULARY, top_p=1.0, stop_tokens=stop_tokens))

    tokens = sample({model.eos_index})
    distinct = list(dict.fromkeys(tokens))
    assert sample({distinct[5], distinct[3]}) == tokens[: tokens.index(distinct[3])]
    assert sample({distinct[5]}) == tokens[: tokens.index(distinct[5])]


def test_top_k_then_top_p_keeps_the_fewest_likely_tokens_and_always_the_most_likely():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    tokens, probabilities = top_k_top_p(logits, temperature=1.0, top_k=4, top_p=0.7)
    kept = {token: p for token, p in zip(tokens.tolist(), probabilities.tolist()) if p > 0}
    assert kept.keys() == {1, 3}
    assert kept[1] == pytest.approx(0.5 / 0.8) and kept[3] == pytest.approx(0.3 / 0.8)
    tokens, probabilities = top_k_top_p(logits, temperature=1.0, top_k=4, top_p=1e-9)
    assert tokens[probabilities > 0].tolist() == [1]
    tokens, probabilities = top_k_top_p(logits, temperature=1.0, top_k=2, top_p=1.0)
    assert tokens.tolist() == [1, 3] and probabilities.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8])
    _, hot = top_k_top_p(logits, temperature=2.0, top_k=4, top_p=1.0)
    _, cold = top_k_top_p(logits, temperature=0.5, top_k=4, top_p=1.0)
    assert cold[0] > 0.5 > hot[0]
    assert hot.tolist() == pytest.approx((logits.sort(descending=True).values / 2).softmax(-1).tolist())


def test_the_repeat_penalty_pushes_the_context_tokens_towards_unlikely():
    logits = torch.tensor([2.0, -1.0, 3.0, -4.0, 0.5])
    penalized = penalize_repeats(logits, torch.tensor([0, 1, 1, 3]), 2.0)
    assert penalized.tolist() == [1.0, -2.0, 3.0, -8.0, 0.5]
    assert logits.tolist() == [2.0, -1.0, 3.0, -4.0, 0.5]


def every_finished_sequence(model, prompt, max_tokens, stops=None):
    """Every sequence a search can finish, as (tokens, total log-probability, length), by full forward passes:
    ended by any of the stop tokens (by default the eos_index; the log of the probability of any) or cut at
    max_tokens."""
    stops = stops or [model.eos_index]
    others = [token for token in range(model.vocabulary_size) if token not in stops]
    results = []
    for length in range(1, max_tokens + 1):
        bodies = [list(body) for body in itertools.product(others, repeat=length - 1)]
        ends = [*stops, *(others if length == max_tokens else [])]
        batch = torch.tensor([prompt + body + [end] for body in bodies for end in ends])
        logits, _ = model(batch)
        log_probabilities = logits[:, len(prompt) - 1 : -1].log_softmax(-1)
        totals = log_probabilities.gather(2, batch[:, len(prompt) :, None]).sum((1, 2)).view(len(bodies), len(ends))
        results += [(body, totals[row, : len(stops)].logsumexp(0).item(), length) for row, body in enumerate(bodies)]
        if length == max_tokens:
            results += [(body + [end], totals[row, len(stops) + column].item(), length)
                        for row, body in enumerate(bodies) for column, end in enumerate(others)]
    return results


@pytest.mark.parametrize("stops", [None, [0, 3]], ids=["eos", "two stop tokens"])
def test_a_wide_enough_beam_search_equals_exhaustive_search(stops):
    model = tiny_model(vocabulary_size=4)
    prompt = [2, 1]
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:  # larger weights: the end-of-text token is likely early and late
                weight.normal_(0, 0.3)
        sequences = every_finished_sequence(model, prompt, 4, stops)
    for length_penalty in (0.0, 1.0, 2.0):
        ranked = sorted(((tokens, total / length**length_penalty) for tokens, total, length in sequences),
                        key=lambda result: result[1], reverse=True)[:5]
        found = beam_search(model, torch.tensor(prompt), 4, beam_width=27, num_candidates=5,
                            length_penalty=length_penalty, stop_tokens=stops)
        assert [tokens for tokens, _ in found] == [tokens for tokens, _ in ranked]
        assert [score for _, score in found] == pytest.approx([score for _, score in ranked], abs=1e-4)
        assert {len(tokens) for tokens, _ in ranked} != {4}, "the ranking should mix lengths"


def test_beam_search_past_the_block_size_and_with_a_narrow_beam():
    model = tiny_model()
    prompt = torch.tensor([3, 1, 4, 1, 5])
    found = beam_search(model, prompt, 12, beam_width=4, num_candidates=2, block_size=6)
    assert 1 <= len(found) <= 2
    assert [score for _, score in found] == sorted((score for _, score in found), reverse=True)
    assert all(len(tokens) <= 12 and model.eos_index not in tokens for tokens, _ in found)
    one = beam_search(model, prompt, 12, beam_width=1, num_candidates=1, block_size=6)
    assert found[0][1] >= one[0][1] - 1e-6


# The scripts, on a tiny model over the real vocabulary saved in pre-train.py's checkpoint format.


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    tokenizer = load_tokenizer()
    model = lightgpt(vocabulary_size=tokenizer.n_vocab, embedding_dimensions=16, num_heads=2, num_layers=1,
                     feed_forward_ratio=2, eos_index=tokenizer.eot_token)
    return save_pretrained_checkpoint(model, tmp_path_factory.mktemp("generation") / "checkpoint.pt", block_size=16)


def script_model(checkpoint_path):
    """The checkpoint's model as the scripts run it by default: in the precision auto chooses for this CPU."""
    model = model_from_checkpoint(torch.load(checkpoint_path, weights_only=True), checkpoint_path)
    return model.to(compute_dtype("auto", torch.device("cpu"))).eval()


@pytest.mark.slow
def test_generate_samples_as_the_model_does_under_the_same_seed(checkpoint_path):
    tokenizer = load_tokenizer()
    result = run_script("generate.py", "--checkpoint_path", checkpoint_path, "--prompt", "The history of",
                        "--max_tokens", "20", "--temperature", "1.2", "--top_k", "100", "--top_p", "0.95",
                        "--repeat_penalty", "1.2", "--seed", "7", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    model = script_model(checkpoint_path)
    torch.manual_seed(7)
    prompt = torch.tensor(tokenizer.encode_ordinary("The history of"))
    tokens = generate(model, prompt, 20, 1.2, 100, 0.95, 1.2, block_size=16)
    assert result.stdout == "The history of" + tokenizer.decode(list(tokens)) + "\n"  # the prompt, continued


@pytest.mark.slow
def test_generate_completes_every_line_of_standard_input_after_the_line_a_blank_line_apart(checkpoint_path):
    tokenizer = load_tokenizer()
    model = script_model(checkpoint_path)
    lines = ["Once upon a time", "", "The king said"]
    result = run_script("generate.py", "--checkpoint_path", checkpoint_path, "--top_k", "1", "--max_tokens", "6",
                        "--device", "cpu", input="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    texts = []
    for line in lines:
        prompt = torch.tensor(tokenizer.encode_ordinary(line) or [tokenizer.eot_token])
        texts.append(line + tokenizer.decode(list(generate(model, prompt, 6, top_k=1, block_size=16))) + "\n")
    assert result.stdout == "\n".join(texts)


@pytest.mark.slow
def test_beam_search_prints_the_best_candidates_with_their_scores(checkpoint_path):
    tokenizer = load_tokenizer()
    result = run_script("beam_search.py", "--checkpoint_path", checkpoint_path, "--prompt", "In the beginning",
                        "--max_tokens", "8", "--beam_width", "4", "--num_candidates", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    prompt = torch.tensor(tokenizer.encode_ordinary("In the beginning"))
    found = beam_search(script_model(checkpoint_path), prompt, 8, beam_width=4, num_candidates=2, block_size=16)
    assert result.stdout.startswith("> In the beginning\n")
    printed = re.findall(r"^(\d+)\. \[(-?\d+\.\d+)\] (.*)$", result.stdout, re.M)
    assert [rank for rank, _, _ in printed] == ["1", "2"]
    for (_, score, text), (tokens, expected_score) in zip(printed, found):
        assert float(score) == pytest.approx(expected_score, abs=1e-3)
        assert text == tokenizer.decode(tokens)


@pytest.mark.parametrize("script, arguments, fragments", [
    (generate_script, ["--top_k", "0"], ["--top_k", "0"]),
    (generate_script, ["--top_p", "0"], ["--top_p", "(0, 1]"]),
    (generate_script, ["--top_p", "1.5"], ["--top_p", "1.5"]),
    (generate_script, ["--temperature", "0"], ["--temperature", "0"]),
    (generate_script, ["--repeat_penalty", "-1"], ["--repeat_penalty", "-1"]),
    (generate_script, ["--max_tokens", "0"], ["--max_tokens", "0"]),
    (generate_script, ["--device", "cuda:7"], ["--device"]),
    (beam_search_script, ["--beam_width", "2", "--num_candidates", "3"], ["--beam_width (2)", "--num_candidates (3)"]),
    (beam_search_script, ["--num_candidates", "0"], ["--num_candidates", "0"]),
    (beam_search_script, ["--max_tokens", "-3"], ["--max_tokens", "-3"]),
    (beam_search_script, ["--length_penalty", "nan"], ["--length_penalty", "nan"]),
    (beam_search_script, ["--seed", "-1"], ["--seed", "[0, 2**63)", "-1"]),
    (generate_script, ["--seed", str(2**63)], ["--seed", "[0, 2**63)", str(2**63)]),
])
def test_bad_arguments_are_named_in_one_line(script, arguments, fragments, capsys):
    message = flag_error(script, ["--device", "cpu", *arguments], capsys)
    assert all(fragment in message for fragment in fragments), message


@pytest.mark.slow
def test_the_scripts_exit_with_one_line_for_bad_arguments(checkpoint_path):
    result = run_script("generate.py", "--checkpoint_path", checkpoint_path, "--prompt", "x", "--top_k", "50258",
                        "--device", "cpu")
    assert_one_line_error(result, "--top_k", "50257", "50258")
    result = run_script("beam_search.py", "--checkpoint_path", checkpoint_path, "--lora_path", "adapter.pt",
                        "--device", "cpu")
    assert_one_line_error(result, "adapter.pt", "no checkpoint file")


def test_missing_truncated_and_foreign_checkpoints_are_named_in_one_line(tmp_path, checkpoint_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt: no checkpoint"):
        load_model(tmp_path / "nothing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint_path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.pt: not a readable checkpoint"):
        load_model(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt: not a LightGPT checkpoint"):
        load_model(foreign)
    mismatched = tmp_path / "mismatched.pt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    torch.save(checkpoint | {"model_args": checkpoint["model_args"] | {"num_layers": 2}}, mismatched)
    with pytest.raises(ValueError, match="mismatched.pt: its model_args and weights do not make a LightGPT"):
        load_model(mismatched)
    with pytest.raises(FileNotFoundError, match="adapter.pt: no checkpoint"):
        load_inference_model(checkpoint_path, lora_path=tmp_path / "adapter.pt")
    model, block_size, template = load_model(checkpoint_path)
    assert block_size == 16 and not model.training and template is None


def test_hand_made_checkpoints_without_a_context_or_with_nan_weights_are_refused(tmp_path, checkpoint_path):
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    for block_size in (0, -3, 2.5, None):
        torch.save(checkpoint | {"block_size": block_size}, tmp_path / "no_context.pt")
        with pytest.raises(ValueError, match=f"no_context.pt: its block_size must be a positive whole number, "
                                             f"got {block_size}"):
            load_model(tmp_path / "no_context.pt")
    weights = dict(checkpoint["model"])
    weights["output_norm.weight"] = torch.full_like(weights["output_norm.weight"], float("nan"))
    torch.save(checkpoint | {"model": weights}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan.pt: its weights hold NaN or infinite numbers \(in output_norm"):
        load_model(tmp_path / "nan.pt")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["generate.py", "beam_search.py"])
def test_the_scripts_exit_with_one_line_for_a_bad_checkpoint(tmp_path, checkpoint_path, script):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint_path.read_bytes()[:5000])
    result = run_script(script, "--checkpoint_path", truncated, "--prompt", "x", "--device", "cpu")
    assert_one_line_error(result, "truncated.pt", "not a readable checkpoint")
    no_context = tmp_path / "no_context.pt"
    torch.save(torch.load(checkpoint_path, weights_only=True) | {"block_size": 0}, no_context)
    result = run_script(script, "--checkpoint_path", no_context, "--prompt", "x", "--device", "cpu")
    assert_one_line_error(result, "no_context.pt", "block_size must be a positive whole number, got 0")


@pytest.mark.slow
def test_a_beam_search_that_cannot_fit_in_memory_is_refused_before_it_starts(checkpoint_path):
    result = run_script("beam_search.py", "--checkpoint_path", checkpoint_path, "--prompt", "x",
                        "--beam_width", str(10**7), "--device", "cpu")
    assert_one_line_error(result, "--beam_width 10000000 and --max_tokens 200 need about", "GB for the search")
    result = run_script("beam_search.py", "--checkpoint_path", checkpoint_path, "--prompt", "x",
                        "--max_tokens", str(10**30), "--device", "cpu")
    assert_one_line_error(result, f"--max_tokens {10**30} need about", "GB for the search")


def readme_generation_commands() -> list[list[str]]:
    readme = (REPOSITORY / "README.md").read_text()
    section = readme.split("## Generation", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(?:.*\| )?python ((?:generate|beam_search)\.py.*)$", section, re.M)
    assert len(commands) >= 3, "the README's Generation section shows no commands"
    return [shlex.split(command) for command in commands]


@pytest.mark.slow
def test_the_readme_generation_commands_run(checkpoint_path):
    for script, *arguments in readme_generation_commands():
        result = run_script(script, *arguments, "--checkpoint_path", checkpoint_path, "--max_tokens", "4",
                            "--device", "cpu", input="A prompt from standard input\n")
        assert result.returncode == 0, f"{script} {arguments}: {result.stderr}"
        assert result.stdout.strip(), f"{script} {arguments} printed nothing"


@pytest.mark.parametrize("build, fragment", [
    (lambda model: BatchDecoder(model, load_tokenizer(), 10**12, 16, 4),
     "a batch of 16 rows (--max_batch_size) of the model's 1,000,000,000,000-token context"),
    (lambda model: list(generate(model, torch.tensor([1]), 10**12, top_k=1, block_size=10**12)),
     "a context of 1,000,000,000,000 tokens"),
    (lambda model: list(generate(model, torch.tensor([1]), 10**11, top_k=1, block_size=10**12)),
     "a context of 100,000,000,001 tokens"),
])
def test_a_cache_beyond_the_memory_is_refused_in_one_line_before_it_is_allocated(build, fragment):
    """A checkpoint's block_size is read from its file: a cache sized by it is checked against the free memory, and
    a short generation still allocates only the tokens it needs."""
    model = random_tiny_model().eval()
    with pytest.raises(ValueError) as raised:
        build(model)
    message = str(raised.value)
    assert "\n" not in message and fragment in message and "more than the" in message, message
    assert len(list(generate(model, torch.tensor([1]), 3, top_k=1, block_size=10**12, stop_tokens=()))) == 3

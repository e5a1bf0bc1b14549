"""Every float flag is bounded to what its arithmetic carries: values beyond are refused with one line, and the
computation at either end of the range stays finite."""

import math

import pytest
import torch

from conftest import load_script, tiny_model
from flags import available_cpus
from generation import (
    GREEDY_BELOW_TEMPERATURE,
    LENGTH_PENALTIES,
    REPEAT_PENALTIES,
    beam_search,
    generate,
    penalize_repeats,
    top_k_top_p,
)

SCRIPTS = {name: load_script(name) for name in ("generate", "beam_search", "pre-train", "instruction-tune", "bench")}


@pytest.mark.parametrize("script, flag, value", [
    ("generate", "--temperature", "inf"), ("generate", "--temperature", "0"),
    ("generate", "--repeat_penalty", "1e-300"), ("generate", "--repeat_penalty", "1e300"),
    ("beam_search", "--length_penalty", "1e308"), ("beam_search", "--length_penalty", "-1e308"),
    ("pre-train", "--learning_rate", "1e38"), ("pre-train", "--learning_rate", "inf"),
    ("pre-train", "--max_gradient_norm", "inf"), ("instruction-tune", "--alpha", "1e31"),
    ("instruction-tune", "--learning_rate", "nan"),
])
def test_a_float_beyond_what_the_arithmetic_carries_is_refused_with_one_line(script, flag, value, capsys):
    with pytest.raises(SystemExit):
        SCRIPTS[script].parse_args([f"{flag}={value}"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in error and "must be" in error, error


@pytest.mark.parametrize("script", ["pre-train", "bench"])
def test_more_processes_than_cpus_are_refused_before_any_start(script, capsys):
    """--num_dataset_processes 1000000 once started processes until the machine stopped (853 in 15 s)."""
    assert SCRIPTS[script].parse_args(["--num_dataset_processes", str(available_cpus())]).num_dataset_processes
    for value in (available_cpus() + 1, 1000000):
        with pytest.raises(SystemExit):
            SCRIPTS[script].parse_args(["--num_dataset_processes", str(value)])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"--num_dataset_processes: must be at most the {available_cpus()} CPUs of this machine, got {value}" \
            in error, error


@pytest.mark.parametrize("script, flag", [("generate", "--temperature"), ("generate", "--repeat_penalty"),
                                          ("beam_search", "--length_penalty"), ("pre-train", "--learning_rate"),
                                          ("instruction-tune", "--alpha")])
def test_the_help_says_the_bound(script, flag):
    help_text = " ".join(SCRIPTS[script].build_parser().format_help().split())
    bound = {"--temperature": "1e-4", "--repeat_penalty": "1e6", "--length_penalty": "10"}.get(flag, "1e30")
    assert bound in help_text.split(f"{flag} ", 1)[1].split("(default", 1)[0], help_text


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, GREEDY_BELOW_TEMPERATURE / 2])
def test_a_tiny_temperature_samples_greedily(temperature):
    logits = torch.tensor([1.0, 3.0, 2.9999, -50.0])
    tokens, probabilities = top_k_top_p(logits, temperature, top_k=4, top_p=0.9)
    assert tokens[probabilities.argmax()].item() == 1 and probabilities.isfinite().all()
    model = tiny_model()
    prompt = torch.tensor([3, 5])
    sampled = list(generate(model, prompt, 6, temperature=temperature, top_k=50))
    greedy = list(generate(model, prompt, 6, temperature=1.0, top_k=1))
    assert sampled == greedy


@pytest.mark.parametrize("penalty", REPEAT_PENALTIES)
def test_the_repeat_penalties_at_the_ends_of_their_range_keep_the_logits_finite(penalty):
    logits = torch.tensor([3e4, -3e4, 1e-3, -1e-3])
    assert penalize_repeats(logits, torch.arange(4), penalty).isfinite().all()
    assert len(list(generate(tiny_model(), torch.tensor([3, 5, 3]), 4, top_k=50, repeat_penalty=penalty))) <= 4


@pytest.mark.parametrize("length_penalty", LENGTH_PENALTIES)
def test_the_length_penalties_at_the_ends_of_their_range_rank_with_finite_scores(length_penalty):
    candidates = beam_search(tiny_model(), torch.tensor([3, 5]), 8, beam_width=3, num_candidates=2,
                             length_penalty=length_penalty)
    assert candidates and all(math.isfinite(score) for _, score in candidates)

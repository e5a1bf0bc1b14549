import importlib.util

import pytest

from conftest import REPOSITORY, flag_error
from training import learning_rate_at, warmup_steps_of


def pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain", REPOSITORY / "pre-train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# shorter than the old 100-step warmup, the Quick start's run, the default run
@pytest.mark.parametrize("total_steps", [20, 96, 68_640])
def test_the_default_warmup_scales_with_the_run_so_a_short_run_still_reaches_its_peak(total_steps):
    warmup = warmup_steps_of(pretrain_script().parse_args([]).warmup_steps, total_steps)
    assert warmup == round(0.05 * total_steps)
    rates = [learning_rate_at(step, total_steps, warmup, peak=1.0) for step in range(total_steps)]
    assert max(rates) == 1.0 and rates[-1] == pytest.approx(0.1, abs=0.01)
    assert sum(rates) / total_steps > 0.5


def test_the_old_fixed_warmup_left_a_short_run_far_below_its_peak():
    """What the percentage fixes: 100 warmup steps never let a 20-step run pass a fifth of its peak."""
    rates = [learning_rate_at(step, 20, warmup_steps_of(100, 20), peak=1.0) for step in range(20)]
    assert max(rates) == pytest.approx(0.2)


def test_warmup_steps_take_a_number_of_steps_or_a_percentage():
    script = pretrain_script()
    assert script.parse_args(["--warmup_steps", "7"]).warmup_steps == 7
    assert warmup_steps_of(script.parse_args(["--warmup_steps", "2.5%"]).warmup_steps, 400) == 10
    assert warmup_steps_of(script.parse_args(["--warmup_steps", "0%"]).warmup_steps, 400) == 0


@pytest.mark.parametrize("value, fragments", [
    ("5x", ["--warmup_steps", "a number of steps or a percentage such as 5%", "'5x'"]),
    ("-1", ["--warmup_steps", "zero steps or more", "-1"]),
    ("150%", ["--warmup_steps", "from 0% to 100%", "'150%'"]),
    ("nan%", ["--warmup_steps", "'nan%'"]),
    ("x%", ["--warmup_steps", "a percentage from 0% to 100%", "'x%'"]),
])
def test_a_bad_warmup_is_named_in_one_line(value, fragments, capsys):
    message = flag_error(pretrain_script(), ["--device", "cpu", "--warmup_steps", value], capsys)
    assert all(fragment in message for fragment in fragments), message

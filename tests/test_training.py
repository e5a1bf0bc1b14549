import json

import pytest
from tqdm import tqdm

from training import EpochLog


def logged_epoch(tmp_path, **utilization) -> dict:
    """The metrics record of a one-step epoch of 1000 tokens."""
    log = EpochLog(tqdm(disable=True), tmp_path / "run.metrics.jsonl", **utilization)
    log.add_step(1, loss=2.0, gradient_norm=0.5, learning_rate=1e-3)
    log.end_epoch(1, 1, "tokens", 1000, validation_loss=None)
    return json.loads((tmp_path / "run.metrics.jsonl").read_text())


def test_an_epoch_s_mfu_is_its_flops_per_second_over_the_peak(tmp_path):
    record = logged_epoch(tmp_path, flops_per_unit=6e6, peak_flops=2e12)
    assert record["mfu"] == pytest.approx(record["tokens_per_second"] * 6e6 / 2e12)


@pytest.mark.parametrize("utilization", [{}, {"flops_per_unit": 6e6}, {"peak_flops": 2e12}])
def test_without_a_peak_or_the_flops_there_is_no_mfu(tmp_path, utilization):
    assert "mfu" not in logged_epoch(tmp_path, **utilization)

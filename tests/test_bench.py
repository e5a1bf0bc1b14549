import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPOSITORY, assert_one_line_error, one_thread, run_script

import bench
from conftest import lightgpt, load_script, tiny_model
from devices import compute_dtype
from optimizers import Adafactor
from profiling import PeakTensorMemory
from sizing import training_flops_per_token

TINY_BENCH_FLAGS = [
    "--embedding_dimensions", "16", "--num_attention_heads", "2", "--num_hidden_layers", "2", "--block_size", "16",
    "--feed_forward_ratio", "2", "--vocabulary_size", "97", "--batch_size", "2", "--device", "cpu",
]
SIDE_BY_SIDE = {"train_tokens_per_s", "parameters", "train_peak_memory"}


@pytest.mark.slow
def test_bench_runs_a_tiny_shape_and_prints_one_well_formed_json_object_per_measurement():
    # fp32: in bf16 this tiny model's peak memory is not in its activations, so checkpointing cannot lower it.
    result = run_script(
        "bench.py", *TINY_BENCH_FLAGS, "--precision", "fp32", "--steps", "2", "--warmup", "1",
        "--checkpointing_layers", "4", "--parts", "train", "generate", "beam_search", "preference", "checkpointing",
        "data", "--data_tokens", "40000",
        "--generation_lengths", "4", "8", "--beam_tokens", "4", "--beam_width", "4", "--json",
    )
    assert result.returncode == 0, result.stderr
    records = {}
    for line in result.stdout.strip().splitlines():
        record = json.loads(line)
        assert {"metric", "value", "unit"} <= record.keys(), record
        assert math.isfinite(record["value"]) and record["value"] > 0, record
        records[record["metric"], record.get("tokens")] = record

    for length in (4, 8):
        for mode in ("greedy", "sample"):
            assert records[f"generate_{mode}_tokens_per_s", length]["gpt2_value"] > 0
        assert records["kv_cache_speedup", length]["value"] == pytest.approx(
            records["generate_sample_tokens_per_s", length]["value"]
            / records["generate_uncached_tokens_per_s", length]["value"]
        )
    assert records["beam_search_tokens_per_s", 4]["gpt2_value"] > 0
    # a DPO step holds no more than an SFT step over as many rows, give or take the output layer's chunks
    assert 0.5 < records["preference_over_sft_as_many_rows_peak_memory", None]["value"] < 1.2
    assert records["preference_over_sft_peak_memory", None]["value"] > 0

    for metric in SIDE_BY_SIDE:
        record = records[metric, None]
        ratio = record["value"] / record["gpt2_value"]
        assert record["ratio"] == pytest.approx(ratio if metric == "train_tokens_per_s" else 1 / ratio)
    tiny = lightgpt(vocabulary_size=97, embedding_dimensions=16, num_heads=2, num_layers=2, feed_forward_ratio=2,
                    eos_index=96)
    assert records["parameters", None]["value"] == tiny.num_trainable_params
    # GPT-2 of the same shape also has biases and learned positions.
    assert records["parameters", None]["gpt2_value"] > tiny.num_trainable_params

    with_checkpointing = records["checkpointing_peak_memory", None]["value"]
    without = records["no_checkpointing_peak_memory", None]["value"]
    assert with_checkpointing < without
    assert records["checkpointing_memory_fraction", None]["value"] == pytest.approx(with_checkpointing / without)

    # MFU on a CPU: against the best matrix product measured in the same run, in the run's dtype.
    mfu = records["train_mfu", None]
    assert mfu["peak"] == "measured" and mfu["peak_tflops"] > 0
    flops = training_flops_per_token(97, 16, 16, 2, 2) * records["train_tokens_per_s", None]["value"]
    assert mfu["value"] == pytest.approx(100 * flops / (mfu["peak_tflops"] * 1e12), rel=1e-3)


    prepared = sorted(tokens for metric, tokens in records if metric == "prepare_corpus_tokens_per_s")
    assert len(prepared) == 2 and 8_000 < prepared[0] < prepared[1] / 3 and 30_000 < prepared[1] < 50_000
    for tokens in prepared:
        assert records["prepare_corpus_peak_rss", tokens]["processes"] == 2
        assert records["prepare_corpus_worker_peak_rss", tokens]["value"] > 0
    assert ("process_peak_rss", None) in records


@pytest.mark.slow
def test_bench_measures_hellaswag_scoring_batched_and_one_item_at_a_time():
    shape = [flag if flag != "97" else "50257" for flag in TINY_BENCH_FLAGS]
    result = run_script("bench.py", *shape, "--parts", "eval", "--eval_items", "6", "--eval_batch_size", "8",
                        "--precision", "fp32", "--json")
    assert result.returncode == 0, result.stderr
    records = {record["metric"]: record for record in map(json.loads, result.stdout.strip().splitlines())}
    batched, alone = records["hellaswag_items_per_s"]["value"], records["hellaswag_one_at_a_time_items_per_s"]["value"]
    assert records["hellaswag_batching_speedup"]["value"] == pytest.approx(batched / alone)
    assert records["hellaswag_items_per_s"]["items"] == 6


@pytest.mark.slow
def test_bench_serves_concurrent_streaming_clients_and_leaves_no_server_running():
    result = run_script("bench.py", *TINY_BENCH_FLAGS, "--num_kv_heads", "1", "--parts", "serve", "--serve_clients",
                        "1", "3", "--serve_tokens", "6", "--prompt_length", "4", "--precision", "fp32", "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.strip().splitlines()]
    served = {(record["metric"], record["clients"]): record for record in records if "clients" in record}
    assert served.keys() == {(metric, clients) for metric in ("serve_tokens_per_s", "serve_time_to_first_token")
                             for clients in (1, 3)}
    assert all(math.isfinite(record["value"]) and record["value"] > 0 for record in served.values())
    assert all(record["tokens"] == 6 and record["prompt_tokens"] == 4 for record in served.values())
    # The server bench started (the only one with 3 rows: other tests' servers may be running) has ended with it.
    running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert not [line for line in running if "serve.py" in line and "--max_batch_size 3" in line]


@pytest.mark.slow
def test_bench_prints_a_table_by_default_and_a_row_for_each_training_variant():
    result = run_script("bench.py", *TINY_BENCH_FLAGS, "--steps", "1", "--warmup", "0", "--no-gpt2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    dtype = str(compute_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    assert lines[0].startswith(f"LightGPT vs GPT-2 on cpu, {dtype}")  # auto, as in training
    assert lines[1].split() == ["Measurement", "LightGPT", "GPT-2", "LightGPT/GPT-2"]
    assert any(line.startswith("train_tokens_per_s") for line in lines)

    result = run_script("bench.py", *TINY_BENCH_FLAGS, "--steps", "1", "--warmup", "0", "--no-gpt2", "--json",
                        "--variants", "fp32", "bf16")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    for metric in ("train_tokens_per_s", "train_first_step_seconds", "train_peak_memory", "train_mfu"):
        assert [record["precision"] for record in records if record["metric"] == metric] == ["fp32", "bf16"]


@pytest.mark.parametrize("name, kind", [("adafactor", Adafactor), ("adamw", torch.optim.AdamW)])
def test_bench_measures_the_optimizer_that_pre_training_builds(name, kind):
    pretraining = load_script("pre-train").parse_args(["--optimizer", name])
    optimizer = bench.make_optimizer(tiny_model(), bench.parse_args(["--optimizer", name, "--device", "cpu"]))
    assert type(optimizer) is kind
    assert optimizer.param_groups[0]["lr"] == pretraining.learning_rate
    assert optimizer.param_groups[0].get("scale_parameter") is (False if name == "adafactor" else None)


def test_peak_tensor_memory_counts_storages_while_they_live():
    with PeakTensorMemory() as tracker:
        first = torch.empty(1000)
        second = torch.empty(2000)
        view = second[10:]
        del first, second
        third = torch.empty(500)
    assert tracker.peak == 3000 * 4
    assert tracker.current == (2000 + 500) * 4  # the view keeps the second storage alive
    del view, third
    assert tracker.current == 0


def test_peak_tensor_memory_sees_what_live_storages_hold_after_an_in_place_resize():
    # FSDP2 frees a gathered parameter by resizing its storage to nothing, and gathers into it again.
    with PeakTensorMemory() as tracker:
        gathered = torch.empty(1000)
        gathered.untyped_storage().resize_(0)
        assert tracker.held() == 0
        gathered.untyped_storage().resize_(400)
        assert tracker.held() == 400


@pytest.mark.slow
def test_bench_measures_fsdp2_gradient_accumulation_both_ways_under_torchrun():
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "bench.py",
         *TINY_BENCH_FLAGS, "--parts", "accumulation", "--micro_batches", "2", "--steps", "1", "--warmup", "0",
         "--json"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300, env=one_thread(),
    )
    assert result.returncode == 0, result.stderr
    records = {(record["metric"], record.get("level")): record["value"]
               for record in map(json.loads, result.stdout.strip().splitlines())}
    for level in (2, 3):
        every, last = (records[f"reduce_{when}_micro_batch_kept_gradients", level] for when in ("every", "last"))
        assert last == pytest.approx(2 * every, rel=0.01)  # whole gradients, or each process's half
        assert records["reduce_every_micro_batch_speed_fraction", level] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--steps", "0"], ["--steps", "positive"]),
        (["--embedding_dimensions", "30", "--num_attention_heads", "4"], ["divisible by"]),
        (["--generation_lengths", "0"], ["--generation_lengths"]),
        (["--variants", "bf16+fast"], ["--variants", "with +compile", "bf16+fast"]),
        (["--parts", "accumulation"], ["--parts", "under torchrun"]),
        (["--parts", "eval", "--vocabulary_size", "97"], ["--vocabulary_size must be at least 50257, got 97"]),
    ],
)
def test_bad_flags_get_one_clear_line(flags, fragments):
    assert_one_line_error(run_script("bench.py", "--device", "cpu", *flags), *fragments)

"""Grouped-query attention: key/value heads shared by groups of query heads, a cache that shrinks with them,
and the export that follows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sizing
from checkpoint import check_same_base
from conftest import lightgpt, load_script, save_pretrained_checkpoint
from model import LightGPT, LightGPTConfig

REPOSITORY = Path(__file__).resolve().parent.parent
SHAPE = {"vocabulary_size": 97, "embedding_dimensions": 32, "num_heads": 8, "num_layers": 2, "eos_index": 0}


def test_num_kv_heads_defaults_to_num_heads_and_must_divide_it():
    assert LightGPTConfig(**SHAPE).num_kv_heads == 8  # model_args written before grouped-query attention
    assert LightGPTConfig(**SHAPE, num_kv_heads=2).num_kv_heads == 2
    for kv_heads, message in ((3, "divisible by num_kv_heads"), (0, "num_kv_heads must be a whole number of at least 1")):
        with pytest.raises(ValueError, match=message):
            LightGPTConfig(**SHAPE, num_kv_heads=kv_heads)


def test_pre_train_s_flag_sets_the_key_value_heads_and_names_itself_in_errors():
    pre_train = load_script("pre-train")
    assert pre_train.model_args_from(pre_train.parse_args(["--num_attention_heads", "8", "--num_kv_heads", "2"])
                                     )["num_kv_heads"] == 2
    assert pre_train.model_args_from(pre_train.parse_args(["--num_attention_heads", "8"]))["num_kv_heads"] == 8
    with pytest.raises(ValueError, match=r"--num_attention_heads \(8\) must be divisible by --num_kv_heads \(3\)"):
        pre_train.model_args_from(pre_train.parse_args(["--num_attention_heads", "8", "--num_kv_heads", "3"]))


def with_repeated_key_value_heads(model: LightGPT) -> LightGPT:
    """The multi-head model that computes what the grouped one does: each key/value head's weights copied to
    every query head of its group."""
    config = model.config
    groups, width = config.num_heads // config.num_kv_heads, config.head_dimensions * config.num_kv_heads
    full = lightgpt(**SHAPE)
    state = model.state_dict()
    for name, weight in list(state.items()):
        if name.endswith("qkv_projection.weight"):
            q, k, v = weight.split((config.embedding_dimensions, width, width))
            # (kv_heads * head_dimensions, embedding) -> (heads * head_dimensions, embedding), each head repeated
            k, v = (t.view(config.num_kv_heads, 1, config.head_dimensions, -1).expand(-1, groups, -1, -1)
                    .reshape(config.embedding_dimensions, -1) for t in (k, v))
            state[name] = torch.cat((q, k, v))
    full.load_state_dict(state)
    return full.eval()


def test_grouped_attention_computes_what_heads_with_repeated_keys_and_values_compute():
    grouped = lightgpt(**SHAPE, num_kv_heads=2).eval()
    assert grouped.blocks[0].attention.qkv_projection.weight.shape == (32 + 2 * 2 * 4, 32)
    tokens = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(grouped(tokens)[0], with_repeated_key_value_heads(grouped)(tokens)[0])


def test_the_cache_holds_kv_heads_only_and_sizing_predicts_its_bytes():
    grouped, full = lightgpt(**SHAPE, num_kv_heads=2).eval(), lightgpt(**SHAPE).eval()
    tokens = torch.randint(0, 97, (4, 10), generator=torch.Generator().manual_seed(1))
    measured = {}
    for model in (grouped, full):
        cache = model.new_cache(4, 16)
        with torch.no_grad():
            model.next_token_logits(tokens[:, :9], cache)
            cached = model.next_token_logits(tokens[:, 9:], cache)
            torch.testing.assert_close(cached, model(tokens)[0][:, -1])
        measured[model.config.num_kv_heads] = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache)
    for kv_heads, size in measured.items():
        architecture = sizing.Architecture(97, 16, 32, 8, 2, num_kv_heads=kv_heads)
        assert architecture.kv_cache_bytes(sequences=4) == size
    assert measured[8] == 4 * measured[2]


@pytest.mark.slow
def test_an_exported_grouped_model_loads_and_its_onnx_file_gives_its_logits(tmp_path):
    import onnxruntime

    model = lightgpt(**SHAPE | {"vocabulary_size": 50257}, num_kv_heads=4).eval()
    checkpoint = save_pretrained_checkpoint(model, tmp_path / "gqa.pt", block_size=16)
    folder = tmp_path / "export"
    result = subprocess.run([sys.executable, "export.py", "--checkpoint_path", checkpoint, "--output_dir", folder,
                             "--onnx"], cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((folder / "config.json").read_text())["num_kv_heads"] == 4
    tokens = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(tokens)[0]
        torch.testing.assert_close(LightGPT.from_pretrained(folder)(tokens)[0], expected, rtol=0, atol=0)
    session = onnxruntime.InferenceSession(folder / "model.onnx")
    (logits,) = session.run(["logits"], {"token_ids": tokens.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=0, atol=1e-4)


def test_an_adapter_must_match_its_base_s_key_value_heads_and_one_from_before_them_fits_a_full_base():
    base = {"model_args": SHAPE | {"num_kv_heads": 8}}
    check_same_base({"model_args": SHAPE}, base)  # an adapter's model_args written before grouped-query attention
    with pytest.raises(ValueError, match="num_kv_heads=8, but the base checkpoint has num_kv_heads=2"):
        check_same_base({"model_args": SHAPE}, {"model_args": SHAPE | {"num_kv_heads": 2}})

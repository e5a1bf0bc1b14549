"""Silent corruption is found: every format records a checksum of each tensor (or file) it saves and loading
verifies it; files from before checksums load as before."""

import pytest
import torch

from checkpoint import (
    exported_config,
    load_checkpoint,
    load_lora_checkpoint,
    load_model,
    save_atomically,
    training_checkpoint,
)
from conftest import tiny_model
from conversations import ALPACA
from formats import FORMAT_VERSION
from integrity import verify_optimizer_state
from test_checkpoint import sharded_checkpoint


def flip_bytes_of(path, tensor: torch.Tensor, count: int = 1000) -> None:
    """Flip `count` bytes of the file where the tensor's data lies, as a failing disk or copy would."""
    data, needle = bytearray(path.read_bytes()), tensor.contiguous().view(torch.uint8).numpy().tobytes()
    start = data.find(needle)
    assert start >= 0, "the tensor's bytes are not in the file"
    for offset in range(start, start + min(count, len(needle))):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def saved_checkpoint(path, model, **entries):
    save_atomically(training_checkpoint(vars(model.config), 8, {}, 1, 1, [], {}, grad_scaler={}, model=model.state_dict(),
                                        **entries), path)
    return path


def test_a_checkpoint_with_flipped_bytes_is_refused_naming_the_tensor(tmp_path):
    model = tiny_model()
    path = saved_checkpoint(tmp_path / "checkpoint.pt", model)
    load_model(path)  # whole, it loads
    flip_bytes_of(path, model.blocks[1].mlp.up_projection.weight)
    with pytest.raises(ValueError, match=r"checkpoint.pt: model/blocks.1.mlp.up_projection.weight differs from the "
                                         r"checksum saved with it: the file is damaged"):
        load_model(path)


def test_an_adapter_with_flipped_bytes_is_refused(tmp_path):
    model = tiny_model()
    lora = {"blocks.0.mlp.up_projection.lora_a": torch.randn(2, 32)}
    path = tmp_path / "adapter.pt"
    save_atomically({"format_version": FORMAT_VERSION, "lora_args": {"rank": 2, "alpha": 1.0}, "model_args": vars(model.config),
                     "lora": lora, "prompt_template": ALPACA.to_dict()}, path)
    flip_bytes_of(path, lora["blocks.0.mlp.up_projection.lora_a"], count=10)
    with pytest.raises(ValueError, match=r"lora/blocks.0.mlp.up_projection.lora_a differs from the checksum"):
        load_lora_checkpoint(path)


def test_a_sharded_checkpoint_with_flipped_bytes_is_refused_naming_the_shard(tmp_path):
    model = tiny_model()
    sharded_checkpoint(model, tmp_path / "sharded")
    shard = next((tmp_path / "sharded").glob("shards-*/*.distcp"))
    flip_bytes_of(shard, model.output_norm.weight, count=8)
    with pytest.raises(ValueError, match=r"__0_0.distcp: differs from the checksum saved with it"):
        load_checkpoint(tmp_path / "sharded")


def test_an_exported_folder_with_flipped_bytes_is_refused(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, config=exported_config(model, block_size=8))
    flip_bytes_of(tmp_path / "model.safetensors", model.blocks[0].attention.qkv_projection.weight)
    with pytest.raises(ValueError, match=r"model.safetensors: blocks.0.attention.qkv_projection.weight differs"):
        load_model(tmp_path)


def test_a_checkpoint_saved_before_checksums_still_loads(tmp_path):
    model = tiny_model()
    path = tmp_path / "old.pt"
    torch.save(training_checkpoint(vars(model.config), 8, {}, 1, 1, [], {}, grad_scaler={}, model=model.state_dict()),
               path)
    loaded, block_size, _ = load_model(path)
    assert block_size == 8 and torch.equal(loaded.output_norm.weight, model.output_norm.weight)


def test_checksums_of_an_older_format_are_verified_under_today_s_names(tmp_path):
    """A format-2 checkpoint (blocks named body) with checksums: its optimizer state, verified when resumed after
    the upgrade renamed it, is still found damaged."""
    model = tiny_model()
    weights = {name.replace("blocks.", "body."): tensor for name, tensor in model.state_dict().items()}
    moment = torch.randn(32, 32)
    optimizer = {"state": {"body.0.attention.out_projection.weight": {"exp_avg": moment}},
                 "param_groups": [{"params": ["body.0.attention.out_projection.weight"]}]}
    path = tmp_path / "checkpoint.pt"
    save_atomically(training_checkpoint(vars(model.config), 8, optimizer, 1, 1, [], {}, grad_scaler={},
                                        model=weights) | {"format_version": 2}, path)
    flip_bytes_of(path, moment)
    checkpoint = load_checkpoint(path)  # the weights are whole; the optimizer state is verified on resuming
    assert "blocks.0.attention.out_projection.weight" in checkpoint["optimizer"]["state"]
    with pytest.raises(ValueError, match=r"optimizer/state/blocks.0.attention.out_projection.weight/exp_avg differs"):
        verify_optimizer_state(checkpoint, path)

import pytest
import torch

from checkpoint import check_same_base, weights_fingerprint
from finetuning import load_adapted_model
from conftest import TINY_SHAPE, tiny_model
from distributed import parallelize
from lora import LoRALinear, add_lora, load_lora_state_dict, lora_state_dict, merge_lora
from model import LightGPT

VOCABULARY = TINY_SHAPE["vocabulary_size"]
SIZES = TINY_SHAPE


def base_model(**overrides) -> LightGPT:
    return tiny_model(**overrides).eval()


def trained_adapter(model: LightGPT) -> None:
    """Give every adapter non-zero B, as training would."""
    generator = torch.Generator().manual_seed(1)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            layer.lora_b.data = torch.randn(layer.lora_b.shape, generator=generator) * 0.1


def tokens(length=12, seed=2):
    return torch.randint(0, VOCABULARY, (2, length), generator=torch.Generator().manual_seed(seed))


def test_every_attention_and_mlp_matrix_gets_an_adapter_and_only_adapters_train():
    model = base_model()
    add_lora(model, rank=4, alpha=1.0, dropout=0.0)
    wrapped = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    assert wrapped == [f"blocks.{layer}.{name}" for layer in range(2)
                       for name in ("attention.qkv_projection", "attention.output_projection", "mlp.up_projection", "mlp.down_projection")]
    x = tokens()
    model.train()
    _, loss = model(x, x)
    loss.backward()
    for name, parameter in model.named_parameters():
        is_adapter = name.endswith((".lora_a", ".lora_b"))
        assert parameter.requires_grad == is_adapter, name
        assert (parameter.grad is not None) == is_adapter, name
    assert all(parameter.grad.abs().sum() > 0 for name, parameter in model.named_parameters()
               if name.endswith(".lora_b"))
    per_layer = 4 * (32 + 96) + 4 * (32 + 32) + 2 * 4 * (32 + 128)
    assert model.num_trainable_params == 2 * per_layer


def test_a_fresh_adapter_changes_no_output():
    model = base_model()
    x = tokens()
    before, _ = model(x)
    add_lora(model, rank=8, alpha=2.0, dropout=0.0)
    after, _ = model.eval()(x)
    assert torch.equal(before, after)


def test_the_adapter_is_w_plus_alpha_b_a():
    linear = torch.nn.Linear(6, 5, bias=False)
    layer = LoRALinear(linear, rank=3, alpha=0.5, dropout=0.0)
    layer.lora_b.data = torch.randn(5, 3)
    x = torch.randn(4, 6)
    expected = x @ (linear.weight + 0.5 * layer.lora_b @ layer.lora_a).T
    torch.testing.assert_close(layer(x), expected)


def test_merged_model_gives_the_same_logits_as_the_unmerged_one():
    model = base_model()
    add_lora(model, rank=4, alpha=1.5, dropout=0.1)
    trained_adapter(model)
    model.eval()
    x = tokens(length=20)
    unmerged, _ = model(x)
    merge_lora(model)
    assert not [module for module in model.modules() if isinstance(module, LoRALinear)]
    merged, _ = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert sorted(model.state_dict()) == sorted(base_model().state_dict())
    reference, _ = base_model()(x)
    assert not torch.allclose(merged, reference)


def test_saved_adapters_load_onto_a_fresh_base_and_reproduce_the_model():
    model = base_model()
    add_lora(model, rank=4, alpha=1.0, dropout=0.0)
    trained_adapter(model)
    state = lora_state_dict(model)
    assert len(state) == 2 * 4 * 2 and all(name.endswith((".lora_a", ".lora_b")) for name in state)
    lora_checkpoint = {"model_args": SIZES, "lora_args": {"rank": 4, "alpha": 1.0, "dropout": 0.0}, "lora": state}
    base_checkpoint = {"model_args": SIZES, "model": base_model().state_dict()}
    adapted = load_adapted_model(lora_checkpoint, base_checkpoint)
    x = tokens()
    torch.testing.assert_close(adapted(x)[0], model.eval()(x)[0], rtol=1e-5, atol=1e-5)


def test_an_adapter_for_another_base_is_a_clear_error():
    model = base_model()
    add_lora(model, rank=4, alpha=1.0, dropout=0.0)
    lora_checkpoint = {"model_args": SIZES, "lora_args": {"rank": 4, "alpha": 1.0, "dropout": 0.0},
                       "lora": lora_state_dict(model)}
    wider = SIZES | {"embedding_dimensions": 64}
    with pytest.raises(ValueError, match="embedding_dimensions=32, but the base checkpoint has embedding_dimensions=64"):
        check_same_base(lora_checkpoint, {"model_args": wider})
    other = base_model(embedding_dimensions=64)
    add_lora(other, rank=4, alpha=1.0, dropout=0.0)
    with pytest.raises(ValueError, match="another size or rank"):
        load_lora_state_dict(other, lora_checkpoint["lora"])
    deeper = base_model(num_layers=3)
    add_lora(deeper, rank=4, alpha=1.0, dropout=0.0)
    with pytest.raises(ValueError, match="another number of layers"):
        load_lora_state_dict(deeper, lora_checkpoint["lora"])
    wrapped = {name.replace("blocks.0.", "blocks.0._orig_mod."): tensor
               for name, tensor in lora_checkpoint["lora"].items()}
    with pytest.raises(ValueError, match=r"blocks\.0\._orig_mod\.\S+ is not one of this model's adapter matrices"):
        load_lora_state_dict(model, wrapped)


def test_adapters_cannot_be_added_twice():
    model = base_model()
    add_lora(model, rank=2, alpha=1.0, dropout=0.0)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, rank=2, alpha=1.0, dropout=0.0)


def test_the_weights_fingerprint_tells_a_base_from_another_of_the_same_shape():
    model = base_model()
    copy = base_model()
    copy.load_state_dict(model.state_dict())
    assert weights_fingerprint(copy.state_dict()) == weights_fingerprint(model.state_dict())
    with torch.no_grad():
        copy.blocks[-1].mlp.down_projection.weight[-1, -1] += 1e-3
    assert weights_fingerprint(copy.state_dict()) != weights_fingerprint(model.state_dict())


def test_compiling_for_training_leaves_the_adapter_names_as_they_are():
    # An adapter trained with --compile (the default on CUDA) must load into a model that runs eagerly.
    eager = base_model()
    add_lora(eager, rank=4, alpha=1.0, dropout=0.0)
    compiled = base_model()
    add_lora(compiled, rank=4, alpha=1.0, dropout=0.0)
    parallelize(compiled, torch.device("cpu"), activation_checkpointing=False, compile=True)
    assert lora_state_dict(compiled).keys() == lora_state_dict(eager).keys()
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    load_lora_state_dict(eager, lora_state_dict(compiled))

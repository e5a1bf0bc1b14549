from dataclasses import asdict

import pytest
import torch

from profiling import PeakTensorMemory
from conftest import TINY_SHAPE, tiny_model
from distributed import materialize
from losses import LinearCrossEntropy, linear_cross_entropy
from model import LightGPT, LightGPTConfig, attention

VOCABULARY = TINY_SHAPE["vocabulary_size"]


def test_no_bias_parameters_anywhere():
    model = tiny_model()
    names = [name for name, _ in model.named_parameters()]
    assert not [name for name in names if "bias" in name]
    for module in model.modules():
        assert getattr(module, "bias", None) is None, module


def test_parameters_are_exactly_embeddings_blocks_and_norms_with_no_positions():
    vocabulary, width, layers, ratio = VOCABULARY, 32, 3, 4
    model = tiny_model(num_layers=layers, feed_forward_ratio=ratio)
    per_block = 3 * width * width + width * width + 2 * ratio * width * width + 2 * width
    assert model.num_trainable_params == vocabulary * width + layers * per_block + width
    assert not [name for name, _ in model.named_parameters() if "pos" in name]


def test_any_sequence_length_runs_because_position_comes_from_the_mask_alone():
    model = tiny_model().eval()
    for length in (1, 7, 300):
        logits, _ = model(torch.randint(0, VOCABULARY, (2, length)))
        assert logits.shape == (2, length, VOCABULARY)


def test_output_layer_and_token_embedding_share_one_tensor_through_training():
    model = tiny_model()
    assert model.output_layer.weight is model.token_embeddings.weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, VOCABULARY, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    assert model.output_layer.weight.data_ptr() == model.token_embeddings.weight.data_ptr()


def test_changing_a_token_never_changes_the_logits_before_it():
    model = tiny_model().eval()
    x = torch.randint(0, VOCABULARY, (1, 12))
    changed = x.clone()
    changed[0, 7] = (x[0, 7] + 1) % VOCABULARY
    before, _ = model(x)
    after, _ = model(changed)
    assert torch.equal(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_loss_is_the_mean_over_targets_that_are_not_padding():
    model = tiny_model(padding_index=-100).eval()
    x = torch.randint(0, VOCABULARY, (2, 10))
    y = torch.randint(0, VOCABULARY, (2, 10))
    y[0, 6:] = -100
    y[1, :3] = -100
    (logits, _), (no_logits, loss) = model(x), model(x, y)
    assert no_logits is None
    kept = y != -100
    expected = torch.nn.functional.cross_entropy(logits[kept], y[kept])
    torch.testing.assert_close(loss, expected)
    _, no_loss = model(x)
    assert no_loss is None


def test_initialisation_is_small_and_residual_projections_shrink_with_depth():
    model = tiny_model(embedding_dimensions=256, num_layers=8)
    assert abs(model.token_embeddings.weight.std().item() - 0.02) < 0.002
    projection = model.blocks[0].attention.output_projection.weight.std().item()
    assert abs(projection - 0.02 / 4) < 0.001


def test_activation_checkpointing_gives_the_same_gradients():
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model()
        model.enable_activation_checkpointing(checkpointing)
        x = torch.randint(0, VOCABULARY, (2, 9), generator=torch.Generator().manual_seed(1))
        _, loss = model(x, x)
        loss.backward()
        gradients.append([parameter.grad for parameter in model.parameters()])
    for without, with_checkpointing in zip(*gradients):
        torch.testing.assert_close(without, with_checkpointing)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"embedding_dimensions": 30, "num_heads": 4}, "divisible by num_heads"),
        ({"num_layers": 0}, "num_layers must be a whole number of at least 1, got 0"),
        ({"vocabulary_size": 0}, "vocabulary_size must be a whole number of at least 1, got 0"),
        ({"dropout": 1.5}, "dropout must be a number in [0, 1), got 1.5"),
        ({"eos_index": VOCABULARY}, "eos_index"),
    ],
)
def test_constructor_arguments_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        tiny_model(**overrides)


def test_training_fuses_the_output_layer_and_loss_with_the_plain_path_s_loss_and_gradients():
    # The real vocabulary makes the fused path run several chunks of positions; some targets are padding.
    results = []
    for fused in (True, False):
        model = tiny_model(vocabulary_size=50257, embedding_dimensions=16, num_heads=2).train()
        generator = torch.Generator().manual_seed(2)
        x = torch.randint(0, 50257, (2, 200), generator=generator)
        y = torch.randint(0, 50257, (2, 200), generator=generator)
        y[0, 50:90] = -100
        if fused:
            logits, loss = model(x, y)
        else:
            logits = model(x)[0]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        results.append((logits, loss, [parameter.grad for parameter in model.parameters()]))
    (fused_logits, fused_loss, fused_gradients), (plain_logits, plain_loss, plain_gradients) = results
    assert fused_logits is None and plain_logits.shape == (2, 200, 50257)
    torch.testing.assert_close(fused_loss, plain_loss)
    for fused, plain in zip(fused_gradients, plain_gradients):
        torch.testing.assert_close(fused, plain)


def test_under_bf16_autocast_the_fused_loss_sums_the_weight_gradient_of_many_chunks_in_float32():
    # 32768 tokens make chunks of 256 positions on a CPU: 32 of them here. Summing their products in bf16 was off
    # by 0.3% of the gradient; in float32 only each chunk's bf16 product is rounded: 0.05%.
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(32 * 256, 8, generator=generator).bfloat16().float()  # values exact in bf16
    weight = 0.02 * torch.randn(2**15, 8, generator=generator).bfloat16().float()
    targets = torch.randint(0, 2**15, (32 * 256,), generator=generator)
    gradients = []
    for autocast in (True, False):
        parameter = weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            LinearCrossEntropy.apply(hidden, parameter, targets, -100).backward()
        gradients.append(parameter.grad)
    autocast, exact = gradients
    assert autocast.dtype == torch.float32
    assert (autocast - exact).norm() < 1e-3 * exact.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_target_whose_probability_is_below_float32_s_range_still_has_its_exact_loss(dtype):
    # Losses of 200 on two tokens: e^-200 is 0 in float32 and in bf16, so the CPU's path, which takes the loss from
    # the softmax, recomputes that chunk's log-softmax instead of returning infinity (or, where the target is
    # ignored, NaN).
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    weight = torch.tensor([[200.0, 0.0], [0.0, 0.0], [0.0, 200.0]])  # logits (200, 0, 0), (0, 0, 200), (200, 0, 0)
    targets = torch.tensor([1, 0, -100])  # the ignored row's target counts as 0 in the chunk
    parameter = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = LinearCrossEntropy.apply(hidden, parameter, targets, -100)
        evaluated, count, _, _ = linear_cross_entropy(hidden, weight, targets, -100)
    loss.backward()
    plain = weight.clone().requires_grad_()
    torch.nn.functional.cross_entropy(hidden @ plain.T, targets).backward()
    assert loss.item() == evaluated.item() / count.item() == 200.0
    torch.testing.assert_close(parameter.grad, plain.grad)


def test_attention_under_a_cpu_s_bf16_autocast_computes_sequences_under_512_tokens_in_float32():
    # There the CPU's bf16 attention trained 1.8-3x slower than float32's (docs/performance.md).
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 32, generator=generator).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        short = attention(q[:, :, :511], k[:, :, :511], v[:, :, :511], is_causal=True)
        long = attention(q, k, v, is_causal=True)
    assert short.dtype == torch.float32 and long.dtype == torch.bfloat16
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(short, exact[:, :, :511])


def test_evaluation_s_loss_is_the_plain_cross_entropy_and_never_holds_the_logits():
    model = tiny_model(vocabulary_size=50257, embedding_dimensions=16, num_heads=2).eval()
    generator = torch.Generator().manual_seed(4)
    x = torch.randint(0, 50257, (2, 512), generator=generator)
    y = torch.randint(0, 50257, (2, 512), generator=generator)
    y[1, 100:300] = -100
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
        with PeakTensorMemory() as memory:
            logits, loss = model(x, y)
    assert logits is None
    torch.testing.assert_close(loss, plain)
    logits_bytes = x.numel() * 50257 * 4  # 206 MB; the loss works through chunks of 33 MB
    assert memory.largest <= logits_bytes / 6 and memory.peak < logits_bytes / 1.5, (memory.largest, memory.peak)


def test_the_fused_loss_trains_the_blocks_alone_when_the_tied_weight_is_frozen():
    gradients = []
    for training in (True, False):
        model = tiny_model().train(training)
        model.token_embeddings.weight.requires_grad_(False)
        x = torch.randint(0, VOCABULARY, (2, 9), generator=torch.Generator().manual_seed(3))
        model(x, x)[1].backward()
        assert model.token_embeddings.weight.grad is None
        gradients.append([parameter.grad for parameter in model.blocks.parameters()])
    for fused, plain in zip(*gradients):
        torch.testing.assert_close(fused, plain)


def test_the_config_is_stored_as_plain_model_args_and_rebuilds_the_same_model():
    model = tiny_model()
    model_args = asdict(model.config)
    assert all(isinstance(value, (int, float)) for value in model_args.values())
    rebuilt = LightGPT(LightGPTConfig(**model_args))
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randint(0, VOCABULARY, (1, 5))
    assert torch.equal(rebuilt.eval()(x)[0], model.eval()(x)[0])


def test_a_model_built_on_the_meta_device_keeps_its_tied_weight_once_allocated():
    with torch.device("meta"):
        model = LightGPT(LightGPTConfig(**TINY_SHAPE))
    model.to_empty(device="cpu")
    assert model.output_layer.weight is model.token_embeddings.weight


def test_a_model_built_on_the_meta_device_draws_no_weights_until_materialized():
    """Drawing a weight on the meta device draws nothing and costs milliseconds (PyTorch's Python reference of
    normal_): --num_hidden_layers 10000 took 69 s to build instead of 19 s."""
    drawn = []

    class CountingGPT(LightGPT):
        def init_parameter(self, name, tensor):
            drawn.append(name)
            super().init_parameter(name, tensor)

    with torch.device("meta"):
        model = CountingGPT(LightGPTConfig(**TINY_SHAPE))
    assert drawn == []
    materialize(model, torch.device("cpu"))
    assert drawn == [name for name, _ in model.named_parameters()] and model.output_norm.weight.eq(1).all()

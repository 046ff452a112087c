"""Encoder-decoders and other models that return a value later layers read.

The encoder's output is returned by the model and read by every decoder layer: the caller
holds it to the end of the step, so it is a cut of its own (``Chain.caller_held``) after
which the decoder is cut layer by layer. T5's position bias, made from a parameter in each
stack's first layer and read by every layer, is made once, at a cut just before that layer.
"""

import pytest
import torch
from grad_helpers import assert_grads_equal, step_grads
from torch import nn

import remat
from remat import measure_step
from remat.tools.strategies import compare

transformers = pytest.importorskip("transformers")
LAYERS = 3


def _t5():
    config = transformers.T5Config(
        d_model=64, d_ff=128, num_layers=LAYERS, num_heads=4, d_kv=16, vocab_size=512, decoder_start_token_id=0,
        pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config).train()


def _bart():
    config = transformers.BartConfig(
        d_model=64, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=512,
        max_position_embeddings=64,
    )
    return transformers.BartForConditionalGeneration(config).train()


@pytest.mark.parametrize("make", [_t5, _bart], ids=["t5", "bart"])
def test_an_encoder_decoder_plans_below_per_layer_checkpointing_with_exact_gradients(make):
    torch.manual_seed(0)
    model = make()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "use_cache": False}
    fast = remat.optimize(model, batch)
    assert measure_step(fast, batch, fake=True).peak_bytes == fast.plan.predicted_peak_bytes
    (per_layer,) = compare(model, batch, ["checkpoint-blocks"])  # gradient_checkpointing_enable()
    assert fast.plan.predicted_peak_bytes < per_layer.peak_bytes
    loss = lambda out: out.loss  # noqa: E731
    assert_grads_equal(step_grads(model, (), loss_fn=loss, **batch), step_grads(fast, (), loss_fn=loss, **batch))


def test_t5_is_cut_in_every_layer_of_both_stacks():
    model = _t5()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    plan = remat.plan(model, {"input_ids": ids, "labels": ids, "use_cache": False})
    names = set(plan.stage_names)
    for stack in ("encoder", "decoder"):
        assert f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias" in names
        assert all(f"{stack}.block.{i}.layer.0" in names for i in range(LAYERS)), sorted(names)


class EncoderDecoder(nn.Module):
    """Returns the encoder's output with the decoder's: every decoder layer reads it."""

    def __init__(self, width: int = 32, layers: int = 4):
        super().__init__()
        self.encoder = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)])
        self.reads = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, 4 * width), nn.GELU()) for _ in range(layers))
        self.outs = nn.ModuleList(nn.Linear(4 * width, width) for _ in range(layers))

    def forward(self, x, y):
        memory = self.encoder(x)
        for read, layer, out in zip(self.reads, self.layers, self.outs):
            y = y + out(layer(y + read(memory)))
        return y, memory


def test_a_returned_value_that_later_layers_read_is_kept_once_and_predicted_exactly():
    torch.manual_seed(0)
    model, inputs = EncoderDecoder(), (torch.randn(64, 32), torch.randn(64, 32))
    fast = remat.optimize(model, inputs)
    assert fast.plan.checkpoints
    assert measure_step(fast, inputs, fake=True).peak_bytes == fast.plan.predicted_peak_bytes
    assert measure_step(fast, inputs).peak_bytes == fast.plan.predicted_peak_bytes
    assert_grads_equal(step_grads(model, inputs), step_grads(fast, inputs))
    expected, got = model(*inputs), fast(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))

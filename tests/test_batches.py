"""Batches as users have them: a dict of keyword arguments (``model(**batch)``), or ``(args, kwargs)``."""

import pytest
import torch
from grad_helpers import assert_grads_equal, step_grads

import remat
from remat import default_loss, measure_step

transformers = pytest.importorskip("transformers")


def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)
    return transformers.GPT2LMHeadModel(config).train()


def _bert():
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=256,
        max_position_embeddings=64,
    )
    return transformers.BertForMaskedLM(config).train()


def _llama():  # attention as transformers picks it (sdpa)
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=256, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).train()


def _t5():
    # An encoder-decoder (every decoder layer reads the encoder's output) whose decoder inputs are
    # the labels shifted right in place: in-place ATen operators on input-only values must keep
    # those values from being recomputed by the pieces that read them.
    config = transformers.T5Config(
        d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=256, decoder_start_token_id=0,
        pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config).train()


def _batch(**extra) -> dict:
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, **extra}


@pytest.mark.parametrize(
    "make, extra",
    [(_gpt2, {"use_cache": False}), (_bert, {}), (_llama, {"use_cache": False}), (_t5, {"use_cache": False})],
    ids=["gpt2", "bert", "llama", "t5"],
)
def test_a_dict_batch_plans_and_trains_with_the_models_loss_and_gradients(make, extra):
    torch.manual_seed(0)
    model, batch = make(), _batch(**extra)
    fast = remat.optimize(model, batch)  # the default loss is the output's .loss
    assert fast.plan.checkpoints
    assert measure_step(fast, batch, fake=True).peak_bytes == fast.plan.predicted_peak_bytes
    assert measure_step(fast, batch).peak_bytes == fast.plan.predicted_peak_bytes  # fake = real
    loss = lambda out: out.loss  # noqa: E731
    assert_grads_equal(step_grads(model, (), loss_fn=loss, **batch), step_grads(fast, (), loss_fn=loss, **batch))
    torch.manual_seed(1)
    expected = model(**batch).loss
    torch.manual_seed(1)
    assert torch.equal(expected, fast(**batch).loss)  # dropout draws the same masks


def test_args_and_kwargs_plan_as_the_same_call():
    model, batch = _bert(), _batch()
    ids = batch.pop("input_ids")
    as_dict = remat.plan(model, {"input_ids": ids, **batch})
    as_pair = remat.plan(model, ((ids,), batch))
    assert (as_pair.checkpoints, as_pair.predicted_peak_bytes) == (as_dict.checkpoints, as_dict.predicted_peak_bytes)


def test_the_default_loss_is_the_outputs_loss():
    loss = torch.tensor(3.0)
    assert default_loss({"loss": loss, "logits": torch.ones(2)}) is loss
    assert default_loss({"logits": torch.full((2,), 2.0)}).item() == 4.0  # no loss: mean of squares


def test_a_key_the_model_does_not_take_is_refused_by_name():
    with pytest.raises(ValueError, match="labelz"):
        remat.plan(_bert(), {**_batch(), "labelz": torch.zeros(2, dtype=torch.long)})


def test_a_call_with_other_keys_than_planned_says_so():
    model, batch = _bert(), _batch()
    fast = remat.optimize(model, batch)
    with pytest.raises(ValueError, match="planned for calls with"):
        fast(input_ids=batch["input_ids"])


def test_a_loss_fn_that_returns_the_models_own_loss_is_predicted_exactly():
    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])

        def forward(self, x):
            return self.net(x).pow(2).mean()

    model, x = WithLoss(), torch.randn(32, 64)
    fast = remat.optimize(model, x, loss_fn=lambda loss: loss)  # the root gradient still counts
    assert measure_step(fast, x, lambda loss: loss, fake=True).peak_bytes == fast.plan.predicted_peak_bytes

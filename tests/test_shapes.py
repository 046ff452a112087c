"""Batches that change shape: remat.optimize(..., per_shape=N) plans once per input shape, keeps
the last N plans, and every step's loss and gradients are the model's."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import remat
from grad_helpers import assert_grads_equal, step_grads


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128)
    return transformers.GPT2LMHeadModel(config).train()


def _batch(length: int, batch: int = 2) -> dict:
    ids = torch.randint(0, 256, (batch, length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "use_cache": False}


def _loss(out):
    return out.loss


def test_a_loop_over_five_lengths_plans_each_once_with_exact_gradients(caplog):
    model = _gpt2()
    fast = remat.optimize(model, _batch(16), per_shape=True)
    assert isinstance(fast, remat.PerShapeModule) and len(fast.plans) == 1
    assert fast.state_dict().keys() == model.state_dict().keys()
    lengths = [16, 24, 32, 40, 48, 24, 16]
    with caplog.at_level(logging.INFO, logger="remat"):
        for length in lengths:
            batch = _batch(length)
            expected = step_grads(model, (), loss_fn=_loss, **batch)
            assert_grads_equal(expected, step_grads(fast, (), loss_fn=_loss, **batch))
            assert fast.plan.fingerprint == remat.plan(model, batch).fingerprint
    assert len(fast.plans) == 5  # each new length planned once, the repeats reused
    assert sum("planning for new input shapes" in r.message for r in caplog.records) == 4


def test_at_most_max_shapes_plans_are_kept_the_least_recently_used_go(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).train()
    fast = remat.optimize(model, torch.randn(4, 32), per_shape=2, compile="aot_eager")
    with caplog.at_level(logging.INFO, logger="remat"):
        for batch in (4, 8, 4, 16):
            x = torch.randn(batch, 32)
            assert_grads_equal(step_grads(model, (x,)), step_grads(fast, (x,)))
    shapes = [key[0][0][0] for key in fast.plans]
    assert shapes == [(4, 32), (16, 32)]  # 8 was least recently used when 16 came
    assert all(p.compiled == "aot_eager" for p in fast.plans.values())
    assert any("dropped the plan for input shapes" in r.message for r in caplog.records)
    with torch.no_grad():  # the model's own forward: nothing planned
        assert fast(torch.randn(3, 32)).shape == (3, 8)
    assert len(fast.plans) == 2


def test_per_shape_refuses_a_fixed_plan():
    model = nn.Sequential(nn.Linear(8, 8)).train()
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="pass plan= or per_shape=, not both"):
        remat.optimize(model, x, plan=remat.plan(model, x), per_shape=True)

"""Models bigger than the machine: planned without weights (built on ``device="meta"``, or
under the caller's FakeTensorMode), and the plan applied to the real model built later."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import remat
from remat import measure_step

transformers = pytest.importorskip("transformers")

LLAMA = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=256, max_position_embeddings=128, use_cache=False,
)


def _batch(device="cpu") -> dict:
    ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "labels": ids}


def _plan_facts(plan: remat.Plan) -> tuple:
    return (plan.checkpoints, plan.stored, plan.selective, plan.remake, plan.predicted_peak_bytes,
            plan.baseline_peak_bytes, plan.recompute_flops, plan.fingerprint)


@pytest.mark.parametrize(
    "make", [lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)),
             lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(  # tied input and output embeddings
                 n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128, use_cache=False))],
    ids=["llama", "gpt2"],
)
def test_a_model_on_meta_plans_as_the_real_one_and_the_plan_trains_it(make, tmp_path):
    torch.manual_seed(0)
    real = make().train()
    budget = int(0.6 * remat.plan(real, _batch(), budget=None).baseline_peak_bytes)
    expected = remat.plan(real, _batch(), budget=budget)
    with torch.device("meta"):
        model = make().train()
    planned = remat.plan(model, _batch(), budget=budget)
    assert _plan_facts(planned) == _plan_facts(expected)
    assert all(t.is_meta for t in model.parameters())  # left as it was
    assert remat.plan(model, _batch("meta"), budget=budget).fingerprint == expected.fingerprint  # meta inputs too

    planned.save(tmp_path / "plan.json")
    fast = remat.optimize(real, _batch(), plan=remat.Plan.load(tmp_path / "plan.json"))
    assert measure_step(fast, _batch()).peak_bytes == planned.predicted_peak_bytes
    torch.manual_seed(1)
    reference = real(**_batch()).loss
    torch.manual_seed(1)
    assert torch.equal(fast(**_batch()).loss, reference)


def test_a_model_built_under_the_callers_fake_mode_plans_as_the_real_one():
    torch.manual_seed(0)
    expected = remat.plan(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).train(), _batch())
    with FakeTensorMode():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).train()
    assert _plan_facts(remat.plan(model, _batch())) == _plan_facts(expected)  # real inputs made fake


def test_a_model_on_meta_is_not_optimized_and_a_plan_for_other_shapes_is_refused(tmp_path):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(32, 64)
    with pytest.raises(ValueError, match="meta device.*remat.plan.*plan="):
        remat.optimize(model, x)
    plan = remat.plan(model, x)
    real = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    assert measure_step(remat.optimize(real, x, plan=plan), x).peak_bytes == plan.predicted_peak_bytes
    with pytest.raises(ValueError, match=r"made for inputs \(32, 64\):torch.float32, and these are \(16, 64\)"):
        remat.optimize(real, torch.randn(16, 64), plan=remat.Plan.from_json(plan.to_json()))
    with pytest.raises(ValueError, match="made for another model: Sequential's parameter"):
        remat.optimize(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64)), x, plan=plan)

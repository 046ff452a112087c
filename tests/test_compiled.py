"""Compiled plans (remat.execute.compiled): exact loss, gradients, buffers and random draws under
aot_eager; the simulated compiled peak equals the measured one; the plan's recompute is what the
backward runs; errors for what a compiled module cannot run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torch import nn

import remat
from grad_helpers import assert_grads_equal, step_grads
from test_bad_input import PartlyTraceable
from remat import measure_step
from remat.tools import models


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    block = lambda c: [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), *[m for _ in range(6) for m in block(16)], nn.Flatten(), nn.Linear(16 * 16 * 16, 10))


def _check_exact(model: nn.Module, fast: nn.Module, inputs: tuple) -> None:
    """Loss, gradients, BatchNorm statistics and the generator state after a step equal a plain step's."""
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    expected = step_grads(model, inputs, seed=3)
    after_plain = {k: v.clone() for k, v in model.state_dict().items()}
    rng_plain = torch.get_rng_state()
    model.load_state_dict(buffers)
    actual = step_grads(fast, inputs, seed=3)
    assert_grads_equal(expected, {name: g for name, g in actual.items()})
    assert torch.equal(rng_plain, torch.get_rng_state())
    for key, value in model.state_dict().items():
        assert torch.equal(value, after_plain[key]), key


def test_least_peak_compiled_is_exact_and_predicted():
    model, x = _cnn().train(), torch.randn(4, 3, 16, 16)
    fast = remat.optimize(model, x, compile="aot_eager")
    assert isinstance(fast, remat.CompiledModule) and fast.plan.compiled == "aot_eager"
    assert fast.plan.recompute_flops > 0
    measured = measure_step(fast, x)
    assert measured.peak_bytes == fast.plan.predicted_peak_bytes
    assert measured.peak_bytes < measure_step(model, x).peak_bytes
    step = measured.forward_flops + measured.backward_flops
    plain = measure_step(model, x)
    assert step - plain.forward_flops - plain.backward_flops == fast.plan.recompute_flops
    _check_exact(model, fast, (x,))


def test_budget_plan_compiled_fits_and_is_exact():
    model, x = _cnn().train(), torch.randn(4, 3, 16, 16)
    least = remat.plan(model, x, compile="aot_eager")
    baseline = least.baseline_peak_bytes
    budget = (least.predicted_peak_bytes + baseline) // 2
    plan = remat.plan(model, x, budget=budget, compile="aot_eager")
    assert plan.predicted_peak_bytes <= budget and plan.budget_bytes == budget
    assert plan.recompute_flops <= least.recompute_flops
    fast = remat.optimize(model, x, plan=plan)
    assert measure_step(fast, x).peak_bytes == plan.predicted_peak_bytes
    _check_exact(model, fast, (x,))
    with pytest.raises(remat.InfeasibleBudget):
        remat.plan(model, x, budget=least.predicted_peak_bytes // 2, compile="aot_eager")


def test_max_batch_compiled():
    spec = "remat:mlp?depth=4&width=64"
    batch, plan = remat.max_batch(spec, "1MiB", compile="aot_eager")
    assert plan.compiled == "aot_eager" and plan.predicted_peak_bytes <= 2**20
    above = models.load(spec, batch + 1)
    with pytest.raises(remat.InfeasibleBudget):
        remat.plan(above.model, above.example_inputs, budget="1MiB", compile="aot_eager")


def test_pareto_compiled_is_a_front_of_compiled_plans():
    model, x = _cnn().train(), torch.randn(2, 3, 16, 16)
    front = remat.pareto(model, x, compile="aot_eager")
    assert len(front) > 1 and all(p.compiled == "aot_eager" for p in front)
    peaks = [p.predicted_peak_bytes for p in front]
    flops = [p.recompute_flops for p in front]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)
    assert flops == sorted(flops) and flops[0] == 0
    last = remat.optimize(model, x, plan=front[-1])
    assert measure_step(last, x).peak_bytes == front[-1].predicted_peak_bytes


def test_planning_compiled_leaves_the_model_as_it_was():
    model, x = _cnn().train(), torch.randn(2, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    remat.plan(model, x, compile="aot_eager")
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_eager_plans_with_stored_and_selective_stages_run_compiled():
    """A plan made for the eager engine, selective stages included, compiled as it is."""
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10).train(), torch.randn(2, 3, 64, 64)
    plan = remat.plan(model, x, remake=False)
    assert plan.selective or plan.stored or plan.checkpoints
    fast = remat.optimize(model, x, plan=plan, compile="aot_eager")
    assert fast.plan.compiled == "aot_eager"
    # The compiled backward remakes each value when it is needed, not a stage's at once.
    assert measure_step(fast, x).peak_bytes <= plan.predicted_peak_bytes * 1.001
    _check_exact(model, fast, (x,))


def test_random_operators_are_replayed():
    """GPT-2 with dropout: a recomputed dropout draws the forward's mask (RNG state replayed)."""
    source = models.load("hf:gpt2?n_layer=2&n_embd=64&n_head=4&seq=32", 2)
    model, inputs = source.model, source.example_inputs
    plan = remat.plan(model, inputs, compile="aot_eager")
    fast = remat.optimize(model, inputs, plan=plan)
    assert measure_step(fast, inputs).peak_bytes == plan.predicted_peak_bytes
    _check_exact(model, fast, inputs)


def test_compiled_module_refuses_what_it_cannot_run():
    model, x = _cnn().train(), torch.randn(2, 3, 16, 16)
    fast = remat.optimize(model, x, compile="aot_eager")
    with pytest.raises(ValueError, match="compiled for inputs 2x3x16x16 float32 and got 3x3x16x16 float32"):
        fast(torch.randn(3, 3, 16, 16))
    with pytest.raises(ValueError, match="and got 2x3x16x16 float32 requiring grad"):
        fast(torch.randn(2, 3, 16, 16, requires_grad=True))
    with torch.no_grad():  # the model's own forward, any shape
        assert fast(torch.randn(3, 3, 16, 16)).shape == (3, 10)
    nested = dataclasses.replace(fast.plan, inner=((0, 2, (1,)),), compiled="")
    with pytest.raises(ValueError, match="nested checkpoints"):
        remat.optimize(model, x, plan=nested, compile="aot_eager")
    with pytest.raises(ValueError, match="compile backend must be"):
        remat.plan(model, x, compile="tvm")
    with pytest.raises(ValueError, match="do not offload"):
        from remat.planner.choose import solve
        from remat.planner.profiled import ProfiledModel

        solve(ProfiledModel.of(model, x, None), None, offload=True, compiled="aot_eager")


def test_untraceable_parts_are_refused_with_what_to_do():
    model, x = PartlyTraceable().train(), torch.randn(16, 64)
    with pytest.warns(UserWarning, match="one opaque stage"), pytest.raises(ValueError, match="block.1 could not be traced"):
        remat.optimize(model, x, compile="aot_eager")


def test_autocast_compiled_matches_autocast_and_is_guarded():
    model, x = _cnn().train(), torch.randn(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = remat.optimize(model, x, compile="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert remat.measure_step(fast, x, fake=True).peak_bytes == fast.plan.predicted_peak_bytes
        buffers = {k: v.clone() for k, v in model.state_dict().items()}
        expected = step_grads(model, (x,))
        model.load_state_dict(buffers)
        assert_grads_equal(expected, step_grads(fast, (x,)))
    with pytest.raises(RuntimeError, match=r"compiled under autocast\('cpu', bfloat16\) and is called under no autocast"):
        fast(x)


@pytest.mark.heavy
def test_inductor_runs_the_plan_within_tolerance():
    model, x = _cnn().train(), torch.randn(4, 3, 16, 16)
    fast = remat.optimize(model, x, compile=True)
    assert fast.backend == "inductor"
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    expected = step_grads(model, (x,))
    model.load_state_dict(buffers)
    actual = step_grads(fast, (x,))
    for name, g in expected.items():
        torch.testing.assert_close(actual[name], g, rtol=1e-4, atol=1e-5)


def test_hugging_face_batch_compiled():
    """A dict batch (model(**batch)), its .loss the default loss, through the compiled module."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 256, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "use_cache": False}
    fast = remat.optimize(model, batch, compile="aot_eager")
    assert measure_step(fast, batch).peak_bytes == fast.plan.predicted_peak_bytes
    expected = step_grads(model, (), **batch, loss_fn=lambda out: out.loss)
    assert_grads_equal(expected, step_grads(fast, (), **batch, loss_fn=lambda out: out.loss))


def test_budget_candidates_after_a_miss_need_the_room_a_compile_took(monkeypatch):
    """A candidate whose compiled step is over the budget by some bytes makes the search skip
    the next ones with less room than that, not simulate each."""
    import remat.planner.compiled as planner_compiled

    model, x = _cnn().train(), torch.randn(2, 3, 16, 16)
    base = remat.plan(model, x)
    budget = base.predicted_peak_bytes
    fast, tight, roomy = (
        dataclasses.replace(base, predicted_peak_bytes=budget - room, predicted_seconds=seconds)
        for room, seconds in ((0, 1.0), (256, 2.0), (1024, 3.0))
    )
    simulated = []

    def simulate(profiled, plan, backend):
        simulated.append(plan.predicted_seconds)
        return dataclasses.replace(plan, compiled=backend, predicted_peak_bytes=plan.predicted_peak_bytes + 512)

    monkeypatch.setattr(planner_compiled, "simulate_compiled", simulate)
    chosen = planner_compiled.compiled_choice(None, [roomy, tight, fast], budget, "aot_eager", 0.0)
    assert simulated == [1.0, 3.0] and chosen.predicted_seconds == 3.0
    assert chosen.predicted_peak_bytes == budget - 512 and chosen.compiled == "aot_eager"
    with pytest.raises(remat.InfeasibleBudget):
        planner_compiled.compiled_choice(None, [fast, tight], budget, "aot_eager", 0.0)

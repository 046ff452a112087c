"""The whole step: the optimizer's state held all step, and its step() after the backward."""

import copy

import pytest
import torch
from torch import nn

import remat
from remat import measure_step
from remat.measure.optimizer import optimizer_like, state_bytes, warm_up


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 10),
    ).train()


X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum", "adamw", "adagrad"])
def test_a_step_with_an_optimizer_measures_the_same_fake_and_real_and_leaves_the_model(optimizer):
    model = _cnn()
    before = copy.deepcopy(model.state_dict())
    fake, real = measure_step(model, X, fake=True, optimizer=optimizer), measure_step(model, X, optimizer=optimizer)
    assert (fake.peak_bytes, fake.optimizer_state_bytes, fake.optimizer_peak_bytes) == (
        real.peak_bytes, real.optimizer_state_bytes, real.optimizer_peak_bytes
    )
    plain = measure_step(model, X)
    assert real.peak_bytes >= plain.peak_bytes + real.optimizer_state_bytes
    for name, value in model.state_dict().items():  # weights (decayed by the step) and statistics put back
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())


def test_adams_state_is_its_two_moments_and_its_step_counts():
    model = _cnn()
    opt = optimizer_like("adamw", list(model.parameters()), list(model.parameters()))
    warm_up(opt)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert state_bytes(opt) == 2 * params + 4 * len(list(model.parameters()))  # exp_avg, exp_avg_sq, step


@pytest.mark.parametrize("optimizer", ["adamw", "sgd-momentum"])
def test_plans_of_the_whole_step_predict_its_measured_peak_and_keep_the_budget(optimizer):
    model = _cnn()
    least = remat.plan(model, X, optimizer=optimizer)
    assert least.optimizer == optimizer and least.optimizer_state_bytes > 0
    assert least.predicted_peak_bytes > remat.plan(model, X).predicted_peak_bytes
    for budget in (None, (least.predicted_peak_bytes + least.baseline_peak_bytes) // 2):
        fast = remat.optimize(model, X, budget=budget, optimizer=optimizer)
        measured = measure_step(fast, X, optimizer=optimizer).peak_bytes
        assert measured == fast.plan.predicted_peak_bytes == measure_step(fast, X, fake=True, optimizer=optimizer).peak_bytes
        assert budget is None or measured <= budget


def test_the_callers_optimizer_is_copied_in_kind_and_settings_and_never_stepped():
    model = _cnn()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "momentum": 0.9}, {"params": model[9].parameters()}], lr=0.1
    )
    step = measure_step(model, X, optimizer=opt)
    momentum = sum(p.numel() * p.element_size() for p in model[0].parameters())  # one group keeps momentum
    assert step.optimizer_state_bytes == momentum and not opt.state
    with pytest.raises(ValueError, match="not the model's parameters"):
        measure_step(model, X, optimizer=torch.optim.SGD([nn.Parameter(torch.ones(3))], lr=0.1))
    with pytest.raises(ValueError, match="no optimizer named 'adamm'"):
        remat.plan(model, X, optimizer="adamm")


def test_where_the_optimizers_step_is_the_peak_no_plan_lowers_it():
    # Large weights, a small batch: Adam's step() (every gradient, its moments, its temporaries) is the peak.
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(512, 512), nn.GELU())])
    x = torch.randn(2, 512)
    step = measure_step(model, x, fake=True, optimizer="adam")
    least = remat.plan(model, x, optimizer="adam")
    assert least.predicted_peak_bytes == step.optimizer_peak_bytes == step.peak_bytes
    with pytest.raises(remat.InfeasibleBudget) as error:
        remat.plan(model, x, budget=step.optimizer_peak_bytes - 1, optimizer="adam")
    assert error.value.least_peak_bytes == step.optimizer_peak_bytes


def test_a_hugging_face_model_plans_its_whole_step_with_the_users_optimizer():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64, use_cache=False)
    model = transformers.GPT2LMHeadModel(config).train()  # tied input and output embeddings
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "labels": ids}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    fast = remat.optimize(model, batch, optimizer=opt)
    assert fast.plan.checkpoints and fast.plan.optimizer == "AdamW"
    assert measure_step(fast, batch, optimizer=opt).peak_bytes == fast.plan.predicted_peak_bytes
    assert not opt.state  # planning never stepped it

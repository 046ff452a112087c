"""remat.remake_cheap: exact gradients, buffers and random draws; fewer bytes kept; remade plans."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import remat
from grad_helpers import assert_grads_equal, step_grads
from remat import measure_step
from remat.tools import models
from remat.execute.remake import costly_calls, remake_cheap
import remat.planner.remade as remade_search
from remat.planner.families import front as chain_front
from remat.planner.profiled import ProfiledModel
from remat.planner.remade import costly_calls_of, costly_worth, remade_costly, simulate_remade


class Remade(nn.Module):
    """``module`` run under :func:`remake_cheap`."""

    def __init__(self, module: nn.Module, max_depth: int = 16, costly: tuple[int, ...] = ()):
        super().__init__()
        self.module = module
        self.max_depth = max_depth
        self.costly = costly

    def forward(self, *args):
        with remake_cheap(self.max_depth, self.costly):
            return self.module(*args)


def remade_grads(module: nn.Module, inputs: tuple, **kwargs) -> dict:
    """:func:`step_grads` of ``module`` under :func:`remake_cheap`, by the module's own names."""
    grads = step_grads(Remade(module), inputs, **kwargs)
    return {name.removeprefix("module."): g for name, g in grads.items()}


SPECS = [
    ("torchvision:resnet18", 2, (3, 32, 32)),  # BatchNorm, in-place ReLU and add
    ("torchvision:densenet121", 2, (3, 32, 32)),  # concatenations of earlier features
    ("torchvision:mobilenet_v3_small", 2, (3, 32, 32)),  # hardswish, squeeze-excitation, dropout
    ("hf:gpt2?n_layer=2&seq=32&n_embd=64&n_head=2", 2, None),  # dropout (random draws replayed)
    ("remat:preact_resnet?depth=11", 2, None),
]


@pytest.mark.parametrize("spec,batch,shape", SPECS, ids=[s for s, _, _ in SPECS])
def test_gradients_buffers_and_random_state_are_a_plain_steps(spec, batch, shape):
    source = models.load(spec, batch, input_shape=shape)
    plain, remade = source.model, copy.deepcopy(source.model)
    expected = step_grads(plain, source.example_inputs, seed=3)
    after_plain = torch.get_rng_state()
    actual = remade_grads(remade, source.example_inputs, seed=3)
    assert torch.equal(torch.get_rng_state(), after_plain)  # replayed draws leave the generator as it was
    assert_grads_equal(expected, actual)
    for (name, a), b in zip(plain.state_dict().items(), remade.state_dict().values()):
        assert torch.equal(a, b), f"buffer {name} moved differently"


def test_under_autocast_gradients_are_a_plain_steps():
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 8))
    x = torch.randn(16, 32)

    def loss(out):
        return out.float().pow(2).mean()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_grads_equal(step_grads(net, (x,), loss_fn=loss), remade_grads(net, (x,), loss_fn=loss))


class _ChangesKeptInPlace(nn.Module):
    """A kept value (a Linear's output) is changed in place after a cheap value made from it was saved."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        c = self.a(x)
        y = c * 2  # cheap, saved by self.b as a recipe that reads c
        z = self.b(y)
        c.add_(1)  # the recipe holds y from now on
        return z + c


def test_an_in_place_change_of_what_a_recipe_reads_keeps_the_value_first():
    net = _ChangesKeptInPlace()
    x = torch.randn(4, 8)
    assert_grads_equal(step_grads(net, (x,)), remade_grads(net, (x,)))


class _ChangesHeldValueInPlace(nn.Module):
    """Like :class:`_ChangesKeptInPlace`, and then the value held for a recipe changes in place too."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        c = self.a(x)
        y = c * 2
        z = self.b(y * 3)  # saves y * 3: a recipe reading y's, which reads c
        c.add_(1)  # y's recipe holds y
        y.add_(1)  # ... which changes: y * 3 cannot be made again (plain autograd saved neither)
        return z + c + y


def test_a_value_that_cannot_be_remade_raises_and_the_planner_goes_without():
    net, x = _ChangesHeldValueInPlace(), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="changed in place"):
        remade_grads(net, (x,))
    step_grads(net, (x,))  # a plain step is fine
    with pytest.warns(UserWarning, match="planning without remade values"):
        plan = remat.plan(net, x)
    assert not plan.remake


def test_a_cheap_value_between_two_matmuls_is_remade_not_kept():
    """Linear -> GELU -> Linear keeps the GELU's input and its output; remade, only the input."""
    batch, width = 512, 64
    net = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
    x = torch.randn(batch, width)
    plain = measure_step(net, (x,), fake=True)
    remade = measure_step(Remade(net), (x,), fake=True)
    assert plain.peak_bytes - remade.peak_bytes == batch * width * 4
    assert remade.forward_flops + remade.backward_flops == plain.forward_flops + plain.backward_flops


def test_recipes_never_keep_more_than_the_value_they_replace():
    """A reduction's output is smaller than its input: it is kept, and its input is not."""
    net = nn.Sequential(nn.Linear(64, 256), nn.Unflatten(1, (4, 64)))

    class SumThenLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.last = net, nn.Linear(64, 8)

        def forward(self, x):
            return self.last(self.first(x).sum(1))

    model = SumThenLinear()
    x = torch.randn(256, 64)
    assert measure_step(Remade(model), (x,), fake=True).peak_bytes <= measure_step(model, (x,), fake=True).peak_bytes


def test_fake_and_real_steps_agree():
    source = models.load("torchvision:resnet18", 4, input_shape=(3, 32, 32))
    module = Remade(source.model)
    fake = measure_step(module, source.example_inputs, fake=True)
    real = measure_step(module, source.example_inputs, fake=False)
    assert (fake.peak_bytes, fake.activation_peak_bytes) == (real.peak_bytes, real.activation_peak_bytes)
    plain = measure_step(source.model, source.example_inputs, fake=True)
    assert fake.activation_peak_bytes < 0.7 * plain.activation_peak_bytes


def test_depth_limits_the_chain_of_remakes():
    source = models.load("torchvision:resnet18", 4, input_shape=(3, 32, 32))
    peaks = [
        measure_step(Remade(source.model, depth), source.example_inputs, fake=True).activation_peak_bytes
        for depth in (1, 2, 16)
    ]
    assert peaks[0] > peaks[1] > peaks[2]
    with pytest.raises(ValueError, match="max_depth"):
        with remake_cheap(0):
            pass


def test_a_remade_costly_call_starts_the_depth_again():
    # Two cheap operators before a widening matmul: at max_depth 2 its output is three deep,
    # but a remade costly call holds what it remade, so the count starts again there.
    torch.manual_seed(0)
    net = nn.Sequential(nn.ReLU(), nn.GELU(), nn.Linear(64, 1024), nn.GELU(), nn.Linear(1024, 64))
    x = torch.randn(256, 64)
    steps = [measure_step(Remade(net, max_depth=2, costly=costly), (x,), fake=True) for costly in ((), (0,))]
    kept, remade = (step.timeline[step.forward_ops - 1][1] for step in steps)  # live when the forward ends
    assert kept - remade == 256 * 1024 * 4  # the matmul's output (the GELU's input) is not kept
    grads = step_grads(Remade(net, max_depth=2, costly=(0,)), (x,))
    assert_grads_equal(step_grads(net, (x,)), {n.removeprefix("module."): g for n, g in grads.items()})


def test_chains_through_remade_costly_calls_are_bounded():
    # Every matmul remade: without a bound, remaking the last value would recurse through all 300.
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(16, 16) for _ in range(300)])
    x = torch.randn(64, 16)
    grads = step_grads(Remade(net, max_depth=2, costly=range(300)), (x,))
    assert_grads_equal(step_grads(net, (x,)), {n.removeprefix("module."): g for n, g in grads.items()})


# The planner: remade plans are simulated steps, chosen where they beat the chain's plans.

RESNET = ("remat:preact_resnet?depth=20", 32, None)


def test_remade_values_meet_without_recompute_a_budget_below_every_plain_plan_without_recompute():
    source = models.load(*RESNET[:2], input_shape=RESNET[2])
    model, x = source.model, source.example_inputs
    without = remat.pareto(model, x, remake=False)[0]
    remade = remat.pareto(model, x)[0]
    assert remade.remake and remade.recompute_flops == 0
    assert remade.predicted_peak_bytes < without.predicted_peak_bytes
    budget = (remade.predicted_peak_bytes + without.predicted_peak_bytes) // 2
    chain_only = remat.plan(model, x, budget=budget, remake=False)
    assert chain_only.recompute_flops > 0
    # The planner weighs the remade plan against the others by predicted time.
    chosen = remat.plan(model, x, budget=budget)
    assert chosen.predicted_peak_bytes <= budget and chosen.predicted_seconds <= remade.predicted_seconds
    module = remat.optimize(model, x, plan=remade)
    step, plain = measure_step(module, x, fake=True), measure_step(model, x, fake=True)
    assert step.peak_bytes == module.plan.predicted_peak_bytes <= budget
    assert step.forward_flops + step.backward_flops == plain.forward_flops + plain.backward_flops
    assert_grads_equal(step_grads(model, x), step_grads(module, x))


def test_remade_plans_round_trip_and_rebuild_from_a_saved_plan(tmp_path):
    source = models.load(*RESNET[:2], input_shape=RESNET[2])
    model, x = source.model, source.example_inputs
    plan = remat.pareto(model, x)[0]
    assert plan.remake and "remade" in plan.summary()
    plan.save(tmp_path / "plan.json")
    loaded = remat.Plan.load(tmp_path / "plan.json")
    assert loaded == plan
    module = remat.optimize(model, x, plan=loaded)
    assert module.remake
    assert measure_step(module, x, fake=True).peak_bytes == plan.predicted_peak_bytes


def test_the_pareto_front_with_remade_plans_is_a_front():
    source = models.load(*RESNET[:2], input_shape=RESNET[2])
    front = remat.pareto(source.model, source.example_inputs)
    peaks = [p.predicted_peak_bytes for p in front]
    flops = [p.recompute_flops for p in front]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    assert any(p.remake for p in front)


def test_remake_false_plans_as_before():
    net = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    x = torch.randn(128, 64)
    assert not remat.plan(net, x, remake=False).remake
    assert not any(p.remake for p in remat.pareto(net, x, remake=False))


def _wide_mlp(blocks: int = 3, width: int = 64, hidden: int = 1024) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [m for _ in range(blocks) for m in (nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))]
    return nn.Sequential(*layers)


def test_costly_calls_remade_too_cost_their_flops_and_keep_gradients_exact():
    net, x = _wide_mlp(), torch.randn(256, 64)
    calls = costly_calls(lambda: net(x))
    assert [c.index for c in calls] == list(range(6))
    widening = [c for c in calls if c.output_bytes > c.input_bytes]
    assert [c.index for c in widening] == [0, 2, 4]  # the 64 -> 1024 matmuls

    plain = measure_step(Remade(net), (x,), fake=True)
    costly = measure_step(Remade(net, costly=(0, 2)), (x,), fake=True)
    extra = costly.forward_flops + costly.backward_flops - plain.forward_flops - plain.backward_flops
    assert extra > 0 and extra % (calls[0].flops + calls[2].flops) == 0  # each remake recomputes them
    assert costly.peak_bytes < plain.peak_bytes
    grads = step_grads(Remade(net, costly=(0, 2, 4)), (x,))
    assert_grads_equal(step_grads(net, (x,)), {n.removeprefix("module."): g for n, g in grads.items()})


def test_a_budget_below_the_remade_plan_takes_the_plan_that_recomputes_least():
    """Remade matmul outputs compete with recomputed segments (here, with early stop, segments
    that end at the 1024 -> 64 matmuls, which their recompute skips, recompute least)."""
    net, x = _wide_mlp(), torch.randn(256, 64)
    first = remat.pareto(net, x)[0]
    assert first.remake and first.recompute_flops == 0
    budget = first.predicted_peak_bytes - 256 * 1024 * 4  # one hidden activation less
    without = remat.plan(net, x, budget=budget, remake=False)
    module = remat.optimize(net, x, budget=budget)
    plan = module.plan
    step = measure_step(module, (x,), fake=True)
    # (the chain's figure is 256 bytes above the measured peak on this plan, with or without early stop)
    assert step.peak_bytes <= plan.predicted_peak_bytes <= min(budget, step.peak_bytes + 256)
    assert plan.recompute_flops <= without.recompute_flops
    baseline = measure_step(net, (x,), fake=True)
    total = lambda m: m.forward_flops + m.backward_flops  # noqa: E731
    assert total(step) - total(baseline) == plan.recompute_flops
    assert_grads_equal(step_grads(net, (x,)), step_grads(module, (x,)))
    assert remat.Plan.from_json(plan.to_json()) == plan


def test_the_search_for_costly_remakes_takes_the_fewest_that_fit():
    net, x = _wide_mlp(), torch.randn(256, 64)
    profiled = ProfiledModel.of(net, x, None)
    first = simulate_remade(profiled, profiled.to_plan(chain_front(profiled)[0], 0.0, None))
    one_less = first.predicted_peak_bytes - 256 * 1024 * 4  # one hidden activation fewer
    plan = remade_costly(profiled, [first], one_less)
    assert plan is not None and len(plan.remade_costly) == 1 and plan.predicted_peak_bytes <= one_less
    module = remat.optimize(net, x, plan=plan)
    assert measure_step(module, (x,), fake=True).peak_bytes == plan.predicted_peak_bytes
    assert remade_costly(profiled, [first], first.predicted_peak_bytes // 4) is None  # nothing gets that low


def test_the_search_for_costly_remakes_along_the_front_fits_and_never_loses_to_the_first_plan():
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(64, 256), nn.GELU(), nn.MaxPool1d(2), nn.Linear(128, 64))])
    x = torch.randn(4096, 64)
    profiled = ProfiledModel.of(net, x, None)
    front = [profiled.to_plan(s, 0.0, None) for s in chain_front(profiled)]
    # Everything fits: the bisection stops at one call, which a trade then gives up.
    assert remade_costly(profiled, front[:1], 1 << 40).remade_costly == ()
    plain = simulate_remade(profiled, front[0]).predicted_peak_bytes
    found = []
    for budget in range(plain - (1 << 20), plain // 2, -(plain // 8)):
        first, along = remade_costly(profiled, front[:1], budget), remade_costly(profiled, front, budget)
        assert along is not None or first is None
        if along is not None:
            assert along.predicted_peak_bytes <= budget and along.remade_costly
            assert first is None or along.recompute_flops <= first.recompute_flops
            found.append(along)
    assert len(found) >= 2
    assert measure_step(remat.optimize(net, x, plan=found[-1]), (x,), fake=True).peak_bytes == found[-1].predicted_peak_bytes


def test_trades_of_remade_calls_land_the_mix_closer_to_the_budget(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(64, 256), nn.GELU(), nn.MaxPool1d(2), nn.Linear(128, 64))])
    x = torch.randn(4096, 64)
    profiled = ProfiledModel.of(net, x, None)
    front = [profiled.to_plan(s, 0.0, None) for s in chain_front(profiled)]
    budget = simulate_remade(profiled, front[0]).predicted_peak_bytes - (1 << 20)
    traded = remade_costly(profiled, front, budget)
    monkeypatch.setattr(remade_search, "MAX_TRADES", 0)
    ranked = remade_costly(profiled, front, budget)
    # Ranked by bytes saved per FLOP, the wide matmul goes first; trades may swap it for a
    # narrow one, half its FLOPs, that saves the mebibyte the budget needs (with early stop,
    # the front's plans recompute less, and the ranked mix is already as cheap here).
    assert traded.recompute_flops <= ranked.recompute_flops
    assert traded.predicted_peak_bytes <= budget
    assert measure_step(remat.optimize(net, x, plan=traded), (x,), fake=True).peak_bytes == traded.predicted_peak_bytes


class _Attention(nn.Module):
    """Self-attention on ``scaled_dot_product_attention``, then an MLP; both residual."""

    def __init__(self, width: int = 64, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, tokens, width))
        return x + self.mlp(x)


def test_attention_is_remade_though_it_reads_more_than_it_writes():
    torch.manual_seed(0)
    net, x = _Attention(), torch.randn(8, 16, 64)
    calls = costly_calls(lambda: net(x))
    attention = next(c for c in calls if "attention" in c.name)
    assert attention.output_bytes < attention.input_bytes
    plain = measure_step(Remade(net), (x,), fake=True)
    remade = measure_step(Remade(net, costly=(attention.index,)), (x,), fake=True)
    extra = remade.forward_flops + remade.backward_flops - plain.forward_flops - plain.backward_flops
    assert extra == attention.flops  # made again once, for the backward of the projection after it
    assert remade.peak_bytes < plain.peak_bytes
    grads = step_grads(Remade(net, costly=(attention.index,)), (x,))
    assert_grads_equal(step_grads(net, (x,)), {n.removeprefix("module."): g for n, g in grads.items()})


class _SplitHeads(nn.Module):
    """One matmul's output split in three and copied apart (GPT-2's query, key and value)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (part.contiguous() for part in self.qkv(x).split(self.width, dim=-1))
        return self.out(q * k * v)


def test_copies_of_a_remade_matmuls_output_are_remade_with_it():
    # Each copy is a third of the matmul's output, so it is kept while the output is: remade,
    # the output holds only the matmul's input, and the copies are made again from it.
    torch.manual_seed(0)
    net, x = nn.Sequential(*[_SplitHeads() for _ in range(6)]), torch.randn(1024, 32)
    matmuls = [c for c in costly_calls(lambda: net(x)) if c.output_bytes > c.input_bytes]
    costly = tuple(c.index for c in matmuls)
    plain = measure_step(Remade(net), (x,), fake=True)
    remade = measure_step(Remade(net, costly=costly), (x,), fake=True)
    copies = 3 * 1024 * 32 * 4
    assert remade.peak_bytes <= plain.peak_bytes - 4 * copies  # five blocks' copies dropped, less what one remakes
    extra = remade.forward_flops + remade.backward_flops - plain.forward_flops - plain.backward_flops
    assert extra == sum(c.flops for c in matmuls)  # each matmul once, for all three copies
    grads = step_grads(Remade(net, costly=costly), (x,))
    assert_grads_equal(step_grads(net, (x,)), {n.removeprefix("module."): g for n, g in grads.items()})


def test_costly_calls_are_remade_in_the_order_of_what_they_save_per_flop():
    torch.manual_seed(0)
    net, x = nn.Sequential(*[_Attention() for _ in range(3)]), torch.randn(8, 16, 64)
    profiled = ProfiledModel.of(net, x, None)
    first = profiled.to_plan(chain_front(profiled)[0], 0.0, None)
    calls = costly_calls_of(profiled, first)
    worth = costly_worth(profiled, first, calls)
    kind = {name: next(c.kind for c in calls if name in c.name) for name in ("attention", "addmm")}
    assert worth[kind["attention"]] > worth[kind["addmm"]] > 0  # attention: few FLOPs for its output
    plain = simulate_remade(profiled, first)
    budget = plain.predicted_peak_bytes - 1
    plan = remade_costly(profiled, [first], budget)
    assert plan is not None and plan.predicted_peak_bytes <= budget
    remade = [c for c in calls if c.index in plan.remade_costly]
    assert remade and all("attention" in c.name for c in remade)


def test_no_remade_plan_is_simulated_where_none_can_be_predicted_faster():
    """Every remade plan runs at least the model's step with its forward under the recorder: the
    bound holds for remade plans of the front, and where a fitting chain plan is predicted
    faster than it, that plan is chosen without a simulated step."""
    import dataclasses

    from remat.chain.time import Work
    from remat.planner.choose import solve

    source = models.load("remat:mlp?depth=8&width=256", 512)
    least = remat.plan(source.model, source.example_inputs, remake=False)
    budget = least.predicted_peak_bytes  # the chain plan recomputes; cheaper plans of the front may fit remade
    profiled = ProfiledModel.of(source.model, source.example_inputs, None)
    solve(profiled, budget)
    assert profiled.simulated  # the chain's plan recomputes: remade plans are searched
    bound = profiled.speed.seconds(profiled.baseline.work + Work(recorded_ops=profiled.baseline.forward_ops))
    for solution in chain_front(profiled)[:3]:
        remade = simulate_remade(profiled, profiled.to_plan(solution, 0.0, budget))
        assert remade.predicted_seconds >= bound
    # With a recorder this slow, no remade plan can win: none is simulated.
    slow = ProfiledModel.of(source.model, source.example_inputs, None)
    slow.__dict__["speed"] = dataclasses.replace(profiled.speed, seconds_per_recorded_op=1.0)
    chosen = solve(slow, budget)
    assert not chosen.remake and not slow.simulated
    assert chosen.predicted_peak_bytes <= budget


@pytest.mark.parametrize(
    "spec, batch, shape, flops_slower",
    [
        ("remat:mlp?depth=8&width=256", 512, None, 1),
        ("remat:preact_resnet?depth=20", 32, (3, 32, 32), 1),
        ("remat:preact_resnet?depth=20", 32, (3, 32, 32), 1000),
    ],
)
def test_the_remade_search_priced_before_it_simulates_loses_little_to_the_whole_search(spec, batch, shape, flops_slower):
    """With the time objective the remade search skips what it prices slower than the fastest
    plan without remade values (estimates, see planner.remade): it simulates no more steps,
    and its plan is predicted at most 1% slower than the one the whole search finds. On a
    device where FLOPs cost 1000 times more, remade plans (fewer FLOPs) win, and are found."""
    import dataclasses
    import math

    from remat.planner.families import solve_chain

    source = models.load(spec, batch, input_shape=shape)
    least = remat.plan(source.model, source.example_inputs, remake=False)
    remade_won = False
    for share in (0.1, 0.6):
        budget = int(least.predicted_peak_bytes + share * (least.baseline_peak_bytes - least.predicted_peak_bytes))
        runs = {}
        for name, to_beat in (("priced", None), ("whole", math.inf)):
            profiled = ProfiledModel.of(source.model, source.example_inputs, None)
            speed = profiled.speed
            profiled.__dict__["speed"] = dataclasses.replace(speed, flops_per_second=speed.flops_per_second / flops_slower)
            chosen = solve_chain(profiled, budget, False, "flops")
            plan = remade_search.best_remade(profiled, chosen, budget, "time", to_beat=to_beat)
            assert plan.predicted_peak_bytes <= budget
            runs[name] = plan, len(profiled.simulated)
        (priced, priced_steps), (whole, whole_steps) = runs["priced"], runs["whole"]
        assert priced_steps <= whole_steps
        assert priced.predicted_seconds <= 1.01 * whole.predicted_seconds
        remade_won |= priced.remake
    if flops_slower > 1:
        assert remade_won

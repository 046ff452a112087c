"""Profile a captured model: its pieces grouped into chain stages and measured (:mod:`remat.profile.stages`)."""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from remat.capture.captured import Captured, capture
from remat.capture.graph import structure_key
from remat.chain.model import Chain
from remat.execute.engine import run_selective
from remat.execute.recompute import batch_norms
from remat.execute.module import RematModule
from remat.measure.step import step_model
from remat.measure.tracker import round_to_of, track_memory, unique_storage_bytes
from remat.profile.stages import BackwardSkipsStage, LossReadsHeldOutputs, profile_selectively, profile_stages
from remat.validate import check_choice

__all__ = ["CUT_MODES", "Profile", "capture_and_profile", "profile_model"]

Profile = Literal["fake", "device"]


def capture_and_profile(
    model: nn.Module, inputs: tuple, loss_fn, profile: Profile, carried: bool
) -> tuple[Captured, Chain, list[list[int]], Profile, str]:
    """Capture and profile ``model``: the captured pieces, the chain, the pieces of each chain
    stage, the profile mode used and the cut mode used (:data:`CUT_MODES`).

    ``carried``: cut inside blocks too (several tensors live across a cut).
    Offloaded plans use single-tensor cuts only: the offload cost model moves
    each segment's one input tensor to the host.
    """
    cuts = "carried" if carried else "single"
    while True:
        captured = capture(model, inputs, **CUT_MODES[cuts])
        if captured.opaque:
            # Untraced code may branch on values, which fake tensors do not have: measure
            # on the real ones; the plan is exact for the branches the example inputs take.
            profile = "device"
        try:
            chain, stage_pieces, _ = profile_model(model, captured, inputs, loss_fn, profile)
            return captured, chain, stage_pieces, profile, cuts
        except LossReadsHeldOutputs:
            cuts = "carried-unheld"
        except BackwardSkipsStage:
            if cuts == "single":
                raise
            # A branch the loss ignores: cut only where a single tensor is live,
            # so that branch stays inside a stage whose profile sees it.
            cuts = "single"


#: Cut modes (``Plan.cuts``) as :func:`remat.capture.captured.capture`'s options: ``carried``
#: cuts inside blocks too and at values the model returns that later stages read (caller-held
#: boundaries); ``carried-unheld`` not at those (where the loss reads several outputs);
#: ``single`` only where one tensor is live.
CUT_MODES = {
    "carried": dict(carried=True, held=True),
    "carried-unheld": dict(carried=True, held=False),
    "single": dict(carried=False, held=False),
}


def profile_model(
    model: nn.Module,
    captured: Captured,
    inputs: tuple,
    loss_fn,
    profile: Profile = "fake",
    selective_stages: list[list[int]] | None = None,
) -> tuple[Chain, list[list[int]], frozenset[int]]:
    """The chain of ``captured``'s pieces (plus the loss), measured on fake tensors or the
    device, and its grouping of pieces into chain stages.

    With ``selective_stages`` (the pieces of each chain stage, as a first
    profile grouped them), every chain stage is measured run selectively
    instead (:func:`remat.execute.engine.run_selective`, one region per stage), but
    those that cannot run so, whose chain stages (1-based) come back third.
    """
    check_choice("profile", profile, ("fake", "device"))
    host = RematModule(model, captured, ())  # the model's modules and root tensors, same names
    inputs = host.flat_inputs(inputs, {})  # arguments left to their defaults filled in
    with step_model(host, inputs, fake=profile == "fake") as (fake_host, fake_inputs):
        named = dict(fake_host.named_parameters(remove_duplicate=False))  # tied weights by every name
        specs, keys = [], []
        last = len(captured.modules) - 1
        finish = fake_host.structured_output  # the model's output structure
        for index, piece in enumerate(fake_host.captured.modules):

            def run(x, piece=piece, index=index):
                args = ((), fake_host, *x) if index == 0 else (x, fake_host, *fake_inputs)
                return finish(piece(*args)) if index == last else piece(*args)

            used = captured.tensor_names(index, fake_host)
            trainable = [named[k] for k in used if k in named and named[k].requires_grad]
            specs.append((captured.pieces[index].name, run, trainable))
            keys.append(structure_key(piece, fake_host) + ("<last>" if index == last else ""))
        device = next((t.device for t in fake_inputs if isinstance(t, torch.Tensor)), None)
        tensors = [*fake_host.parameters(), *fake_host.buffers(), *fake_inputs]
        base = unique_storage_bytes(tensors, round_to_of(device)) + _cached_casts(fake_host, fake_inputs, device)
        common = dict(base_bytes=base, device=device, exact=profile == "fake")
        if selective_stages is None:
            # A stage measured once for several places hands the next stage stand-in values;
            # untraced code may branch on values, so then every stage runs on the real ones.
            keys = None if captured.opaque else keys
            chain, stage_pieces = profile_stages(specs, fake_inputs, loss_fn, keys=keys, reads=captured.reads, **common)
            return chain, stage_pieces, frozenset()
        selective, stage_keys, reads = _stage_specs(fake_host, specs, keys, selective_stages, captured, True)
        plain, _, _ = _stage_specs(fake_host, specs, keys, selective_stages, captured, False)
        keys = None if captured.opaque else stage_keys
        return profile_selectively(selective, plain, fake_inputs, loss_fn, keys=keys, reads=reads, **common)


def _stage_specs(
    host: RematModule, specs: list, keys: list, stage_pieces: list[list[int]], captured: Captured, selectively: bool
):
    """Specs, keys and reads of the chain stages (``stage_pieces``: each piece after a stage's
    first reads only the one before it, merged views), run selectively or not."""

    def run_stage(pieces: list[int], spec, *leaves):
        x = tree_unflatten(list(leaves), spec)
        for index in pieces:
            x = specs[index][1](x if index == pieces[0] else (x,))
        return x

    def run(x, pieces: list[int], modules: list[nn.Module]):
        # The region's inputs one by one, as the executor passes them: checkpoint keeps
        # tensor arguments through saved-tensor hooks (which the profile sees), and
        # containers of tensors only by reference.
        leaves, spec = tree_flatten(x)
        if not selectively:
            return run_stage(pieces, spec, *leaves)
        return run_selective(functools.partial(run_stage, pieces, spec), batch_norms(modules), *leaves)

    grouped = []
    for pieces in stage_pieces:
        modules = captured.submodules(pieces[0], pieces[-1] + 1, host)
        trainable = list({id(p): p for i in pieces for p in specs[i][2]}.values())
        stage = functools.partial(run, pieces=pieces, modules=modules)
        grouped.append((" + ".join(specs[i][0] for i in pieces), stage, trainable))
    stage_keys = ["|".join(keys[i] for i in pieces) for pieces in stage_pieces]
    stage_of = {index: k for k, pieces in enumerate(stage_pieces) for index in pieces}
    reads = [tuple(stage_of[q] for q in captured.reads[pieces[0]]) for pieces in stage_pieces]
    return grouped, stage_keys, reads


def _cached_casts(host: RematModule, inputs: tuple, device: torch.device | None) -> int:
    """Bytes of the weight copies autocast makes and caches in a forward (0 outside autocast).

    Autocast keeps a parameter's low-precision copy from its first use until
    the autocast block exits, so for a step run in one block they are live to
    its end: counted with the parameters. The forward run here fills the
    cache, so the stage profiles that follow see no cast of their own.
    """
    if device is None or not (torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)):
        return 0
    with torch.no_grad(), track_memory(device, exact=True) as mem:
        host.run_pieces(0, len(host.captured.modules), {}, inputs)
    return mem.current_bytes
